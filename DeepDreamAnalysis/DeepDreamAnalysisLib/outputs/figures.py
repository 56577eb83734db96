"""Panel figures drawn once: an Agg canvas, panels placed by margins in inches, PNG bytes.

matplotlib's ``tight_layout`` measures every text of the figure by laying the whole figure out
(twice when given a ``rect``), and leaves a layout engine on the figure that makes ``savefig`` lay
it out once more before the real drawing: three passes for one picture. The tool's figures have a
known number of panels and texts of known font sizes, so their margins are computed instead
(:func:`place_panels`); the one extent that depends on the data, the width of the y tick labels,
is measured from the font without drawing anything (:func:`ytick_label_width`).

Sizes here are in inches (72 points to the inch). Nothing here imports pyplot: each figure has its
own Agg canvas, so drawing never touches a GUI backend or pyplot's global figure list (the Slicer
worker, Ray workers and threads may draw at the same time).
"""

from __future__ import annotations

import functools
import io
import math

__all__ = ["EDGE", "agg_figure", "png_bytes", "text_size", "ytick_label_width", "left_decoration",
           "bottom_decoration", "title_band", "place_panels", "place_suptitle", "suptitle_band", "legend_rows",
           "legend_band", "layout_grid", "wrap_to_width", "title_lines"]

EDGE = 0.15
"""Blank space at the figure's edges and between panels' decorations (tight_layout's default pad,
1.08 x the 10 pt default font, rounded)."""


def agg_figure(width: float, height: float, dpi: float = 100):
    """A matplotlib Figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes, drawn once (the caller writes them, or embeds them, or both)."""
    buf = io.BytesIO()
    if dpi is None:
        fig.savefig(buf, format="png")
    else:
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _points(size) -> float:
    from matplotlib.font_manager import FontProperties

    return float(FontProperties(size=size).get_size_in_points())


def text_size(text: str, fontsize) -> tuple[float, float]:
    """(width, height) in inches of one line of ``text`` at ``fontsize``, as matplotlib lays it out
    (the height is a full line's: ascent and descent), measured from the font without drawing."""
    return (_extent(text, fontsize)[0] if text else 0.0), _extent("lp", fontsize)[1]


def _extent(text: str, fontsize) -> tuple[float, float, float]:
    """(width, height, descent) in inches of ``text`` in the default font at ``fontsize``."""
    import matplotlib as mpl

    font = tuple(str(mpl.rcParams[k]) for k in ("font.family", "font.sans-serif", "font.serif", "font.style",
                                                  "font.weight", "font.stretch", "font.size"))
    return _cached_extent(text, fontsize, font)


@functools.lru_cache(maxsize=4096)
def _cached_extent(text: str, fontsize, font: tuple) -> tuple[float, float, float]:
    """:func:`_extent` for one font setting (tick labels repeat: "0.0", "0.5"... are measured once)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    w, h, d = text_to_path.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return w / 72.0, h / 72.0, d / 72.0


def _visible_ticks(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-10 * max(abs(hi - lo), 1e-300)
    locs = [v for v in axis.get_major_locator()() if lo - tol <= v <= hi + tol]
    return list(axis.get_major_formatter().format_ticks(locs)) if locs else []


def ytick_label_width(ax, fontsize) -> float:
    """Width in inches of the widest y tick label ``ax`` will draw at ``fontsize`` (its limits and
    panel size as they are now: call after the data is plotted and the panels are placed)."""
    return max((text_size(s, fontsize)[0] for s in _visible_ticks(ax.yaxis)), default=0.0)


def left_decoration(tick_width: float, tick_fontsize, ylabel_fontsize=None) -> float:
    """Inches left of a panel taken by its y ticks, their labels (``tick_width`` wide) and an
    optional y label (rotated: as wide as a line of ``ylabel_fontsize`` is high)."""
    import matplotlib as mpl

    ticks = (mpl.rcParams["ytick.major.size"] + mpl.rcParams["ytick.major.pad"]) / 72.0 + tick_width
    if ylabel_fontsize is None:
        return ticks
    return ticks + mpl.rcParams["axes.labelpad"] / 72.0 + text_size("", ylabel_fontsize)[1]


def bottom_decoration(tick_fontsize, xlabel_fontsize=None) -> float:
    """Inches below a panel taken by its x ticks, their labels and an optional x label."""
    import matplotlib as mpl

    ticks = (mpl.rcParams["xtick.major.size"] + mpl.rcParams["xtick.major.pad"]) / 72.0 + text_size("", tick_fontsize)[1]
    if xlabel_fontsize is None:
        return ticks
    return ticks + mpl.rcParams["axes.labelpad"] / 72.0 + text_size("", xlabel_fontsize)[1]


def title_band(title_fontsize) -> float:
    """Inches above a panel taken by its title (``axes.titlepad`` plus a line)."""
    import matplotlib as mpl

    return mpl.rcParams["axes.titlepad"] / 72.0 + text_size("", title_fontsize)[1]


def place_panels(fig, nrow: int, ncol: int, left: float, right: float, bottom: float, top: float,
                 wgap: float, hgap: float) -> None:
    """Place the ``nrow`` x ``ncol`` subplot grid with margins and gaps in inches: ``left`` ...
    ``top`` from the figure's edges to the panels' frames, ``wgap``/``hgap`` between frames. Holds
    for panels added before or after (the grid's parameters are the figure's)."""
    width, height = fig.get_size_inches()
    aw = (width - left - right - (ncol - 1) * wgap) / ncol
    ah = (height - bottom - top - (nrow - 1) * hgap) / nrow
    if aw <= 0 or ah <= 0:
        raise ValueError(f"{nrow}x{ncol} panels do not fit a {width:.3g}x{height:.3g} in figure with these margins")
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wgap / aw if ncol > 1 else 0.0, hspace=hgap / ah if nrow > 1 else 0.0)


def wrap_to_width(text: str, fontsize, width: float) -> str:
    """``text`` broken at spaces into lines no wider than ``width`` inches where it can be."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_size(f"{lines[-1]} {word}", fontsize)[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def place_suptitle(fig, text: str, fontsize, from_top: float = EDGE, **kwargs):
    """The figure's title with its top ``from_top`` inches below the figure's top edge (a fraction
    of the height would leave a tall figure's title inches away from its panels), on more lines
    when one is wider than the figure (:func:`suptitle_band` counts them)."""
    width, height = fig.get_size_inches()
    if text_size(text, fontsize)[0] > width - 2 * EDGE:
        text = wrap_to_width(text, fontsize, width - 2 * EDGE)
    return fig.suptitle(text, fontsize=fontsize, y=1 - from_top / height, va="top", **kwargs)


def suptitle_band(fontsize, from_top: float = EDGE, lines: int = 1) -> float:
    """Inches from the figure's top edge to the bottom of a :func:`place_suptitle` title of ``lines``
    lines (as matplotlib stacks lines: 1.2 times a line's height above its baseline apart)."""
    _, h, d = _extent("lp", fontsize)
    return from_top + h + (max(lines, 1) - 1) * 1.2 * (h - d)


def title_lines(fig) -> int:
    """Lines of the figure's title (0 without one)."""
    if hasattr(fig, "get_suptitle"):  # matplotlib >= 3.8
        text = fig.get_suptitle()
    else:
        text = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    return text.count("\n") + 1 if text else 0


def legend_rows(count: int, ncol: int) -> int:
    """Rows of a legend of ``count`` entries in ``ncol`` columns."""
    return max(1, math.ceil(count / max(ncol, 1)))


def legend_band(rows: int, fontsize) -> float:
    """Inches from the figure's bottom edge to the top of a frameless ``fig.legend(loc="lower
    center")`` of ``rows`` rows at ``fontsize`` (its border pads and row spacing included)."""
    import matplotlib as mpl

    em = _points(fontsize) / 72.0
    pads = mpl.rcParams["legend.borderaxespad"] + 2 * mpl.rcParams["legend.borderpad"]
    spacing = (rows - 1) * mpl.rcParams["legend.labelspacing"]
    return rows * text_size("", fontsize)[1] + (pads + spacing) * em


def layout_grid(fig, axes, nrow: int, ncol: int, *, tick_font, title_font, xlabel_font=None, suptitle_font=None,
                legend_rows: int = 0, legend_font=None) -> None:
    """Place a grid of curve panels without drawing: each panel with a title, x and y tick labels,
    an x label (``xlabel_font``) and, where it has one, a y label; a :func:`place_suptitle` title
    (``suptitle_font``) above and a figure legend of ``legend_rows`` rows below, if any.

    ``axes``: the panels in use, in row-major order (panel ``p`` in column ``p % ncol``). Margins
    and gaps are computed from the font sizes and :data:`EDGE`; the y tick labels are measured
    once the panels' heights are final (their heights decide which ticks are shown), so each
    column gets the room its widest label needs."""
    axes = list(axes)
    edge = EDGE
    title = title_band(title_font)
    top = (suptitle_band(suptitle_font, lines=title_lines(fig)) + edge if suptitle_font else edge) + title
    below = bottom_decoration(tick_font, xlabel_font)
    bottom = edge + below + (legend_band(legend_rows, legend_font) + edge if legend_rows else 0.0)
    # half of an x tick label may stand out past a panel's right edge
    overhang = text_size("00000", tick_font)[0] / 2

    def side(panels: list, measure: bool) -> float:  # what stands left of these panels
        width = max((ytick_label_width(ax, tick_font) for ax in panels), default=0.0) if measure else 0.0
        ylabels = [ax.yaxis.label.get_fontsize() for ax in panels if ax.get_ylabel()]
        return left_decoration(width, tick_font, max(ylabels) if ylabels else None)

    def place(measure: bool) -> None:
        first = axes[::ncol]
        others = [ax for p, ax in enumerate(axes) if p % ncol]
        place_panels(fig, nrow, ncol, left=edge + side(first, measure), right=max(edge, overhang), bottom=bottom,
                     top=top, wgap=overhang + edge + side(others, measure), hgap=below + edge + title)

    place(measure=False)  # the panels' heights are final now, so are the y ticks they will show
    place(measure=True)
