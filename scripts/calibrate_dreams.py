"""Calibrate the dream methods' default step and choose the default method (docs/dream-methods.md).

For each method and step (a fraction of the card's intensity window per iteration), dream from a
healthy liver slice of LiTS 117 at several seed points on the calibration networks (the demo network
and any ``--model`` given; NOT the held-out networks of Testing/Data/heldout) and print, per method
and step: runs reaching p(seed) > 0.5, the median first iteration above 0.5, runs without any
quality flag, and the seconds per run.

    python scripts/calibrate_dreams.py [--model extra.pt ...] [--iterations 150] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DeepDreamAnalysis"))

from DeepDreamAnalysisLib.analysis import run_analysis  # noqa: E402
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig  # noqa: E402
from DeepDreamAnalysisLib.dreaming import intensity_scale  # noqa: E402
from DeepDreamAnalysisLib.lits import demo_case  # noqa: E402
from DeepDreamAnalysisLib.models import load_model  # noqa: E402

METHODS = ("ascent", "robust", "spectral", "robust+spectral", "accentuate", "robust+spectral+accentuate", "adam")
FRACTIONS = (0.005, 0.01, 0.02, 0.04)
OFFSETS = ((0, 0), (8, 0), (-8, 0), (0, 8), (0, -8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    volume, (i, j, k) = demo_case()
    seeds = [(i + di, j + dj, k) for di, dj in OFFSETS]
    models = [str(ROOT / "Resources" / "DemoModel" / "demo_unet.pt")] + args.model
    rows = []
    for path in models:
        model = load_model(path)
        scale = intensity_scale(model.card)
        for method in args.methods.split(","):
            for fraction in (float(f) for f in args.fractions.split(",")):
                reached, firsts, clean, t0 = 0, [], 0, time.perf_counter()
                for seed in seeds:
                    cfg = AnalysisConfig(dream=DreamConfig(iterations=args.iterations, method=method,
                                                           step=fraction * scale, device="cpu"),
                                         features=FeatureConfig(names=()), snapshot_every=args.iterations)
                    result = run_analysis(volume, seed, model, cfg)
                    first = result.first_iteration_above(0.5)
                    reached += first is not None
                    firsts += [first] if first is not None else []
                    clean += first is not None and not result.quality_flags
                row = dict(model=Path(path).stem, method=method, step_fraction=fraction, step=fraction * scale,
                           runs=len(seeds), reached=reached, clean=clean,
                           median_first=statistics.median(firsts) if firsts else None,
                           seconds_per_run=(time.perf_counter() - t0) / len(seeds))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
