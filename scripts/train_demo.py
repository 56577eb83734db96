"""Train the bundled demo network (``make train-demo``): a small 2D MONAI UNet that segments
synthetic hypointense lesions in axial slices of LiTS volume 117.

Data: every axial slice of LiTS 117 with its real tumours inpainted away (DeepDreamAnalysisLib.lits),
plus random round hypointense lesions with soft edges (the paper's section 3.2 synthetic tumours,
DeepDreamAnalysisLib.synthetic.HypointenseLesions), drawn afresh every epoch, and Gaussian noise
(standard deviation up to 30 HU; it makes the network less sensitive to voxel-level noise, so the
dream grows a darker blob rather than only a few adversarial voxels). Slices 38-50 are held
out for validation (slices 35-37 and 51-53 are not used at all). Assumed spacing 1.6 x 1.6 x 3.0 mm.

Writes into ``--out`` (default Resources/DemoModel/): ``demo_unet.pt`` (state dict, loads with
``torch.load(weights_only=True)``), ``demo_unet.card.json`` (model card), ``training_log.json``
(loss and validation Dice per epoch, the demo checks), and ``demo_reference.json`` (features of
the real LiTS 117 tumours, 2D components in every axial slice, for the z-scores). Takes about a minute or two on 2
CPU cores. Deterministic for a given ``--seed`` and thread count.

After training it checks the demo: the tumour probability at the demo seed on the healthy slice
must be below 0.1, and plain gradient ascent on the target logit (X <- X + step * dlogit/dX, X in
HU, on the card's crop around the seed) must raise it above 0.5. The smallest step of a fixed list
that passes 0.5 within 120 of 300 iterations is written into the card (``demo.step``), where
``deepdream-analysis demo`` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import training  # noqa: E402
from DeepDreamAnalysisLib import lits  # noqa: E402
from DeepDreamAnalysisLib.synthetic import HypointenseLesions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEP_CANDIDATES = (30.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 3000.0)
DEMO_ITERATIONS = 300
CROSS_BY = 120
REFERENCE_MIN_VOXELS = 10


def dream_trajectory(model, card, image2d, seed_ij, step, iterations=DEMO_ITERATIONS):
    """Seed probabilities of plain gradient ascent on the target logit, on the card's ROI crop
    around the seed (the same loop as the engine's, without options). Returns a list of floats."""
    roi = card["roi_size"]
    h, w = image2d.shape
    i, j = seed_ij
    j0 = int(np.clip(j - roi[0] // 2, 0, max(0, h - roi[0])))
    i0 = int(np.clip(i - roi[1] // 2, 0, max(0, w - roi[1])))
    crop = image2d[j0 : j0 + roi[0], i0 : i0 + roi[1]]
    sj, si = j - j0, i - i0
    pre = card["preprocessing"]
    lo, hi = pre["min"], pre["max"]
    vmin, vmax = card["intensity_range"]
    x = torch.tensor(np.ascontiguousarray(crop, dtype=np.float32)[None, None], requires_grad=True)
    probs = []
    for it in range(iterations + 1):
        logits = model((x - lo) / (hi - lo))
        probs.append(float(torch.softmax(logits[0, :, sj, si].detach(), 0)[card["target_class"]]))
        if it == iterations:
            break
        (g,) = torch.autograd.grad(logits[0, card["target_class"], sj, si], x)
        with torch.no_grad():
            x += step * g
            x.clamp_(vmin, vmax)
    return probs


def first_above(probs, level=0.5):
    return next((n for n, p in enumerate(probs) if p > level), None)


def real_tumour_reference(out_dir: Path, volume, slices) -> Path | None:
    """Reference statistics (DeepDreamAnalysisLib.reference) of the real LiTS 117 tumours as 2D
    lesions: every connected tumour component of at least ``REFERENCE_MIN_VOXELS`` voxels (about
    26 mm^2; smaller fragments are label noise) of each axial slice in ``slices``, the paper's
    features, assumed spacing."""
    try:
        from DeepDreamAnalysisLib import reference
        from DeepDreamAnalysisLib.config import FeatureConfig
        from DeepDreamAnalysisLib.features import build_feature_set
        from DeepDreamAnalysisLib.volume import Volume
    except ImportError as exc:
        print(f"Reference statistics skipped: {exc}")
        return None

    image, labels = volume
    ks = list(slices)
    img = Volume(image[ks], spacing=lits.ASSUMED_SPACING)
    mask = Volume((labels[ks] == lits.TUMOUR).astype(np.float32), spacing=lits.ASSUMED_SPACING)
    fs = build_feature_set(FeatureConfig(min_mask_voxels=REFERENCE_MIN_VOXELS), spatial_dims=2)
    stats = reference.compute_reference([(img, mask)], fs)
    path = out_dir / "demo_reference.json"
    stats.save(path)
    path.chmod(0o644)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "Resources" / "DemoModel"))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    volume = lits.load_lits117()
    train_k, val_k = training.split_indices(volume[0].shape[0])
    train = training.lits_slices(train_k, "healthy", volume=volume)
    val = training.lits_slices(val_k, "healthy", volume=volume)
    lesions = HypointenseLesions()
    model, card, log = training.train_unet2d(
        train, val, lesions, epochs=args.epochs, seed=args.seed, num_threads=args.threads, noise_hu=30.0,
        name="deepdream-demo-unet2d",
        description=(
            "Teaching/demo network: a small 2D MONAI UNet that segments synthetic round hypointense "
            "lesions in axial slices of one liver CT (LiTS volume 117, tumours inpainted away). "
            "Not for clinical use. See MODEL_CARD.md."
        ),
    )

    demo_volume, seed = lits.demo_case()
    healthy = demo_volume.array[0]
    p0 = dream_trajectory(model, card, healthy, seed[:2], 1.0, iterations=0)[0]
    chosen, trajectory = None, None
    for step in STEP_CANDIDATES:
        probs = dream_trajectory(model, card, healthy, seed[:2], step)
        cross = first_above(probs)
        print(f"demo check: step {step:g}: p(seed) {probs[0]:.4f} -> {probs[-1]:.3f}, passes 0.5 at iteration {cross}")
        if cross is not None and cross <= CROSS_BY:
            chosen, trajectory = step, probs
            break
    # The paper's step is recorded in the training log (above); the card names the default method, whose step is in
    # image units (1% of the window) and needs no per-network choice (docs/dream-methods.md).
    card["dream"] = {"method": "robust+spectral", "iterations": DEMO_ITERATIONS, "snapshot_every": 10}
    log["demo_check"] = {
        "slice_k": demo_volume.origin[2] / lits.ASSUMED_SPACING[2],
        "seed_ijk": list(seed),
        "p_seed_healthy": p0,
        "step": chosen,
        "iterations": DEMO_ITERATIONS,
        "first_iteration_above_0.5": first_above(trajectory) if trajectory else None,
        "p_seed_every_25": [round(p, 4) for p in trajectory[::25]] if trajectory else None,
    }
    paths = training.save_model(model, card, log, out / "demo_unet.pt")
    ref = real_tumour_reference(out, volume, range(volume[0].shape[0]))
    print(f"Validation Dice {log['val_dice']:.3f}; p(seed) on the healthy slice {p0:.4f}; step {chosen}.")
    print("Wrote " + ", ".join(str(p) for p in paths.values()) + (f", {ref}" if ref else ""))
    print(f"Done in {time.perf_counter() - t0:.0f} s.")
    ok = p0 < 0.1 and chosen is not None
    if not ok:
        print("WARNING: the demo check failed (p(seed) must start < 0.1 and pass 0.5 by gradient ascent).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
