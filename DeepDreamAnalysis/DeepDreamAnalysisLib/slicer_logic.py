"""The Slicer module's logic without Qt: run an analysis on MRML nodes and show it as nodes.

``DeepDreamAnalysisLogic`` (in ``DeepDreamAnalysis.py``) is this class plus Slicer's
``ScriptedLoadableModuleLogic`` and a ``qt.QTimer`` that calls :meth:`RunHandle.processEvents`
every 150 ms. Without Qt (slicer-core, CI) call ``handle.processEvents()`` yourself, or use the
blocking form (``waitForCompletion=True``), which drains on the calling thread until the end.

Threads: the worker thread (``runner.AnalysisRunner``) computes with torch and numpy only; every
MRML update happens in :meth:`RunHandle.processEvents`, on the thread that calls it (Slicer's main
thread). Imports torch only when a run starts.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import AnalysisConfig, DreamConfig, FeatureConfig, paper_features
from .errors import DeepDreamError, FeatureError, SeedError
from .result import AnalysisResult, Progress
from . import scene as scene_mod

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


def radiomics_available() -> bool:
    """True when pyradiomics can be imported (SlicerRadiomics installs it in Slicer)."""
    return importlib.util.find_spec("radiomics") is not None


def native_feature_names() -> frozenset[str]:
    """Features the engine computes without pyradiomics (empty if that module is unavailable)."""
    try:
        from .features.native import NATIVE_FEATURES
    except Exception:  # noqa: BLE001 - no torch yet, or the module is missing: nothing native
        return frozenset()
    return frozenset(NATIVE_FEATURES)


def choose_features(names: Sequence[str] | None, spatial_dims: int,
                    have_radiomics: bool | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(features to compute, features left out because pyradiomics is missing).

    ``names`` None means the paper's six for the model's dimensionality.
    """
    wanted = tuple(names) if names is not None else tuple(paper_features(spatial_dims))
    if have_radiomics is None:
        have_radiomics = radiomics_available()
    if have_radiomics:
        return wanted, ()
    native = native_feature_names()
    kept = tuple(n for n in wanted if n in native)
    return kept, tuple(n for n in wanted if n not in native)


def preload_engine() -> None:
    """Import, on the calling (main) thread, what the worker would otherwise import on its first
    iteration. An import holds the GIL for its whole duration (monai: seconds), which would freeze
    Slicer's main thread mid-run; done here it is a one-time wait when Apply is pressed."""
    import torch

    from . import analysis, features, runner  # noqa: F401

    # on CUDA the loop's deterministic() switch imports torch._dynamo/_inductor on first use (seconds)
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                           warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    for name in ("monai", "radiomics", "SimpleITK"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def status_text(progress: Progress | None, status: str = "running") -> str:
    """One line for the panel: iteration, probability at the seed, time left."""
    if progress is None:
        return "Starting..." if status == "running" else status.capitalize()
    it, total = progress.step.iteration + 1, progress.total_iterations
    prob = progress.step.probability
    text = f"Iteration {it}/{total}, p(seed) = {prob:.3f}"
    if status == "running":
        if math.isfinite(progress.eta_s):
            minutes, seconds = divmod(int(round(progress.eta_s)), 60)
            text += f", {minutes}:{seconds:02d} left"
    else:
        text = f"{status.capitalize()}: {text}"
    return text


class RunHandle:
    """One analysis going on in a worker thread, and its output nodes.

    Call :meth:`processEvents` on the scene's thread (Slicer: a timer does it) to move progress
    into the nodes; it returns False once the run has ended and the nodes are final.
    :meth:`cancel` stops the run within one iteration (the nodes keep what was computed).
    """

    def __init__(self, runner, updater: scene_mod.SceneUpdater,
                 progressCallback: Callable[[Progress], None] | None = None,
                 logCallback: Callable[[str], None] | None = None,
                 finishedCallback: Callable[["RunHandle"], None] | None = None):
        self.runner = runner
        self.updater = updater
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.finishedCallback = finishedCallback
        self.lastProgress: Progress | None = None
        self.finished = False
        self.started = time.monotonic()

    # --- state -------------------------------------------------------------------------------

    @property
    def nodes(self) -> scene_mod.ResultNodes:
        return self.updater.nodes

    @property
    def result(self) -> AnalysisResult | None:
        return self.runner.result

    @property
    def error(self) -> BaseException | None:
        return self.runner.error

    @property
    def is_running(self) -> bool:
        return not self.finished

    @property
    def status(self) -> str:
        if not self.finished:
            return "cancelling" if self.runner.cancelled else "running"
        return self.updater.status

    def statusText(self) -> str:
        return status_text(self.lastProgress, self.status)

    # --- control -----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the run to stop; it ends within one iteration, and the next drain finishes the nodes."""
        self.runner.cancel()

    def processEvents(self) -> bool:
        """Drain the worker's reports into the nodes; True while the run goes on."""
        if self.finished:
            return False
        done = self.runner.done
        self._drain()
        if done:
            self._drain()
            self._finish()
            return False
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.1,
             idle: Callable[[], None] | None = None) -> AnalysisResult | None:
        """Drain until the end (or ``timeout`` seconds); ``idle`` runs between drains (Slicer:
        ``slicer.app.processEvents``). Returns the result; raises the run's error."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.processEvents():
            if end is not None and time.monotonic() > end:
                return None
            self.runner.join(interval)
            if idle is not None:
                idle()
        if self.error is not None:
            raise self.error
        return self.result

    def abandon(self, timeout: float = 10.0) -> None:
        """Stop without touching the scene again (the scene is closing or the module reloads)."""
        self.runner.cancel()
        self.runner.join(timeout)
        self.runner.poll()
        self.finished = True

    # --- internals ---------------------------------------------------------------------------

    def _drain(self) -> None:
        progresses = self.runner.poll()
        if not progresses:
            return
        self.lastProgress = progresses[-1]
        try:
            self.updater.update(progresses)
        except Exception as exc:  # noqa: BLE001 - the run goes on; the user hears why nodes lag
            log.exception("Updating the output nodes failed")
            self._log(f"Could not update the output nodes: {exc}")
        if self.progressCallback is not None:
            self.progressCallback(self.lastProgress)

    def _finish(self) -> None:
        self.finished = True
        error = self.runner.error
        result = self.runner.result
        try:
            if error is not None:
                partial = getattr(error, "partial", None)
                self.updater.finish(partial, status="fault", metadata={"fault": str(error)})
                self._log(f"The run failed: {error}")
            else:
                self.updater.finish(result)
                if result is not None and result.status == "fault":
                    self._log(f"The run stopped on a fault: {result.metadata.get('fault', '')}")
                else:
                    self._log(f"Run {self.updater.status}: {status_text(self.lastProgress, self.updater.status)}")
        except Exception as exc:  # noqa: BLE001
            log.exception("Finishing the output nodes failed")
            self._log(f"Could not finish the output nodes: {exc}")
        if self.finishedCallback is not None:
            self.finishedCallback(self)

    def _log(self, message: str) -> None:
        log.info("%s", message)
        if self.logCallback is not None:
            self.logCallback(message)


class AnalysisLogicCore:
    """What ``DeepDreamAnalysisLogic`` does, usable headless (slicer-core) and from scripts."""

    def __init__(self, scene=None):
        self._scene = scene
        self.handle: RunHandle | None = None
        self._models: dict[tuple[str, bool], Any] = {}

    @property
    def scene(self):
        return scene_mod._scene(self._scene)

    @property
    def isRunning(self) -> bool:
        return self.handle is not None and self.handle.is_running

    def resolveSeed(self, volumeNode, seed=None, seedRAS=None) -> tuple[int, int, int]:
        """The seed voxel (i, j, k): from a markups node (its last placed point, world
        coordinates), from an ``(i, j, k)`` index tuple (``seed=``), or from world RAS millimetres
        (``seedRAS=``)."""
        if seed is not None and seedRAS is not None:
            raise SeedError("Give the seed either as seed= (markups node or i,j,k) or as seedRAS=, not both.")
        if seedRAS is not None:
            return scene_mod.seed_ijk_from_ras(seedRAS, volumeNode, world=True)
        if seed is None:
            raise SeedError("No seed: place a seed point, or pass seed=(i, j, k) or seedRAS=(r, a, s).")
        if hasattr(seed, "GetNumberOfControlPoints"):
            return scene_mod.seed_ijk_from_markups(seed, volumeNode)
        dims = volumeNode.GetImageData().GetDimensions()
        try:
            ijk = tuple(int(round(float(v))) for v in seed)
        except (TypeError, ValueError):
            raise SeedError(f"seed must be a markups node or three voxel indices (i, j, k); got {seed!r}.") from None
        if len(ijk) != 3 or any(s < 0 or s >= n for s, n in zip(ijk, dims)):
            raise SeedError(f"Seed (i,j,k)={seed!r} is outside the volume (0,0,0) to {tuple(n - 1 for n in dims)}.")
        return ijk  # type: ignore[return-value]

    def loadModel(self, modelPath, device: str = "auto", allowCodeTargets: bool = False):
        """Load (and cache) a model with ``models.load_model``."""
        from .models import load_model

        if modelPath is None or str(modelPath).strip() in ("", "."):
            raise DeepDreamError("No model selected. Choose a model file or a MONAI bundle folder.")
        key = (str(Path(modelPath).resolve()), bool(allowCodeTargets))
        if key not in self._models:
            self._models.clear()  # keep one model in memory
            self._models[key] = load_model(modelPath, device="cpu", allow_code_targets=allowCodeTargets)
        return self._models[key]

    def run(self, volumeNode, modelPath=None, seed=None, *, seedRAS=None, iterations: int = 300,
            step: float = 1.0, features: Sequence[str] | None = None, referencePath=None,
            device: str = "auto", recordEvery: int = 10, maxRecorded: int = 100, newNodes: bool = False,
            waitForCompletion: bool = True, progressCallback=None, logCallback=None,
            finishedCallback=None, config: AnalysisConfig | None = None, model=None,
            allowCodeTargets: bool = False, idle: Callable[[], None] | None = None):
        """Run the analysis of ``volumeNode`` with the model at ``modelPath`` (or a loaded ``model``).

        Seed: ``seed`` is a markups point list (its last placed point) or voxel indices
        ``(i, j, k)``; ``seedRAS`` is a world position ``(R, A, S)`` in mm. ``features``: pyradiomics
        names (None: the paper's six). ``referencePath``: a reference statistics JSON (z-scores and
        the normal band) or None (raw values). ``device``: auto, cuda or cpu. ``recordEvery``:
        iterations between sequence items (snapshots are taken that often too).

        ``waitForCompletion=True`` returns the :class:`~.result.AnalysisResult` (output nodes in
        ``self.handle.nodes``); False returns the :class:`RunHandle` at once (call
        ``handle.processEvents()`` if no timer does). ``config`` overrides every loop setting.
        """
        if self.isRunning:
            raise DeepDreamError("An analysis is already running. Cancel it or wait for it to end.")
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise DeepDreamError(f"device must be one of {', '.join(DEVICES)}; got {device!r}.")
        volume = scene_mod.volume_from_node(volumeNode)
        seed_ijk = self.resolveSeed(volumeNode, seed, seedRAS)
        loaded = model if model is not None else self.loadModel(modelPath, device, allowCodeTargets)
        card = loaded.card
        if config is None:
            # Snapshots (live display) at least every 5 iterations; the sequences keep every recordEvery-th.
            config = AnalysisConfig(dream=DreamConfig(iterations=int(iterations), step=float(step), device=device),
                                    features=FeatureConfig(names=None),
                                    snapshot_every=max(1, min(int(recordEvery), 5)))
        else:
            config = copy.deepcopy(config)
        names, dropped = choose_features(features if features is not None else config.features.names,
                                         card.spatial_dims)
        if dropped:
            _say(logCallback, f"pyradiomics is not installed (install the SlicerRadiomics extension for it): "
                              f"running without {', '.join(dropped)}.")
        if not names:
            raise FeatureError("None of the selected features can be computed here. Select at least one "
                               "feature, or install SlicerRadiomics for pyradiomics features.")
        config.features.names = tuple(names)
        config.validate()
        reference = None
        if referencePath is not None and str(referencePath).strip() not in ("", "."):
            from .reference import ReferenceStats

            reference = ReferenceStats.load(referencePath)
        crop = self.cropFor(volume, seed_ijk, card, config)
        preload_engine()
        from .runner import AnalysisRunner

        updater = scene_mod.SceneUpdater(
            volumeNode, crop, names, reference, total_iterations=config.dream.iterations,
            options=scene_mod.SceneOptions(record_every=recordEvery, max_sequence_items=maxRecorded,
                                           new_nodes=newNodes),
            scene=self.scene,
            metadata={"model": str(getattr(loaded, "path", modelPath)), "seed_ijk": list(seed_ijk),
                      "device": device, "features": list(names)})
        runner = AnalysisRunner(volume, seed_ijk, loaded, config, reference)
        self.handle = RunHandle(runner, updater, progressCallback, logCallback, finishedCallback)
        _say(logCallback, f"Running {config.dream.iterations} iterations at seed (i,j,k)={seed_ijk} "
                          f"with {len(names)} features.")
        runner.start()
        if not waitForCompletion:
            return self.handle
        return self.handle.wait(idle=idle)

    @staticmethod
    def cropFor(volume, seed_ijk, card, config: AnalysisConfig):
        """The crop the loop will work on (``analysis.plan_crop``, as ``run_analysis`` uses it)."""
        from .analysis import plan_crop

        return plan_crop(volume, seed_ijk, card, config)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def abandon(self) -> None:
        """Stop any run without touching the scene (scene close, module reload, exit)."""
        if self.handle is not None:
            self.handle.abandon()


def _say(callback, message: str) -> None:
    log.info("%s", message)
    if callback is not None:
        callback(message)
