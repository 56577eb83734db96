"""Several networks, several random restarts each, on the same start image and seed (the paper's Fig. 5).

    deepdream-analysis compare --image CT.nii.gz --seed i,j,k --model real=a.pt --model synth=b.pt \
        --restarts 3 --out DIR [the dream and feature options of `run`]

Python::

    from DeepDreamAnalysisLib.studies import compare_models, write_comparison
    comp = compare_models(volume, (i, j, k), {"real": model_a, "synth": model_b}, config, reference, restarts=3)
    comp.mean("real", "firstorder_RootMeanSquared")   # [iterations] mean z-score over the restarts
    write_comparison(comp, "out/")                     # comparison.csv, comparison.png, sensitivity.csv, ranking.*

Restarts. Restart ``r`` (0-based) runs with ``random_seed = config.dream.random_seed + r``. With
``start="noise"`` each restart starts from its own white noise. With ``start="image"`` the loop
itself is deterministic (no regulariser draws random numbers), so restart ``r >= 1`` starts from
the image plus i.i.d. Gaussian noise of standard deviation ``restart_noise_std`` (image units, HU
for CT; default 10 HU, about half the texture of healthy liver) inside the crop the loop works on,
drawn from ``numpy.random.default_rng(random_seed)``; restart 0 is the unperturbed image. With
``restart_noise_std = 0`` and ``start="image"`` every restart would be identical, so only one is
run (and the metadata says so). Every model sees the same start images (the same noise per restart).

Spread. Per model, feature and iteration: mean, standard deviation (population, ddof 0), minimum
and maximum over the restarts whose value is finite there (NaN while no restart has a mask).
Values are z-scores when reference statistics are given (the normal range is [-1, 1]), raw
feature values otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import AnalysisConfig
from ..errors import ConfigError, DeepDreamError, ModelError
from ..result import AnalysisResult, Progress
from ..volume import Volume

log = logging.getLogger(__name__)

BASE_CURVES = ("objective", "probability", "mask_voxels")
DEFAULT_RESTART_NOISE_STD = 10.0


@dataclass
class CompareProgress:
    """Progress of a comparison: which run (model, restart) and that run's :class:`Progress`.

    ``run_index`` counts from 0 over all runs; ``total_runs`` = models x restarts.
    """

    model: str
    restart: int
    run_index: int
    total_runs: int
    progress: Progress


@dataclass
class Comparison:
    """The runs of several models with restarts, on one common iteration axis.

    ``raw[model]`` and ``z[model]`` are float arrays ``[restart, iteration, feature]`` (features in
    ``features`` order, iterations in ``iterations``; NaN where a run has no value); ``z`` is None
    without a reference. ``base[model]`` is ``[restart, iteration, 3]`` with objective (logit units),
    probability at the seed and mask size (voxels). ``results[model]`` keeps the full
    :class:`~.result.AnalysisResult` of every restart.
    """

    models: list[str]
    features: tuple[str, ...]
    iterations: np.ndarray
    raw: dict[str, np.ndarray]
    z: dict[str, np.ndarray] | None
    base: dict[str, np.ndarray]
    results: dict[str, list[AnalysisResult]]
    restarts: int
    metadata: dict = field(default_factory=dict)
    keep_flagged: bool = False
    """Rank runs with quality flags too (default: they are left out of :meth:`ranking`)."""

    @property
    def normalised(self) -> bool:
        """True when the curves are z-scores against reference statistics."""
        return self.z is not None

    def values(self, model: str, feature: str, kind: str = "auto") -> np.ndarray:
        """``[restart, iteration]`` curves of one feature (``kind``: ``z``, ``raw`` or ``auto`` =
        z when normalised), or of a base curve (objective, probability, mask_voxels)."""
        if model not in self.raw:
            raise KeyError(f"No model named {model!r}; known: {', '.join(self.models)}")
        if feature in BASE_CURVES:
            return self.base[model][:, :, BASE_CURVES.index(feature)]
        if feature not in self.features:
            raise KeyError(f"No feature named {feature!r}; known: {', '.join(self.features)}")
        n = self.features.index(feature)
        if kind == "auto":
            kind = "z" if self.normalised else "raw"
        if kind == "z":
            if self.z is None:
                raise KeyError("This comparison has no reference statistics, hence no z-scores; use kind='raw'.")
            return self.z[model][:, :, n]
        return self.raw[model][:, :, n]

    def _stat(self, fn, model, feature, kind):
        v = self.values(model, feature, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as documented
            return fn(v, axis=0)

    def mean(self, model: str, feature: str, kind: str = "auto") -> np.ndarray:
        """Mean over the restarts at each iteration (NaN where no restart has a value)."""
        return self._stat(np.nanmean, model, feature, kind)

    def std(self, model: str, feature: str, kind: str = "auto") -> np.ndarray:
        """Standard deviation (ddof 0) over the restarts at each iteration."""
        return self._stat(np.nanstd, model, feature, kind)

    def min(self, model: str, feature: str, kind: str = "auto") -> np.ndarray:
        return self._stat(np.nanmin, model, feature, kind)

    def max(self, model: str, feature: str, kind: str = "auto") -> np.ndarray:
        return self._stat(np.nanmax, model, feature, kind)

    def sensitivities(self):
        """``{model: [[FeatureSensitivity per feature] per restart]}`` (see :mod:`.sensitivity`)."""
        from .sensitivity import feature_sensitivity

        # z-scores for a feature the reference knows (finite z in some run), in every run, so that a
        # restart that never made a lesion gives NaN rather than switching that feature to raw values
        normalised = {f: self.z is not None and any(np.isfinite(self.z[m][:, :, n]).any() for m in self.models)
                      for n, f in enumerate(self.features)}
        out = {}
        for m in self.models:
            per_restart = []
            for r in range(self.restarts):
                row = []
                for f in self.features:
                    if normalised[f]:
                        z = self.z[m][r, :, self.features.index(f)]
                        row.append(feature_sensitivity(self.iterations, z, f, True))
                    else:
                        row.append(feature_sensitivity(self.iterations, self.raw[m][r, :, self.features.index(f)], f, False))
                per_restart.append(row)
            out[m] = per_restart
        return out

    def flagged_runs(self) -> dict[str, dict[int, list[str]]]:
        """``{model: {restart: [quality flag codes]}}`` of the runs with quality flags
        (docs/quality-flags.md); models without one are absent."""
        out: dict[str, dict[int, list[str]]] = {}
        for m, runs in self.results.items():
            for r, res in enumerate(runs):
                codes = [f.code for f in getattr(res, "quality_flags", None) or []]
                if codes:
                    out.setdefault(m, {})[r] = codes
        return out

    def ranking(self, keep_flagged: bool | None = None):
        """The features of each model ranked by sensitivity score (:func:`.sensitivity.rank_features`).

        Runs with quality flags are left out unless ``keep_flagged`` (default: the comparison's
        ``keep_flagged``); a model whose every run is flagged has no rows (see :meth:`ranking_note`)."""
        from .sensitivity import rank_features

        keep = self.keep_flagged if keep_flagged is None else keep_flagged
        flagged = {} if keep else self.flagged_runs()
        return rank_features({m: [s for r, run in enumerate(runs) if r not in flagged.get(m, {}) for s in run]
                              for m, runs in self.sensitivities().items()
                              if len(flagged.get(m, {})) < len(runs)})

    def ranking_note(self) -> list[str]:
        """One line per model with flagged runs: which restarts, which flags, and whether they were ranked."""
        lines = []
        for m, runs in self.flagged_runs().items():
            which = "; ".join(f"restart {r}: {', '.join(codes)}" for r, codes in sorted(runs.items()))
            if self.keep_flagged:
                lines.append(f"{m}: runs with quality flags are ranked (--keep-flagged): {which}.")
            elif len(runs) == len(self.results[m]):
                lines.append(f"{m}: every run has a quality flag ({which}): no ranking; the dreams are not "
                             "trustworthy (docs/quality-flags.md). --keep-flagged ranks them anyway.")
            else:
                lines.append(f"{m}: left out of the ranking, runs with quality flags ({which}); "
                             "--keep-flagged keeps them (docs/quality-flags.md).")
        return lines


def restart_seeds(config: AnalysisConfig, restarts: int, restart_noise_std: float) -> list[int]:
    """The random seeds of the restarts actually run (one when they would all be identical)."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ConfigError(f"restarts must be a positive integer, got {restarts!r}.")
    if not (isinstance(restart_noise_std, (int, float)) and restart_noise_std >= 0 and math.isfinite(restart_noise_std)):
        raise ConfigError(f"restart_noise_std must be zero or a positive number (image units), got {restart_noise_std!r}.")
    if config.dream.start == "image" and restart_noise_std == 0 and restarts > 1:
        log.warning("start=image and restart_noise_std=0: every restart would be identical; running one.")
        restarts = 1
    base = int(config.dream.random_seed)
    return [base + r for r in range(restarts)]


def _restart(volume: Volume, seed_ijk, model, config: AnalysisConfig, r: int, random_seed: int,
             restart_noise_std: float):
    """(config, start volume) of restart ``r``: its random seed and, with ``start="image"``, for
    ``r >= 1`` the image plus noise (module docstring)."""
    run_config = dataclasses.replace(config, dream=dataclasses.replace(config.dream, random_seed=random_seed))
    start = volume
    if config.dream.start == "image" and r > 0 and restart_noise_std > 0:
        start = _perturbed(volume, seed_ijk, model.card, config, restart_noise_std, random_seed)
    return run_config, start


def _perturbed(volume: Volume, seed_ijk, card, config: AnalysisConfig, std: float, random_seed: int) -> Volume:
    """``volume`` with Gaussian noise (std image units) added inside the crop the loop will use."""
    from ..dream import crop_around_seed, default_roi

    seed = volume.check_seed(seed_ijk)
    roi = default_roi(card, config.dream)
    crop = crop_around_seed(volume.array.shape, (seed[2], seed[1], seed[0]), roi, card.spatial_dims, card.size_divisible)
    rng = np.random.default_rng(random_seed)
    array = np.array(volume.array, copy=True)
    region = array[crop.slices]
    array[crop.slices] = region + rng.normal(0.0, std, region.shape).astype(np.float32)
    return dataclasses.replace(volume, array=array)


def compare_models(volume: Volume, seed_ijk, models: dict, config: AnalysisConfig | None = None, reference=None,
                   restarts: int = 3, on_progress: Callable[[CompareProgress], None] | None = None,
                   cancel: threading.Event | None = None,
                   restart_noise_std: float = DEFAULT_RESTART_NOISE_STD, keep_flagged: bool = False,
                   batch: bool = True) -> Comparison:
    """Run every model of ``models`` (name -> :class:`~.models.LoadedModel`) ``restarts`` times.

    ``seed_ijk``: voxel indices (i, j, k) of ``volume``; ``config``: the same
    :class:`~.config.AnalysisConfig` for every run (its ``dream.random_seed`` is the first
    restart's seed); ``reference``: :class:`~.reference.ReferenceStats` or None (raw values).
    Restarts are described in the module docstring. ``cancel`` (a threading.Event) stops the
    current run within one iteration and skips the rest; the comparison then holds what ran, with
    ``metadata["status"] == "cancelled"``. Raises :class:`~.errors.DeepDreamError` subclasses for bad
    input (no models, models of different dimensions, a bad configuration). Runs with quality flags
    are left out of the ranking unless ``keep_flagged`` (docs/quality-flags.md).

    ``batch`` (default True): the restarts of each model run as one batch through its network
    (:mod:`..engine.batched`; the same numbers as separate runs up to floating-point rounding; a
    network that cannot take a batch runs them one after the other); False runs them one by one.
    """
    from ..analysis import run_analysis

    config = config or AnalysisConfig()
    config.validate()
    if not models:
        raise ConfigError("Give at least one model to compare (name -> model).")
    names = list(models)
    dims = {n: m.card.spatial_dims for n, m in models.items()}
    if len(set(dims.values())) > 1:
        raise ModelError(
            "The models to compare must all be 2D or all 3D (their features differ otherwise): "
            + ", ".join(f"{n} is {d}D" for n, d in dims.items()) + "."
        )
    seeds = restart_seeds(config, restarts, restart_noise_std)
    total = len(names) * len(seeds)
    results: dict[str, list[AnalysisResult]] = {n: [] for n in names}
    status = "completed"
    t0 = time.perf_counter()
    run_index = 0
    if batch:
        from ..engine.batched import BatchMember, run_batched

        for name in names:  # the restarts of one model: one batch through its network
            if cancel is not None and cancel.is_set():
                status = "cancelled"
                break
            model = models[name]
            members = []
            for r, rs in enumerate(seeds):
                run_config, start = _restart(volume, seed_ijk, model, config, r, rs, restart_noise_std)
                cb = None
                if on_progress is not None:
                    def cb(p, _m=name, _r=r, _i=run_index + r):
                        on_progress(CompareProgress(_m, _r, _i, total, p))
                members.append(BatchMember(start, seed_ijk, run_config, cb))
            results[name] = run_batched(model, members, reference, cancel=cancel)
            run_index += len(members)
            if any(res.status == "cancelled" for res in results[name]):
                status = "cancelled"
                break
    for r, rs in enumerate(seeds if not batch else ()):
        for name in names:
            if cancel is not None and cancel.is_set():
                status = "cancelled"
                break
            model = models[name]
            run_config, start = _restart(volume, seed_ijk, model, config, r, rs, restart_noise_std)
            cb = None
            if on_progress is not None:
                def cb(p, _m=name, _r=r, _i=run_index):
                    on_progress(CompareProgress(_m, _r, _i, total, p))
            result = run_analysis(start, seed_ijk, model, run_config, reference, on_progress=cb, cancel=cancel)
            results[name].append(result)
            run_index += 1
            if result.status == "cancelled":
                status = "cancelled"
                break
        if status == "cancelled":
            break
    # a model whose run was cancelled before it started has fewer restarts: keep only complete rows
    done = min(len(v) for v in results.values())
    if done == 0:
        raise DeepDreamError("The comparison was cancelled before any run finished for every model; nothing to show.")
    results = {n: v[:done] for n, v in results.items()}
    return _comparison(names, results, models, volume, seed_ijk, config, reference, restarts, seeds, status,
                       restart_noise_std, keep_flagged, t0)


def _comparison(names, results, models, volume, seed_ijk, config, reference, restarts, seeds, status,
                restart_noise_std, keep_flagged, t0) -> Comparison:
    """The :class:`Comparison` of finished runs, with its metadata."""
    done = min(len(v) for v in results.values())
    comp = _assemble(names, results, reference)
    comp.keep_flagged = bool(keep_flagged)
    comp.metadata.update({
        "status": status if status == "cancelled" else _overall_status(results),
        "restarts_requested": int(restarts),
        "restarts_run": done,
        "batched_restarts": {n: [(res.metadata.get("batch") or {}).get("batched", False) for res in v]
                             for n, v in results.items()},
        "random_seeds": seeds[:done],
        "restart_noise_std": float(restart_noise_std) if config.dream.start == "image" else None,
        "start": config.dream.start,
        "seed_ijk": list(volume.check_seed(seed_ijk)),
        "configuration": dataclasses.asdict(config),
        "models": {n: _model_meta(models[n]) for n in names},
        "normalised": reference is not None,
        "reference": getattr(reference, "source", None) if reference is not None else None,
        "wall_s": round(time.perf_counter() - t0, 3),
        "runs": {n: [{"status": res.status, "fault": res.metadata.get("fault"),
                      "first_iteration_above_0.5": res.first_iteration_above(0.5),
                      "quality_flags": [f.code for f in getattr(res, "quality_flags", None) or []]} for res in v]
                 for n, v in results.items()},
    })
    return comp


def compare_on_study(image_path, seed_ijk, model_files: dict, config: AnalysisConfig, reference_path=None,
                     restarts: int = 3, restart_noise_std: float = DEFAULT_RESTART_NOISE_STD, out=None,
                     address: str | None = None, workers: int | None = None, keep_flagged: bool = False,
                     on_progress=None, batch: bool = True) -> Comparison:
    """:func:`compare_models` on the study engine (Ray, :mod:`.engine`): the same runs (same restart
    seeds and start images, hence the same numbers), run in parallel, each in ``out/runs/<key>/``.

    ``model_files``: name -> (model path, card path or None). ``config.features.custom`` (what
    ``--custom-feature`` gave: the user's explicit opt-in) goes to the study as allowed. Returns the :class:`Comparison`; the study's own
    files (table, pooled figure, report) are in ``out`` too.
    """
    from ..models import load_model
    from ..reference import ReferenceStats
    from ..volume import read_volume
    from .engine import run_study_outcome
    from .spec import load_study

    config.validate()
    seeds = restart_seeds(config, restarts, restart_noise_std)
    dream = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config.dream).items()
             if k not in ("method",)}
    if getattr(config.dream, "method", None) is not None:
        methods = [config.dream.method]
    else:
        methods = ["default"]
    seed = [int(v) for v in seed_ijk]
    spec = {"name": "compare", "models": [{"name": n, "path": str(p), **({"card": str(c)} if c else {})}
                                          for n, (p, c) in model_files.items()],
            "images": [{"name": "image", "path": str(image_path), "seeds": [seed]}],
            "restarts": len(seeds), "restart_noise_std": float(restart_noise_std), "methods": methods, "dream": dream,
            "features": list(config.features.names) if config.features.names is not None else None,
            "feature_backend": config.features.backend, "feature_every": config.features.every,
            "bin_width": config.features.bin_width, "snapshot_every": config.snapshot_every,
            "keep_flagged": bool(keep_flagged), "batch": 4 if batch else 1}
    if config.features.custom:
        spec["custom_features"] = dict(config.features.custom)
    if reference_path:
        spec["reference"] = str(reference_path)
    t0 = time.perf_counter()
    outcome = run_study_outcome(load_study(spec), out, address=address, workers=workers, on_progress=on_progress,
                                keep_results=True, allow_custom_features=True)
    names = list(model_files)
    results = {n: [] for n in names}
    for run in sorted(outcome.runs, key=lambda r: r.restart):
        if run.key not in outcome.results:
            raise DeepDreamError(f"The run {run.label()} failed: {outcome.status[run.key].get('message')} "
                                 f"(see {outcome.out}/runs.csv).")
        results[run.model].append(outcome.results[run.key])
    volume = read_volume(image_path)
    models = {n: load_model(p, card=c) for n, (p, c) in model_files.items()}
    reference = ReferenceStats.load(reference_path) if reference_path else None
    comp = _comparison(names, results, models, volume, seed, config, reference, restarts, seeds, "completed",
                       restart_noise_std, keep_flagged, t0)
    comp.metadata["study_folder"] = str(outcome.out)
    return comp


def _overall_status(results) -> str:
    statuses = {res.status for v in results.values() for res in v}
    return "fault" if "fault" in statuses else "completed"


def _model_meta(model) -> dict:
    return {"path": str(getattr(model, "path", "")), "format": getattr(model, "format", "unknown"),
            "sha256": getattr(model, "sha256", None), "card": model.card.to_dict()}


def _assemble(names, results: dict[str, list[AnalysisResult]], reference) -> Comparison:
    features: list[str] = []
    for v in results.values():
        for res in v:
            for f in res.feature_names:
                if f not in features:
                    features.append(f)
    its = sorted({int(i) for v in results.values() for res in v for i in res.iterations})
    iterations = np.array(its, dtype=int)
    index = {it: n for n, it in enumerate(its)}
    raw, zs, base = {}, {} if reference is not None else None, {}
    for name in names:
        runs = results[name]
        a = np.full((len(runs), len(its), len(features)), np.nan)
        b = np.full((len(runs), len(its), len(BASE_CURVES)), np.nan)
        z = np.full_like(a, np.nan)
        for r, res in enumerate(runs):
            rows = [index[int(i)] for i in res.iterations]
            for n, f in enumerate(features):
                if f in res.feature_names:
                    a[r, rows, n] = res.column(f)
                    if zs is not None:
                        z[r, rows, n] = res.zscores(f)
            for n, c in enumerate(BASE_CURVES):
                b[r, rows, n] = res.column(c)
        raw[name] = a
        base[name] = b
        if zs is not None:
            zs[name] = z
    return Comparison(names, tuple(features), iterations, raw, zs, base, results, len(next(iter(results.values()))))


# ----------------------------------------------------------------------------- output


def write_comparison(comparison: Comparison, out_dir, title: str | None = None) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.png``, ``sensitivity.csv``, ``ranking.csv``,
    ``ranking.md`` and ``comparison.json`` (metadata) into ``out_dir``; returns the paths by key.

    comparison.csv is long format, one row per (model, restart, iteration, curve): columns
    ``model, restart, iteration, feature, value, z`` (``z`` empty without a reference and for the
    base curves objective, probability and mask_voxels, which are included too).
    """
    from ..atomic import write_text_atomic
    from ..report import check_writable
    from .sensitivity import FIELDS, ranking_markdown, write_sensitivity_csv

    out = check_writable(out_dir)
    paths = {}
    lines = ["model,restart,iteration,feature,value,z"]
    for m in comparison.models:
        for r in range(comparison.restarts):
            for n, it in enumerate(comparison.iterations):
                for c, name in enumerate(BASE_CURVES):
                    lines.append(f"{_csv(m)},{r},{int(it)},{name},{_num(comparison.base[m][r, n, c])},")
                for c, f in enumerate(comparison.features):
                    zv = comparison.z[m][r, n, c] if comparison.z is not None else math.nan
                    lines.append(f"{_csv(m)},{r},{int(it)},{f},{_num(comparison.raw[m][r, n, c])},{_num(zv)}")
    paths["csv"] = out / "comparison.csv"
    write_text_atomic(paths["csv"], "\n".join(lines) + "\n")

    sens = comparison.sensitivities()
    rows = []
    for m, runs in sens.items():
        for r, run in enumerate(runs):
            for s in run:
                rows.append({"model": m, "restart": r, **{k: getattr(s, k) for k in FIELDS}})
    paths["sensitivity"] = out / "sensitivity.csv"
    write_sensitivity_csv(rows, paths["sensitivity"])
    ranking = comparison.ranking()
    paths["ranking"] = out / "ranking.csv"
    write_sensitivity_csv([dataclasses.asdict(r) for r in ranking], paths["ranking"])
    paths["ranking_md"] = out / "ranking.md"
    note = comparison.ranking_note()
    write_text_atomic(paths["ranking_md"], "".join(f"> {line}\n" for line in note) + ("\n" if note else "")
                      + ranking_markdown(ranking))
    paths["json"] = out / "comparison.json"
    meta = dict(comparison.metadata)
    meta["keep_flagged"] = comparison.keep_flagged
    meta["ranking_note"] = comparison.ranking_note()
    meta.update({"models_order": comparison.models, "features": list(comparison.features),
                 "iterations": [int(comparison.iterations[0]), int(comparison.iterations[-1])] if len(comparison.iterations) else []})
    write_text_atomic(paths["json"], json.dumps(meta, indent=2, default=_json_default) + "\n")
    paths["png"] = out / "comparison.png"
    plot_comparison(comparison, paths["png"], title=title)
    return paths


def plot_comparison(comparison: Comparison, path, features=None, title: str | None = None, kind: str = "auto",
                    show_probability: bool = True, dpi: int = 90) -> Path:
    """Write :func:`comparison_figure` as a PNG to ``path`` (atomically); returns the path."""
    from ..atomic import atomic_path

    fig = comparison_figure(comparison, features, title, kind, show_probability)
    target = Path(path)
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return target


def comparison_figure(comparison: Comparison, features=None, title: str | None = None, kind: str = "auto",
                      show_probability: bool = True):
    """One panel per feature (and one for p(seed)): per model a mean line (one colour per model) and
    the min-max spread over the restarts shaded; the normal band [-1, 1] shaded grey for z-scores.
    A matplotlib Figure on its own Agg canvas, its panels placed without drawing it."""
    import matplotlib

    from ..outputs import figures

    features = list(features or comparison.features)
    panels = (["probability"] if show_probability else []) + features
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = figures.agg_figure(3.4 * ncol, 2.7 * nrow)  # its own Agg canvas: no pyplot, no GUI backend
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    its = comparison.iterations
    zmode = comparison.normalised if kind == "auto" else kind == "z"
    for ax, name in zip(axes.flat, panels):
        base = name in BASE_CURVES
        k = "raw" if base or not zmode else "z"
        if not base and zmode:
            ax.axhspan(-1, 1, color="0.85", zorder=0, label="normal range")
        for n, m in enumerate(comparison.models):
            c = colours[n % len(colours)]
            mean = comparison.mean(m, name, k)
            lo, hi = comparison.min(m, name, k), comparison.max(m, name, k)
            ok = np.isfinite(mean)  # features computed every N-th iteration: join the computed points
            ax.plot(its[ok], mean[ok], color=c, lw=1.5, label=m)
            if comparison.restarts > 1:
                ax.fill_between(its[ok], lo[ok], hi[ok], color=c, alpha=0.22, lw=0)
        ax.set_title(name if base or not zmode else f"{name} (z)", fontsize=8)
        ax.set_xlabel("iteration", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if zmode and features:
        h2, l2 = axes.flat[len(panels) - 1].get_legend_handles_labels()
        for h, lab in zip(h2, l2):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    legend_cols = min(6, len(labels))
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    spread = f"mean and min-max over {comparison.restarts} restarts" if comparison.restarts > 1 else "one run each"
    figures.place_suptitle(fig, title or f"DeepDream comparison ({spread}; {'z-scores' if zmode else 'raw values'})", 9)
    # margins in inches instead of tight_layout, which would draw the whole figure more times just to measure it
    figures.layout_grid(fig, list(axes.flat)[:len(panels)], nrow, ncol, tick_font=7, title_font=8, xlabel_font=7,
                        suptitle_font=9, legend_rows=figures.legend_rows(len(labels), legend_cols) if labels else 0,
                        legend_font=8)
    return fig


def _csv(s: str) -> str:
    return f'"{s}"' if ("," in s or '"' in s) else s


def _num(v) -> str:
    v = float(v)
    return "" if math.isnan(v) else f"{v:.7g}"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


__all__ = ["Comparison", "CompareProgress", "compare_models", "compare_on_study", "write_comparison", "plot_comparison",
           "comparison_figure",
           "restart_seeds", "DEFAULT_RESTART_NOISE_STD", "BASE_CURVES"]
