"""Reproduce the paper's experiments (Couteaux et al. 2019, sections 3.1 and 3.2) on real CT.

    python scripts/reproduce.py --out results/reproduce --workers 2    # what `make reproduce` runs
    python scripts/reproduce.py --out /tmp/smoke --quick               # a smoke run (numbers meaningless)

Data: axial slices of LiTS volume 117 (128^3, CC BY-NC-SA 4.0; `make data` fetches it), tumours
inpainted away for the "healthy" slices (DeepDreamAnalysisLib.lits). Assumed spacing 1.6 x 1.6 mm
in-plane, 3.0 mm between slices (not recorded in the files). Slices 38-50 are held out for
validation (35-37 and 51-53 unused), training uses the others (scripts/training.py).

Networks: every network is trained ``--training-seeds`` (3) times, seeds 0, 1, 2 (``<name>_t<seed>``;
seed 0 is the earlier versions' seed), ``--workers`` trainings at once in separate
processes.

Dreams and statistics. Every dream starts on held-out healthy slice 44, at each of
``--seed-points`` (8) seed points in its liver, chosen deterministically (:func:`seed_points`: the
demo seed, the liver voxel deepest inside the liver, then farthest-point sampling among the liver
voxels at least MIN_DEPTH voxels inside the liver and 16 from the image border), with
``--restarts`` (1) run(s) each, with every dream method of ``--methods`` (``paper``: the paper's plain
update X <- X + 300 * dlogit/dX, 600 iterations; ``default``: the engine's default method,
robust+spectral, with its image-unit step, ``--default-iterations`` 150), through
studies.compare_models, or the same runs on the study engine with ``--workers N``/``--address``
(docs/studies.md). Every network of a comparison sees the same start images. The statistical unit
is the **training seed** (with one training seed: the seed point): per network and feature, the
mean over the training seeds of the seed-point means, and its 95 % Student-t interval. A claim "A
above B" is judged on paired differences A_t - B_t (same training seed t, same seed points),
averaged over the seed points per training seed: **holds** when the 95 % interval over training
seeds lies entirely on the claimed side, **does not hold** when entirely on the other side,
**inconclusive (difference within spread)** otherwise.

Section 3.1, the controlled experiment (the paper used COCO cats and dogs; here liver CT):
networks G_p, p in {0, 0.2, 0.5, 0.9, 1.0}, learn to segment synthetic low-contrast hypointense
lesions in healthy slices; each training lesion is marked with probability p by a texture of
135-degree line segments with random positions and intensities (synthetic.MarkedLesions). Dice is
measured on the held-out slices with *unmarked* lesions (and, for information, with every lesion
marked). Each network dreams from liver-like white noise (100 +- 20 HU) and from the healthy slice
(``--starts``). The characteristic feature is measured on the dream in a 31 x 31 voxel window
around the seed: ``line135_response`` (the paper's maximum response of a 135-degree line filter)
and ``line135_selectivity`` (its contrast-normalised variant, (E135 - E45)/(E135 + E45), see
features/custom.py). Networks are grouped by unmarked Dice (mean over training seeds): relying on
the marking (below half of G_0's), robust (within 0.1 of G_0's), intermediate (neither; not part
of the claim). Claim: every relying network ends its dream with a higher characteristic feature
than every robust network (per method, per start and per feature). Markings (``--markings``):
``thin`` (default; one-voxel rasterised segments) and ``antialiased`` (opt-in; 2 voxels wide,
the earlier run's attempted fix, with which the marked networks did not learn the task). Per
method, the dream quality on the G_p networks (runs reaching p > 0.5, checkerboard index, mask
compactness, quality flags, as scripts/evaluate_methods.py measures them) and a figure of the
dreams of G_0 and G_1 side by side.

Section 3.2: a network trained on the real tumours against one trained on synthetic round
hypointense lesions; a network trained on synthetic elongated lesions against the round one.
All three dream from the healthy slice, features z-scored against the real tumours of the held-out
slices. Claims: the real-tumour network is more sensitive to low intensity (its dreams' final RMS
intensity is lower; secondary: its RMS sensitivity score is higher); the elongated-lesion network
is more sensitive to elongation (its dreams' final pyradiomics Elongation is lower, i.e. more
elongated; secondary: its Elongation sensitivity score is higher).

Smaller than the paper: 2D MONAI UNets with 8/16/32 channels, 40 epochs. Everything is written
into --out: tables (CSV and markdown, per-run CSVs), figures (PNG), ``results.md`` (tables,
verdicts), ``results.json``, the trained networks (``models/``).
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
from DeepDreamAnalysisLib.synthetic import HypointenseLesions, LineMarking, MarkedLesions, distance_to_outside  # noqa: E402

PS = (0.0, 0.2, 0.5, 0.9, 1.0)
WINDOW = 31
"""Side (voxels) of the square window around the seed where the characteristic feature is measured."""
CONTRAST_31 = (15.0, 35.0)
"""Lesion contrast (HU) of section 3.1: subtle next to the marking (lines of +40..+120 HU)."""
MARKINGS = {"thin": None, "antialiased": 2.0}
"""Section 3.1 marking variants: name -> synthetic.LineMarking width (None: one-voxel rasterised)."""
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
RESTART_NOISE = 10.0
"""Restart noise (HU) added to the healthy slice for restarts 1, 2, ... (compare.py's default)."""
MIN_DEPTH = 15
"""Seed points lie at least this many voxels (24 mm at the assumed 1.6 mm) inside the liver, so that the
31 x 31 window around them is (nearly) all liver."""
T975 = (math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
"""Two-sided 95 % Student-t quantiles by degrees of freedom (index); 1.96 beyond."""
HOLDS, NOT_HOLDS, INCONCLUSIVE = "holds", "does not hold", "inconclusive (difference within spread)"


METHODS = ("paper", "default")
"""Dream methods: ``paper`` (the paper's update X <- X + step * dlogit/dX, ``--step``/``--iterations``) and
``default`` (the engine's default method, robust+spectral, with its default image-unit step and
``--default-iterations``)."""


@dataclasses.dataclass
class Settings:
    epochs: int = 40
    iterations: int = 600
    """Iterations of the ``paper`` method."""
    default_iterations: int = 150
    """Iterations of the ``default`` method (it reaches p > 0.5 within 27 on the G_p networks, docs/reproduction.md)."""
    step: float = 300.0
    """The ``paper`` method's alpha (HU per unit of dlogit/dX); the default method uses the engine's step."""
    restarts: int = 1
    seed_points: int = 8
    training_seeds: int = 3
    threads: int = 1
    seed: int = 0
    snapshot_every: int = 10
    feature_every: int = 2
    markings: tuple = ("thin",)
    methods: tuple = METHODS
    starts: tuple = ("noise", "healthy")
    """Section 3.1 dream starts (white noise, the healthy slice)."""
    workers: int | None = None
    """Run the dreams on the study engine (Ray) with this many local workers, and train this many
    networks at once; None: in this process."""
    address: str | None = None
    """Or on this Ray cluster (auto, ray://HOST:10001)."""
    min_own_dice: float = 0.2
    """Trainings below this own-distribution Dice are retrained (:func:`replace_failed_trainings`; 0 in ``--quick``)."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- statistics


def mean_ci(values) -> dict:
    """Mean, sample standard deviation and 95 % Student-t confidence interval of the finite values.

    ``{"mean", "sd", "lo", "hi", "n"}``; the interval is NaN with fewer than 2 values, the mean NaN
    with none."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[np.isfinite(a)]
    n = int(a.size)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    m = float(a.mean())
    if n < 2:
        return {"mean": m, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 1}
    sd = float(a.std(ddof=1))
    t = T975[n - 1] if n - 1 < len(T975) else 1.96
    half = t * sd / math.sqrt(n)
    return {"mean": m, "sd": sd, "lo": m - half, "hi": m + half, "n": n}


def unit_means(runs, key: str, **match) -> dict:
    """Per-cell means of ``runs[key]`` over restarts, for the runs whose fields equal ``match`` (NaN
    values skipped; a cell with none is left out).

    The cell is the seed point, ``{seed_point: mean}``, when no matching run has a ``training_seed``;
    otherwise the (training seed, seed point) pair, ``{(training_seed, seed_point): mean}``."""
    acc: dict = {}
    for r in runs:
        if all(r.get(k) == v for k, v in match.items()):
            v = r.get(key)
            if v is not None and math.isfinite(v):
                cell = r["seed_point"] if "training_seed" not in r else (r["training_seed"], r["seed_point"])
                acc.setdefault(cell, []).append(float(v))
    return {u: float(np.mean(v)) for u, v in sorted(acc.items())}


def statistical_units(cells: dict) -> dict:
    """The statistical units of :func:`unit_means`' cells: each seed point when the cells are seed points;
    each **training seed** when they are (training seed, seed point) pairs, its value the mean over its
    seed points (a trained network is the unit: its seed points are repeated measures of one training,
    not independent trainings)."""
    if not cells or not isinstance(next(iter(cells)), tuple):
        return dict(cells)
    acc: dict = {}
    for (t, _s), v in cells.items():
        acc.setdefault(t, []).append(v)
    return {t: float(np.mean(v)) for t, v in sorted(acc.items())}


def paired_verdict(a: dict, b: dict, expected: str) -> dict:
    """Is ``a`` above (``expected=">"``) or below (``"<"``) ``b``? Paired over the cells both have
    (:func:`unit_means`), the interval over the statistical units (:func:`statistical_units`: seed
    points, or training seeds with the mean difference over their common seed points).

    Returns the difference a - b (mean and 95 % interval over the units) and the verdict: ``holds``
    when the interval lies entirely on the expected side of 0, ``does not hold`` when entirely on the
    other side, ``inconclusive (difference within spread)`` otherwise, ``not testable`` with fewer
    than 2 units."""
    if expected not in (">", "<"):
        raise ValueError("expected must be '>' or '<'")
    cells = sorted(set(a) & set(b))
    diffs = statistical_units({u: a[u] - b[u] for u in cells})
    ci = mean_ci(diffs.values())
    unit = "training seed" if cells and isinstance(cells[0], tuple) else "seed point"
    if ci["n"] < 2:
        verdict = f"not testable ({ci['n']} {unit}(s) where both dreamed a value)"
    else:
        sign = 1.0 if expected == ">" else -1.0
        lo, hi = sorted((sign * ci["lo"], sign * ci["hi"]))
        verdict = HOLDS if lo > 0 else NOT_HOLDS if hi < 0 else INCONCLUSIVE
    return {"expected": expected, "diff_mean": ci["mean"], "diff_lo": ci["lo"], "diff_hi": ci["hi"], "n": ci["n"],
            "cells": len(cells), "unit": unit, "verdict": verdict}


def unit_ci(runs, key: str, **match) -> dict:
    """:func:`mean_ci` over the statistical units of ``runs[key]`` (seed points, or training seeds)."""
    return mean_ci(statistical_units(unit_means(runs, key, **match)).values())


def combine_verdicts(verdicts) -> str:
    """One verdict for a claim made of several comparisons that must all hold."""
    verdicts = list(verdicts)
    if not verdicts:
        return "not testable (no comparison)"
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if any(v == NOT_HOLDS for v in verdicts):
        return NOT_HOLDS
    if any(v.startswith("not testable") for v in verdicts) and not any(v == INCONCLUSIVE for v in verdicts):
        return "not testable"
    return INCONCLUSIVE


def _ci_text(c: dict, fmt: str = ".3f") -> str:
    if not math.isfinite(c["mean"]):
        return "n/a"
    if not math.isfinite(c["lo"]):
        return format(c["mean"], fmt)
    return f"{format(c['mean'], fmt)} [{format(c['lo'], fmt)}, {format(c['hi'], fmt)}]"


# ----------------------------------------------------------------------------- seed points and training


def seed_points(liver: np.ndarray, n: int, min_depth: float = MIN_DEPTH, border: int = 16) -> list[tuple[int, int]]:
    """``n`` seed points ``(i, j)`` in ``liver`` (bool ``[j, i]``), deterministic.

    The first is :func:`lits.choose_seed` (the demo seed: the liver voxel deepest inside the liver);
    each next one is the candidate farthest (Euclidean, voxels) from the points chosen so far, ties to
    the smallest (j, i); candidates are the liver voxels at least ``min_depth`` voxels from the liver
    boundary and ``border`` voxels from the image edge. Fewer than ``n`` when candidates run out."""
    first = lits.choose_seed(liver, border=border)
    ok = distance_to_outside(liver) >= min_depth
    ok[:border, :] = ok[-border:, :] = False
    ok[:, :border] = ok[:, -border:] = False
    jj, ii = np.nonzero(ok)
    pts = [first]
    dmin = np.hypot(ii - first[0], jj - first[1])
    while len(pts) < n and dmin.size and dmin.max() > 0:
        k = int(np.argmax(dmin))
        pts.append((int(ii[k]), int(jj[k])))
        dmin = np.minimum(dmin, np.hypot(ii - ii[k], jj - jj[k]))
    return pts


def model_name(group: str, training_seed: int) -> str:
    """The trained network ``group`` (G_1_aa, real, ...) of training seed ``training_seed``: ``<group>_t<seed>``."""
    return f"{group}_t{training_seed}"


@dataclasses.dataclass
class TrainJob:
    """One network to train: ``name`` (folder models/<name>/), data, lesion generators, seed."""

    name: str
    group: str
    training_seed: int
    seed: int
    train: list
    val: list
    lesion_fn: object
    val_lesion_fn: object = "same"
    description: str = ""


def _train_job(job: TrainJob, out: str, epochs: int, threads: int) -> dict:
    """Train and save one network (runs in a worker process); returns its training log summary."""
    torch.set_num_threads(threads)
    net, card, tlog = training.train_unet2d(
        job.train, job.val, job.lesion_fn, epochs=epochs, seed=job.seed, val_lesion_fn=job.val_lesion_fn,
        num_threads=threads, noise_hu=30.0, name=job.name, description=job.description, verbose=False)
    training.save_model(net, card, tlog, Path(out) / "models" / job.name / f"{job.name}.pt")
    return {"name": job.name, "val_dice": tlog["val_dice"], "train_seconds": tlog["train_seconds"]}


def _end_pool(pool, grace_s: float = 5.0) -> None:
    """Stop a ProcessPoolExecutor at once: drop the queued jobs and end its processes (SIGTERM, then
    SIGKILL after ``grace_s``); ``shutdown(wait=True)`` would let every queued training run first."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public way before Python 3.14
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown(wait=False) forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    # the pool's manager thread notices its dead processes and closes its wake-up pipe; wait for it, or
    # Python's exit handler may write to that pipe while it closes ("Bad file descriptor" traceback at
    # exit: a race in concurrent.futures of Python 3.11, whose exit handler takes no lock)
    if manager is not None and manager.is_alive():
        manager.join(grace_s)


def train_all(out: Path, settings: Settings, jobs: list[TrainJob], reuse: bool = False) -> dict:
    """Train every job's network (with ``reuse``, keep those already in ``out/models``), ``settings.workers``
    at once in separate processes (one torch thread each); returns ``{name: (LoadedModel, training log)}``.

    A network is saved when its training ends (atomically, its training log last), so a stop
    (Ctrl-C, SIGTERM) keeps the finished ones for ``--reuse``; the training processes end with it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from DeepDreamAnalysisLib.stopping import deferred, exit_with_parent

    from DeepDreamAnalysisLib.models import load_model

    def paths(job):
        path = out / "models" / job.name / f"{job.name}.pt"
        return path, path.with_name("training_log.json")

    todo = [j for j in jobs if not (reuse and all(p.is_file() for p in paths(j)))]
    t0 = time.perf_counter()
    if todo:
        n = max(1, min(settings.workers or 1, len(todo)))
        log(f"Training {len(todo)} networks ({n} at a time)")
        if n == 1:
            done = (_train_job(j, str(out), settings.epochs, settings.threads) for j in todo)
            for r in done:
                log(f"  trained {r['name']}: validation Dice {r['val_dice']:.3f} ({r['train_seconds']:.0f} s)")
        else:
            pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent)
            try:
                with deferred():  # a stop while the processes start would cut their start-up data short
                    futures = [pool.submit(_train_job, j, str(out), settings.epochs, settings.threads) for j in todo]
                for f in futures:
                    r = f.result()
                    log(f"  trained {r['name']}: validation Dice {r['val_dice']:.3f} ({r['train_seconds']:.0f} s, "
                        f"{time.perf_counter() - t0:.0f} s so far)")
            except BaseException:  # Ctrl-C, SIGTERM, a failed training: the other trainings end now
                _end_pool(pool)
                raise
            pool.shutdown()
    trained = {}
    for j in jobs:
        path, log_path = paths(j)
        trained[j.name] = (load_model(path), json.loads(log_path.read_text()))
    return trained


MIN_OWN_DICE = Settings.min_own_dice
"""A training whose validation Dice on the lesions it was trained on (its own distribution: marked
with probability p for G_p, real tumours for ``real``...) stays below this did not learn the task
(a collapsed training predicts nothing at all); it is replaced (:func:`replace_failed_trainings`)."""
MAX_REPLACEMENTS = 2


def own_dice(job: TrainJob, model, tlog: dict) -> float:
    """Validation Dice of a trained network on the lesions of its own training distribution."""
    if job.val_lesion_fn == "same" or job.lesion_fn is None:
        return float(tlog["val_dice"])  # validated on its own distribution during training
    return dice_on(model, job.val, job.lesion_fn, job.seed)


def replace_failed_trainings(out: Path, settings: Settings, jobs: list[TrainJob], trained: dict,
                             reuse: bool = False, min_dice: float = MIN_OWN_DICE,
                             max_replacements: int = MAX_REPLACEMENTS) -> list[dict]:
    """Retrain every network that did not learn its task (own-distribution Dice < ``min_dice``).

    The rule, fixed before the full run of 2026-12-04 (the reduced run before it had one collapsed
    G_1 training, Dice 0 on every lesion, which made the section 3.1 claim untestable): replacement
    ``r`` (1, 2, ...) of training seed ``t`` trains with seed ``settings.seed + 100 r + t`` under the
    name ``<name>_retrain<r>`` and takes the place of the failed one in every table (same training
    seed slot); after ``max_replacements`` the last attempt is kept and marked. Updates ``trained``
    in place; returns one record per failed training (written to results.json / results.md)."""
    records = []
    for job in jobs:
        model, tlog = trained[job.name]
        dice = own_dice(job, model, tlog)
        if dice >= min_dice:
            continue
        record = {"network": job.group, "training_seed": job.training_seed, "failed": job.name,
                  "failed_seed": job.seed, "failed_own_dice": round(dice, 4), "attempts": []}
        for r in range(1, max_replacements + 1):
            again = dataclasses.replace(job, name=f"{job.name}_retrain{r}", seed=settings.seed + 100 * r + job.training_seed)
            log(f"  {job.name} did not learn its task (own Dice {dice:.3f} < {min_dice:g}): retraining as {again.name} "
                f"(seed {again.seed})")
            model, tlog = train_all(out, settings, [again], reuse)[again.name]
            dice = own_dice(again, model, tlog)
            record["attempts"].append({"model": again.name, "seed": again.seed, "own_dice": round(dice, 4)})
            if dice >= min_dice:
                break
        record["replacement"] = record["attempts"][-1]["model"]
        record["learned"] = dice >= min_dice
        trained[job.name] = (model, {**tlog, "replaces": job.name})
        records.append(record)
    return records


def dice_on(model, val, lesion_fn, seed: int) -> float:
    imgs, labs = training.make_validation_set(val, lesion_fn, seed)
    return float(training.evaluate(model.network, imgs, labs)["dice"])


def _last_finite(a) -> float:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(a[-1]) if a.size else math.nan


def _first_finite(a) -> float:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(a[0]) if a.size else math.nan


def _f(v, fmt="+.3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


_INPUTS: dict = {}


def _compare(out: Path, settings: Settings, tag: str, volume, seed, models: dict, cfg, reference, restarts: int,
             restart_noise_std: float):
    """compare_models, or, with --workers/--address, the same runs on the study engine (docs/studies.md):
    the same numbers, every core busy, each run in out/studies/<tag>/runs/<key>/."""
    from DeepDreamAnalysisLib.studies import compare_models, compare_on_study

    if settings.workers is None and settings.address is None:
        return compare_models(volume, seed, models, cfg, reference, restarts=restarts,
                              restart_noise_std=restart_noise_std)
    import SimpleITK as sitk

    from DeepDreamAnalysisLib.volume import volume_to_sitk

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    if id(volume) not in _INPUTS:
        path = inputs / f"start_{len(_INPUTS)}.nii.gz"
        sitk.WriteImage(volume_to_sitk(volume), str(path))
        _INPUTS[id(volume)] = path
    ref_path = None
    if reference is not None:
        ref_path = inputs / f"reference_{tag.split('_')[0]}.json"
        reference.save(ref_path)
    files = {name: (str(m.path), None) for name, m in models.items()}
    return compare_on_study(_INPUTS[id(volume)], seed, files, cfg, ref_path, restarts=restarts,
                            restart_noise_std=restart_noise_std, out=out / "studies" / tag,
                            address=settings.address, workers=settings.workers)


def _dream_config(settings: Settings, features, start: str, random_seed: int, method: str = "paper"):
    """The dream of one method: ``paper`` (alpha ``settings.step``, ``settings.iterations``) or ``default``
    (the engine's default method and step, ``settings.default_iterations``)."""
    from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig

    noise = start == "noise"
    common = dict(start="noise" if noise else "image", noise_mean=NOISE_MEAN if noise else None,
                  noise_std=NOISE_STD if noise else None, random_seed=random_seed, device="cpu")
    if method == "paper":
        dream = DreamConfig(iterations=settings.iterations, step=settings.step, method="paper", **common)
    elif method == "default":
        dream = DreamConfig(iterations=settings.default_iterations, **common)  # the engine's default method and step
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return AnalysisConfig(dream=dream, features=FeatureConfig(names=features, every=settings.feature_every),
                          snapshot_every=settings.snapshot_every)


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


WINDOW_KEYS = ("window_response", "window_selectivity")
STARTS = ("noise", "healthy")


def jobs_31(settings: Settings, train_h, val_h, variant: str) -> list[TrainJob]:
    """The G_p networks of marking ``variant``, ``settings.training_seeds`` trainings each."""
    suffix = "" if variant == "thin" else "_aa"
    base = HypointenseLesions(contrast_hu=CONTRAST_31)
    marking = LineMarking(width=MARKINGS[variant])
    return [TrainJob(model_name(f"G_{p:g}{suffix}", t), f"G_{p:g}{suffix}", t, settings.seed + t, train_h, val_h,
                     MarkedLesions(base=base, p=p, marking=marking), base,
                     f"section 3.1: lesions marked by 135-degree lines ({variant}) with probability {p:g}; "
                     f"training seed {settings.seed + t}")
            for p in PS for t in range(settings.training_seeds)]


def dream_quality(res, seed_kji) -> dict:
    """How good the dream of one run is, as scripts/evaluate_methods.py measures it: ``reached`` (final
    p(seed) > 0.5), ``checkerboard`` (:func:`checkerboard_index` of the final change), ``component_share``
    (the seed's mask component / crop voxels: a compact object is a few percent), ``touches_border``,
    ``flags`` (quality flag codes, space-separated) and ``clean`` (reached, component <= 10 % of the crop,
    off the border, no flag)."""
    from DeepDreamAnalysisLib.engine.quality import checkerboard_index
    from DeepDreamAnalysisLib.mask import seed_component

    last, first = res.snapshots[-1], res.snapshots[0]
    prob = np.asarray(last.probability)
    if prob.ndim == 2:
        prob = prob[None]
    comp = seed_component(prob, tuple(int(v) for v in seed_kji), 0.5)
    border = False
    if comp.any():
        for axis in range(3):
            if prob.shape[axis] > 1:
                border |= bool(comp.take(0, axis).any() or comp.take(-1, axis).any())
    change = np.asarray(last.image, np.float64) - np.asarray(first.image, np.float64)
    flags = sorted({f.code if hasattr(f, "code") else f["code"] for f in (res.quality_flags or [])})
    reached = bool(res.steps[-1].probability > 0.5)
    share = float(comp.sum() / prob.size)
    return {"reached": reached, "checkerboard": checkerboard_index(change), "component_share": share,
            "touches_border": border, "flags": " ".join(flags),
            "clean": bool(reached and share <= 0.10 and not border and not flags)}


def section_31(out: Path, settings: Settings, trained: dict, val_h, demo_volume, points, variant: str = "antialiased") -> dict:
    """Section 3.1 with the marking ``variant`` (a key of MARKINGS): Dice of the trained G_p networks, then
    every network (every training seed) dreams at every seed point from both starts with every method;
    write tables, per-run CSV and the figures."""
    width = MARKINGS[variant]
    suffix = "" if variant == "thin" else "_aa"
    d = out / ("section3.1" if variant == "thin" else f"section3.1_{variant}")
    d.mkdir(parents=True, exist_ok=True)
    base = HypointenseLesions(contrast_hu=CONTRAST_31)
    marking = LineMarking(width=width)
    models, dice_rows, group_of = {}, [], {}
    for job in jobs_31(settings, [], [], variant):
        model, tlog = trained[job.name]
        models[job.name] = model
        group_of[job.name] = (job.group, job.training_seed)
        dice_rows.append({"p": float(job.group.split("_")[1]), "network": job.group, "training_seed": job.training_seed,
                          "model": job.name, "dice_unmarked": float(tlog["val_dice"]),
                          "dice_marked": dice_on(model, val_h, MarkedLesions(base=base, p=1.0, marking=marking), job.seed)})
    runs, curves, example = [], {}, {}
    t0 = time.perf_counter()
    for method in settings.methods:
        for start in settings.starts:
            for s, (i, j) in enumerate(points):
                seed = (i, j, 0)
                cfg = _dream_config(settings, FEATURES_31, start, random_seed=1000 * s, method=method)
                comp = _compare(out, settings, f"s31{suffix}_{method}_{start}_sp{s}", demo_volume, seed, models, cfg,
                                None, settings.restarts, RESTART_NOISE)
                for name, results in comp.results.items():
                    group, t = group_of[name]
                    for r, res in enumerate(results):
                        crop_seed = (seed[1] - res.crop.start[1], seed[0] - res.crop.start[2])
                        snaps = [(sn.iteration, *window_features(sn.image[0], crop_seed)) for sn in res.snapshots]
                        its = np.array([x[0] for x in snaps])
                        resp = np.array([x[1] for x in snaps])
                        sel = np.array([x[2] for x in snaps])
                        curves.setdefault((method, group, start), []).append((its, resp, sel))
                        if s == 0 and r == 0 and t == 0:
                            example[(method, group, start)] = (res.snapshots[-1].image[0], res.snapshots[-1].mask[0],
                                                               crop_seed, res.snapshots[0].image[0])
                        row = {
                            "method": method, "network": group, "training_seed": t, "model": name, "start": start,
                            "seed_point": s, "seed_i": i, "seed_j": j, "restart": r,
                            "random_seed": comp.metadata["random_seeds"][r], "status": res.status,
                            "p_start": res.steps[0].probability, "p_final": res.steps[-1].probability,
                            "first_above_0.5": res.first_iteration_above(0.5),
                            "mask_final": res.steps[-1].mask_voxels,
                            "window_response_start": float(resp[0]), "window_response_final": float(resp[-1]),
                            "window_selectivity_start": float(sel[0]), "window_selectivity_final": float(sel[-1]),
                            "window_response_gain": float(resp[-1] - resp[0]),
                            "window_selectivity_gain": float(sel[-1] - sel[0]),
                            "mask_response_final": _last_finite(res.column("line135_response")),
                            "mask_selectivity_final": _last_finite(res.column("line135_selectivity")),
                        }
                        row.update(dream_quality(res, (seed[2] - res.crop.start[0], *crop_seed)))
                        runs.append(row)
                log(f"  {variant}, {method}, {start} start, seed point {s} (i, j) = ({i}, {j}): {len(models)} networks x "
                    f"{comp.restarts} restarts ({time.perf_counter() - t0:.0f} s so far)")
    claims = {m: claim_31(dice_rows, runs, method=m) for m in settings.methods}
    summary = summarise_31(dice_rows, runs, settings.methods)
    quality = method_quality(runs, settings.methods)
    _write_table(runs, d / "runs_3_1.csv")
    _write_table(dice_rows, d / "dice_3_1.csv")
    _write_table(summary, d / "table_3_1.csv")
    (d / "table_3_1.md").write_text(_table_31_md(summary) + "\n")
    (d / "methods_3_1.md").write_text(_quality_md(quality) + "\n")
    groups = list(dict.fromkeys(r["network"] for r in dice_rows))
    for m in settings.methods:
        _plot_31(d / f"fig4_{m}.png", variant, m, [r for r in summary if r["method"] == m], curves, example, groups)
    _plot_dreams(d / "dreams_G0_G1.png", variant, example, settings.methods, groups[0], groups[-1])
    return {"variant": variant, "marking_width": width, "dice": dice_rows, "summary": summary, "claims": claims,
            "quality": quality, "runs": len(runs), "dream_seconds": round(time.perf_counter() - t0, 1)}


def dice_groups(dice_rows) -> dict:
    """Networks grouped by unmarked Dice (the mean over their training seeds) against G_0's: relying,
    not_relying (robust), intermediate."""
    dice: dict = {}
    for r in dice_rows:
        dice.setdefault(r["network"], []).append(r["dice_unmarked"])
    dice = {n: float(np.mean(v)) for n, v in dice.items()}
    g0 = dice[next(r["network"] for r in dice_rows if r["p"] == 0.0)]
    out = {"baseline_dice": g0, "dice_unmarked": dice, "relying": [], "not_relying": [], "intermediate": []}
    for n, v in dice.items():
        if v >= g0 - NEAR_BASELINE:
            out["not_relying"].append(n)
        elif v < RELIES * g0:
            out["relying"].append(n)
        else:
            out["intermediate"].append(n)
    return out


def claim_31(dice_rows, runs, method: str | None = None) -> dict:
    """The section 3.1 verdicts of one dream ``method`` (None: every run): per start and per window feature
    (final response, final selectivity), every relying network above every robust one, paired over seed
    points (and training seeds: the unit is then the training seed, :func:`paired_verdict`)."""
    out = dice_groups(dice_rows)
    out["by_start"] = {}
    by_method = {} if method is None else {"method": method}
    for start in [st for st in STARTS if any(r["start"] == st for r in runs)]:
        b = {}
        for key in WINDOW_KEYS:
            units = {n: unit_means(runs, f"{key}_final", network=n, start=start, **by_method)
                     for n in out["dice_unmarked"]}
            pairs = [{"relying": a, "robust": n, **paired_verdict(units[a], units[n], ">")}
                     for a in out["relying"] for n in out["not_relying"]]
            if not out["relying"] or not out["not_relying"]:
                verdict = "not testable (no relying or no robust network)"
            else:
                verdict = combine_verdicts(p["verdict"] for p in pairs)
            b[key] = {"verdict": verdict, "pairs": pairs}
        out["by_start"][start] = b
    return out


def method_quality(runs, methods) -> list[dict]:
    """Per method and start: runs, runs reaching p > 0.5, clean dreams, mean checkerboard index, median
    component share (mask compactness), runs touching the border, and the count of each quality flag."""
    rows = []
    for m in methods:
        for start in STARTS:
            mine = [r for r in runs if r.get("method") == m and r["start"] == start]
            if not mine:
                continue
            flags: dict = {}
            for r in mine:
                for f in (r.get("flags") or "").split():
                    flags[f] = flags.get(f, 0) + 1
            cb = [r["checkerboard"] for r in mine if r["checkerboard"] is not None and math.isfinite(r["checkerboard"])]
            rows.append({"method": m, "start": start, "runs": len(mine),
                         "reached": sum(bool(r["reached"]) for r in mine), "clean": sum(bool(r["clean"]) for r in mine),
                         "checkerboard_mean": float(np.mean(cb)) if cb else math.nan,
                         "component_share_median": float(np.median([r["component_share"] for r in mine])),
                         "touches_border": sum(bool(r["touches_border"]) for r in mine),
                         "flags": ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "none"})
    return rows


def _quality_md(rows) -> str:
    lines = ["| method | start | reached p > 0.5 | clean | checkerboard index (mean) | component share (median) | "
             "touching the crop border | quality flags (runs) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['method']}` | {r['start']} | {r['reached']}/{r['runs']} | {r['clean']}/{r['runs']} | "
                     f"{_f(r['checkerboard_mean'], '.2f')} | {r['component_share_median']:.1%} | "
                     f"{r['touches_border']}/{r['runs']} | {r['flags']} |")
    return "\n".join(lines)


def summarise_31(dice_rows, runs, methods=(None,)) -> list[dict]:
    """One row per method, network and start: Dice (mean over training seeds), and mean [95 % CI] over the
    statistical units (training seeds, or seed points with one training) of the window features."""
    rows = []
    groups = list(dict.fromkeys(r["network"] for r in dice_rows))
    for method in methods:
        by_method = {} if method is None else {"method": method}
        for g in groups:
            mine_d = [r for r in dice_rows if r["network"] == g]
            for start in [st for st in STARTS if any(r["start"] == st for r in runs)]:
                row = {"method": method, "network": g, "p": mine_d[0]["p"], "start": start,
                       "training_seeds": len(mine_d),
                       "dice_unmarked": float(np.mean([r["dice_unmarked"] for r in mine_d])),
                       "dice_marked": float(np.mean([r["dice_marked"] for r in mine_d]))}
                for key in ("window_response_final", "window_selectivity_final", "window_response_gain",
                            "window_selectivity_gain", "mask_response_final", "mask_selectivity_final", "p_final"):
                    c = unit_ci(runs, key, network=g, start=start, **by_method)
                    row.update({f"{key}_mean": c["mean"], f"{key}_lo": c["lo"], f"{key}_hi": c["hi"]})
                mine = [r for r in runs if r["network"] == g and r["start"] == start
                        and all(r.get(k) == v for k, v in by_method.items())]
                row["window_response_start_mean"] = float(np.mean([r["window_response_start"] for r in mine])) if mine else math.nan
                row["window_selectivity_start_mean"] = float(np.mean([r["window_selectivity_start"] for r in mine])) if mine else math.nan
                row["runs"] = len(mine)
                row["runs_reaching_0.5"] = sum(r["first_above_0.5"] is not None for r in mine)
                rows.append(row)
    return rows


def _ci_cols(row, key, fmt) -> str:
    return _ci_text({"mean": row[f"{key}_mean"], "lo": row[f"{key}_lo"], "hi": row[f"{key}_hi"]}, fmt)


def _table_31_md(summary) -> str:
    lines = ["| method | network | start | Dice unmarked | Dice marked | window response final (HU) | window selectivity "
             "start -> final | selectivity gain | runs with p(seed) > 0.5 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(
            f"| {r['method']} | {r['network']} | {r['start']} | {r['dice_unmarked']:.3f} | {r['dice_marked']:.3f} | "
            f"{_ci_cols(r, 'window_response_final', '.1f')} | {_f(r['window_selectivity_start_mean'])} -> "
            f"{_ci_cols(r, 'window_selectivity_final', '+.3f')} | {_ci_cols(r, 'window_selectivity_gain', '+.3f')} | "
            f"{r['runs_reaching_0.5']}/{r['runs']} |")
    return "\n".join(lines)


def _plot_31(path: Path, variant: str, method: str, summary, curves, example, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 5, figsize=(18, 7))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
    for row, start in enumerate(STARTS):
        if not any(r["start"] == start for r in summary):
            for a in ax[row]:
                a.axis("off")
            continue
        a = ax[row, 0]
        if (method, names[-1], start) in example:
            xT, mT, (sj, si), _ = example[(method, names[-1], start)]
            a.imshow(xT, cmap="gray", vmin=-100, vmax=250)
            a.contour(mT, levels=[0.5], colors="r", linewidths=0.8)
            a.plot(si, sj, "r+")
        a.set_title(f"(a) {names[-1]} (training seed 0) from {start}, seed point 0 (final)", fontsize=9)
        a.axis("off")
        for n, name in enumerate(names):
            cs = curves.get((method, name, start), [])
            if not cs:
                continue
            its = cs[0][0]
            for col, k in ((1, 2), (2, 1)):
                v = np.array([c[k] for c in cs if len(c[k]) == len(its)])
                m, sd = v.mean(0), v.std(0)
                ax[row, col].plot(its, m, color=colours[n], label=name)
                ax[row, col].fill_between(its, m - sd, m + sd, color=colours[n], alpha=0.15, lw=0)
        ax[row, 1].set_title(f"(b) 135-deg selectivity, mean +- sd of runs ({start})", fontsize=9)
        ax[row, 2].set_title(f"(b') max 135-deg response (HU), mean +- sd ({start})", fontsize=9)
        ax[row, 1].legend(fontsize=7)
        for col in (1, 2):
            ax[row, col].set_xlabel("iteration")
        rows = [r for r in summary if r["start"] == start]
        ps = np.array([r["p"] for r in rows])
        for col, key, label in ((3, "window_response_final", "final response (HU)"),
                                (4, "window_selectivity_final", "final selectivity")):
            a = ax[row, col]
            m = np.array([r[f"{key}_mean"] for r in rows])
            lo = np.array([r[f"{key}_lo"] for r in rows])
            hi = np.array([r[f"{key}_hi"] for r in rows])
            a.errorbar(ps, m, yerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], fmt="s--", color="tab:red",
                       capsize=3, label=f"{label}, mean, 95% CI")
            a.set_xlabel("p")
            a.set_ylabel(label, color="tab:red")
            b = a.twinx()
            b.plot(ps, [r["dice_unmarked"] for r in rows], "o-", color="k", label="Dice (unmarked)")
            b.set_ylim(0, 1)
            b.set_ylabel("Dice unmarked")
            a.set_title(f"(c) Dice (black) and {label} ({start})", fontsize=9)
    fig.suptitle(f"Section 3.1 on LiTS 117, marking '{variant}', method '{method}': networks G_p trained with a "
                 f"135-degree line marking of probability p; 95% CI over training seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _plot_dreams(path: Path, variant: str, example, methods, g0: str, g1: str, start: str = "healthy") -> None:
    """The dreams of G_0 and G_1 (training seed 0, seed point 0, from the healthy slice) side by side per
    method: the final image with its mask, and the change (dream - start) on a symmetric window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if (m, g0, start) in example and (m, g1, start) in example]
    if not methods:
        return
    fig, ax = plt.subplots(len(methods), 4, figsize=(13, 3.4 * len(methods)), squeeze=False)
    for r, m in enumerate(methods):
        for c, g in enumerate((g0, g1)):
            x, mask, (sj, si), x0 = example[(m, g, start)]
            a = ax[r, 2 * c]
            a.imshow(x, cmap="gray", vmin=-100, vmax=250)
            a.contour(mask, levels=[0.5], colors="r", linewidths=0.8)
            a.plot(si, sj, "r+")
            a.set_title(f"{m}: {g} dream (HU -100..250)", fontsize=9)
            a.axis("off")
            change = x - x0
            lim = float(np.nanpercentile(np.abs(change), 99.5)) or 1.0
            a = ax[r, 2 * c + 1]
            im = a.imshow(change, cmap="RdBu_r", vmin=-lim, vmax=lim)
            a.set_title(f"{m}: {g} change (dream - start, HU)", fontsize=9)
            a.axis("off")
            fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(f"Section 3.1, marking '{variant}': dreams of {g0} and {g1} from the healthy slice (training seed 0, "
                 f"seed point 0)", fontsize=10)
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


CLAIMS_32 = {
    # key: (feature, quantity, network expected ..., relation, other network)
    "intensity": ("firstorder_RootMeanSquared", "final", "real", "<", "synthetic_round"),
    "intensity_score": ("firstorder_RootMeanSquared", "score", "real", ">", "synthetic_round"),
    "elongation": ("shape2D_Elongation", "final", "synthetic_elongated", "<", "synthetic_round"),
    "elongation_score": ("shape2D_Elongation", "score", "synthetic_elongated", ">", "synthetic_round"),
}
"""The section 3.2 claims: final raw value (primary) and sensitivity score against the real tumours (secondary)."""


GROUPS_32 = ("real", "synthetic_round", "synthetic_elongated")


def jobs_32(settings: Settings, train_h, val_h, train_r, val_r) -> list[TrainJob]:
    """The section 3.2 networks, ``settings.training_seeds`` trainings each."""
    round_l, elong_l = HypointenseLesions(shape="round"), HypointenseLesions(shape="elongated")
    spec = {"real": (train_r, val_r, None, "section 3.2: real LiTS tumours"),
            "synthetic_round": (train_h, val_h, round_l, "section 3.2: synthetic round hypointense lesions"),
            "synthetic_elongated": (train_h, val_h, elong_l, "section 3.2: synthetic elongated hypointense lesions")}
    return [TrainJob(model_name(g, t), g, t, settings.seed + t, spec[g][0], spec[g][1], spec[g][2], "same",
                     f"{spec[g][3]}; training seed {settings.seed + t}")
            for g in GROUPS_32 for t in range(settings.training_seeds)]


def section_32(out: Path, settings: Settings, trained: dict, volume, val_h, val_r, val_k, demo_volume, points) -> dict:
    from DeepDreamAnalysisLib.compare import _assemble, plot_comparison, write_comparison

    d = out / "section3.2"
    d.mkdir(parents=True, exist_ok=True)
    round_l, elong_l = HypointenseLesions(shape="round"), HypointenseLesions(shape="elongated")
    real_imgs = [s.image for s in val_r]
    real_labs = [s.label for s in val_r]
    nets, dice, group_of = {}, [], {}
    for job in jobs_32(settings, [], [], [], []):
        model, tlog = trained[job.name]
        nets[job.name] = model
        group_of[job.name] = (job.group, job.training_seed)
        dice.append({"network": job.group, "training_seed": job.training_seed, "own": tlog["val_dice"],
                     "real_tumours": float(training.evaluate(model.network, real_imgs, real_labs)["dice"]),
                     "synthetic_round": dice_on(model, val_h, round_l, job.seed),
                     "synthetic_elongated": dice_on(model, val_h, elong_l, job.seed)})
    reference, n_lesions = real_reference(volume, val_k)
    log(f"  reference: {n_lesions} real tumour cross-sections in the held-out slices")
    t0 = time.perf_counter()
    runs, pooled = [], {m: {g: [] for g in GROUPS_32} for m in settings.methods}
    features = None
    for method in settings.methods:
        for s, (i, j) in enumerate(points):
            cfg = _dream_config(settings, FEATURES_32, "healthy", random_seed=1000 * s, method=method)
            comp = _compare(out, settings, f"s32_{method}_sp{s}", demo_volume, (i, j, 0), nets, cfg, reference,
                            settings.restarts, RESTART_NOISE)
            features = comp.features
            sens = comp.sensitivities()
            for name in nets:
                group, t = group_of[name]
                pooled[method][group].extend(comp.results[name])
                for r in range(comp.restarts):
                    res = comp.results[name][r]
                    row = {"method": method, "network": group, "training_seed": t, "model": name, "seed_point": s,
                           "seed_i": i, "seed_j": j, "restart": r, "p_final": res.steps[-1].probability,
                           "first_above_0.5": res.first_iteration_above(0.5),
                           "flags": " ".join(sorted({f.code if hasattr(f, "code") else f["code"]
                                                     for f in (res.quality_flags or [])}))}
                    for n, f in enumerate(comp.features):
                        row[f"{f}_start"] = _first_finite(comp.values(name, f, "raw")[r])
                        row[f"{f}_final"] = _last_finite(comp.values(name, f, "raw")[r])
                        row[f"{f}_final_z"] = _last_finite(comp.values(name, f, "z")[r])
                        row[f"{f}_score"] = float(sens[name][r][n].score)
                    runs.append(row)
            log(f"  {method}, seed point {s} (i, j) = ({i}, {j}): {len(nets)} networks x {comp.restarts} restarts "
                f"({time.perf_counter() - t0:.0f} s so far)")
    files, rankings = {}, {}
    for method in settings.methods:
        allc = _assemble(list(GROUPS_32), pooled[method], reference)
        allc.metadata.update({"status": "completed", "method": method, "seed_points": [list(p) for p in points],
                              "restarts_per_seed_point": settings.restarts, "training_seeds": settings.training_seeds,
                              "restart_noise_std": RESTART_NOISE,
                              "note": "runs pooled over training seeds, seed points and restarts"})
        dm = d / method
        dm.mkdir(exist_ok=True)
        files[method] = {k: str(v) for k, v in write_comparison(allc, dm, title=f"Section 3.2 ({method}): all runs").items()}
        rankings[method] = [dataclasses.asdict(r) for r in allc.ranking()]
        nruns = allc.restarts
        plot_comparison(allc, d / f"fig5_raw_{method}.png", features=FIG5, kind="raw",
                        title=f"Section 3.2 (like Fig. 5), method '{method}': RMS (HU), max diameter (mm), elongation; "
                              f"mean and min-max of {nruns} runs")
        plot_comparison(allc, d / f"fig5_z_{method}.png", features=FIG5, kind="z",
                        title=f"Section 3.2, method '{method}': z-scores against the real tumours (normal range shaded)")
    claims = {m: claims_32(runs, m) for m in settings.methods}
    summary = []
    for method in settings.methods:
        for g in GROUPS_32:
            mine_d = [r for r in dice if r["network"] == g]
            row = {"method": method, "network": g,
                   **{f"dice_{k}": float(np.mean([r[k] for r in mine_d]))
                      for k in ("own", "real_tumours", "synthetic_round", "synthetic_elongated")}}
            for f in FEATURES_32:
                for q in ("start", "final", "final_z", "score"):
                    c = unit_ci(runs, f"{f}_{q}", network=g, method=method)
                    row.update({f"{f}_{q}_mean": c["mean"], f"{f}_{q}_lo": c["lo"], f"{f}_{q}_hi": c["hi"]})
            mine = [r for r in runs if r["network"] == g and r["method"] == method]
            row["runs"] = len(mine)
            row["runs_reaching_0.5"] = sum(r["first_above_0.5"] is not None for r in mine)
            row["runs_flagged"] = sum(bool(r["flags"]) for r in mine)
            summary.append(row)
    _write_table(runs, d / "runs_3_2.csv")
    _write_table(dice, d / "dice_3_2.csv")
    _write_table(summary, d / "table_3_2.csv")
    (d / "table_3_2.md").write_text(_table_32_md(summary) + "\n")
    return {"summary": summary, "claims": claims, "ranking": rankings, "files": files, "dice": dice,
            "reference_lesions": n_lesions, "dream_seconds": round(time.perf_counter() - t0, 1)}


def claims_32(runs, method: str | None = None) -> dict:
    """The section 3.2 verdicts (CLAIMS_32) of one dream ``method`` (None: every run)."""
    by_method = {} if method is None else {"method": method}
    claims = {}
    for key, (f, q, a, rel, b) in CLAIMS_32.items():
        ua = unit_means(runs, f"{f}_{q}", network=a, **by_method)
        ub = unit_means(runs, f"{f}_{q}", network=b, **by_method)
        claims[key] = {"feature": f, "quantity": q, "network": a, "relation": rel, "other": b,
                       "mean": mean_ci(statistical_units(ua).values())["mean"],
                       "other_mean": mean_ci(statistical_units(ub).values())["mean"],
                       **paired_verdict(ua, ub, rel)}
    return claims


def _table_32_md(summary) -> str:
    lines = ["| method | network | Dice own val | Dice real tumours | RMS start -> final (HU) | max diameter final (mm) | "
             "elongation final | score RMS | score elongation | runs with p(seed) > 0.5 | runs flagged |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(
            f"| {r['method']} | {r['network']} | {r['dice_own']:.3f} | {r['dice_real_tumours']:.3f} | "
            f"{_f(r['firstorder_RootMeanSquared_start_mean'], '.1f')} -> "
            f"{_ci_cols(r, 'firstorder_RootMeanSquared_final', '.1f')} | "
            f"{_ci_cols(r, 'shape2D_MaximumDiameter_final', '.1f')} | {_ci_cols(r, 'shape2D_Elongation_final', '.3f')} | "
            f"{_ci_cols(r, 'firstorder_RootMeanSquared_score', '+.2f')} | "
            f"{_ci_cols(r, 'shape2D_Elongation_score', '+.2f')} | {r['runs_reaching_0.5']}/{r['runs']} | "
            f"{r.get('runs_flagged', 0)}/{r['runs']} |")
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


def _git_commit() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "scripts",
                                "DeepDreamAnalysis/DeepDreamAnalysisLib"], capture_output=True, text=True,
                               timeout=10).stdout
        changed = [line[3:] for line in dirty.splitlines() if line.strip()]
        return head + (f" (uncommitted changes in {', '.join(changed)})" if changed else "") if head else "unknown"
    except Exception:  # noqa: BLE001 - no git: the run goes on
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/reproduce")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2 epochs, 20 iterations, 2 seed points, 2 training seeds (numbers meaningless)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=None, help="iterations of the paper method (default 600)")
    ap.add_argument("--default-iterations", type=int, default=None,
                    help="iterations of the default method (default 150)")
    ap.add_argument("--step", type=float, default=None, help="the paper method's alpha (default 300)")
    ap.add_argument("--restarts", type=int, default=None, help="random restarts per seed point (default 1)")
    ap.add_argument("--seed-points", type=int, default=None, help="seed points in the liver (default 8)")
    ap.add_argument("--training-seeds", type=int, default=None,
                    help="trainings (seeds 0, 1, ...) of every network (default 3; the statistical unit of the verdicts)")
    ap.add_argument("--methods", default=None,
                    help=f"dream methods, comma-separated (default {','.join(METHODS)}; 'default' is the engine's)")
    ap.add_argument("--markings", default=None,
                    help=f"section 3.1 marking variants, comma-separated (default thin; also {', '.join(MARKINGS)})")
    ap.add_argument("--starts", default=None,
                    help=f"section 3.1 dream starts, comma-separated (default {','.join(STARTS)})")
    ap.add_argument("--feature-every", type=int, default=None,
                    help="compute the mask features every N iterations (default 2; the verdicts use the window "
                         "features of the snapshots, every 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--reuse", action="store_true", help="reuse networks already trained in --out/models")
    ap.add_argument("--only", choices=("3.1", "3.2"), default=None)
    ap.add_argument("--workers", type=int, default=None,
                    help="dream on the study engine (a local Ray) with this many workers, and train this many networks "
                         "at once (`make reproduce`: one per core)")
    ap.add_argument("--address", default=None, help="dream on this Ray cluster instead (auto, ray://HOST:10001)")
    args = ap.parse_args(argv)
    s = Settings(threads=args.threads, workers=args.workers, address=args.address)
    if args.quick:
        s = dataclasses.replace(s, epochs=2, iterations=20, default_iterations=20, restarts=1, seed_points=2,
                                training_seeds=2, snapshot_every=5, feature_every=1, min_own_dice=0.0)
    for k in ("epochs", "iterations", "default_iterations", "step", "restarts", "seed_points", "training_seeds",
              "feature_every"):
        v = getattr(args, k)
        if v is not None:
            if v <= 0:
                ap.error(f"--{k.replace('_', '-')} must be positive, got {v}")
            setattr(s, k, v)
    for opt, known in (("markings", MARKINGS), ("methods", METHODS), ("starts", STARTS)):
        value = getattr(args, opt)
        if value is not None:
            chosen = tuple(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
            unknown = [m for m in chosen if m not in known]
            if unknown or not chosen:
                ap.error(f"--{opt}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
            setattr(s, opt, chosen)
    from DeepDreamAnalysisLib.stopping import stop_reason, stop_signals_interrupt

    with stop_signals_interrupt():  # SIGTERM and SIGHUP stop it as Ctrl-C does
        try:
            return _reproduce(args, s)
        except KeyboardInterrupt as stop:
            print(f"\nstopped ({stop_reason(stop)}); the networks trained so far are kept in {args.out}/models: run "
                  "the same command with --reuse to go on from them (the dreams are redone).", file=sys.stderr)
            return 130
        finally:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                ray.shutdown()  # the local Ray of the dreams (or the connection to --address): its processes end


def _reproduce(args, s: Settings) -> int:
    torch.set_num_threads(s.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    commit = _git_commit()
    log(f"Reproduction on LiTS 117 (assumed spacing 1.6 x 1.6 x 3.0 mm) at commit {commit}; "
        f"settings {dataclasses.asdict(s)}")
    volume = lits.load_lits117()
    train_k, val_k = training.split_indices(volume[0].shape[0])
    train_h = training.lits_slices(train_k, "healthy", volume=volume)
    val_h = training.lits_slices(val_k, "healthy", volume=volume)
    train_r = training.lits_slices(train_k, "real", volume=volume)
    val_r = training.lits_slices(val_k, "real", volume=volume)
    demo_volume, _ = lits.demo_case()
    liver = lits.healthy_slice(volume[0], volume[1], lits.DEMO_SLICE).liver
    points = seed_points(liver, s.seed_points)
    log(f"Dream start: healthy slice {lits.DEMO_SLICE} (held out), seed points (i, j) = {points}, "
        f"{s.restarts} restart(s) each, {s.training_seeds} training seeds per network, methods {', '.join(s.methods)}")
    results = {"settings": dataclasses.asdict(s), "commit": commit, "seed_points_ij": [list(p) for p in points],
               "slice": lits.DEMO_SLICE, "torch": torch.__version__}
    jobs = []
    if args.only in (None, "3.1"):
        for variant in s.markings:
            jobs += jobs_31(s, train_h, val_h, variant)
    if args.only in (None, "3.2"):
        jobs += jobs_32(s, train_h, val_h, train_r, val_r)
    trained = train_all(out, s, jobs, args.reuse)  # before Ray starts: the training processes are spawned
    results["replaced_trainings"] = replace_failed_trainings(out, s, jobs, trained, args.reuse,
                                                                 min_dice=s.min_own_dice)
    results["time_training_s"] = round(time.perf_counter() - t0, 1)
    if s.workers is not None or s.address is not None:  # one Ray for every comparison of the run
        from DeepDreamAnalysisLib.studies.engine import _start_ray, require_ray

        _start_ray(require_ray(), s.address, s.workers, 10.0)
    if args.only in (None, "3.1"):
        results["section_3_1"] = {}
        for variant in s.markings:
            log(f"Section 3.1, marking '{variant}': networks G_p")
            results["section_3_1"][variant] = section_31(out, s, trained, val_h, demo_volume, points, variant)
        results["time_3_1_s"] = round(time.perf_counter() - t0, 1)
    if args.only in (None, "3.2"):
        log("Section 3.2: real vs synthetic, elongated vs round")
        results["section_3_2"] = section_32(out, s, trained, volume, val_h, val_r, val_k, demo_volume, points)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    try:
        import os

        results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(_results_md(results) + "\n")
    log("")
    log(_claims_text(results))
    log(f"Done in {results['total_s'] / 60:.1f} min; results in {out}/ (results.md, results.json, section3.*/)")
    return 0


def _pair_text(p) -> str:
    return (f"{p['relying']} - {p['robust']} {_f(p['diff_mean'], '+.3g')} "
            f"[{_f(p['diff_lo'], '+.3g')}, {_f(p['diff_hi'], '+.3g')}]")


def _claims_text(results) -> str:
    lines = []
    st = results["settings"]
    n = len(results["seed_points_ij"])
    ts = st.get("training_seeds", 1)
    unit = (f"the unit is the training seed ({ts}), its value the mean over {n} seed points"
            if ts > 1 else f"the unit is the seed point ({n})")
    lines.append(f"(verdicts: paired differences, {unit}, restarts averaged; 95% t-interval of the mean difference)")
    for variant, sec in results.get("section_3_1", {}).items():
        for method, c in sec["claims"].items():
            lines.append(f"3.1 [{variant}, {method}]: G_0 Dice {c['baseline_dice']:.3f}; relying on the marking "
                         f"(Dice < {RELIES:g} x G_0's): {', '.join(c['relying']) or 'none'}; robust (Dice within "
                         f"{NEAR_BASELINE:g} of G_0's): {', '.join(c['not_relying']) or 'none'}; intermediate: "
                         f"{', '.join(c['intermediate']) or 'none'}.")
            for start, b in c["by_start"].items():
                for key, label in (("window_response", "raw max 135-degree response (the paper's)"),
                                   ("window_selectivity", "contrast-normalised selectivity")):
                    v = b[key]
                    lines.append(f"3.1 [{variant}, {method}] ({start} start, {label}): every relying network above "
                                 f"every robust one -> {v['verdict'].upper()}; differences: "
                                 + "; ".join(_pair_text(p) for p in v["pairs"]))
    if "section_3_2" in results:
        for method, claims in results["section_3_2"]["claims"].items():
            for key, c in claims.items():
                lines.append(f"3.2 [{method}] {key}: {c['quantity']} {c['feature']} {c['network']} {_f(c['mean'], '.3f')} "
                             f"{c['relation']} {c['other']} {_f(c['other_mean'], '.3f')}? difference "
                             f"{_f(c['diff_mean'], '+.3f')} [{_f(c['diff_lo'], '+.3f')}, {_f(c['diff_hi'], '+.3f')}] "
                             f"-> {c['verdict'].upper()}.")
    return "\n".join(lines)


def _results_md(results) -> str:
    st = results["settings"]
    out = ["# Reproduction results", "",
           f"Commit {results['commit']}; settings `{json.dumps(st)}`; dream start: healthy slice "
           f"{results['slice']}, seed points (i, j) = {results['seed_points_ij']}; total "
           f"{results['total_s'] / 60:.1f} min (training {results.get('time_training_s', 0) / 60:.1f} min), load average "
           f"at the end {results.get('load_average_at_end')}. Values: mean [95 % CI] over training seeds of the "
           f"seed-point means (restarts averaged); Dice: mean over training seeds.", ""]
    replaced = results.get("replaced_trainings") or []
    out += ["## Trainings that did not learn their task", "",
            f"Rule: own-distribution validation Dice < {st.get('min_own_dice', MIN_OWN_DICE):g} -> retrained with seed 100 r + t "
            f"(at most {MAX_REPLACEMENTS} times), the replacement takes the training seed's place.", ""]
    out += [f"- {r['failed']} (seed {r['failed_seed']}, own Dice {r['failed_own_dice']:.3f}) -> "
            + ", ".join(f"{a['model']} (seed {a['seed']}, own Dice {a['own_dice']:.3f})" for a in r["attempts"])
            + ("" if r["learned"] else " (still did not learn: kept, marked)") for r in replaced] or ["- none"]
    out += [""]
    for variant, sec in results.get("section_3_1", {}).items():
        folder = "section3.1" if variant == "thin" else f"section3.1_{variant}"
        out += [f"## Section 3.1, marking '{variant}'", "", _table_31_md(sec["summary"]), "",
                "### Dream quality per method on the G_p networks", "", _quality_md(sec["quality"]), "",
                f"![dreams of G_0 and G_1 per method]({folder}/dreams_G0_G1.png)", ""]
        out += [f"![fig4 {m}]({folder}/fig4_{m}.png)" for m in st["methods"]] + [""]
    if "section_3_2" in results:
        out += ["## Section 3.2", "", _table_32_md(results["section_3_2"]["summary"]), ""]
        for m in st["methods"]:
            out += [f"![fig5 {m}](section3.2/fig5_raw_{m}.png)", "", f"![fig5z {m}](section3.2/fig5_z_{m}.png)", ""]
    out += ["## Verdicts", "", "```", _claims_text(results), "```"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
