"""The figures' layout (outputs/figures.py): margins computed in inches instead of tight_layout.

Each figure is drawn, then every panel's extent with its title, labels and tick labels
(``get_tightbbox``), the figure's title, row labels and legend must lie inside the figure and
no two of them may overlap: with one panel and with many, with short and with wide tick labels.
"""

import math

import numpy as np
import pytest

from DeepDreamAnalysisLib.outputs import figures
from DeepDreamAnalysisLib.reference import ReferenceStats
from DeepDreamAnalysisLib.report import curves_figure, pick_snapshots, strip_figure, write_outputs
from DeepDreamAnalysisLib.result import AnalysisResult, Crop, Snapshot, Step
from DeepDreamAnalysisLib.studies.compare import Comparison, comparison_figure
from DeepDreamAnalysisLib.studies.tables import pooled_figure

TOL = 0.5  # pixels


def _boxes(fig):
    """(name, bbox in pixels) of every panel (with its decorations) and figure-level text, drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for n, ax in enumerate(fig.axes):
        if ax.get_visible() and ax.axison:
            boxes.append((f"panel {n} {ax.get_title()!r}", ax.get_tightbbox(renderer)))
    texts = list(fig.texts) + [t for t in (fig._suptitle,) if t is not None and t not in fig.texts]
    boxes += [(f"text {t.get_text()!r}", t.get_window_extent(renderer)) for t in texts if t.get_text()]
    boxes += [(f"legend {n}", leg.get_window_extent(renderer)) for n, leg in enumerate(fig.legends)]
    return boxes


def layout_problems(fig) -> list[str]:
    """What lies outside the figure, and which pairs overlap."""
    width, height = fig.bbox.width, fig.bbox.height
    boxes = _boxes(fig)
    problems = [f"{name} outside the figure ({bb.x0:.1f}, {bb.y0:.1f}, {bb.x1:.1f}, {bb.y1:.1f}; figure "
                f"{width:.0f}x{height:.0f})" for name, bb in boxes
                if bb.x0 < -TOL or bb.y0 < -TOL or bb.x1 > width + TOL or bb.y1 > height + TOL]
    for i, (a, p) in enumerate(boxes):
        for b, q in boxes[i + 1:]:
            dx = min(p.x1, q.x1) - max(p.x0, q.x0)
            dy = min(p.y1, q.y1) - max(p.y0, q.y0)
            if dx > TOL and dy > TOL:
                problems.append(f"{a} overlaps {b} by {dx:.1f}x{dy:.1f} px")
    return problems


# ----------------------------------------------------------------------------- results


def _result(features, values, reference=None, iterations=60, status="completed", crop_size=(1, 16, 16), snaps=4):
    """``values(name, it)``: the raw feature value at iteration ``it``."""
    crop = Crop(start=(0, 0, 0), size=crop_size)
    steps, snapshots = [], []
    every = max(1, (iterations - 1) // max(snaps - 1, 1))
    for it in range(iterations):
        p = min(1.0, it / (iterations / 2))
        steps.append(Step(it, objective=-2.0 + 0.1 * it, probability=p, mask_voxels=it,
                          features={f: (math.nan if it < 3 else values(f, it)) for f in features}))
        if snaps and (it % every == 0 or it == iterations - 1) and len(snapshots) < snaps:
            img = np.random.default_rng(it).normal(100.0, 10.0, crop_size).astype(np.float32)
            prob = np.full(crop_size, p, np.float32)
            mask = np.zeros(crop_size, bool)
            mask[:, 4:8, 4:8] = it > 3
            snapshots.append(Snapshot(it, img, prob, mask))
    meta = {"input": {"seed_ijk": [crop_size[2] // 2, crop_size[1] // 2, 0]}}
    return AnalysisResult(steps, snapshots, crop, tuple(features), reference, meta, status)


def _reference(features):
    return ReferenceStats({f: 1.0 for f in features}, {f: 0.5 for f in features}, {f: 10 for f in features},
                          source="ref.json")


WIDE = {  # raw values whose tick labels are wide, or need an offset ("1e6", "+1.234e3") above the panel
    "firstorder_TotalEnergy": lambda it: 2.5e5 + 1e3 * it,
    "firstorder_Minimum": lambda it: -123456.0 + 10 * it,
    "glcm_ClusterShade": lambda it: 1234.5678 + 1e-4 * it,
    "ngtdm_Coarseness": lambda it: 1e-7 * (1 + math.sin(it)),
    "firstorder_Energy": lambda it: 3e8 * (1 + 0.01 * it),
}


def _many(count):
    names = list(WIDE) + [f"glszm_SizeZoneNonUniformityNormalized_{n}" for n in range(count - len(WIDE))]
    return names, (lambda f, it: WIDE[f](it) if f in WIDE else 0.1 * it * (1 + names.index(f)))


# ----------------------------------------------------------------------------- the run's figures


@pytest.mark.parametrize("normalised", [True, False])
def test_curves_with_one_feature(normalised):
    names = ["firstorder_Entropy"]
    res = _result(names, lambda f, it: 1.0 + 0.01 * it, _reference(names) if normalised else None)
    assert layout_problems(curves_figure(res)) == []


def test_curves_with_the_papers_seven_features():
    names = ["firstorder_RootMeanSquared", "firstorder_Entropy", "shape2D_MaximumDiameter", "shape2D_Elongation",
             "shape2D_Sphericity", "glcm_Contrast", "gldm_LargeDependenceEmphasis"]
    res = _result(names, lambda f, it: 1.0 + 0.05 * it * (1 + names.index(f)), _reference(names))
    fig = curves_figure(res)
    assert len(fig.axes) == 8
    assert layout_problems(fig) == []


def test_curves_with_many_features_and_wide_raw_tick_labels():
    names, values = _many(32)
    res = _result(names, values, status="cancelled")
    fig = curves_figure(res)
    assert len(fig.axes) == 33
    assert layout_problems(fig) == []
    # the title stays near the top however tall the figure (not 5% of its height away)
    renderer = fig.canvas.get_renderer()
    assert fig.bbox.height - fig._suptitle.get_window_extent(renderer).y1 < 0.3 * fig.dpi


def test_curves_without_features_wrap_the_title_into_the_narrow_figure():
    fig = curves_figure(_result([], lambda f, it: 0.0, status="cancelled"))
    assert len(fig.axes) == 1 and "\n" in fig._suptitle.get_text()
    assert layout_problems(fig) == []


def test_curves_with_no_values_yet():
    res = _result(["firstorder_Entropy", "glcm_Contrast"], lambda f, it: math.nan, iterations=2, snaps=1)
    assert layout_problems(curves_figure(res)) == []


@pytest.mark.parametrize("snaps,crop", [(1, (1, 16, 16)), (4, (1, 16, 16)), (4, (1, 12, 40)), (3, (9, 24, 24))])
def test_strip(snaps, crop):
    res = _result(["firstorder_Entropy"], lambda f, it: 1.0, crop_size=crop, snaps=snaps)
    fig = strip_figure(res, pick_snapshots(res), (crop[0] // 2, crop[1] // 2, crop[2] // 2))
    assert len(fig.axes) == 3 * len(pick_snapshots(res)) + 1  # and the colour bar
    assert layout_problems(fig) == []


def test_the_layout_check_sees_a_broken_layout():
    names, values = _many(7)
    fig = curves_figure(_result(names, values))
    figures.place_panels(fig, 3, 3, left=0.05, right=0.05, bottom=0.05, top=0.3, wgap=0.05, hgap=0.05)
    problems = layout_problems(fig)
    assert any("outside the figure" in p for p in problems)
    assert any("overlaps" in p for p in problems)


def test_write_outputs_draws_each_figure_once(tmp_path, monkeypatch):
    """No layout engine is left on the figures, so savefig does not lay them out again before drawing;
    report.html embeds the very bytes of curves.png and strip.png."""
    from matplotlib.figure import Figure

    from DeepDreamAnalysisLib.volume import Volume

    draws = []
    real = Figure.draw

    def counting(self, renderer):
        draws.append(self)
        return real(self, renderer)

    monkeypatch.setattr(Figure, "draw", counting)
    monkeypatch.setattr(Figure, "tight_layout", lambda *a, **k: pytest.fail("tight_layout called"))
    names = ["firstorder_Entropy", "glcm_Contrast"]
    res = _result(names, lambda f, it: 1.0 + 0.01 * it, _reference(names))
    paths = write_outputs(res, tmp_path / "out", Volume(np.zeros((1, 16, 16), np.float32)))
    assert len(draws) == 2 and len(set(map(id, draws))) == 2
    html = paths["html"].read_text()
    import base64

    for key in ("plot", "strip"):
        assert base64.b64encode(paths[key].read_bytes()).decode("ascii") in html


# ----------------------------------------------------------------------------- study figures


def _comparison(models, features, normalised, restarts=2, iterations=40):
    its = np.arange(iterations)
    rng = np.random.default_rng(0)
    raw = {m: rng.normal(1e4, 5e3, (restarts, iterations, len(features))) for m in models}
    z = {m: rng.normal(0, 1, (restarts, iterations, len(features))) for m in models} if normalised else None
    base = {m: np.stack([np.zeros((restarts, iterations)), np.linspace(0, 1, iterations)[None].repeat(restarts, 0),
                         np.full((restarts, iterations), 10.0)], axis=-1) for m in models}
    return Comparison(list(models), tuple(features), its, raw, z, base, {m: [] for m in models}, restarts)


@pytest.mark.parametrize("models,features,normalised", [
    (["demo"], ["firstorder_Entropy"], True),
    (["a", "b"], ["firstorder_Entropy", "glcm_Contrast", "shape2D_Elongation"], False),
    ([f"model_{n}" for n in range(8)], [f"feature_{n}" for n in range(11)], True),  # a legend of two rows
])
def test_comparison_figure(models, features, normalised):
    fig = comparison_figure(_comparison(models, features, normalised))
    assert layout_problems(fig) == []


@pytest.mark.parametrize("groups,curves", [(1, 2), (9, 13)])
def test_pooled_figure(groups, curves):
    rows = []
    for c in range(curves):
        name = "probability" if c == 0 else f"glcm_ClusterProminence_{c}"
        for g in range(groups):
            for it in range(0, 50, 5):
                m = 1e5 * (g + 1) + it if c else it / 50
                rows.append({"curve": name, "kind": "z" if c % 2 else "raw", "group": f"group {g}", "method": "paper",
                             "iteration": it, "mean": m, "ci_seed_low": m - 1, "ci_seed_high": m + 1,
                             "ci_training_low": m - 2, "ci_training_high": m + 2})
    fig = pooled_figure(rows, "a study")
    assert layout_problems(fig) == []
