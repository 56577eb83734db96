"""The Slicer module's logic without Qt: run an analysis on MRML nodes and show it as nodes.

``DeepDreamAnalysisLogic`` (in ``DeepDreamAnalysis.py``) is this class plus Slicer's
``ScriptedLoadableModuleLogic`` and a ``qt.QTimer`` that calls :meth:`RunHandle.processEvents`
every 150 ms. Without Qt (slicer-core, CI) call ``handle.processEvents()`` yourself, or use the
blocking form (``waitForCompletion=True``), which drains on the calling thread until the end.

Threads: the worker (``runner.AnalysisRunner``, a thread; ``process_runner.ProcessRunner`` and
``ProcessComparisonRunner``, a process) computes with torch and numpy only; every
MRML update happens in :meth:`RunHandle.processEvents`, on the thread that calls it (Slicer's main
thread). Imports torch only when a run starts.

Faults and life cycle (docs/slicer-panel.md, "When things go wrong"):

- One analysis at a time per Slicer process, whichever logic object started it: ``run()`` while
  one is going raises :class:`RunInProgressError` and changes nothing.
- Bad input (a label map or vector volume, a seed outside the image, a missing model, ...) raises a
  :class:`~.errors.DeepDreamError` subclass before any output node is made; the last run's nodes
  are only replaced once the new run has passed every check.
- The scene closing (``slicer.mrmlScene.Clear()``, File > Close scene, loading a scene) cancels the
  run: each :class:`RunHandle` observes the scene's ``StartCloseEvent``, stops its worker (it ends
  within one iteration) and never touches the scene again, so nothing is recreated in the new scene.
- The input volume or the seed node deleted mid-run: the run goes on (the worker has its own copy of
  the image and the seed voxel; the outputs keep the input's geometry).
- Nothing raises out of :meth:`RunHandle.processEvents` (the timer's drain): node updates and user
  callbacks that fail are logged.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import AnalysisConfig, DreamConfig, FeatureConfig, card_dream_settings, dream_settings, paper_features
from .errors import ConfigError, DeepDreamError, FeatureError, SeedError
from .result import AnalysisResult, Progress
from . import scene as scene_mod

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


class RunInProgressError(DeepDreamError):
    """An analysis (or a comparison) is already running in this Slicer; one runs at a time."""


# What is running now in this process (RunHandle or comparison jobs), whichever logic started it:
# two runs at once would share the CPU/GPU and, with "replace the last run's nodes", remove each
# other's nodes.
_ACTIVE: list = []


def active_run():
    """The analysis or comparison running now in this process (it has ``describe()`` and
    ``cancel()``), or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def _refuse_if_running() -> None:
    job = active_run()
    if job is not None and job.finishIfDone():  # ended, but nobody drained it yet: finish its nodes now
        job = active_run()
    if job is not None:
        raise RunInProgressError(
            f"An analysis is already running ({job.describe()}). One runs at a time: cancel it first "
            "(Cancel in the panel, handle.cancel() or logic.cancel() in the console) or wait for it to end "
            "(handle.wait()), then start the new one.")


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


SHAPE_3D_TO_2D = {
    "shape_Maximum3DDiameter": "shape2D_MaximumDiameter",
    "shape_Elongation": "shape2D_Elongation",
    "shape_Sphericity": "shape2D_Sphericity",
}
"""The paper's shape features in their 3D (``shape``) and 2D (``shape2D``) forms."""
SHAPE_2D_TO_3D = {v: k for k, v in SHAPE_3D_TO_2D.items()}


def features_for_dims(names: Sequence[str] | None, spatial_dims: int) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """Map requested feature names to the model's dimensionality: (names to use, notes for the log).

    A 3D model measures shape with pyradiomics' ``shape`` class, a 2D model (one axial slice) with
    ``shape2D``. The paper's three shape features given in the other form are translated
    (``shape_Maximum3DDiameter`` <-> ``shape2D_MaximumDiameter``, ``shape_Elongation`` <->
    ``shape2D_Elongation``, ``shape_Sphericity`` <-> ``shape2D_Sphericity``); other shape features
    of the other form are dropped, with a note. Duplicates go, the order stays. None stays None
    (the paper's features for ``spatial_dims``).
    """
    if names is None:
        return None, ()
    if spatial_dims == 2:
        wrong, mapping = "shape_", SHAPE_3D_TO_2D
    else:
        wrong, mapping = "shape2D_", SHAPE_2D_TO_3D
    out: list[str] = []
    translated, dropped = [], []
    for name in names:
        if name in mapping:
            translated.append(f"{name} -> {mapping[name]}")
            name = mapping[name]
        elif name.startswith(wrong):
            dropped.append(name)
            continue
        if name not in out:
            out.append(name)
    notes = []
    if translated:
        notes.append(f"The model is {spatial_dims}D: using {', '.join(translated)}.")
    if dropped:
        other = "2D" if spatial_dims == 3 else "3D"
        notes.append(f"The model is {spatial_dims}D: left out {', '.join(dropped)} ({other} shape features; "
                     f"choose from the shape{'2D' if spatial_dims == 2 else ''} group instead).")
    return tuple(out), tuple(notes)


def model_card_hints(modelPath) -> tuple[int | None, dict]:
    """(spatial_dims or None, recommended dream settings) from the card beside ``modelPath``,
    without loading the model (for the panel: no torch). (None, {}) when no readable card is found."""
    from .card import ModelCard, find_card

    text = str(modelPath or "").strip()
    if not text or text == ".":
        return None, {}
    try:
        path = find_card(text)
        if path is None:
            return None, {}
        card = ModelCard.load(path)
    except (DeepDreamError, OSError, ValueError):
        return None, {}
    return card.spatial_dims, card_dream_settings(card)


def choose_features(names: Sequence[str] | None, spatial_dims: int,
                    have_radiomics: bool | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(features to compute, features left out because pyradiomics is missing).

    ``names`` None means the paper's seven features for the model's dimensionality.
    """
    wanted = tuple(names) if names is not None else tuple(paper_features(spatial_dims))
    if have_radiomics is None:
        have_radiomics = radiomics_available()
    if have_radiomics:
        return wanted, ()
    from .features.catalog import radiomics_names

    native = native_feature_names()
    radiomic = {n for group in radiomics_names(spatial_dims).values() for n in group}
    # only pyradiomics features without a native version are left out; custom names and typos go on
    # to build_feature_set, which computes the first and names the second
    dropped = tuple(n for n in wanted if n in radiomic and n not in native)
    return tuple(n for n in wanted if n not in dropped), dropped


def resolve_features(requested, spatial_dims: int, logCallback, verb: str) -> tuple[str, ...]:
    """The features a run computes: mapped to the model's dimensionality, without the
    pyradiomics-only ones when pyradiomics is missing (each change said through ``logCallback``)."""
    requested, notes = features_for_dims(requested, spatial_dims)
    for note in notes:
        _say(logCallback, note)
    names, dropped = choose_features(requested, spatial_dims)
    if dropped:
        _say(logCallback, f"pyradiomics is not installed (install the SlicerRadiomics extension for it): "
                          f"{verb} without {', '.join(dropped)}.")
    if not names:
        raise FeatureError("None of the selected features can be computed here. Select at least one "
                           "feature, or install SlicerRadiomics for pyradiomics features.")
    return tuple(names)


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


class _DrainedHandle:
    """What a run's and a comparison's handle share: the worker (a process or a thread) reports into
    a queue that :meth:`processEvents` drains on the scene's thread (a timer in Slicer); at the
    worker's end the handle finishes (``_finish``). Subclasses give ``runner``, ``finished``,
    ``_drain`` and ``_finish``."""

    @property
    def result(self):
        """The worker's result (an ``AnalysisResult`` or a ``Comparison``), None until it has one."""
        return self.runner.result

    @property
    def error(self) -> BaseException | None:
        return self.runner.error

    @property
    def is_running(self) -> bool:
        return not self.finished

    def cancel(self) -> None:
        """Ask the worker to stop; it ends within one iteration, and the next drain finishes."""
        self.runner.cancel()

    def processEvents(self) -> bool:
        """Drain the worker's reports; at its end finish. True while it goes on; never raises."""
        if self.finished:
            return False
        done = self.runner.done
        self._drain()
        if done and not getattr(self.runner, "backlog", 0):  # a capped drain's rest goes first
            self._drain()
            self._finish()
            return False
        return True

    def finishIfDone(self) -> bool:
        """If the worker has ended, drain and finish now (on the calling, main thread); True then."""
        if self.finished or not self.runner.done:
            return self.finished
        while self.processEvents():
            pass
        return True

    def _drainUntilEnd(self, timeout: float | None, interval: float, idle: Callable[[], None] | None):
        """Drain until the end, ``idle`` between waits: ``(True, deadline)``, or ``(False, deadline)``
        once ``timeout`` seconds have passed first (deadline: a ``time.monotonic`` value or None)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.processEvents():
            if end is not None and time.monotonic() > end:
                return False, end
            self.runner.join(interval)
            if idle is not None:
                idle()
        return True, end


class RunHandle(_DrainedHandle):
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
        self.abandoned = False
        self.abandonReason: str | None = None
        self.started = time.monotonic()
        self._inputGoneSaid = False
        self.sceneClosing = False
        self._closeTag = None
        scene = updater.scene
        if hasattr(scene, "StartCloseEvent"):
            self._closeTag = scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose)
        _ACTIVE.append(self)

    def describe(self) -> str:
        if self.lastProgress is None:
            return "starting"
        return f"iteration {self.lastProgress.step.iteration + 1}/{self.lastProgress.total_iterations}"

    # --- state -------------------------------------------------------------------------------

    @property
    def nodes(self) -> scene_mod.ResultNodes:
        return self.updater.nodes

    @property
    def status(self) -> str:
        if not self.finished:
            return "cancelling" if self.runner.cancelled else "running"
        if self.abandoned:
            return "cancelled"
        return self.updater.status

    def statusText(self) -> str:
        return status_text(self.lastProgress, self.status)

    # --- control -----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, interval: float = 0.1,
             idle: Callable[[], None] | None = None) -> AnalysisResult | None:
        """Drain until the end (or ``timeout`` seconds); ``idle`` runs between drains (Slicer:
        ``slicer.app.processEvents``). Returns the result; raises the run's error.

        If the scene closed meanwhile, waits (up to ``timeout``, else 30 s) for the worker to stop
        and returns its cancelled result (the nodes went with the scene)."""
        ended, end = self._drainUntilEnd(timeout, interval, idle)
        if not ended:
            return None
        if self.abandoned:
            self.runner.join(30.0 if end is None else max(0.0, end - time.monotonic()))
            self.runner.poll()
        if self.error is not None:
            raise self.error
        return self.result

    def abandon(self, timeout: float = 10.0, reason: str = "the module was reloaded or Slicer is quitting",
                notify: bool = False) -> None:
        """Cancel the run and never touch the scene again (the scene is closing, the module
        reloads or Slicer quits). Waits up to ``timeout`` s for the worker; it stops within one
        iteration either way. ``notify`` calls the log and finished callbacks."""
        if self.finished:
            return
        self.runner.cancel()
        self.finished = True
        self.abandoned = True
        self.abandonReason = reason
        self._release()
        if not self.sceneClosing:  # the nodes stay: say they are no longer running
            try:
                self.updater.mark_stopped("cancelled", reason)
            except Exception:  # noqa: BLE001 - the scene may be going away
                log.exception("Tagging the output nodes as cancelled failed")
        terminate = getattr(self.runner, "terminate", None)
        if terminate is not None:  # a worker process: end it now, nothing more goes into the scene
            terminate()
        elif timeout and timeout > 0:
            self.runner.join(timeout)
        self.runner.poll()  # drop what was queued; nothing of it goes into the scene
        if notify:
            self._log(f"Run cancelled: {reason}.")
            self._call(self.finishedCallback, self)

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        """The scene is closing: cancel, and forget the output nodes (they go with the scene; their
        IDs will be reused by new nodes). Never waits for the worker here, not to hold up the close."""
        self.sceneClosing = True
        self.updater.nodes.ids.clear()
        self.updater.nodes.series_ids.clear()
        if self.finished:  # ended before, or the panel abandoned it first
            self._release()
            return
        self.abandon(timeout=0, reason="the scene was closed", notify=True)

    def _release(self) -> None:
        """No longer the running analysis; stop observing the scene."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._closeTag is not None:
            try:
                self.updater.scene.RemoveObserver(self._closeTag)
            except Exception:  # noqa: BLE001 - the scene may be going away
                pass
            self._closeTag = None

    # --- internals ---------------------------------------------------------------------------

    def _drain(self) -> None:
        progresses = self.runner.poll()
        if not progresses:
            return
        self.lastProgress = progresses[-1]
        self._checkInput()
        try:
            self.updater.update(progresses)
        except Exception as exc:  # noqa: BLE001 - the run goes on; the user hears why nodes lag
            log.exception("Updating the output nodes failed")
            self._log(f"Could not update the output nodes: {exc}")
        self._call(self.progressCallback, self.lastProgress)

    def _checkInput(self) -> None:
        """Say once that the input volume was deleted: the run goes on with its own copy."""
        if self._inputGoneSaid or not self.updater.input_id:
            return
        if self.updater.scene.GetNodeByID(self.updater.input_id) is None:
            self._inputGoneSaid = True
            self._log(f"The input volume {self.updater.input_name!r} was removed from the scene; the run goes on "
                      "with the copy it started from (the outputs keep its position).")

    def _call(self, callback, *args) -> None:
        """A user callback; its exception is logged, never raised into the drain (Slicer's timer)."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001
            log.exception("A DeepDreamAnalysis callback (%s) raised", getattr(callback, "__name__", callback))

    def _finish(self) -> None:
        self.finished = True
        self._release()
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
        self._call(self.finishedCallback, self)

    def _log(self, message: str) -> None:
        log.info("%s", message)
        self._call(self.logCallback, message)


class AnalysisLogicCore:
    """What ``DeepDreamAnalysisLogic`` does, usable headless (slicer-core) and from scripts."""

    def __init__(self, scene=None):
        self._scene = scene
        self.handle: RunHandle | None = None
        self._comparison: ComparisonHandle | None = None
        self.comparisonNodes = None
        self._models: dict[tuple[str, bool], Any] = {}

    @property
    def scene(self):
        return scene_mod._scene(self._scene)

    @property
    def isRunning(self) -> bool:
        """True while this logic's analysis (or comparison) runs."""
        return (self.handle is not None and self.handle.is_running) or \
            (self._comparison is not None and self._comparison.is_running)

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

    def run(self, volumeNode, modelPath=None, seed=None, *, seedRAS=None, iterations: int | None = None,
            step: float | None = None, features: Sequence[str] | None = None, referencePath=None,
            device: str = "auto", recordEvery: int = 10, maxRecorded: int = 100, newNodes: bool = False,
            waitForCompletion: bool = True, progressCallback=None, logCallback=None,
            finishedCallback=None, config: AnalysisConfig | None = None, model=None,
            allowCodeTargets: bool = False, idle: Callable[[], None] | None = None, process: bool = False):
        """Run the analysis of ``volumeNode`` with the model at ``modelPath`` (or a loaded ``model``).

        Seed: ``seed`` is a markups point list (its last placed point) or voxel indices
        ``(i, j, k)``; ``seedRAS`` is a world position ``(R, A, S)`` in mm. ``iterations`` and
        ``step`` (image units per unit gradient): None takes the model card's recommendation
        (its ``dream`` field), else 300 and 1.0. ``features``: pyradiomics names (None: the paper's
        features); shape features given for the other dimensionality are translated or left out
        (:func:`features_for_dims`). ``referencePath``: a reference statistics JSON (z-scores and
        the normal band) or None (raw values). ``device``: auto, cuda or cpu. ``recordEvery``:
        iterations between sequence items (snapshots are taken that often too).

        Everything that can fail (model, features, reference, crop, device) is checked before any
        output node is made or the last run's nodes are replaced.

        ``waitForCompletion=True`` returns the :class:`~.result.AnalysisResult` (output nodes in
        ``self.handle.nodes``); False returns the :class:`RunHandle` at once (call
        ``handle.processEvents()`` if no timer does). ``config`` overrides every loop setting.

        ``process=True`` runs the loop in a worker process (:mod:`.process_runner`: ``PythonSlicer``
        in Slicer), which Slicer's main thread cannot starve; it loads the model from ``modelPath``.
        False runs it in a thread of this process (notebooks, scripts, the blocking form).
        """
        _refuse_if_running()
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {device!r}.")
        volume = scene_mod.volume_from_node(volumeNode)
        seed_ijk = self.resolveSeed(volumeNode, seed, seedRAS)
        loaded = model if model is not None else self.loadModel(modelPath, device, allowCodeTargets)
        card = loaded.card
        if config is None:
            settings = dream_settings(card, iterations, step)
            iterations, step, source = settings
            _say(logCallback, f"Dream settings: {source}.")
            # Snapshots (live display) at least every 5 iterations; the sequences keep every recordEvery-th.
            config = AnalysisConfig(dream=settings.config(device=device),
                                    features=FeatureConfig(names=None),
                                    snapshot_every=max(1, min(int(recordEvery), 5)))
        else:
            config = copy.deepcopy(config)
        names, reference, crop = self._prepare(volume, seed_ijk, card, config, features, referencePath,
                                               logCallback)
        from .runner import AnalysisRunner

        updater = scene_mod.SceneUpdater(
            volumeNode, crop, names, reference, total_iterations=config.dream.iterations,
            options=scene_mod.SceneOptions(record_every=recordEvery, max_sequence_items=maxRecorded,
                                           new_nodes=newNodes),
            scene=self.scene,
            metadata={"model": str(getattr(loaded, "path", modelPath)), "seed_ijk": list(seed_ijk),
                      "device": device, "features": list(names)})
        # composed before the worker starts: nothing after runner.start() may fail and orphan a worker
        step_text = "auto" if config.dream.step is None else f"{config.dream.step:g}"
        running_message = (f"Running {'in a worker process: ' if process else ''}{config.dream.iterations} iterations "
                           f"(method {config.dream.method}, step {step_text}) at seed "
                           f"(i,j,k)={seed_ijk} with {len(names)} features.")
        try:
            if process:
                from .process_runner import ProcessRunner

                if model is not None and modelPath is None:
                    raise ConfigError("A run in a worker process loads the model from its file: give modelPath "
                                      "instead of a loaded model, or pass process=False.")
                runner = ProcessRunner(volume, seed_ijk, loaded, config, reference, model_path=modelPath,
                                       reference_path=referencePath, allow_code_targets=allowCodeTargets)
            else:
                runner = AnalysisRunner(volume, seed_ijk, loaded, config, reference)
            handle = RunHandle(runner, updater, progressCallback, logCallback, finishedCallback)
            try:
                runner.start()
            except BaseException:
                handle._release()
                raise
        except BaseException:  # no half-made output nodes
            scene_mod.remove_run_nodes(self.scene, updater.run_id)
            raise
        self.handle = handle
        _say(logCallback, running_message)
        if not waitForCompletion:
            return self.handle
        return self.handle.wait(idle=idle)

    def _prepare(self, volume, seed_ijk, card, config: AnalysisConfig, features, referencePath, logCallback):
        """Resolve and check everything the worker would otherwise fail on, before any node is made:
        the features for the model's dimensionality, ``build_feature_set``, the reference statistics
        (loaded, and holding every feature), the image (finite, fits the model), the device and the
        crop. Sets ``config.features.names``; returns (feature names, reference or None, crop)."""
        names = resolve_features(features if features is not None else config.features.names,
                                 card.spatial_dims, logCallback, "running")
        config.features.names = names
        config.validate()
        preload_engine()
        from . import analysis
        from .dream import select_device
        from .features import build_feature_set

        names = tuple(build_feature_set(config.features, card.spatial_dims).names)
        reference = None
        if referencePath is not None and str(referencePath).strip() not in ("", "."):
            from .reference import ReferenceStats

            reference = ReferenceStats.load(referencePath)
            reference.require(names)
            analysis.check_reference_settings(reference, card.spatial_dims, config.features.bin_width, names)
        volume.check_seed(seed_ijk)
        volume.check_finite()
        analysis.check_fits(volume, card, "noise")  # channels and slices only; the image warnings come from the run
        select_device(config.dream.device)
        crop = self.cropFor(volume, seed_ijk, card, config)
        return names, reference, crop

    def compareModels(self, volumeNode, models: dict, seed=None, *, seedRAS=None, restarts: int = 3,
                      iterations: int | None = None, step: float | None = None, features: Sequence[str] | None = None,
                      referencePath=None, device: str = "auto", config: AnalysisConfig | None = None,
                      restartNoiseStd: float | None = None, allowCodeTargets: bool = False, show: bool = True,
                      feature: str | None = None, progressCallback=None, logCallback=None,
                      finishedCallback=None, waitForCompletion: bool = True, process: bool | None = None,
                      idle: Callable[[], None] | None = None, interval: float = 0.1):
        """Compare several models (``compare.compare_models``) on ``volumeNode`` at one seed, with
        ``restarts`` random restarts each, and show the mean curves as nodes.

        ``models``: name -> model path (file or bundle folder; the card beside it) or a loaded
        model. Seed, features, reference, device, iterations, step and ``config`` as in :meth:`run`;
        ``restartNoiseStd`` (image units, HU) as in ``compare_models`` (None: its default).

        ``waitForCompletion=True`` (default) blocks until the end, calling ``idle`` between waits
        (Slicer: ``slicer.app.processEvents``, so the GUI keeps painting) and returns the
        ``compare.Comparison``. False returns a :class:`ComparisonHandle` at once (``status``,
        ``lastProgress``, ``cancel()``, ``result``, ``error``, ``processEvents()``, ``wait()``: the
        interface of :class:`RunHandle`); a timer (Slicer) or the caller drains it.

        ``process``: run the comparison in a worker process (:class:`~.process_runner.ProcessComparisonRunner`,
        ``PythonSlicer`` in Slicer), which Slicer's main thread cannot starve; it loads each model from
        its path. None (default): a process for a non-blocking comparison of model paths, a thread
        otherwise (the blocking call waits in ``Thread.join``, which releases the GIL, so a thread
        keeps its pace there; loaded models can only go to a thread).

        ``progressCallback(CompareProgress)`` hears the latest report at each drain. :meth:`cancel`
        or closing the scene stops it within one iteration; the comparison then holds the runs that
        finished (``metadata["status"]`` is ``cancelled``); if no run of every model had finished,
        the handle's ``error`` (raised by the blocking form) is ``compare_models``' DeepDreamError,
        and after the scene closed the blocking form returns None. With ``show`` (and the scene still
        open) the result becomes nodes (``scene.show_comparison``: a mean table per model and one chart
        of ``feature``, default the first); they are in ``self.comparisonNodes`` and ``handle.nodes``.
        A worker process that dies (killed, out of memory) gives a
        :class:`~.process_runner.WorkerProcessError` saying how it ended.
        """
        from .compare import DEFAULT_RESTART_NOISE_STD, compare_models

        _refuse_if_running()
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {device!r}.")
        if not models:
            raise ConfigError("Give at least one model to compare: {name: model path}.")
        volume = scene_mod.volume_from_node(volumeNode)
        seed_ijk = self.resolveSeed(volumeNode, seed, seedRAS)
        loaded, paths = {}, {}
        for name, m in models.items():
            if hasattr(m, "card") and hasattr(m, "network"):
                loaded[str(name)] = m
            else:
                from .models import load_model

                if m is None or str(m).strip() in ("", "."):
                    raise ConfigError(f"No model path given for {name!r}.")
                loaded[str(name)] = load_model(m, device="cpu", allow_code_targets=allowCodeTargets)
                paths[str(name)] = m
        if process is None:
            process = not waitForCompletion and len(paths) == len(loaded)
        if process and len(paths) < len(loaded):
            raise ConfigError("A comparison in a worker process loads each model from its file: give model paths "
                              "instead of loaded models, or pass process=False.")
        dims = next(iter(loaded.values())).card.spatial_dims
        if config is None:
            cards = [m.card for m in loaded.values()]
            # the cards' recommendation only where every model's card gives the same one
            shared = cards[0] if all(card_dream_settings(c) == card_dream_settings(cards[0]) for c in cards) else None
            settings = dream_settings(shared, iterations, step)
            iterations, step, source = settings
            _say(logCallback, f"Dream settings: {source}.")
            config = AnalysisConfig(dream=settings.config(device=device),
                                    features=FeatureConfig(names=None))
        else:
            config = copy.deepcopy(config)
        config.features.names = resolve_features(features if features is not None else config.features.names,
                                                 dims, logCallback, "comparing")
        config.validate()
        reference = None
        if referencePath is not None and str(referencePath).strip() not in ("", "."):
            from .reference import ReferenceStats

            reference = ReferenceStats.load(referencePath)
        preload_engine()
        noise = DEFAULT_RESTART_NOISE_STD if restartNoiseStd is None else restartNoiseStd
        if process:
            from .process_runner import ProcessComparisonRunner

            runner = ProcessComparisonRunner(volume, seed_ijk, paths, config, reference_path=referencePath,
                                             restarts=restarts, restart_noise_std=noise,
                                             allow_code_targets=allowCodeTargets)
        else:
            runner = _ComparisonThreadRunner(lambda on_progress, cancel: compare_models(
                volume, seed_ijk, loaded, config, reference, restarts=restarts, on_progress=on_progress,
                cancel=cancel, restart_noise_std=noise))
        handle = ComparisonHandle(runner, self.scene, show=show, feature=feature, progressCallback=progressCallback,
                                  logCallback=logCallback, finishedCallback=finishedCallback, logic=self)
        try:
            runner.start()
        except BaseException:
            handle._release()
            raise
        self._comparison = handle
        self.comparisonNodes = None
        _say(logCallback, f"Comparing {', '.join(loaded)} ({restarts} restarts each, {config.dream.iterations} "
                          f"iterations) at seed (i,j,k)={seed_ijk}{' in a worker process' if process else ''}.")
        if not waitForCompletion:
            return handle
        try:
            return handle.wait(idle=idle, interval=interval)
        finally:
            if handle.is_running:  # the wait itself was interrupted (KeyboardInterrupt)
                handle.abandon(timeout=30.0, reason="the waiting call was interrupted")

    @staticmethod
    def cropFor(volume, seed_ijk, card, config: AnalysisConfig):
        """The crop the loop will work on (``analysis.plan_crop``, as ``run_analysis`` uses it)."""
        from .analysis import plan_crop

        return plan_crop(volume, seed_ijk, card, config)

    def cancel(self) -> None:
        """Cancel this logic's running analysis or comparison (it stops within one iteration)."""
        if self.handle is not None:
            self.handle.cancel()
        if self._comparison is not None and self._comparison.is_running:
            self._comparison.cancel()

    def abandon(self, timeout: float = 10.0) -> None:
        """Stop this logic's run without touching the scene again (module reload, exit; the scene
        closing does the same by itself). Waits up to ``timeout`` s for the worker to end."""
        if self.handle is not None:
            self.handle.abandon(timeout)
        if self._comparison is not None:
            self._comparison.abandon(timeout)


class _ComparisonThreadRunner:
    """``compare_models`` in a daemon thread (torch and numpy only), with the interface of
    :class:`~.process_runner.ProcessComparisonRunner` (``start``, ``poll``, ``cancel``, ``done``,
    ``join``, ``result``, ``error``). :meth:`poll` returns the latest report only."""

    def __init__(self, work: Callable):
        self.work = work
        self._cancel = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self._latest = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "_ComparisonThreadRunner":
        self._thread = threading.Thread(target=self._run, name="DeepDreamAnalysis compare", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.work(self._push, self._cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the draining thread
            self.error = exc

    def _push(self, progress) -> None:
        with self._lock:
            self._latest = progress

    def poll(self) -> list:
        with self._lock:
            latest, self._latest = self._latest, None
        return [] if latest is None else [latest]

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


class ComparisonHandle(_DrainedHandle):
    """One model comparison going on (in a worker process or a thread), and, once it has ended,
    its nodes. The interface of :class:`RunHandle`: :meth:`processEvents` on the scene's thread (a
    timer in Slicer) takes the reports and, at the end, shows the comparison; :meth:`cancel`,
    :meth:`wait`, ``status``, ``lastProgress`` (a ``CompareProgress``), ``result`` (the
    ``Comparison``), ``error``, ``nodes`` (``scene.ComparisonNodes`` once shown)."""

    def __init__(self, runner, scene, *, show: bool = True, feature: str | None = None,
                 progressCallback=None, logCallback=None, finishedCallback=None, logic=None):
        self.runner = runner
        self.scene = scene
        self.show = show
        self.feature = feature
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.finishedCallback = finishedCallback
        self.logic = logic
        self.lastProgress = None
        self.nodes = None
        self.finished = False
        self.abandoned = False
        self.sceneClosed = False
        self.started = time.monotonic()
        self._closeTag = scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose) \
            if hasattr(scene, "StartCloseEvent") else None
        _ACTIVE.append(self)

    # --- state -------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """running / cancelling, then completed / cancelled / fault (an error, or a worker process lost)."""
        if not self.finished:
            return "cancelling" if self.runner.cancelled else "running"
        if self.abandoned or (self.sceneClosed and self.result is None):
            return "cancelled"
        if self.error is not None:
            return "cancelled" if self.runner.cancelled and not _is_lost(self.error) else "fault"
        return str((self.result.metadata or {}).get("status", "completed"))

    def describe(self) -> str:
        p = self.lastProgress
        if p is None:
            return "a model comparison, starting"
        return (f"a model comparison, run {p.run_index + 1}/{p.total_runs} (model {p.model}, restart {p.restart}, "
                f"iteration {p.progress.step.iteration + 1}/{p.progress.total_iterations})")

    def statusText(self) -> str:
        if not self.finished:
            return self.describe()
        return f"Comparison {self.status}" + (f": {self.error}" if self.error is not None else "")

    # --- control -----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, interval: float = 0.1, idle: Callable[[], None] | None = None):
        """Drain until the end (or ``timeout`` s; then None), calling ``idle`` between waits. Returns
        the ``Comparison``; raises its error, except after the scene closed, when it returns None
        if nothing had finished."""
        if not self._drainUntilEnd(timeout, interval, idle)[0]:
            return None
        if self.sceneClosed:
            if self.error is not None and isinstance(self.error, DeepDreamError):
                return None  # cancelled before one run of every model had ended: nothing to return
        if self.error is not None:
            raise self.error
        return self.result

    def abandon(self, timeout: float = 10.0, reason: str = "the module was reloaded or Slicer is quitting") -> None:
        """Stop the comparison and show nothing (scene closing, module reload, exit); a worker
        process is terminated at once, a thread gets up to ``timeout`` s to end."""
        if self.finished:
            return
        self.runner.cancel()
        self.finished = True
        self.abandoned = True
        self._release()
        terminate = getattr(self.runner, "terminate", None)
        if terminate is not None:
            terminate()
        elif timeout and timeout > 0:
            self.runner.join(timeout)
        self._log(f"Comparison cancelled: {reason}.")
        _call(self.finishedCallback, self)

    # --- internals ---------------------------------------------------------------------------

    def _drain(self) -> None:
        reports = self.runner.poll()
        if reports:
            self.lastProgress = reports[-1]
            _call(self.progressCallback, self.lastProgress)

    def _finish(self) -> None:
        self.finished = True
        self._release()
        if self.sceneClosed:
            self._log("The scene was closed: the comparison was cancelled and is not shown.")
        elif self.error is not None:
            self._log(f"The comparison {'was cancelled' if self.status == 'cancelled' else 'failed'}: {self.error}")
        else:
            comparison = self.result
            if self.show:
                try:
                    self.nodes = scene_mod.show_comparison(comparison, feature=self.feature, scene=self.scene)
                    if self.logic is not None and self.logic._comparison is self:
                        self.logic.comparisonNodes = self.nodes
                except Exception as exc:  # noqa: BLE001 - the result stays in handle.result
                    log.exception("Showing the comparison failed")
                    self._log(f"Could not show the comparison: {exc}")
            self._log(f"Comparison {comparison.metadata.get('status')}: {len(comparison.models)} models x "
                      f"{comparison.restarts} restarts.")
        _call(self.finishedCallback, self)

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        self.sceneClosed = True
        self.cancel()
        if getattr(self.runner, "terminate", None) is not None and not self.finished:
            self.abandon(timeout=0, reason="the scene was closed")

    def _release(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._closeTag is not None:
            try:
                self.scene.RemoveObserver(self._closeTag)
            except Exception:  # noqa: BLE001
                pass
            self._closeTag = None

    def _log(self, message: str) -> None:
        _say(self.logCallback, message)


def _is_lost(error: BaseException) -> bool:
    from .process_runner import WorkerProcessError

    return isinstance(error, WorkerProcessError)


def _call(callback, *args) -> None:
    """A user callback; its exception is logged, never raised into the drain (Slicer's timer)."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # noqa: BLE001
        log.exception("A DeepDreamAnalysis callback (%s) raised", getattr(callback, "__name__", callback))


def _say(callback, message: str) -> None:
    log.info("%s", message)
    if callback is not None:
        try:
            callback(message)
        except Exception:  # noqa: BLE001 - a broken log callback must not break a run
            log.exception("The DeepDreamAnalysis log callback raised")
