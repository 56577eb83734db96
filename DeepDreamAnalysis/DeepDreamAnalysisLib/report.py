"""Write an analysis result to a folder: curves, metadata, plots, snapshots and an HTML report.

Files (every one written atomically: a temporary name in the same folder, then a rename, so a
reader never sees a half-written file; a failed write leaves no temporary file behind):

- ``curves.csv``: one row per recorded iteration, the columns of ``AnalysisResult.table()``
  (``iteration, objective, probability, mask_voxels``, each feature's raw value, then
  ``<feature>_z`` when normalised). Numbers are written with full precision; a NaN (a feature
  not computed, or undefined because the mask is empty or too small) is written as an **empty
  cell**, which spreadsheets show as blank and ``pandas.read_csv`` reads as NaN.
- ``run.json``: the result's metadata (configuration, model hash, versions, device, random seed,
  timings...) plus ``status``, ``normalised``, ``features``, ``first_iteration_above_0.5``, the
  reference statistics used for each feature, ``final`` (last raw value and z-score of each
  feature), a ``note`` saying the curves are raw values when there is no reference, and
  ``files``, ``quality_flags`` (``[{"code", "message", "iteration", "value"}]``, see
  :mod:`.engine.quality`) and ``trustworthy`` (no flag). NaN is written as ``null``.
- ``curves.png``: the seed probability, then one panel per feature against the iteration: z-scores
  with the normal band [-1, 1] shaded when normalised, raw values with a visible note otherwise.
  A dotted line marks the first iteration where the seed probability passed 0.5.
- ``snapshots/iter_NNNN_image.nii.gz``, ``..._probability.nii.gz``, ``..._mask.nii.gz`` for the
  first, about one third, about two thirds and last recorded snapshots. They are **crop-sized**
  (the loop's region, ``result.crop``), with the input volume's spacing and direction and the
  origin of the crop's first voxel, so they overlay the input volume exactly in any viewer
  (3D Slicer, ITK-SNAP) at a fraction of the size of a full volume. Mask: uint8 (1 inside).
  ``snapshots/`` holds one run's files: they are written into a temporary sibling folder
  (``.snapshots-new-<nonce>-<n>``, logged in ``deepdream.lock`` before it is made, so a rerun
  after a kill removes it, see :mod:`.outputs.leftovers`), then moved into ``snapshots/`` one
  rename each; the earlier run's
  snapshots not written again are deleted at the end, so re-running into the same output folder
  leaves no stale snapshot of an earlier, longer run, and a run that fails part-way leaves the old
  ones. Files the tool did not write (not in ``deepdream-manifest.json``, see :mod:`.outputs`) are
  never replaced or deleted: a write that would replace one raises OutputError.
- ``deepdream-manifest.json``: the files the tool wrote (``"complete": false`` while writing, and
  after an interrupted write).
- ``strip.png``: like the paper's Fig. 3: columns are those iterations; top row the image (the
  seed's axial slice; grey window: the model card's intensity window when it shows the image and
  the dream, else from the data near the seed, see :func:`display_window`; the window is printed
  on top) with the seed marked by a red cross in the first column; middle row the dream change
  (image minus the first snapshot) in its own symmetric window (blue darker, red brighter, with a
  colour bar), so a 10-40 HU dream is visible whatever the grey window; bottom row the network's
  probability (black 0, white 1). Slices are shown as a radiological viewer shows them (patient's
  right on the left, anterior at the top), from the image's direction.
- ``report.html``: self-contained (the PNGs embedded as base64): the note, the quality flags (or a
  line saying none fired), a table of the final values, the snapshot strip, the curves and the metadata.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .atomic import WRITE_GUARD, atomic_path, write_text_atomic
from .errors import OutputError
from .outputs import figures
from .result import AnalysisResult

NO_REFERENCE_NOTE = (
    "No reference statistics were given: the curves are raw feature values, not z-scores. "
    "Give --reference stats.json (deepdream-analysis reference) to normalise them."
)
SNAPSHOT_FORMATS = ("nii.gz", "nii", "nrrd", "mha")
INT_COLUMNS = ("iteration", "mask_voxels")


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check a file can be written there; OutputError otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # unnamed where the system allows it (O_TMPFILE): a kill leaves nothing
            pass
    except OSError as exc:
        raise OutputError(
            f"Cannot write into the output folder {out} ({exc.strerror or exc}). Choose a writable folder."
        ) from None
    return out


# ----------------------------------------------------------------------------- CSV


def _cell(value: float, integer: bool) -> str:
    v = float(value)
    if not math.isfinite(v):
        return "" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return str(int(round(v))) if integer else repr(v)


def curves_csv_text(result: AnalysisResult) -> str:
    """The curves table as CSV text (NaN as an empty cell)."""
    table = result.table()
    cols = list(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    rows = len(result.steps)
    for r in range(rows):
        writer.writerow([_cell(table[c][r], c in INT_COLUMNS) for c in cols])
    return buf.getvalue()


def write_curves_csv(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """Write ``curves.csv`` (see the module docstring) atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, curves_csv_text(result))
    return path


# ----------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def final_values(result: AnalysisResult) -> dict[str, dict[str, float | None]]:
    """For each feature: the last finite raw value (and its iteration) and its z-score."""
    out = {}
    for name in result.feature_names:
        raw = result.column(name)
        z = result.zscores(name)
        finite = np.flatnonzero(np.isfinite(raw))
        if finite.size:
            r = int(finite[-1])
            out[name] = {"iteration": int(result.steps[r].iteration), "value": float(raw[r]),
                         "z": float(z[r]) if np.isfinite(z[r]) else None}
        else:
            out[name] = {"iteration": None, "value": None, "z": None}
    return out


def run_json(result: AnalysisResult, files: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of ``run.json``."""
    data = dict(result.metadata)
    data["status"] = result.status
    data["normalised"] = result.normalised
    data["features"] = list(result.feature_names)
    data["first_iteration_above_0.5"] = result.first_iteration_above(0.5)
    data["iterations_recorded"] = len(result.steps)
    data["crop"] = {"start_kji": list(result.crop.start), "size_kji": list(result.crop.size)}
    if result.normalised:
        ref = result.reference
        data["note"] = data.get("note") or None
        data["reference_stats"] = {
            "source": getattr(ref, "source", None),
            "features": {n: {"mean": ref.mean[n], "std": ref.std[n], "n": ref.n[n]}
                         for n in result.feature_names if n in ref},
            "settings": getattr(ref, "settings", {}),
        }
    else:
        data["note"] = NO_REFERENCE_NOTE
    data["final"] = final_values(result)
    data["quality_flags"] = [f.to_dict() for f in getattr(result, "quality_flags", None) or []]
    data["trustworthy"] = not data["quality_flags"]
    data["csv_nan"] = "empty cell"
    if files is not None:
        data["files"] = files
    return _jsonable(data)


# ----------------------------------------------------------------------------- plots


CURVES_TICK_FONT, CURVES_LABEL_FONT, CURVES_TITLE_FONT, CURVES_SUPTITLE_FONT = 7, 8, 9, 10


def curves_figure(result: AnalysisResult):
    """The curves figure (matplotlib Figure, Agg canvas; no pyplot state touched). The panels are
    placed by margins computed in inches (:mod:`.outputs.figures`), so drawing it once draws it."""
    names = list(result.feature_names)
    panels = 1 + len(names)
    ncols = min(3, panels)
    nrows = int(math.ceil(panels / ncols))
    fig = figures.agg_figure(4.2 * ncols, 2.9 * nrows + 0.6)
    it = result.iterations
    first = result.first_iteration_above(0.5)
    status = "" if result.status == "completed" else f" ({result.status})"
    if result.normalised:
        figures.place_suptitle(fig, f"DeepDream analysis{status}: z-scores against the reference lesions; band = normal "
                               "range [-1, 1]", CURVES_SUPTITLE_FONT)
    else:
        figures.place_suptitle(fig, f"DeepDream analysis{status}: RAW feature values (no reference statistics: not "
                               "normalised)", CURVES_SUPTITLE_FONT, color="#b00000")
    axes = [fig.add_subplot(nrows, ncols, p + 1) for p in range(panels)]
    ax = axes[0]
    ax.plot(it, result.column("probability"), color="black", lw=1.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("probability at the seed", fontsize=CURVES_TITLE_FONT)
    for ax, name in zip(axes[1:], names):
        if result.normalised and name in result.reference:
            y = result.zscores(name)
            ax.axhspan(-1, 1, color="#9fd39f", alpha=0.45, lw=0, label="normal range")
            ax.axhline(0, color="#5a9a5a", lw=0.6)
            ax.set_ylabel("z-score", fontsize=CURVES_LABEL_FONT)
        else:
            y = result.column(name)
            ax.set_ylabel("raw value", fontsize=CURVES_LABEL_FONT)
            ax.text(0.02, 0.96, "raw, not normalised", transform=ax.transAxes, fontsize=7, va="top",
                    color="#b00000")
        ok = np.isfinite(y)
        if ok.any():
            ax.plot(it[ok], y[ok], color="#1f5fa8", lw=1.4, marker="." if ok.sum() < 30 else None)
        else:
            ax.text(0.5, 0.5, "no values yet\n(mask empty or too small)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="grey")
        ax.set_title(name, fontsize=CURVES_TITLE_FONT)
    for ax in axes:
        if first is not None:
            ax.axvline(first, color="grey", ls=":", lw=1)
        if it.size > 1:
            ax.set_xlim(it[0], it[-1])
        ax.set_xlabel("iteration", fontsize=CURVES_LABEL_FONT)
        ax.tick_params(labelsize=CURVES_TICK_FONT)
    figures.layout_grid(fig, axes, nrows, ncols, tick_font=CURVES_TICK_FONT, title_font=CURVES_TITLE_FONT,
                        xlabel_font=CURVES_LABEL_FONT, suptitle_font=CURVES_SUPTITLE_FONT)
    return fig


def pick_snapshots(result: AnalysisResult, count: int = 4) -> list:
    """The first, ~1/3, ~2/3 and last snapshots (fewer when fewer were recorded)."""
    snaps = result.snapshots
    if not snaps:
        return []
    idx = sorted({int(round(q * (len(snaps) - 1))) for q in np.linspace(0, 1, count)})
    return [snaps[i] for i in idx]


def seed_in_crop(result: AnalysisResult, seed_ijk=None) -> tuple[int, int, int] | None:
    """The seed as (k, j, i) inside the crop, from ``seed_ijk`` or ``metadata['input']['seed_ijk']``."""
    if seed_ijk is None:
        seed_ijk = (result.metadata.get("input") or {}).get("seed_ijk")
    if seed_ijk is None:
        return None
    i, j, k = (int(v) for v in seed_ijk)
    k0, j0, i0 = result.crop.start
    return (k - k0, j - j0, i - i0)


CARD_WINDOW_MIN_INSIDE = 0.5
"""The card's window is used only when at least this share of the slice lies inside it ..."""
CARD_WINDOW_MIN_CHANGE = 0.1
"""... and the dream changed the image by at least this share of the window's width."""


def display_window(result: AnalysisResult, first_slice: np.ndarray, last_slice: np.ndarray | None = None,
                   focus: tuple[slice, slice] | None = None) -> tuple[float, float]:
    """Grey window (lo, hi) of the strip's image row, in image units.

    The model card's intensity window (what the network sees) when it shows this image and this
    dream: at least :data:`CARD_WINDOW_MIN_INSIDE` of the first slice inside it, and the dream's
    largest change (``last_slice - first_slice``) at least :data:`CARD_WINDOW_MIN_CHANGE` of its
    width (a 20 HU dream in a 350 HU window is a 6% grey step, invisible). Otherwise a window from
    the data: the 1st-99th percentiles of the first and last slices in ``focus`` (the region around
    the seed and the dream), so both the tissue and the dream span the grey range.
    """
    return _display_window(result, first_slice, last_slice, focus)[:2]


def _display_window(result, first_slice, last_slice=None, focus=None) -> tuple[float, float, str]:
    first = np.asarray(first_slice, dtype=float)
    last = first if last_slice is None else np.asarray(last_slice, dtype=float)
    change = float(np.abs(last - first).max()) if first.size else 0.0
    pre = (((result.metadata.get("model") or {}).get("card") or {}).get("preprocessing") or {})
    try:
        if pre.get("type") == "window" and float(pre["max"]) > float(pre["min"]):
            lo, hi = float(pre["min"]), float(pre["max"])
            inside = float(np.mean((first >= lo) & (first <= hi))) if first.size else 0.0
            if inside >= CARD_WINDOW_MIN_INSIDE and (change == 0 or change >= CARD_WINDOW_MIN_CHANGE * (hi - lo)):
                return lo, hi, "the card's window"
    except (KeyError, TypeError, ValueError):
        pass
    region = (slice(None), slice(None)) if focus is None else focus
    values = np.concatenate([first[region].ravel(), last[region].ravel()]) if first.size else np.zeros(0)
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = float(np.min(values, initial=0.0)) - 1.0, float(np.max(values, initial=0.0)) + 1.0
    return float(lo), float(hi), "from the data (1st-99th percentiles near the seed)"


def display_orientation(direction) -> tuple[bool, bool, bool]:
    """How to show an axial slice ``[j, i]`` as a radiologist does (patient's right on the screen's
    left, anterior at the top, as 3D Slicer's axial view): (transpose, flip_rows, flip_columns) for
    the image's ``direction`` (3x3, columns = the i, j, k axes in LPS; row-major 9 numbers accepted).
    The identity (i toward the patient's left, j toward posterior) needs nothing."""
    d = np.asarray(direction if direction is not None else np.eye(3), dtype=float).reshape(3, 3)
    i_axis, j_axis = d[:, 0], d[:, 1]
    transpose = abs(i_axis[1]) > abs(i_axis[0]) and abs(j_axis[0]) > abs(j_axis[1])
    if transpose:  # i runs front-back, j left-right: show j across the screen
        i_axis, j_axis = j_axis, i_axis
    return transpose, bool(j_axis[1] < 0), bool(i_axis[0] < 0)


def _oriented(slice2d: np.ndarray, orient: tuple[bool, bool, bool]) -> np.ndarray:
    out = np.asarray(slice2d)
    transpose, flip_rows, flip_cols = orient
    if transpose:
        out = out.T
    if flip_rows:
        out = out[::-1, :]
    if flip_cols:
        out = out[:, ::-1]
    return out


def _oriented_point(j: int, i: int, shape: tuple[int, int], orient: tuple[bool, bool, bool]) -> tuple[int, int]:
    """(row, column) on screen of the voxel (j, i) of a slice of ``shape`` [j, i]."""
    transpose, flip_rows, flip_cols = orient
    r, c, nr, nc = (i, j, shape[1], shape[0]) if transpose else (j, i, shape[0], shape[1])
    return (nr - 1 - r if flip_rows else r), (nc - 1 - c if flip_cols else c)


def _focus(mask: np.ndarray, seed_kji, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The region of a slice the data window looks at: the final mask's box grown by its own size
    (at least 8 voxels), or 33 x 33 voxels around the seed; the whole slice when neither is known."""
    idx = np.nonzero(mask)
    if idx[0].size:
        box = [(int(a.min()), int(a.max())) for a in idx]
    elif seed_kji is not None:
        box = [(int(seed_kji[1]), int(seed_kji[1])), (int(seed_kji[2]), int(seed_kji[2]))]
    else:
        return (slice(None), slice(None))
    out = []
    for (lo, hi), n in zip(box, shape):
        grow = max(hi - lo + 1, 8) if idx[0].size else 16
        out.append(slice(max(lo - grow, 0), min(hi + grow + 1, n)))
    return tuple(out)  # type: ignore[return-value]


STRIP_TICK_FONT, STRIP_LABEL_FONT, STRIP_TITLE_FONT, STRIP_SUPTITLE_FONT = 7, 9, 9, 8
STRIP_ROW_LABEL_X = 0.1
"""Inches from the strip's left edge to its row labels."""


def strip_figure(result: AnalysisResult, snaps: list, seed_kji=None):
    """The Fig. 3-like strip at the chosen iterations: the image (top), the dream change
    ``image - start`` with its own symmetric window (middle; blue darker, red brighter) and the
    probability (bottom). The image's window comes from :func:`display_window`; slices are shown
    as in a radiological viewer (:func:`display_orientation`)."""
    n = max(len(snaps), 1)
    fig = figures.agg_figure(2.3 * n + 0.6, 7.3)
    if not snaps:
        fig.text(0.5, 0.5, "no snapshots recorded", ha="center")
        return fig
    k = 0
    if seed_kji is not None and 0 <= seed_kji[0] < snaps[0].image.shape[0]:
        k = int(seed_kji[0])
    orient = display_orientation((result.metadata.get("input") or {}).get("direction"))
    start = np.asarray(snaps[0].image, dtype=float)[k]
    final = np.asarray(snaps[-1].image, dtype=float)[k]
    focus = _focus(np.asarray(snaps[-1].mask)[k], seed_kji, start.shape)
    lo, hi, source = _display_window(result, start, final, focus)
    changes = [np.asarray(s.image, dtype=float)[k] - start for s in snaps]
    span = float(max(np.percentile(np.abs(c), 99.9) for c in changes)) or 1.0
    for c, (snap, change) in enumerate(zip(snaps, changes)):
        top = fig.add_subplot(3, n, c + 1)
        top.imshow(_oriented(np.asarray(snap.image)[k], orient), cmap="gray", vmin=lo, vmax=hi,
                   interpolation="nearest")
        top.set_title(f"iteration {snap.iteration}", fontsize=STRIP_TITLE_FONT)
        if c == 0 and seed_kji is not None:
            row, col = _oriented_point(int(seed_kji[1]), int(seed_kji[2]), start.shape, orient)
            top.plot([col], [row], marker="x", color="red", ms=10, mew=2)
        middle = fig.add_subplot(3, n, n + c + 1)
        shown = middle.imshow(_oriented(change, orient), cmap="RdBu_r", vmin=-span, vmax=span,
                              interpolation="nearest")
        bottom = fig.add_subplot(3, n, 2 * n + c + 1)
        bottom.imshow(_oriented(np.asarray(snap.probability)[k], orient), cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
        for ax in (top, middle, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    figures.place_suptitle(fig, f"image window [{lo:.4g}, {hi:.4g}] ({source}); change window \u00b1{span:.3g}",
                           STRIP_SUPTITLE_FONT)
    _place_strip(fig, n, colorbar_width=0.0)  # the rows' heights are final now, so is the colour bar's
    bar = fig.colorbar(shown, ax=fig.axes[-2], fraction=0.046, pad=0.03)
    bar.ax.tick_params(labelsize=STRIP_TICK_FONT)
    rows = _place_strip(fig, n, colorbar_width=figures.ytick_label_width(bar.ax, STRIP_TICK_FONT))
    x = STRIP_ROW_LABEL_X / fig.get_size_inches()[0]
    for y, label in zip(rows, ("image", "change (dream - start)", "probability")):
        fig.text(x, y, label, rotation=90, fontsize=STRIP_LABEL_FONT, va="center")
    return fig


def _place_strip(fig, ncols: int, colorbar_width: float) -> list[float]:
    """Margins of the strip in inches (the row labels on the left, the colour bar's tick labels,
    ``colorbar_width`` wide, on the right, the title band and the columns' titles on top); returns
    the three rows' vertical centres as fractions of the figure's height."""
    import matplotlib as mpl

    edge = figures.EDGE
    left = STRIP_ROW_LABEL_X + figures.text_size("", STRIP_LABEL_FONT)[1] + edge
    bar = (mpl.rcParams["ytick.major.size"] + mpl.rcParams["ytick.major.pad"]) / 72.0 + colorbar_width
    top = (figures.suptitle_band(STRIP_SUPTITLE_FONT, lines=figures.title_lines(fig)) + edge
           + figures.title_band(STRIP_TITLE_FONT))
    figures.place_panels(fig, 3, ncols, left=left, right=edge + bar, bottom=edge, top=top, wgap=edge, hgap=edge)
    height = fig.get_size_inches()[1]
    row = (height - top - edge - 2 * edge) / 3
    return [1 - (top + r * (row + edge) + row / 2) / height for r in range(3)]


# ----------------------------------------------------------------------------- snapshots


def crop_geometry(volume, crop) -> dict[str, Any]:
    """Spacing, direction and origin (LPS mm) of the crop's first voxel, for crop-sized images."""
    k0, j0, i0 = crop.start
    return {"spacing": tuple(volume.spacing), "direction": np.asarray(volume.direction),
            "origin": tuple(float(v) for v in volume.index_to_physical((i0, j0, k0)))}


def _write_image(array: np.ndarray, geometry: dict, path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(geometry["spacing"])
    img.SetOrigin(geometry["origin"])
    img.SetDirection(tuple(np.asarray(geometry["direction"]).ravel()))
    suffix = "." + path.name.split(".", 1)[1]
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), True)
        except RuntimeError as exc:
            raise OSError(28, f"SimpleITK could not write the image: {str(exc).strip()[:200]}") from None


def write_snapshots(result: AnalysisResult, out_dir: Path, volume, formats: Iterable[str] = ("nii.gz",),
                    snaps: list | None = None, folder: Path | None = None) -> dict[str, Path]:
    """Crop-sized image, probability and mask of the chosen snapshots (see the module docstring).

    Written into ``folder`` (default ``out_dir/snapshots``), beside any files already there.
    """
    formats = tuple(f.lstrip(".") for f in formats)
    bad = [f for f in formats if f not in SNAPSHOT_FORMATS]
    if bad:
        raise OutputError(f"Unknown snapshot format(s) {', '.join(bad)}; use one of {', '.join(SNAPSHOT_FORMATS)}.")
    snaps = pick_snapshots(result) if snaps is None else snaps
    geometry = crop_geometry(volume, result.crop)
    folder = Path(out_dir) / "snapshots" if folder is None else Path(folder)
    paths = {}
    for snap in snaps:
        arrays = {
            "image": np.asarray(snap.image, dtype=np.float32),
            "probability": np.asarray(snap.probability, dtype=np.float32),
            "mask": np.asarray(snap.mask).astype(np.uint8),
        }
        for kind, arr in arrays.items():
            for fmt in formats:
                p = folder / f"iter_{snap.iteration:04d}_{kind}.{fmt}"
                _write_image(arr, geometry, p)
                key = f"{kind}@{snap.iteration}" + ("" if fmt == formats[0] else f".{fmt}")
                paths[key] = p
    return paths


def _staging_folder(out: Path) -> Path:
    """A new empty folder ``out/.snapshots-new-*`` with the usual permissions, logged in the folder's
    lock before it is made (a rerun after a kill removes it, :mod:`.outputs.leftovers`)."""
    from .outputs.lock import staging_path

    try:
        staging = staging_path(out, ".snapshots-new-")
        if staging is None:  # no lock held on out (not reached from write_outputs)
            staging = Path(tempfile.mkdtemp(prefix=".snapshots-new-", dir=out))
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes 0700
        else:
            os.mkdir(staging)  # the usual permissions (0777 less the umask); fails if something is there
    except OSError as exc:
        raise OutputError(f"Cannot write into the output folder {out} ({exc.strerror or exc}). "
                          "Choose a writable folder.") from None
    return staging


# ----------------------------------------------------------------------------- HTML


def quality_section(flags: list[dict]) -> str:
    """The report's "Quality" section: every flag (code, iteration, message), or a line saying none fired."""
    if not flags:
        return ('<h2>Quality</h2><p class="ok" id="quality">No quality flag: the dream passed every check '
                '(docs/quality-flags.md).</p>')
    items = "".join(
        f"<li><b>{html.escape(str(f.get('code')))}</b>"
        + (f" (iteration {f['iteration']})" if f.get("iteration") is not None else "")
        + f": {html.escape(str(f.get('message', '')))}</li>" for f in flags)
    return (f'<h2>Quality</h2><div class="note" id="quality"><p>{len(flags)} quality flag(s): the dream may not be '
            f'trustworthy; read the curves with care (docs/quality-flags.md).</p><ul>{items}</ul></div>')


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def report_html(result: AnalysisResult, run: dict, curves_png: bytes, strip_png: bytes | None) -> str:
    """The self-contained HTML report."""
    final = run.get("final", {})
    ref = run.get("reference_stats", {}).get("features", {}) if result.normalised else {}
    sens = {row["feature"]: row for row in run.get("sensitivity", [])}
    rows = []
    for name in result.feature_names:
        f = final.get(name, {})
        r = ref.get(name, {})
        z = sens.get(name, {})
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_fmt(f.get('value'))}</td><td>{_fmt(f.get('z'))}</td>"
            f"<td>{_fmt(r.get('mean'))}</td><td>{_fmt(r.get('std'))}</td><td>{_fmt(f.get('iteration'))}</td>"
            f"<td>{_fmt(z.get('entered_at'))}</td><td>{'yes' if z.get('overshoot') else ''}</td>"
            f"<td>{_fmt(z.get('score'))}</td></tr>"
        )
    note = run.get("note")
    first = run.get("first_iteration_above_0.5")
    steps = result.steps
    summary = (f"{len(steps)} iterations recorded; probability at the seed {steps[0].probability:.3f} &rarr; "
               f"{steps[-1].probability:.3f}; " if steps else "no iterations recorded; ")
    summary += (f"above 0.5 from iteration {first}." if first is not None else "never above 0.5.")

    def img(data: bytes | None, alt: str) -> str:
        if not data:
            return ""
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'

    meta = html.escape(json.dumps(run, indent=2))
    quality_html = quality_section(run.get("quality_flags") or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DeepDream analysis report</title>
<style>
body{{font-family:sans-serif;margin:2em;max-width:1300px}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} .note{{color:#b00000;font-weight:bold}} .ok{{color:#1a6b1a}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}
</style></head><body>
<h1>DeepDream analysis</h1>
<p>Status: <b>{html.escape(result.status)}</b>. {summary}</p>
{f'<p class="note">{html.escape(note)}</p>' if note else ''}
{quality_html}
<h2>Final values</h2>
<table><tr><th>feature</th><th>final raw value</th><th>z-score</th><th>reference mean</th><th>reference std</th>
<th>at iteration</th><th>entered [-1, 1] at</th><th>overshoot</th><th>sensitivity score</th></tr>
{''.join(rows)}
</table>
<p>Sensitivity: see docs/sensitivity.md (score = mean progress toward the normal range over the run;
1 = the whole way at once).</p>
<h2>The dream</h2>
{img(strip_png, "image and probability at chosen iterations")}
<h2>Curves</h2>
{img(curves_png, "feature curves")}
<h2>Metadata</h2>
<pre>{meta}</pre>
</body></html>
"""


# ----------------------------------------------------------------------------- all outputs


def _json_number(v):
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_outputs(result: AnalysisResult, out_dir: str | os.PathLike, volume,
                  formats: Iterable[str] = ("nii.gz",), seed_ijk=None) -> dict[str, Path]:
    """Write every output of ``result`` into ``out_dir`` (created if needed); returns name -> path.

    ``volume`` is the input :class:`~.volume.Volume` (its spacing, origin and direction give the
    snapshots' geometry). ``formats``: snapshot image formats (``nii.gz``, ``nii``, ``nrrd``,
    ``mha``). ``seed_ijk``: the seed (default ``metadata['input']['seed_ijk']``) for the red cross.
    Keys: ``csv``, ``sensitivity`` (docs/sensitivity.md), ``json``, ``plot``, ``strip``, ``html`` and ``<image|probability|mask>@<iteration>``.
    Raises OutputError when the folder cannot be written (before anything is written).
    """
    formats = tuple(formats)
    bad = [f for f in formats if f.lstrip(".") not in SNAPSHOT_FORMATS]
    if bad:
        raise OutputError(f"Unknown snapshot format(s) {', '.join(bad)}; use one of {', '.join(SNAPSHOT_FORMATS)}.")
    out = check_writable(out_dir)
    from .outputs import FolderLock, ManifestWriter

    with FolderLock(out), ManifestWriter(out) as manifest:  # never replaces a file the tool did not write
        staging = _staging_folder(out)
        try:
            paths = _write_outputs(result, out, volume, formats, seed_ijk, staging)
        finally:
            if staging.exists():  # a failure before the move: the old snapshots/ stays as it was
                shutil.rmtree(staging, ignore_errors=True)
        manifest.finish()  # only now: the previous run's files not written again are deleted
    return paths


def _write_outputs(result: AnalysisResult, out: Path, volume, formats: tuple, seed_ijk,
                   staging: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    paths["csv"] = write_curves_csv(result, out / "curves.csv")

    curves_fig = curves_figure(result)
    curves_png = figures.png_bytes(curves_fig)
    paths["plot"] = out / "curves.png"
    with atomic_path(paths["plot"], suffix=".png") as tmp:
        Path(tmp).write_bytes(curves_png)

    snaps = pick_snapshots(result)
    strip_png = None
    if snaps:
        strip_png = figures.png_bytes(strip_figure(result, snaps, seed_in_crop(result, seed_ijk)))
        paths["strip"] = out / "strip.png"
        with atomic_path(paths["strip"], suffix=".png") as tmp:
            Path(tmp).write_bytes(strip_png)
        written = write_snapshots(result, out, volume, formats, snaps, folder=staging)
        paths.update({k: out / "snapshots" / p.name for k, p in written.items()})

    from .sensitivity import result_sensitivity, write_sensitivity_csv

    sensitivity = [s.to_row() for s in result_sensitivity(result)]
    paths["sensitivity"] = out / "sensitivity.csv"
    write_sensitivity_csv(sensitivity, paths["sensitivity"])

    # every snapshot is written: move them in (old ones not rewritten go in manifest.finish()), then
    # write run.json, which lists them
    WRITE_GUARD.get().move_files(staging, out / "snapshots")
    paths["json"] = out / "run.json"
    paths["html"] = out / "report.html"
    files = {k: os.path.relpath(p, out) for k, p in paths.items()}
    run = run_json(result, files)
    run["sensitivity"] = [{k: _json_number(v) for k, v in row.items()} for row in sensitivity]
    write_text_atomic(paths["json"], json.dumps(run, indent=2, allow_nan=False) + "\n")
    write_text_atomic(paths["html"], report_html(result, run, curves_png, strip_png))
    return paths
