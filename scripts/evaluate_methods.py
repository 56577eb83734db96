"""Evidence for the dream defaults: every dream method on the held-out networks, with no dream settings.

For each held-out network (``Testing/Data/heldout/<name>``, trained by
``scripts/train_heldout_networks.py`` and never used to tune anything), each seed point in its
``seeds.json`` and each method, one analysis runs from the network's lesion-free image with the
method's defaults: no step, no objective, no iterations given (``--method`` is the only setting, and
the row ``(default)`` gives none at all). Recorded per run:

- ``success``: the probability at the seed ends above 0.5;
- ``first_above``: the first iteration at which it was above 0.5 (empty when never);
- ``component_share``: voxels of the mask's component that holds the seed / crop voxels (a compact
  object is a few percent; a dream that merged with false positives is tens of percent);
- ``mask_share``: all mask voxels / crop voxels;
- ``touches_border``: the seed's component reaches the crop's border;
- ``checkerboard``: :func:`DeepDreamAnalysisLib.engine.quality.checkerboard_index` of the last change
  (share of in-plane spectral energy above half Nyquist: white noise gives about 0.75);
- ``flags``: the run's quality flag codes;
- ``s_per_iter``: wall time per iteration on this machine.

A run is a **clean dream** (``good``) when it succeeds, its component is at most 10% of the crop, does
not touch the border, and no quality flag fired (issue #9: "p > 0.5, no quality flag").

Usage::

    nice -n 10 python scripts/evaluate_methods.py [--data Testing/Data/heldout] [--seeds 2] \
        [--methods default paper ascent robust spectral ...] [--out docs/evidence]

Writes ``<out>/heldout_runs.csv`` (one row per run), ``<out>/heldout_summary.md`` (good dreams per
network and method) and ``docs/images/heldout_methods.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.engine.quality import checkerboard_index
from DeepDreamAnalysisLib.mask import seed_component
from DeepDreamAnalysisLib.models import load_model
from DeepDreamAnalysisLib.volume import read_volume

FIELDS = ["network", "method", "seed_ijk", "success", "final_probability", "first_above", "component_share",
          "mask_share", "touches_border", "checkerboard", "flags", "good", "iterations", "s_per_iter"]


def default_methods() -> list[str]:
    """``(default)`` (no setting at all), then every registered component alone, then robust+spectral."""
    try:
        from DeepDreamAnalysisLib.dreaming import list_methods

        names = [m.name for m in list_methods()]
    except ImportError:  # an engine without dream methods
        names = ["paper"]
    extra = ["robust+spectral"] if {"robust", "spectral"} <= set(names) else []
    extra += ["lesion-spectrum+robust"] if {"robust", "lesion-spectrum"} <= set(names) else []
    return ["default"] + names + extra


DEMO = "demo_unet"


def load_case(folder: Path):
    """``(model, volume, seeds (i, j, k))`` of a held-out folder, or of the demo network when ``folder`` is
    :data:`DEMO` (its network and card, the demo's healthy LiTS slice, the demo seed and three points near it)."""
    if str(folder) == DEMO:
        from DeepDreamAnalysisLib.lits import demo_case
        volume, (i, j, k) = demo_case()
        model = load_model(Path(__file__).resolve().parents[1] / "Resources" / "DemoModel" / "demo_unet.pt")
        return model, volume, [[i, j, k], [i - 6, j + 4, k], [i + 5, j - 5, k], [i + 3, j + 7, k]]
    seeds = json.loads((folder / "seeds.json").read_text())["seeds_ijk"]
    return (load_model(folder / "model.pt", card=folder / "model.card.json"), read_volume(folder / "healthy.nii.gz"),
            seeds)


def load_reference(folder: Path):
    """The network's reference statistics (the demo's ``demo_reference.json``, a held-out folder's
    ``reference.json``), or None when it has none."""
    from DeepDreamAnalysisLib.reference import ReferenceStats

    path = (Path(__file__).resolve().parents[1] / "Resources" / "DemoModel" / "demo_reference.json"
            if str(folder) == DEMO else folder / "reference.json")
    return ReferenceStats.load(path) if path.is_file() else None


def needs_reference(method: str) -> bool:
    try:
        from DeepDreamAnalysisLib.dreaming.registry import needs_reference as needs
    except ImportError:
        return False
    return method != "default" and needs(method)


def evaluate_run(folder: Path, seed_ijk, method: str) -> dict:
    model, volume, _ = load_case(folder)
    reference = load_reference(folder) if needs_reference(method) else None
    dream = DreamConfig(device="cpu") if method == "default" else DreamConfig(method=method, device="cpu")
    names = (reference.features[0],) if reference is not None else ("firstorder_Mean",)
    config = AnalysisConfig(dream=dream, features=FeatureConfig(names=names, backend="native"))
    t0 = time.perf_counter()
    result = run_analysis(volume, tuple(seed_ijk), model, config, reference)
    seconds = time.perf_counter() - t0
    last = result.snapshots[-1]
    seed_kji = tuple(int(s) - c for s, c in zip(reversed(seed_ijk), result.crop.start))
    prob = np.asarray(last.probability)
    if prob.ndim == 2:
        prob = prob[None]
    component = seed_component(prob, seed_kji, 0.5)
    crop_voxels = prob.size
    inner = component.copy()
    border = False
    if component.any():
        for axis in range(3):
            if prob.shape[axis] > 1:
                border |= bool(component.take(0, axis).any() or component.take(-1, axis).any())
    first = next((s.iteration for s in result.steps if s.probability > 0.5), None)
    change = np.asarray(last.image, dtype=np.float64) - np.asarray(result.snapshots[0].image, dtype=np.float64)
    flags = sorted({f.code for f in getattr(result, "quality_flags", [])})
    final_p = float(result.steps[-1].probability)
    share = float(inner.sum() / crop_voxels)
    row = {
        "network": Path(folder).name, "method": method, "seed_ijk": " ".join(map(str, seed_ijk)),
        "success": final_p > 0.5, "final_probability": round(final_p, 3),
        "first_above": "" if first is None else first, "component_share": round(share, 4),
        "mask_share": round(float((prob > 0.5).sum() / crop_voxels), 4), "touches_border": border,
        "checkerboard": round(checkerboard_index(change), 3), "flags": " ".join(flags),
        "iterations": len(result.steps), "s_per_iter": round(seconds / max(len(result.steps), 1), 4),
    }
    row["good"] = bool(row["success"] and share <= 0.10 and not border and not flags)
    return row


def summarise(rows: list[dict]) -> str:
    """Markdown: per method and network, runs reaching p > 0.5 / clean dreams / runs, and the mean checkerboard index."""
    networks = list(dict.fromkeys(r["network"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(networks) + " | all (reached / clean) |",
             "|---" * (len(networks) + 2) + "|"]
    for m in methods:
        cells, reached_all, good_all, n_all = [], 0, 0, 0
        for n in networks:
            rs = [r for r in rows if r["method"] == m and r["network"] == n]
            if not rs:
                cells.append("-")
                continue
            reached, good = sum(_true(r["success"]) for r in rs), sum(_true(r["good"]) for r in rs)
            cb = np.nanmean([float(r["checkerboard"]) for r in rs])
            cells.append(f"{reached}/{good}/{len(rs)} (cb {cb:.2f})")
            reached_all, good_all, n_all = reached_all + reached, good_all + good, n_all + len(rs)
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | **{reached_all}/{good_all} of {n_all}** |")
    return "\n".join(lines) + "\n"


def _true(v) -> bool:
    return v is True or str(v) == "True"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(r["network"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    grid = np.array([[np.mean([_true(r["good"]) for r in rows if r["method"] == m and r["network"] == n] or [np.nan])
                      for n in networks] for m in methods])
    fig, ax = plt.subplots(figsize=(2.0 + 1.0 * len(networks), 1.6 + 0.42 * len(methods)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(networks)), networks, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "" if np.isnan(v) else f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title("clean dreams (p > 0.5, compact, no flag)\nwith no dream settings", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="Testing/Data/heldout")
    ap.add_argument("--seeds", type=int, default=2, help="seed points per network (from seeds.json)")
    ap.add_argument("--methods", nargs="*", help="default: (default), every component, robust+spectral")
    ap.add_argument("--networks", nargs="*")
    ap.add_argument("--out", default="docs/evidence")
    ap.add_argument("--figure", default="docs/images/heldout_methods.png")
    ap.add_argument("--summarise", nargs="*", metavar="CSV", help="only merge these runs CSVs into the summary and figure")
    args = ap.parse_args(argv)
    if args.summarise:
        rows = [r for path in args.summarise for r in csv.DictReader(open(path))]
        for r in rows:
            r["good"] = _true(r["success"]) and float(r["component_share"]) <= 0.10 and not _true(r["touches_border"]) \
                and not r["flags"]
        return _write(rows, Path(args.out), Path(args.figure))
    import torch

    torch.set_num_threads(1)
    methods = args.methods or default_methods()
    folders = [Path(DEMO)] + sorted(p for p in Path(args.data).iterdir() if (p / "model.card.json").exists())
    if args.networks:
        folders = [f for f in folders if f.name in args.networks or (f.name == DEMO and "demo" in args.networks)]
    rows = []
    for folder in folders:
        seeds = load_case(folder)[2][: args.seeds]
        for method in methods:
            if needs_reference(method) and load_reference(folder) is None:
                print(f"{folder.name}: {method} skipped (no reference statistics)", flush=True)
                continue
            for seed in seeds:
                row = evaluate_run(folder, seed, method)
                rows.append(row)
                print(", ".join(f"{k}={row[k]}" for k in FIELDS), flush=True)
    return _write(rows, Path(args.out), Path(args.figure))


def _write(rows: list[dict], out: Path, figure: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "heldout_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    (out / "heldout_summary.md").write_text(summarise(rows))
    plot(rows, figure)
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
