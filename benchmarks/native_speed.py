"""Diagnostic: per-feature-group time of the native (torch) features against pyradiomics.

Not a ratio benchmark (that is ``run_benchmarks.py``'s ``native_vs_pyradiomics``); this prints, for a
2D lesion of radius 20 pixels and 3D lesions of radius 20 and 40 voxels (spheres with a slightly
irregular border, spacing 1 mm, noisy CT-like intensities), the best-of-N wall time per call of each
feature group and of the paper's features, natively and with pyradiomics' feature classes on the
same bounding-box crop. Times are the minimum over repeats (time.perf_counter), in milliseconds.

    python benchmarks/native_speed.py [--repeats 5] [--radii 20,40] [--no-pyradiomics] [--cpu-time]
                                      [--impl auto|torch|numpy]

``--impl`` picks compute_native's implementation (default ``auto``: numpy for bounding boxes of at
most ``native_small.SMALL_BOX_VOXELS`` voxels, torch above; here the 2D case and 3D radii up to ~11).

``--cpu-time`` measures this thread's CPU time (time.thread_time) with torch limited to one thread
in this process: the intrinsic cost, free of the scheduling noise of a shared machine (where torch's
worker threads wait for each other, wall times vary tenfold).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch

from DeepDreamAnalysisLib.config import paper_features
from DeepDreamAnalysisLib.features.native import NATIVE_FEATURES_2D, NATIVE_FEATURES_3D, compute_native


def lesion(radius: int, dims: int, seed: int = 0):
    """(image float32 [k, j, i], mask bool) of a roughly spherical lesion of ``radius`` voxels."""
    rng = np.random.default_rng(seed)
    n = 2 * radius + 7
    shape = (n, n, n) if dims == 3 else (1, n, n)
    zz, yy, xx = np.indices(shape).astype(np.float64)
    c = np.array(shape, dtype=np.float64) / 2.0
    if dims == 2:
        c[0] = 0.0
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    ang = np.arctan2(yy - c[1], xx - c[2])
    mask = r <= radius * (1 + 0.08 * np.sin(3 * ang))
    image = (rng.normal(60.0, 20.0, shape) + 40.0 * mask).astype(np.float32)
    return image, mask


CLOCK = time.perf_counter


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (table caches, allocator)
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return 1000.0 * best


def groups(dims: int) -> dict[str, list[str]]:
    allowed = NATIVE_FEATURES_2D if dims == 2 else NATIVE_FEATURES_3D
    shape = "shape2D_" if dims == 2 else "shape_"
    g: dict[str, list[str]] = {"paper": list(paper_features(dims))}
    for prefix in ("firstorder_", shape, "glcm_", "gldm_", "glrlm_", "glszm_"):
        names = sorted(n for n in allowed if n.startswith(prefix))
        if names:
            g[prefix[:-1]] = names
    for n in paper_features(dims):
        if n.startswith(shape):
            g[n] = [n]
    return g


def pyradiomics_runner(image, mask, names, force2d):
    """A callable computing ``names`` with pyradiomics' feature classes on the bounding-box crop."""
    import SimpleITK as sitk
    from radiomics import firstorder, glcm, gldm, glrlm, glszm, shape, shape2D

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    classes = {"firstorder": firstorder.RadiomicsFirstOrder, "glcm": glcm.RadiomicsGLCM,
               "gldm": gldm.RadiomicsGLDM, "glrlm": glrlm.RadiomicsGLRLM, "glszm": glszm.RadiomicsGLSZM,
               "shape": shape.RadiomicsShape, "shape2D": shape2D.RadiomicsShape2D}
    nz = np.nonzero(mask)
    bb = tuple(slice(a.min(), a.max() + 1) for a in nz)
    im = sitk.GetImageFromArray(np.ascontiguousarray(image[bb]))
    mk = sitk.GetImageFromArray(np.ascontiguousarray(mask[bb]).astype(np.uint8))
    by_class: dict[str, list[str]] = {}
    for n in names:
        cls, feat = n.split("_", 1)
        by_class.setdefault(cls, []).append(feat)

    def run():
        for cls, feats in by_class.items():
            f = classes[cls](im, mk, binWidth=25.0, force2D=force2d, force2Ddimension=0)
            f.disableAllFeatures()
            for feat in feats:
                f.enableFeatureByName(feat)
            f.execute()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--radii", default="20,40", help="3D radii (voxels); the 2D case always uses 20")
    ap.add_argument("--no-pyradiomics", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="one torch thread, thread CPU time")
    ap.add_argument("--impl", choices=("auto", "torch", "numpy"), default="auto",
                    help="compute_native's implementation (default auto)")
    args = ap.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)  # this diagnostic process only
    cases = [(2, 20)] + [(3, int(r)) for r in args.radii.split(",") if r]
    clock = "thread CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {clock}, best of {args.repeats}, "
          f"ms per call; native impl {args.impl}")
    for dims, radius in cases:
        image, mask = lesion(radius, dims)
        force2d = dims == 2
        print(f"\n{dims}D lesion, radius {radius} ({int(mask.sum())} voxels)")
        print(f"  {'group':34s} {'native':>10s} {'pyradiomics':>12s} {'speed-up':>9s}")
        for label, names in groups(dims).items():
            t_nat = _best(lambda: compute_native(image, mask, (1.0, 1.0, 1.0), names, 25.0, force2d,
                                                      impl=args.impl), args.repeats)
            if args.no_pyradiomics:
                print(f"  {label:34s} {t_nat:10.2f}")
                continue
            t_py = _best(pyradiomics_runner(image, mask, names, force2d), max(1, args.repeats // 2))
            print(f"  {label:34s} {t_nat:10.2f} {t_py:12.1f} {t_py / t_nat:8.1f}x")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
