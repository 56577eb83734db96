"""One analysis: dream + features + reference -> :class:`~.result.AnalysisResult`.

``run_analysis`` is the single entry point used by the command line, notebooks and the Slicer
module. It blocks; it reports every iteration through ``on_progress`` and stops within one
iteration when ``cancel`` is set, returning the partial result marked ``cancelled``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import platform
import threading
import time
from typing import Callable

import numpy as np

from . import __version__
from .config import AnalysisConfig
from .dream import DreamLoop, crop_around_seed, default_roi, deterministic, select_device
from .dreaming.lesion_spectrum import spectrum_for
from .engine import quality
from .errors import DeepDreamError, ImageError, ModelError, ReferenceStatsError, RunFault
from .feature_worker import FeatureComputer
from .mask import seed_component
from .result import AnalysisResult, Progress, Snapshot, Step
from .volume import Volume

log = logging.getLogger(__name__)


def run_analysis(volume: Volume, seed_ijk, model, config: AnalysisConfig | None = None, reference=None,
                 on_progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None, loop_factory: Callable | None = None) -> AnalysisResult:
    """Dream a lesion at ``seed_ijk`` (voxel indices i, j, k of ``volume``) and track its features.

    ``model`` is a :class:`~.models.LoadedModel` (``network`` + ``card``). ``reference`` is a
    :class:`~.reference.ReferenceStats` or None (raw values, noted in the metadata). Raises a
    :class:`~.errors.DeepDreamError` subclass for bad input before anything runs; a fault during the
    run (NaN gradients, out of memory, an exception in the model) returns the iterations before it
    with ``status == "fault"`` and the message in ``metadata["fault"]``.

    ``loop_factory`` (takes :class:`~.dream.DreamLoop`'s arguments, default ``DreamLoop``) is how
    :func:`.engine.batched.run_batched` runs several analyses through one batch.
    """
    t_start = time.perf_counter()
    config = config or AnalysisConfig()
    config.validate()
    card = model.card
    seed = volume.check_seed(seed_ijk)
    volume.check_finite()
    warnings: list[str] = []
    check_fits(volume, card, config.dream.start, warnings)
    check_network_dims(model.network, card)
    seed_kji = (seed[2], seed[1], seed[0])

    from .features import build_feature_set
    from .features.custom import FeatureContext

    feature_set = build_feature_set(config.features, card.spatial_dims)
    names = tuple(feature_set.names)
    if reference is not None:
        reference.require([n for n in names])
        check_reference_settings(reference, card.spatial_dims, config.features.bin_width, names)
    spectrum_for(config.dream.method, reference)  # a method that needs reference lesions: refused without them

    crop = plan_crop(volume, seed, card, config)
    seed_in_crop = tuple(s - c for s, c in zip(seed_kji, crop.start))
    device = select_device(config.dream.device)
    network = _network_on(model, device)
    start = volume.array[crop.slices]

    metadata = _metadata(volume, seed, model, config, crop, device, reference, names)
    metadata["warnings"] = warnings
    steps: list[Step] = []
    snapshots: list[Snapshot] = []
    status = "completed"
    computer = FeatureComputer(feature_set, config.features, card.spatial_dims, volume.spacing)
    t0 = time.perf_counter()
    t_features = 0.0
    total = config.dream.iterations
    every = config.features.every
    loop = (loop_factory or DreamLoop)(network, card, start, seed_in_crop, config.dream, device, spacing=volume.spacing,
                                       reference=reference)
    monitor = quality.QualityMonitor(crop.size, card.spatial_dims, config.dream.threshold)
    watch = _QualityWatch(loop, card, seed_in_crop)
    base_context = FeatureContext(spacing=tuple(volume.spacing), seed_kji=tuple(seed_in_crop), seed_ijk=tuple(seed),
                                  seed_mm=tuple(float(v) for v in volume.index_to_physical(seed)), crop=crop)
    context = base_context
    t_setup = time.perf_counter() - t_start
    try:
        with deterministic(config.dream.random_seed, device):
            for state in loop:
                it = state.iteration
                probability = _ProbabilityOf(state)  # read only where needed (snapshots): it may cost a forward
                mask = state.seed_mask
                if mask is None:
                    mask = seed_component(probability(), seed_in_crop, config.dream.threshold)
                step = Step(it, state.objective, state.probability_at_seed, int(mask.sum()), {})
                steps.append(step)
                monitor.observe(it, mask, state.probability_at_seed, step.mask_voxels)
                watch.see(state)
                context = dataclasses.replace(base_context, iteration=it, start_image=watch.start)
                tf = time.perf_counter()
                if it % every == 0 or it == total - 1:
                    computer.submit(step, state.image, mask, context)
                else:
                    step.features.update({n: math.nan for n in names})
                    computer.submit_window(step, state.image, mask, context)
                late = computer.collect()
                t_features += time.perf_counter() - tf
                snap = None
                if it % config.snapshot_every == 0 or it == total - 1:
                    snap = _snapshot(state, probability(), mask, snapshots, config.max_snapshots)
                if on_progress is not None:
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / (it + 1) * (total - it - 1)
                    on_progress(Progress(step, snap, total, elapsed, eta, late))
                if cancel is not None and cancel.is_set():
                    if snap is None:
                        _snapshot(state, probability(), mask, snapshots, config.max_snapshots)
                    status = "cancelled"
                    break
        if status == "completed" and loop.stopped_early:
            status = "stopped"
            last = steps[-1]
            if snapshots[-1].iteration != last.iteration:
                _snapshot(state, probability(), mask, snapshots, config.max_snapshots)
            if all(math.isnan(last.features.get(n, math.nan)) for n in names) and last.mask_voxels:
                last.features.clear()
                computer.submit(last, state.image, mask, context)
    except RunFault as fault:
        status = "fault"
        metadata["fault"] = str(fault)
        log.error("%s", fault)
    finally:
        tf = time.perf_counter()
        computer.finish(wait=status != "cancelled")
        t_features += time.perf_counter() - tf
    wall = time.perf_counter() - t_start
    loop_wall = time.perf_counter() - t0
    flags = watch.flags(monitor, config.dream.threshold)
    crop_changed = quality.crop_flag(_requested_crop(card, config), crop.size, volume.array.shape,
                                     card.size_divisible, spacing_ijk=volume.spacing, direction=volume.direction,
                                     card_spacing_ijk=card.spacing, spatial_dims=card.spatial_dims)
    if crop_changed is not None:
        flags.insert(0, crop_changed)
    result = AnalysisResult(steps, snapshots, crop, names, reference, metadata, status, flags)
    metadata["quality_flags"] = [f.to_dict() for f in flags]
    metadata["seed_output_constant"] = bool(getattr(watch, "stalled", False))
    metadata["relu_redirects"] = int(getattr(getattr(loop, "redirects", None), "redirected", 0))
    if callable(getattr(loop, "copy_window_record", None)):  # where the transformed copies were evaluated
        metadata.update(loop.copy_window_record())
    failures = dict(getattr(feature_set, "failures", {}) or {})
    if computer.local_set is not None and computer.local_set is not feature_set:
        failures.update(getattr(computer.local_set, "failures", {}) or {})
    failures.update(getattr(computer, "failures", {}) or {})
    metadata.update({
        "feature_backends": dict(getattr(feature_set, "backend_of", {}) or {}),
        "feature_failures": failures,
        "status": status,
        "iterations_run": len(steps),
        "first_iteration_above_0.5": result.first_iteration_above(0.5),
        "finished": _now(),
        "timings_s": {
            "total": round(wall, 4),
            "setup": round(t_setup, 4),
            "features": round(t_features, 4),
            "per_iteration": round(loop_wall / max(len(steps), 1), 6),
        },
    })
    return result


def plan_crop(volume: Volume, seed_ijk, card, config: AnalysisConfig):
    """The crop (start and size in [k, j, i]) the loop will work on for this seed and model."""
    seed = volume.check_seed(seed_ijk)
    roi = default_roi(card, config.dream)
    return crop_around_seed(volume.array.shape, (seed[2], seed[1], seed[0]), roi, card.spatial_dims,
                            card.size_divisible)


def _requested_crop(card, config: AnalysisConfig) -> tuple[int, int, int]:
    """The crop size [k, j, i] asked for (configuration or card), before it is fitted to the image."""
    roi = default_roi(card, config.dream)
    return (1,) + tuple(roi) if card.spatial_dims == 2 else tuple(roi)


class _QualityWatch:
    """Keeps what the image checks of :mod:`.engine.quality` need: the first and last images and,
    for a softmax network with more than two classes, the class probabilities at the seed."""

    def __init__(self, loop, card, seed_in_crop):
        self.loop, self.card, self.seed = loop, card, seed_in_crop
        self.start = None
        self.last = None

    def see(self, state) -> None:
        if self.start is None:
            self.start = state.image.detach().cpu().numpy().copy()
        self.last = state

    def _class_probabilities(self, image):
        to_input = getattr(self.loop, "_network_input", None)
        if to_input is None or image is None:
            return None
        import torch

        try:
            tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(image, device=self.loop.device)
            return quality.seed_class_probabilities(self.loop.network, to_input, tensor, self.seed, self.card)
        except Exception as exc:  # noqa: BLE001 - a check must never fail the run
            log.debug("wrong_class check skipped: %s", exc)
            return None

    def _seed_output_constant(self) -> bool:
        to_input = getattr(self.loop, "_network_input", None)
        if to_input is None:
            return False
        try:
            return bool(quality.seed_output_is_constant(self.loop.network, to_input, self.last.image, self.seed,
                                                        self.card))
        except Exception as exc:  # noqa: BLE001 - a check must never fail the run
            log.debug("stalled-seed check skipped: %s", exc)
            return False

    def flags(self, monitor: quality.QualityMonitor, threshold: float) -> list:
        final = self.last.image.detach().cpu().numpy() if self.last is not None else None
        region = getattr(self.loop, "update_region", None)
        if region is None or callable(region):
            region = getattr(self.loop, "region", None)
        flags = monitor.finish(self.start, final, region, tuple(self.card.intensity_range))
        self.stalled = False
        if self.last is not None and any(f.code == "no_dream" for f in flags) and self._seed_output_constant():
            self.stalled = True  # the real cause of this no_dream: a zero gradient at the seed
            flags = [quality.stalled_flag(f, self.loop.config.method) if f.code == "no_dream" else f for f in flags]
        if self.last is not None:
            wrong = quality.wrong_class_flag(self._class_probabilities(self.start),
                                             self._class_probabilities(self.last.image), self.card.target_class)
            if wrong is not None:
                flags.append(wrong)
        return flags


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def _network_on(model, device):
    """The model's network on ``device`` (through ``LoadedModel.to`` when there is one; the model
    stays there after the run). Out of GPU memory here is a :class:`RunFault`-style message."""
    import torch

    try:
        if hasattr(model, "to") and callable(model.to) and hasattr(model, "card"):
            moved = model.to(device)
            return getattr(moved, "network", model.network)
        return model.network.to(device) if hasattr(model.network, "to") else model.network
    except torch.cuda.OutOfMemoryError:
        raise ModelError(f"The model does not fit in the GPU's memory ({device}). Run on the CPU (--device cpu) "
                         "or free GPU memory.") from None


def check_reference_settings(reference, spatial_dims: int, bin_width: float, names) -> None:
    """Refuse reference statistics computed another way than this run's features (z-scores would lie)."""
    settings = getattr(reference, "settings", None) or {}
    where = getattr(reference, "source", None) or "the reference statistics"
    ref_dims = settings.get("spatial_dims")
    if ref_dims is not None and int(ref_dims) != spatial_dims:
        raise ReferenceStatsError(
            f"{where} were computed per {'slice (2D)' if int(ref_dims) == 2 else 'volume (3D)'} but the model is "
            f"{spatial_dims}D: the z-scores would compare different things. Recompute them with "
            f"`deepdream-analysis reference ... --dims {spatial_dims}`.")
    ref_bw = settings.get("bin_width")
    binned = [n for n in names if not n.startswith(("shape", "line135"))]
    if ref_bw is not None and binned and abs(float(ref_bw) - float(bin_width)) > 1e-9:
        raise ReferenceStatsError(
            f"{where} used a bin width of {ref_bw:g} but this run uses {bin_width:g}; texture and entropy features "
            f"({', '.join(binned[:3])}...) depend on it. Use --bin-width {ref_bw:g}, or recompute the statistics "
            f"with --bin-width {bin_width:g}.")


def check_network_dims(network, card) -> None:
    """Raise ModelError when the network's first convolution is not ``card.spatial_dims``-dimensional.

    torch convolutions accept unbatched input, so a 3D network given a 2D input ``[1, 1, H, W]`` reads it as
    one channel of depth 1 and returns ``[1, C, H, W]``: the output shape alone cannot show the mismatch, and
    the seed's logit would come from a network applied to the wrong axes.
    """
    from .models import first_conv

    conv_dims = first_conv(network)[1]
    if conv_dims is not None and conv_dims != card.spatial_dims:
        raise ModelError(
            f"The model card says spatial_dims={card.spatial_dims} but the network is {conv_dims}D (its first "
            f"convolution is conv{conv_dims}d): fix spatial_dims (and roi_size) in the model card."
        )


def check_fits(volume: Volume, card, start: str = "image", warnings: list[str] | None = None) -> None:
    """Raise ModelError when the model cannot take this image (channels, a 3D model on one slice);
    append (and log) warnings about spacing, slice orientation, constant or label-map images."""
    warnings = [] if warnings is None else warnings
    if card.in_channels != 1:
        raise ModelError(
            f"The model card says the network takes {card.in_channels} input channels, but the image has one "
            "(a scalar volume). DeepDream analysis works on single-channel models; use such a model, or fix "
            "in_channels in the card if it is wrong."
        )
    if card.spatial_dims == 3 and min(volume.array.shape) < 2:
        raise ModelError(
            f"The model is 3D but the image is a single slice (shape [k, j, i] = {volume.array.shape}). "
            "Give a 3D volume, or use a 2D model (spatial_dims 2 in its card)."
        )
    if card.spacing is not None:
        n = 2 if card.spatial_dims == 2 else min(3, len(card.spacing))
        ours, theirs = np.asarray(volume.spacing[:n]), np.asarray(card.spacing[:n])
        if np.any(np.abs(ours / theirs - 1.0) > 0.2):
            _warn(warnings, f"The image's voxel spacing {tuple(round(v, 3) for v in volume.spacing[:n])} mm differs by "
                            f"more than 20% from the spacing the model was trained at {tuple(card.spacing[:n])} mm: "
                            "the network sees objects at another scale. Resample the image to the model's spacing.")
    if card.spatial_dims == 2 and volume.array.shape[0] > 1:
        k_axis = np.asarray(volume.direction)[:, 2]
        if abs(k_axis[2]) < 0.9:
            _warn(warnings, "The model is 2D and works on slices along the image's k axis, but that axis is not "
                            "head-feet (the volume is stored sagittally or coronally, or oblique): the slices are "
                            "not axial. Reorient the image to axial if the model was trained on axial slices.")
    if start == "noise":
        return  # the image's voxels are not used
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo == hi:
        _warn(warnings, f"The image is constant ({volume.array.flat[0]} everywhere): the dream starts from a blank "
                        "image. If that is not what you meant, check that the right volume was loaded.")
    elif looks_like_label_map(volume.array):
        _warn(warnings, "The image holds only the values " + ", ".join(f"{v:g}" for v in np.unique(volume.array))
              + ": it looks like a label map (segmentation), not an intensity image. It is analysed as a scalar "
              "image; choose the intensity volume (the CT or MR) if this was a mistake.")


LABEL_MAP_MAX_VALUES = 8


def looks_like_label_map(array: np.ndarray) -> bool:
    """True for an integer-valued image with at most :data:`LABEL_MAP_MAX_VALUES` distinct values."""
    sample = array.ravel()[:: max(array.size // 100_000, 1)]
    if np.unique(sample).size > LABEL_MAP_MAX_VALUES or not np.array_equal(sample, np.round(sample)):
        return False
    values = np.unique(array)
    return values.size <= LABEL_MAP_MAX_VALUES and np.array_equal(values, np.round(values))


class _ProbabilityOf:
    """The probability map of a :class:`~.dream.DreamState` as a numpy array ``[k, j, i]``, computed
    at the first call (the loop may not have needed it: :mod:`.dreaming.near_seed`)."""

    def __init__(self, state):
        self.state, self.array = state, None

    def __call__(self) -> np.ndarray:
        if self.array is None:
            self.array = self.state.probability.detach().cpu().numpy()
        return self.array


def _snapshot(state, prob_np, mask, snapshots, cap) -> Snapshot:
    snap = Snapshot(state.iteration, state.image.detach().cpu().numpy().copy(), prob_np.astype(np.float32), mask)
    _keep_snapshot(snapshots, snap, cap)
    return snap


def _keep_snapshot(snapshots: list[Snapshot], snap: Snapshot, cap: int) -> None:
    """Append, and when over ``cap`` drop every other snapshot (keeping the first and the newest)."""
    snapshots.append(snap)
    if len(snapshots) > cap:
        keep = snapshots[:-1:2] + [snapshots[-1]]
        snapshots[:] = keep


def _versions() -> dict[str, str]:
    """Package versions from their metadata (importing them here would hold the GIL for seconds)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "deepdream-analysis": __version__}
    for dist, key in (("torch", "torch"), ("monai", "monai"), ("numpy", "numpy"), ("SimpleITK", "SimpleITK"),
                      ("pyradiomics", "radiomics")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _metadata(volume, seed, model, config, crop, device, reference, names) -> dict:
    card = model.card
    return {
        "tool": "deepdream-analysis",
        "version": __version__,
        "started": _now(),
        "configuration": dataclasses.asdict(config),
        "model": {
            "path": str(getattr(model, "path", "")),
            "format": getattr(model, "format", "unknown"),
            "sha256": getattr(model, "sha256", None),
            "executes_code": getattr(model, "executes_code", None),
            "notes": list(getattr(model, "notes", []) or []),
            "card": card.to_dict(),
        },
        "input": {
            "shape_kji": list(volume.array.shape),
            "spacing_ijk_mm": list(volume.spacing),
            "origin_ijk_mm": list(volume.origin),
            "direction": np.asarray(volume.direction).ravel().tolist(),
            "seed_ijk": list(seed),
        },
        "crop": {"start_kji": list(crop.start), "size_kji": list(crop.size)},
        "features": list(names),
        "normalised": reference is not None,
        "reference": getattr(reference, "source", None) if reference is not None else None,
        "note": None if reference is not None else
        "No reference statistics were given: the curves are raw feature values, not z-scores.",
        "device": str(device),
        "random_seed": config.dream.random_seed,
        "platform": platform.platform(),
        "versions": _versions(),
    }


__all__ = ["run_analysis", "DeepDreamError", "ImageError"]
