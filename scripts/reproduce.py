"""Reproduce the paper's experiments (Couteaux et al. 2019, sections 3.1 and 3.2) on real CT.

    python scripts/reproduce.py --out results/reproduce          # what `make reproduce` runs
    python scripts/reproduce.py --out /tmp/smoke --quick         # a smoke run (minutes; numbers meaningless)

Data: axial slices of LiTS volume 117 (128^3, CC BY-NC-SA 4.0; `make data` fetches it), tumours
inpainted away for the "healthy" slices (DeepDreamAnalysisLib.lits). Assumed spacing 1.6 x 1.6 mm
in-plane, 3.0 mm between slices (not recorded in the files). Slices 38-50 are held out for
validation (35-37 and 51-53 unused), training uses the others (scripts/training.py).

Section 3.1, the controlled experiment (the paper used COCO cats and dogs; here liver CT):
networks G_p, p in {0, 0.2, 0.5, 0.9, 1.0}, learn to segment synthetic low-contrast hypointense
lesions in healthy slices; each training lesion is marked with probability p by a texture of
135-degree line segments with random positions and intensities (synthetic.MarkedLesions). Dice is
measured on the held-out slices with *unmarked* lesions (and, for information, with every lesion
marked). Each network dreams at one seed in the liver of held-out slice 44, from the same white
noise and from the healthy slice. The characteristic feature is measured on the dream in a 31 x 31
voxel window around the seed: ``line135_response`` (the paper's maximum response of a 135-degree
line filter) and ``line135_selectivity`` (its contrast-normalised variant, (E135 - E45)/(E135 + E45),
see features/custom.py); the same two features inside the dreamed mask's bounding box come from the
analysis itself. Claim: the networks that rely on the marking (unmarked Dice below half of G_0's)
show the characteristic feature rising in their dreams, the networks robust to it (Dice within 0.1
of G_0's) do not; checked twice: with the contrast-normalised selectivity (a gain >= 0.15 over the
dream) and with the paper's raw maximum response (every relying network ends above every robust one). The white noise is liver-like (100 +- 20 HU).

Section 3.2: a network trained on the real tumours against one trained on synthetic round
hypointense lesions; a network trained on synthetic elongated lesions against the round one.
All three dream from the healthy slice at the same seed with random restarts
(DeepDreamAnalysisLib.compare; restart noise 10 HU), features normalised against the real tumours
of the held-out slices. Claims: the real-tumour network is more sensitive to low intensity (its
dreams' RMS intensity falls further); the elongated-lesion network is more sensitive to elongation
(its dreams are more elongated, i.e. lower pyradiomics Elongation).

Smaller than the paper: 2D MONAI UNets with 8/16/32 channels, 40 epochs; 600 dream iterations of
the paper's plain update X <- X + 300 * dlogit/dX (HU). Everything is written into --out: tables (CSV and markdown), figures (PNG),
``results.md`` (tables, claims), ``results.json``, the trained networks (``models/``). Runs in about
10 minutes on 2 CPU cores (``--epochs`` and ``--iterations`` trade time for quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import training  # noqa: E402
from DeepDreamAnalysisLib import lits  # noqa: E402
from DeepDreamAnalysisLib.synthetic import HypointenseLesions, MarkedLesions  # noqa: E402

PS = (0.0, 0.2, 0.5, 0.9, 1.0)
WINDOW = 31
"""Side (voxels) of the square window around the seed where the characteristic feature is measured."""
CONTRAST_31 = (15.0, 35.0)
"""Lesion contrast (HU) of section 3.1: subtle next to the marking (lines of +40..+120 HU)."""
FEATURES_31 = ("firstorder_RootMeanSquared", "shape2D_MaximumDiameter", "line135_response", "line135_selectivity")
FEATURES_32 = ("firstorder_RootMeanSquared", "shape2D_MaximumDiameter", "shape2D_Elongation",
               "firstorder_Entropy", "shape2D_Sphericity", "glcm_Contrast")
FIG5 = ("firstorder_RootMeanSquared", "shape2D_MaximumDiameter", "shape2D_Elongation")
NEAR_BASELINE = 0.10
"""A network is robust to the marking when its unmarked Dice is at most this much (absolute) below G_0's."""
RELIES = 0.5
"""A network relies on the marking when its unmarked Dice is below this fraction of G_0's (in between:
'intermediate', reported but not part of the claim)."""
NOISE_MEAN, NOISE_STD = 100.0, 20.0
"""The white-noise start (HU): the healthy liver's mean and about its texture, so that the start has no
foreground (the method's premise); the engine's default (the window's centre and a sixth of its
width, 75 +- 58 HU) already looks like a marked lesion to G_1 (p(seed) 0.995 at the start)."""
RISE = 0.15
"""The characteristic feature 'rises' when the window selectivity gains at least this much over the dream."""


@dataclasses.dataclass
class Settings:
    epochs: int = 40
    iterations: int = 600
    step: float = 300.0
    restarts: int = 3
    threads: int = 1
    seed: int = 0
    snapshot_every: int = 10
    feature_every: int = 2


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- training


def train_or_load(name: str, out: Path, settings: Settings, train, val, lesion_fn, val_lesion_fn="same",
                  description: str = "", reuse: bool = False):
    """Train (or, with ``reuse``, load a previous run's) network ``name``; returns (LoadedModel, log)."""
    from DeepDreamAnalysisLib.models import load_model

    path = out / "models" / name / f"{name}.pt"
    log_path = path.with_name("training_log.json")
    if not (reuse and path.is_file() and log_path.is_file()):
        net, card, tlog = training.train_unet2d(
            train, val, lesion_fn, epochs=settings.epochs, seed=settings.seed, val_lesion_fn=val_lesion_fn,
            num_threads=settings.threads, noise_hu=30.0, name=name, description=description, verbose=False)
        training.save_model(net, card, tlog, path)
        log(f"  trained {name}: validation Dice {tlog['val_dice']:.3f} ({tlog['train_seconds']:.0f} s)")
    tlog = json.loads(log_path.read_text())
    return load_model(path), tlog


def dice_on(model, val, lesion_fn, seed: int) -> float:
    imgs, labs = training.make_validation_set(val, lesion_fn, seed)
    return float(training.evaluate(model.network, imgs, labs)["dice"])


# ----------------------------------------------------------------------------- section 3.1


def window_features(image_crop: np.ndarray, seed_in_crop: tuple[int, int]) -> tuple[float, float]:
    """(line135_response, line135_selectivity) in a WINDOW x WINDOW square around the seed of a
    2D crop ``[j, i]`` (HU)."""
    from DeepDreamAnalysisLib.features.custom import line135_response, line135_selectivity

    mask = np.zeros(image_crop.shape, bool)
    j, i = seed_in_crop
    h = WINDOW // 2
    mask[max(j - h, 0): j + h + 1, max(i - h, 0): i + h + 1] = True
    img = image_crop[None].astype(np.float64)
    return line135_response(img, mask[None]), line135_selectivity(img, mask[None])


def section_31(out: Path, settings: Settings, volume, train, val, demo_volume, seed, reuse: bool) -> dict:
    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig

    d = out / "section3.1"
    d.mkdir(parents=True, exist_ok=True)
    base = HypointenseLesions(contrast_hu=CONTRAST_31)
    rows, curves = [], {}
    dreams = {}
    for p in PS:
        name = f"G_{p:g}"
        model, tlog = train_or_load(name, out, settings, train, val, MarkedLesions(base=base, p=p), val_lesion_fn=base,
                                    description=f"section 3.1: lesions marked by 135-degree lines with probability {p:g}",
                                    reuse=reuse)
        dice_unmarked = float(tlog["val_dice"])
        dice_marked = dice_on(model, val, MarkedLesions(base=base, p=1.0), settings.seed)
        row = {"p": p, "network": name, "dice_unmarked": dice_unmarked, "dice_marked": dice_marked}
        for start in ("noise", "healthy"):
            cfg = AnalysisConfig(
                dream=DreamConfig(iterations=settings.iterations, step=settings.step,
                                  start="noise" if start == "noise" else "image", noise_mean=NOISE_MEAN,
                                  noise_std=NOISE_STD, random_seed=0, device="cpu"),
                features=FeatureConfig(names=FEATURES_31, every=settings.feature_every),
                snapshot_every=settings.snapshot_every)
            t0 = time.perf_counter()
            res = run_analysis(demo_volume, seed, model, cfg)
            crop_seed = (seed[1] - res.crop.start[1], seed[0] - res.crop.start[2])
            snaps = [(s.iteration, *window_features(s.image[0], crop_seed)) for s in res.snapshots]
            its = np.array([s[0] for s in snaps])
            resp = np.array([s[1] for s in snaps])
            sel = np.array([s[2] for s in snaps])
            curves[(name, start)] = (its, resp, sel, res)
            dreams[(name, start)] = (res.snapshots[0].image[0], res.snapshots[-1].image[0], res.snapshots[-1].mask[0], crop_seed)
            mask_resp = _last_finite(res.column("line135_response"))
            mask_sel = _last_finite(res.column("line135_selectivity"))
            row.update({
                f"{start}_p_final": res.steps[-1].probability,
                f"{start}_first_above_0.5": res.first_iteration_above(0.5),
                f"{start}_mask_final": res.steps[-1].mask_voxels,
                f"{start}_window_response_start": float(resp[0]),
                f"{start}_window_response_final": float(resp[-1]),
                f"{start}_window_selectivity_start": float(sel[0]),
                f"{start}_window_selectivity_final": float(sel[-1]),
                f"{start}_mask_response_final": mask_resp,
                f"{start}_mask_selectivity_final": mask_sel,
            })
            log(f"  {name} dream from {start}: p(seed) {res.steps[0].probability:.3f} -> {res.steps[-1].probability:.3f}, "
                f"window selectivity {sel[0]:+.3f} -> {sel[-1]:+.3f}, response {resp[0]:.1f} -> {resp[-1]:.1f} HU "
                f"({time.perf_counter() - t0:.0f} s)")
        rows.append(row)
    _write_table(rows, d / "table_3_1.csv")
    _plot_31(d / "fig4_characteristic_feature.png", rows, curves, dreams)
    claim = _claim_31(rows)
    (d / "table_3_1.md").write_text(_table_31_md(rows) + "\n")
    return {"rows": rows, "claim": claim}


def _last_finite(a) -> float:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(a[-1]) if a.size else math.nan


def _claim_31(rows) -> dict:
    g0 = next(r for r in rows if r["p"] == 0.0)["dice_unmarked"]
    out = {"baseline_dice": g0, "relying": [], "not_relying": [], "intermediate": [], "by_start": {}}
    for r in rows:
        if r["dice_unmarked"] >= g0 - NEAR_BASELINE:
            out["not_relying"].append(r["network"])
        elif r["dice_unmarked"] < RELIES * g0:
            out["relying"].append(r["network"])
        else:
            out["intermediate"].append(r["network"])
    for start in ("noise", "healthy"):
        rises = {r["network"]: r[f"{start}_window_selectivity_final"] - r[f"{start}_window_selectivity_start"] for r in rows}
        rising = [n for n, v in rises.items() if v >= RISE]
        judged = set(out["relying"]) | set(out["not_relying"])
        holds = bool(out["relying"]) and set(rising) & judged == set(out["relying"])
        dice = np.array([r["dice_unmarked"] for r in rows])
        sel = np.array([r[f"{start}_window_selectivity_final"] for r in rows])
        resp = {r["network"]: r[f"{start}_window_response_final"] for r in rows}
        robust_max = max((resp[n] for n in out["not_relying"]), default=math.nan)
        resp_holds = bool(out["relying"]) and all(resp[n] > robust_max for n in out["relying"])
        out["by_start"][start] = {
            "selectivity_gain": rises, "rising": rising, "holds": holds,
            "spearman_dice_vs_final_selectivity": _spearman(dice, sel),
            "final_response": resp, "response_holds": resp_holds,
            "spearman_dice_vs_final_response": _spearman(dice, np.array([resp[r["network"]] for r in rows])),
        }
    return out


def _spearman(a, b) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _table_31_md(rows) -> str:
    lines = ["| p | Dice unmarked | Dice marked | noise start: selectivity start -> final | response final (HU) | "
             "healthy start: selectivity start -> final | response final (HU) | mask selectivity final (noise / healthy) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['p']:g} | {r['dice_unmarked']:.3f} | {r['dice_marked']:.3f} | "
            f"{r['noise_window_selectivity_start']:+.3f} -> {r['noise_window_selectivity_final']:+.3f} | "
            f"{r['noise_window_response_final']:.1f} | "
            f"{r['healthy_window_selectivity_start']:+.3f} -> {r['healthy_window_selectivity_final']:+.3f} | "
            f"{r['healthy_window_response_final']:.1f} | "
            f"{_f(r['noise_mask_selectivity_final'])} / {_f(r['healthy_mask_selectivity_final'])} |")
    return "\n".join(lines)


def _f(v, fmt="+.3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _plot_31(path: Path, rows, curves, dreams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 4, figsize=(15, 7))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(PS)))
    for col, start in enumerate(("noise", "healthy")):
        x0, xT, mT, (sj, si) = dreams[(f"G_{PS[-1]:g}", start)]
        a = ax[col, 0]
        a.imshow(xT, cmap="gray", vmin=-100, vmax=250)
        a.contour(mT, levels=[0.5], colors="r", linewidths=0.8)
        a.plot(si, sj, "r+")
        a.set_title(f"(a) dream of G_1 from {start} (final)", fontsize=9)
        a.axis("off")
        for n, p in enumerate(PS):
            its, resp, sel, _ = curves[(f"G_{p:g}", start)]
            ax[col, 1].plot(its, sel, color=colours[n], label=f"p={p:g}")
            ax[col, 2].plot(its, resp, color=colours[n], label=f"p={p:g}")
        ax[col, 1].set_title(f"(b) 135-degree selectivity ({start} start)", fontsize=9)
        ax[col, 2].set_title(f"(b') max 135-degree response, HU ({start} start)", fontsize=9)
        ax[col, 1].set_xlabel("iteration")
        ax[col, 2].set_xlabel("iteration")
        ax[col, 1].legend(fontsize=7)
        a = ax[col, 3]
        ps = [r["p"] for r in rows]
        a.plot(ps, [r["dice_unmarked"] for r in rows], "o-", color="k", label="Dice (unmarked)")
        a.set_ylim(0, 1)
        a.set_xlabel("p")
        b = a.twinx()
        b.plot(ps, [r[f"{start}_window_selectivity_final"] for r in rows], "s--", color="tab:red", label="final selectivity")
        b.set_ylabel("final selectivity", color="tab:red")
        a.set_title(f"(c) Dice and final characteristic feature ({start})", fontsize=9)
        a.legend(loc="lower left", fontsize=7)
    fig.suptitle("Section 3.1 on LiTS 117: networks G_p trained with a 135-degree line marking of probability p", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ----------------------------------------------------------------------------- section 3.2


def real_reference(volume, val_k):
    """Reference statistics of the real tumours of the held-out slices (2D components >= 10 voxels)."""
    import SimpleITK as sitk

    from DeepDreamAnalysisLib.config import FeatureConfig
    from DeepDreamAnalysisLib.features import build_feature_set
    from DeepDreamAnalysisLib.reference import compute_reference
    from DeepDreamAnalysisLib.volume import Volume

    image, labels = volume
    pairs = []
    for k in val_k:
        comp = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((labels[k] == 2).astype(np.uint8))))
        for c in range(1, int(comp.max()) + 1):
            m = comp == c
            if m.sum() >= 10:
                pairs.append((Volume(image[k][None].astype(np.float32), spacing=lits.ASSUMED_SPACING),
                              Volume(m[None].astype(np.float32), spacing=lits.ASSUMED_SPACING)))
    fs = build_feature_set(FeatureConfig(names=FEATURES_32), spatial_dims=2)
    return compute_reference(pairs, fs), len(pairs)


def section_32(out: Path, settings: Settings, volume, train_h, val_h, train_r, val_r, val_k, demo_volume, seed,
               reuse: bool) -> dict:
    from DeepDreamAnalysisLib.compare import compare_models, plot_comparison, write_comparison
    from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig

    d = out / "section3.2"
    d.mkdir(parents=True, exist_ok=True)
    round_l, elong_l = HypointenseLesions(shape="round"), HypointenseLesions(shape="elongated")
    nets = {}
    dice = {}
    m, t = train_or_load("real", out, settings, train_r, val_r, None, description="section 3.2: real LiTS tumours", reuse=reuse)
    nets["real"], dice["real"] = m, {"own": t["val_dice"]}
    m, t = train_or_load("synthetic_round", out, settings, train_h, val_h, round_l,
                         description="section 3.2: synthetic round hypointense lesions", reuse=reuse)
    nets["synthetic_round"], dice["synthetic_round"] = m, {"own": t["val_dice"]}
    m, t = train_or_load("synthetic_elongated", out, settings, train_h, val_h, elong_l,
                         description="section 3.2: synthetic elongated hypointense lesions", reuse=reuse)
    nets["synthetic_elongated"], dice["synthetic_elongated"] = m, {"own": t["val_dice"]}
    real_imgs = [s.image for s in val_r]
    real_labs = [s.label for s in val_r]
    for name, model in nets.items():
        dice[name]["real_tumours"] = float(training.evaluate(model.network, real_imgs, real_labs)["dice"])
        dice[name]["synthetic_round"] = dice_on(model, val_h, round_l, settings.seed)
        dice[name]["synthetic_elongated"] = dice_on(model, val_h, elong_l, settings.seed)
    reference, n_lesions = real_reference(volume, val_k)
    log(f"  reference: {n_lesions} real tumour cross-sections in the held-out slices")
    cfg = AnalysisConfig(dream=DreamConfig(iterations=settings.iterations, step=settings.step, device="cpu"),
                         features=FeatureConfig(names=FEATURES_32, every=settings.feature_every),
                         snapshot_every=settings.snapshot_every)
    t0 = time.perf_counter()
    comp = compare_models(demo_volume, seed, nets, cfg, reference, restarts=settings.restarts)
    log(f"  dreams: {len(nets)} networks x {comp.restarts} restarts in {time.perf_counter() - t0:.0f} s")
    paths = write_comparison(comp, d)
    plot_comparison(comp, d / "fig5_raw.png", features=FIG5, kind="raw",
                    title="Section 3.2 (like Fig. 5): RMS intensity (HU), maximum diameter (mm), elongation; raw values")
    plot_comparison(comp, d / "fig5_z.png", features=FIG5, kind="z",
                    title="Section 3.2: the same curves as z-scores against the real tumours (normal range shaded)")
    summary = {}
    for name in nets:
        summary[name] = {}
        for f in FIG5:
            finals = [_last_finite(comp.values(name, f, "raw")[r]) for r in range(comp.restarts)]
            zf = [_last_finite(comp.values(name, f, "z")[r]) for r in range(comp.restarts)]
            starts = [_first_finite(comp.values(name, f, "raw")[r]) for r in range(comp.restarts)]
            summary[name][f] = {"final_mean": _nanmean(finals), "final_min": _nanmin(finals), "final_max": _nanmax(finals),
                                "start_mean": _nanmean(starts), "final_z_mean": _nanmean(zf)}
        runs = comp.metadata["runs"][name]
        summary[name]["first_iteration_above_0.5"] = [r["first_iteration_above_0.5"] for r in runs]
    rank = [dataclasses.asdict(r) for r in comp.ranking()]
    claims = {
        "intensity": _compare_claim(summary, "firstorder_RootMeanSquared", lower="real", higher="synthetic_round"),
        "elongation": _compare_claim(summary, "shape2D_Elongation", lower="synthetic_elongated", higher="synthetic_round"),
    }
    rows = []
    for name in nets:
        row = {"network": name, **{f"dice_{k}": v for k, v in dice[name].items()}}
        for f in FIG5:
            s = summary[name][f]
            row.update({f"{f}_start": s["start_mean"], f"{f}_final": s["final_mean"], f"{f}_final_min": s["final_min"],
                        f"{f}_final_max": s["final_max"], f"{f}_final_z": s["final_z_mean"]})
        rows.append(row)
    _write_table(rows, d / "table_3_2.csv")
    (d / "table_3_2.md").write_text(_table_32_md(rows) + "\n")
    return {"rows": rows, "claims": claims, "ranking": rank, "files": {k: str(v) for k, v in paths.items()},
            "reference_lesions": n_lesions}


def _first_finite(a) -> float:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(a[0]) if a.size else math.nan


def _nanmean(v):
    a = np.asarray(v, float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _nanmin(v):
    a = np.asarray(v, float)
    a = a[np.isfinite(a)]
    return float(a.min()) if a.size else math.nan


def _nanmax(v):
    a = np.asarray(v, float)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else math.nan


def _compare_claim(summary, feature, lower, higher) -> dict:
    lo, hi = summary[lower][feature], summary[higher][feature]
    if not (math.isfinite(lo["final_mean"]) and math.isfinite(hi["final_mean"])):
        verdict = "not testable (a network dreamed no lesion)"
    elif lo["final_max"] < hi["final_min"]:
        verdict = "holds (every restart)"
    elif lo["final_mean"] < hi["final_mean"]:
        verdict = "holds on average (the restarts' ranges overlap)"
    else:
        verdict = "does not hold"
    return {"feature": feature, "expected_lower": lower, "expected_higher": higher,
            "lower_final_mean": lo["final_mean"], "higher_final_mean": hi["final_mean"], "verdict": verdict}


def _table_32_md(rows) -> str:
    lines = ["| network | Dice own val | Dice real tumours | RMS start -> final (HU) | max diameter final (mm) | "
             "elongation final [min, max] | final z (RMS / diam. / elong.) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['dice_own']:.3f} | {r['dice_real_tumours']:.3f} | "
            f"{_f(r['firstorder_RootMeanSquared_start'], '.1f')} -> {_f(r['firstorder_RootMeanSquared_final'], '.1f')} | "
            f"{_f(r['shape2D_MaximumDiameter_final'], '.1f')} | "
            f"{_f(r['shape2D_Elongation_final'], '.3f')} [{_f(r['shape2D_Elongation_final_min'], '.3f')}, "
            f"{_f(r['shape2D_Elongation_final_max'], '.3f')}] | "
            f"{_f(r['firstorder_RootMeanSquared_final_z'], '+.2f')} / {_f(r['shape2D_MaximumDiameter_final_z'], '+.2f')} / "
            f"{_f(r['shape2D_Elongation_final_z'], '+.2f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output


def _write_table(rows, path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_cell(r.get(c)) for c in cols))
    path.write_text("\n".join(lines) + "\n")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/reproduce")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, 20 iterations, 2 restarts")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--step", type=float, default=None)
    ap.add_argument("--restarts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--reuse", action="store_true", help="reuse networks already trained in --out/models")
    ap.add_argument("--only", choices=("3.1", "3.2"), default=None)
    args = ap.parse_args(argv)
    s = Settings(threads=args.threads)
    if args.quick:
        s = dataclasses.replace(s, epochs=2, iterations=20, restarts=2, snapshot_every=5, feature_every=1)
    for k in ("epochs", "iterations", "step", "restarts"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    torch.set_num_threads(s.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"Reproduction on LiTS 117 (assumed spacing 1.6 x 1.6 x 3.0 mm); settings {dataclasses.asdict(s)}")
    volume = lits.load_lits117()
    train_k, val_k = training.split_indices(volume[0].shape[0])
    train_h = training.lits_slices(train_k, "healthy", volume=volume)
    val_h = training.lits_slices(val_k, "healthy", volume=volume)
    demo_volume, seed = lits.demo_case()
    log(f"Dream start: healthy slice {lits.DEMO_SLICE} (held out), seed (i, j, k) = {seed}")
    results = {"settings": dataclasses.asdict(s), "seed_ijk": list(seed), "slice": lits.DEMO_SLICE,
               "torch": torch.__version__}
    if args.only in (None, "3.1"):
        log("Section 3.1: networks G_p with the 135-degree marking")
        results["section_3_1"] = section_31(out, s, volume, train_h, val_h, demo_volume, seed, args.reuse)
        results["time_3_1_s"] = round(time.perf_counter() - t0, 1)
    if args.only in (None, "3.2"):
        log("Section 3.2: real vs synthetic, elongated vs round")
        train_r = training.lits_slices(train_k, "real", volume=volume)
        val_r = training.lits_slices(val_k, "real", volume=volume)
        results["section_3_2"] = section_32(out, s, volume, train_h, val_h, train_r, val_r, val_k, demo_volume, seed,
                                            args.reuse)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(_results_md(results) + "\n")
    log("")
    log(_claims_text(results))
    log(f"Done in {results['total_s'] / 60:.1f} min; results in {out}/ (results.md, results.json, section3.*/)")
    return 0


def _claims_text(results) -> str:
    lines = []
    if "section_3_1" in results:
        c = results["section_3_1"]["claim"]
        lines.append(f"3.1: G_0 Dice {c['baseline_dice']:.3f}; relying on the marking (Dice < {RELIES:g} x G_0's): "
                     f"{', '.join(c['relying']) or 'none'}; robust (Dice within {NEAR_BASELINE:g} of G_0's): "
                     f"{', '.join(c['not_relying']) or 'none'}; intermediate: {', '.join(c['intermediate']) or 'none'}.")
        for start, b in c["by_start"].items():
            lines.append(f"3.1 ({start} start): selectivity rose by >= {RISE:g} in {', '.join(b['rising']) or 'none'} -> "
                         f"claim {'HOLDS' if b['holds'] else 'DOES NOT HOLD'} "
                         f"(Spearman Dice vs final selectivity {_f(b['spearman_dice_vs_final_selectivity'], '+.2f')}).")
            lines.append(f"3.1 ({start} start, the paper's raw feature): final max 135-degree response of every relying "
                         f"network above every robust one -> claim {'HOLDS' if b['response_holds'] else 'DOES NOT HOLD'} "
                         f"(Spearman Dice vs final response {_f(b['spearman_dice_vs_final_response'], '+.2f')}).")
    if "section_3_2" in results:
        for key, c in results["section_3_2"]["claims"].items():
            lines.append(f"3.2 {key}: final {c['feature']} {c['expected_lower']} {_f(c['lower_final_mean'], '.3f')} vs "
                         f"{c['expected_higher']} {_f(c['higher_final_mean'], '.3f')} (expected lower) -> {c['verdict'].upper()}.")
    return "\n".join(lines)


def _results_md(results) -> str:
    out = ["# Reproduction results", "", f"Settings: `{json.dumps(results['settings'])}`; dream start: healthy "
           f"slice {results['slice']}, seed (i, j, k) = {tuple(results['seed_ijk'])}; total {results['total_s'] / 60:.1f} min.", ""]
    if "section_3_1" in results:
        out += ["## Section 3.1", "", _table_31_md(results["section_3_1"]["rows"]), "",
                "![fig4](section3.1/fig4_characteristic_feature.png)", ""]
    if "section_3_2" in results:
        out += ["## Section 3.2", "", _table_32_md(results["section_3_2"]["rows"]), "",
                "![fig5](section3.2/fig5_raw.png)", "", "![fig5z](section3.2/fig5_z.png)", ""]
    out += ["## Claims", "", "```", _claims_text(results), "```"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
