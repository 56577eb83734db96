"""The study engine: every run of a study on Ray, resumable (docs/studies.md).

    from DeepDreamAnalysisLib.studies import run_study
    table = run_study("study.yaml", out="results/study1")   # a pyarrow.Table, one row per run, iteration, curve

Ray is optional (``pip install 'deepdream-analysis[study]'``). By default an embedded local Ray
starts with one worker per core (one torch thread each; with GPUs one run per GPU, or
``gpus_per_run`` of one); ``address="auto"`` or ``"ray://host:10001"`` joins a running cluster.
Each model file and each image goes into Ray's object store once; a run receives references.

The driver (this process) writes everything: ``study.json`` (the study, to refuse another study's
folder), ``runs/<key>/`` (the run's usual outputs plus ``status.json``), then the tables, figures
and report (:mod:`.tables`). A run is keyed by a hash of its inputs (:func:`.spec.expand_runs`):
runs whose ``status.json`` says ``done`` are not redone; a run that raised or whose worker died
is retried up to ``retries`` times, then recorded ``failed`` with its message. Ctrl-C marks the
runs in progress ``interrupted`` and the same command resumes.
"""

from __future__ import annotations

import atexit

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DeepDreamError
from .spec import (RunSpec, StudySpec, StudySpecError, allow_custom_features, analysis_config, custom_feature_files,
                   expand_runs, load_study)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'deepdream-analysis[study]'  (or: pip install ray pyarrow pyyaml)"
DONE, FAILED, INTERRUPTED, RUNNING = "done", "failed", "interrupted", "running"


class StudyEngineError(DeepDreamError):
    """The study cannot start (no Ray, no cluster at the address, a folder of another study)."""


@dataclass
class StudyProgress:
    """Counts of runs: ``done`` (this time or before), ``running``, ``failed``, ``pending``; ``eta_s``
    seconds left (None until a run finished in this session)."""

    total: int
    done: int
    running: int
    failed: int
    pending: int
    eta_s: float | None = None
    last: str = ""


@dataclass
class StudyOutcome:
    """What :func:`run_study` did besides the table (see :func:`run_study_outcome`)."""

    out: Path
    runs: list[RunSpec]
    status: dict[str, dict] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    table: object = None
    keep_flagged: bool = False
    results: dict = field(default_factory=dict)

    def count(self, state: str) -> int:
        return sum(1 for s in self.status.values() if s.get("state") == state)


def require_ray():
    """Import Ray or raise a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise StudyEngineError(f"Studies run on Ray, which is not installed. Install it with: {INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------------------- the run itself (on a worker)

_MODEL_CACHE: dict[str, object] = {}


def _load_shipped_model(payload: dict):
    """The model of ``payload`` (file bytes from the object store), loaded once per worker process."""
    key = payload["sha256"]
    if key not in _MODEL_CACHE:
        from ..models import load_model

        if payload.get("bytes") is None:  # a folder (MONAI bundle): the cluster must see the path
            model = load_model(payload["path"], card=payload.get("card_path"), device="cpu")
        else:  # the shipped copy lives only while it is loaded: nothing is left in the worker's /tmp
            folder = _scratch_folder()  # a worker killed meanwhile leaves it to the next one (outputs/orphans.py)
            try:
                path = folder.add_file(payload["filename"])
                path.write_bytes(payload["bytes"])
                card = None
                if payload.get("card_bytes") is not None:
                    card = folder.add_file("card.json" if payload["filename"] != "card.json" else "model.card.json")
                    card.write_bytes(payload["card_bytes"])
                model = load_model(path, card=card, device="cpu")
            finally:
                folder.remove()
        model.path = payload["path"]  # the run.json names the user's file, not the worker's copy
        _MODEL_CACHE.clear()  # one model at a time per worker keeps memory bounded
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


def execute_run(run: RunSpec, model_payload: dict, volume, reference, spec: StudySpec, threads: int | None = 1,
                heartbeat: str | None = None, write_to: tuple[str, str] | None = None):
    """One run: load (or reuse) the model, build the run's start image and config, dream.

    Returns the :class:`~.result.AnalysisResult`, or, when ``write_to = (host, folder)`` names this
    worker's host, writes the run's outputs into ``folder`` itself (so the driver does not write
    every run in turn) and returns a summary dict. Restart ``r`` follows :mod:`.compare`: random
    seed ``dream.random_seed + r`` and, with ``start: image``, the start image plus Gaussian noise
    of ``restart_noise_std`` inside the crop for ``r >= 1``.
    """
    from ..analysis import run_analysis

    model = _worker_setup(model_payload, threads, [heartbeat], spec)
    start, config = _run_inputs(run, model, volume, spec)
    return _finish(run_analysis(start, run.seed, model, config, reference), run, volume, write_to)


def execute_group(runs: list[RunSpec], model_payload: dict, volume, reference, spec: StudySpec,
                  threads: int | None = 1, heartbeats: list | None = None, write_tos: list | None = None) -> list:
    """The runs of one model, image and method as ONE batch through the network
    (:func:`..engine.batched.run_together`); per run what :func:`execute_run` returns, or
    ``{"error": message}`` for a run that raised (the driver retries it alone)."""
    from ..analysis import run_analysis
    from ..engine.batched import run_together

    heartbeats = heartbeats or [None] * len(runs)
    write_tos = write_tos or [None] * len(runs)
    model = _worker_setup(model_payload, threads, heartbeats, spec)
    jobs = []
    for run in runs:
        start, config = _run_inputs(run, model, volume, spec)
        jobs.append(lambda factory, _s=start, _r=run, _c=config: run_analysis(_s, _r.seed, model, _c, reference,
                                                                               loop_factory=factory))
    out = []
    for run, outcome, write_to in zip(runs, run_together(jobs), write_tos):
        if isinstance(outcome, BaseException):
            out.append({"error": _failure_message(outcome)})
        else:
            out.append(_finish(outcome, run, volume, write_to))
    return out


def _worker_setup(model_payload: dict, threads: int | None, heartbeats: list, spec: StudySpec):
    """Write the heartbeats (this worker's pid, for the driver), set torch's threads, load the model."""
    import torch

    from ..atomic import write_text_atomic
    from ..errors import OutputError
    from ..outputs import FolderLock

    for heartbeat in heartbeats:
        if heartbeat:
            try:  # under the run folder's lock: a worker killed mid-write leaves a temporary file the next run removes
                with FolderLock(Path(heartbeat).parent):
                    write_text_atomic(heartbeat, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                             "started": time.time()}))
            except (OSError, OutputError):
                pass
    if spec.custom_features and not spec.custom_allowed:  # user code runs only when the user allowed it
        raise StudySpecError("This study's custom features were not allowed (--allow-custom-features); the worker "
                             "loads none of them.")
    if threads:
        torch.set_num_threads(threads)
    return _load_shipped_model(model_payload)


def _run_inputs(run: RunSpec, model, volume, spec: StudySpec):
    """(start volume, AnalysisConfig) of ``run`` (restart ``r``: see :func:`execute_run`)."""
    import dataclasses

    from .compare import _perturbed

    base = analysis_config(spec, run.method, model.card)
    if spec.custom_features:
        base = dataclasses.replace(base, features=dataclasses.replace(base.features, custom=_local_custom(spec)))
    config = dataclasses.replace(base, dream=dataclasses.replace(base.dream, random_seed=base.dream.random_seed + run.restart))
    start = volume
    if config.dream.start == "image" and run.restart > 0 and spec.restart_noise_std > 0:
        start = _perturbed(volume, run.seed, model.card, config, spec.restart_noise_std, config.dream.random_seed)
    return start, config


def _finish(result, run: RunSpec, volume, write_to):
    result.metadata.setdefault("study", {}).update({"run_key": run.key, "model": run.model, "group": run.group,
                                                   "image": run.image, "seed_index": run.seed_index,
                                                   "restart": run.restart, "method": run.method})
    if write_to is not None and write_to[0] == socket.gethostname():
        from ..report import write_outputs

        t = time.perf_counter()
        write_outputs(result, write_to[1], volume, seed_ijk=run.seed)
        return dict(_summary(result), write_s=round(time.perf_counter() - t, 3))
    return result


_CUSTOM_FILES: dict[str, Path] = {}


def _scratch_folder(prefix: str = "ddstudy-"):
    """A private temporary folder of this worker (``<temp>/<prefix><nonce>``, 0700, its files logged in
    its owner file), after removing those that workers killed before their end left."""
    from ..outputs import orphans
    from ..process_runner import remove_dead_run_folders

    remove_dead_run_folders()
    return orphans.RunFolder.create(prefix=prefix)


def _local_custom(spec: StudySpec) -> dict[str, str]:
    """The study's custom features with file targets pointing at a file this worker can read: the
    user's own file when it is here with the same contents, else the copy shipped with the study."""
    import hashlib

    targets = dict(spec.custom_features)
    for name, path in custom_feature_files(spec).items():
        data = spec.custom_sources.get(str(path))
        if data is None:
            continue
        sha = hashlib.sha256(data).hexdigest()
        try:
            same = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha
        except OSError:
            same = False
        if not same:
            if sha not in _CUSTOM_FILES or not _CUSTOM_FILES[sha].is_file():
                folder = _scratch_folder("ddstudy-features-")
                atexit.register(folder.remove)  # the feature's code is imported from it during the runs
                copy = folder.add_file(path.name)
                copy.write_bytes(data)
                _CUSTOM_FILES[sha] = copy
            targets[name] = f"{_CUSTOM_FILES[sha]}:{targets[name].rpartition(':')[2]}"
    return targets


def batch_groups(runs: list[RunSpec], size: int, slots: int = 1) -> list[list[RunSpec]]:
    """The runs in batches: runs of the same model, image and method together (their crops have one
    size), at most ``size`` per batch; the largest batch size that gives at least ``slots``
    (workers) batches, and a multiple of ``slots`` while there are few batches, so that batching
    never leaves a worker idle."""
    by_key: dict[tuple, list[RunSpec]] = {}
    for run in runs:
        by_key.setdefault((run.model, run.image, run.method), []).append(run)
    want = min(max(1, int(slots)), len(runs))

    def count(s):
        return sum(-(-len(v) // s) for v in by_key.values())

    sizes = [s for s in range(max(1, int(size)), 0, -1) if count(s) >= want] or [1]
    balanced = [s for s in sizes if count(s) % want == 0 or count(s) >= 4 * want]
    size = (balanced or sizes)[0]
    groups = []
    for members in by_key.values():
        n = -(-len(members) // size)  # batches of near-equal size
        groups.extend(members[i::n] for i in range(n))
    return groups


def _summary(result) -> dict:
    """What the study records of a finished run (status.json, runs.csv)."""
    return {"result_status": result.status, "fault": result.metadata.get("fault"),
            "batch": (result.metadata.get("batch") or {}).get("size", 1),
            "wall_s": (result.metadata.get("timings_s") or {}).get("total"),
            "quality_flags": [getattr(f, "code", str(f)) for f in getattr(result, "quality_flags", []) or []]}


# ----------------------------------------------------------------------------- the driver


def _model_payload(entry, sha: str) -> dict:
    p = entry.path
    payload = {"path": str(p), "filename": p.name, "sha256": sha, "card_path": str(entry.card) if entry.card else None}
    if p.is_file():
        payload["bytes"] = p.read_bytes()
        payload["card_bytes"] = entry.card.read_bytes() if entry.card else None
        if entry.card is None:
            from ..card import find_card

            found = find_card(p)
            payload["card_bytes"] = Path(found).read_bytes() if found else None
    else:
        payload["bytes"] = None
    return payload


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """A bounded check that something listens at ``address`` (``ray://host:port`` or ``host:port``)."""
    if address in (None, "auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise StudyEngineError(f"--address {address!r} is not ray://HOST:PORT, HOST:PORT or auto.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise StudyEngineError(f"No Ray cluster answers at {address} ({exc}; waited at most {timeout_s:g} s). "
                               "Check the address and that the cluster is up (`ray status` on its head node), "
                               "or leave --address out to run on this machine.") from None


def _start_ray(ray, address: str | None, workers: int | None, timeout_s: float):
    """Join or start Ray; returns True when this call started it (and must shut it down).

    ``ray.init`` replaces the SIGTERM handler with its own (exit at once); a handler the caller
    installed (the command line's, :mod:`..stopping`: stop like Ctrl-C) is put back. A stop while
    Ray starts (SIGTERM: Ray's handler's ``sys.exit``; SIGHUP: held until the start is over) shuts
    down what was started and raises :class:`..stopping.Stopped`, as a stop at any later moment."""
    if ray.is_initialized():
        return False
    from ..stopping import Stopped, deferred, python_handlers, restore_handlers

    handlers = python_handlers()
    try:
        try:
            with deferred():
                return _init_ray(ray, address, workers, timeout_s)
        except SystemExit as exc:
            if signal.SIGTERM not in handlers or exc.code != signal.SIGTERM:
                raise  # no handler of the caller's to honour: Ray's exit stands
            stop = Stopped(signal.SIGTERM)
            stop.__suppress_context__ = True
            raise stop
    except KeyboardInterrupt:
        with deferred():
            ray.shutdown()  # the processes the interrupted start left
        raise
    finally:
        restore_handlers(handlers)


def _init_ray(ray, address: str | None, workers: int | None, timeout_s: float) -> bool:
    if address:
        check_address(address, timeout_s)
        box: dict = {}

        def init():
            try:
                ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
            except Exception as exc:  # noqa: BLE001 - reported below with the address
                box["error"] = exc

        t = threading.Thread(target=init, daemon=True)
        t.start()
        t.join(timeout_s * 3)
        if t.is_alive() or "error" in box:
            why = "no answer" if t.is_alive() else str(box["error"]).splitlines()[0]
            raise StudyEngineError(f"Could not join the Ray cluster at {address}: {why}. Check the address "
                                   "(`ray status` on the head node), that its Ray version matches this one "
                                   f"({ray.__version__}), and, where the cluster uses token authentication, "
                                   "that RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) "
                                   "are set here too.")
        return True
    start_local_ray(ray, workers)
    return True


LOCAL_START_ATTEMPTS = 2


def start_local_ray(ray, workers: int | None = None, attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """``ray.init`` of the study's local Ray (:func:`local_ray_options`), tried ``attempts`` times.

    On a busy machine Ray's own start can fail: its raylet waits a fixed 15 s for the dashboard
    agent (a Python process that imports much of Ray) to write its port, then aborts, and
    ``ray.init`` raises "The current node timed out during startup" (seen in a loaded test run; made
    to happen with an agent held back 40 s). What the failed start left is shut down and Ray starts
    again; the second start finds the agent's files read once already and is faster."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**local_ray_options(workers))
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception for a start that timed out
            try:
                ray.shutdown()  # the GCS and agents the failed start left running
            except Exception:  # noqa: BLE001 - nothing more to end
                pass
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if attempt == attempts:
                raise StudyEngineError(f"Ray could not start on this machine ({why}; tried {attempts} times). A very "
                                       "busy machine slows Ray's start past its own time limits: try again, or "
                                       "when fewer programs run.") from exc
            log.warning("Ray did not start (%s); starting it again (%d of %d)", why, attempt + 1, attempts)


WORKER_NICENESS_ENV = "RAY_worker_niceness"


def local_ray_options(workers: int | None = None) -> dict:
    """The ``ray.init`` arguments of the embedded local Ray a study starts: ``workers`` CPUs (default
    one per core), every GPU, no dashboard, and workers at the priority of this process.

    ``address="local"``: a new Ray on this machine even where ``RAY_ADDRESS`` is set or a cluster
    started with ``ray start`` runs here (plain ``ray.init`` would join it, and then refuse
    ``num_cpus``); joining one is what ``--address`` asks for.

    Ray runs its worker processes 15 nice levels below the process that started it (its
    ``worker_niceness``), so that its own services stay responsive. For a study that makes every
    run yield to any other busy program of the user's (the driver writing the tables, a test run, a
    second study), which the same runs in a plain loop would not (docs/studies.md, "Priority"). The
    local workers therefore run at this process's priority (``nice deepdream-analysis study ...``
    lowers both); setting the environment variable ``RAY_worker_niceness`` (15 is Ray's default)
    keeps Ray's choice. A cluster joined with ``--address`` keeps its own settings.
    """
    kwargs = {"address": "local", "num_cpus": workers or os.cpu_count() or 1, "include_dashboard": False,
              "log_to_driver": False, "configure_logging": False}
    if WORKER_NICENESS_ENV not in os.environ:
        kwargs["_system_config"] = {"worker_niceness": 0}
    try:
        import torch

        if torch.cuda.is_available():
            kwargs["num_gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return kwargs


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_status(path: Path, status: dict) -> None:
    from ..atomic import write_text_atomic

    write_text_atomic(path, json.dumps(status, indent=2, default=str) + "\n")


STUDY_OUTPUT_NAMES = ("study.json", "study.parquet", "study.csv", "runs.csv", "pooled.csv", "pooled.png",
                      "sensitivity.csv", "ranking.csv", "ranking.md", "report.html")
"""Files the study writes at the top of its folder (each run writes into ``runs/<key>/``)."""


@dataclass
class StudyFolder:
    """A checked, locked study folder (:func:`claim_folder`) and the manifest of what the study wrote
    there: ``study.json``, the tables, figures and report, and ``runs/<key>/status.json``. Each run's
    own folder has its own manifest (written by :func:`~..report.write_outputs`)."""

    folder: object  # outputs.OutputFolder (holds deepdream.lock)
    manifest: object  # outputs.ManifestWriter

    @property
    def path(self) -> Path:
        return self.folder.path

    def finish(self, runs) -> None:
        """Keep the status of every run of the study, delete the previous session's files not written
        again (only the study's own), write the final manifest."""
        for run in runs:
            self.manifest.keep(self.path / "runs" / run.key / "status.json")
        self.manifest.finish()

    def release(self, remove_if_empty: bool = False) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE_STUDIES.discard(os.path.realpath(self.path))
        self.folder.release(remove_if_empty=remove_if_empty)


_ACTIVE_STUDIES: set[str] = set()
"""Study folders this process is writing into: the folder lock is re-entrant within a process (so a
run's writer can take it again), so two studies in one process (threads, a console) check here."""
_ACTIVE_LOCK = threading.Lock()


def _refuse_links_under_runs(out: Path) -> None:
    """``runs/`` and each ``runs/<key>`` must be folders the study made, not links to a user's folder."""
    from ..errors import OutputError

    runs = out / "runs"
    suspects = [runs] if os.path.lexists(runs) and (runs.is_symlink() or not runs.is_dir()) else []
    if not suspects and runs.is_dir():
        suspects = sorted(p for p in runs.iterdir() if p.is_symlink() or not p.is_dir())
    if suspects:
        what = "a link to another folder" if suspects[0].is_symlink() else "not a folder"
        raise OutputError(f"{suspects[0]} is {what}: the study writes only into folders it made, and would write "
                          "into (or delete from) that one. Remove it, or choose another --out folder.")


def claim_folder(out: Path, spec: StudySpec, overwrite: bool = False) -> StudyFolder:
    """Check, create and lock the study folder (as ``run`` does its folder, :mod:`..outputs`).

    Refused (before anything is written): a folder another process is writing into; a folder that
    holds one of the study's inputs (study file, model, card, image, mask, reference) or lies
    inside one; a non-empty folder with no results of this tool (unless ``overwrite``, which still
    never replaces a file the tool did not write); the folder of another study or of another
    command; links in ``runs/``. Writes ``study.json`` (the study, to recognise the folder).
    """
    from ..atomic import write_text_atomic
    from ..outputs import ManifestWriter, check_output_folder

    folder = check_output_folder(out, spec.inputs, overwrite=overwrite, names=STUDY_OUTPUT_NAMES, snapshots=False)
    key = os.path.realpath(folder.path)
    with _ACTIVE_LOCK:
        busy = key in _ACTIVE_STUDIES
        _ACTIVE_STUDIES.add(key)
    if busy:
        folder.release()  # drops this call's hold on the re-entrant lock; the other study keeps its own
        from ..errors import OutputError

        raise OutputError(f"Another study of this process (process {os.getpid()}) is writing into {folder.path} right "
                          "now. Wait for it to finish, or choose another --out folder.")
    try:
        path = folder.path
        _refuse_links_under_runs(path)
        manifest = ManifestWriter(path)
        marker = path / "study.json"
        if "study.json" in manifest.owned and marker.exists():
            old = _read_status(marker)
            if old.get("fingerprint") != spec.fingerprint():
                raise StudyEngineError(
                    f"{path} holds another study ({old.get('name', '?')!r}, from {old.get('source', '?')}). Give "
                    "another --out folder, or the same study file to resume that one.")
            manifest.keep(marker)  # the same study: resumed, study.json stays
        else:
            theirs = sorted(r for r in manifest.owned if os.path.lexists(path / r))
            if theirs:
                raise StudyEngineError(
                    f"{path} holds results of another deepdream-analysis command ({theirs[0]}, ...), not of a study. "
                    "Give a new or empty --out folder for the study.")
            with manifest:
                write_text_atomic(marker, json.dumps({"name": spec.name, "source": str(spec.source) if spec.source
                                                      else None, "fingerprint": spec.fingerprint(), "spec": spec.raw},
                                                     indent=2, default=str) + "\n")
    except BaseException:
        with _ACTIVE_LOCK:
            _ACTIVE_STUDIES.discard(key)
        folder.release(remove_if_empty=True)
        raise
    return StudyFolder(folder, manifest)


def run_study(spec, out=None, address: str | None = None, workers: int | None = None,
              on_progress: Callable[[StudyProgress], None] | None = None, connect_timeout_s: float = 10.0,
              overwrite: bool = False, allow_custom_features=False):
    """Run every run of ``spec`` (a :class:`StudySpec`, a study file path or a dict) and return the
    tidy table (:func:`.tables.study_table`: a ``pyarrow.Table``).

    ``out``: the study folder (default ``results/<study name>``); ``address``: None for a local Ray
    (``workers`` processes, default one per core), ``auto`` or ``ray://HOST:PORT`` for a cluster.
    """
    return run_study_outcome(spec, out, address, workers, on_progress, connect_timeout_s, overwrite=overwrite,
                             allow_custom_features=allow_custom_features).table


def run_study_outcome(spec, out=None, address: str | None = None, workers: int | None = None,
                      on_progress: Callable[[StudyProgress], None] | None = None,
                      connect_timeout_s: float = 10.0, cancel: threading.Event | None = None,
                      keep_results: bool = False, overwrite: bool = False,
                      allow_custom_features=False) -> StudyOutcome:
    """:func:`run_study`, returning the table with the run statuses and written paths.

    The study folder is checked and locked first (:func:`claim_folder`; ``overwrite`` as ``--overwrite``):
    a second study into the same folder fails at once, and the study replaces or deletes only files
    it wrote (its manifest).

    ``allow_custom_features``: the study file's ``custom_features`` are user code, loaded (here and on
    the workers) only when this is True or maps each name to the same function (as ``--custom-feature
    NAME=TARGET``); otherwise a study that names any is refused before anything is imported.

    """
    if not isinstance(spec, StudySpec):
        spec = load_study(spec)
    allow_custom_features_of(spec, allow_custom_features)
    require_ray()
    if address:
        check_address(address, connect_timeout_s)  # before the folder is made: a wrong address leaves nothing
    out = Path(out or Path("results") / spec.name).expanduser()
    study_folder = claim_folder(out, spec, overwrite=overwrite)
    try:
        with study_folder.manifest:  # every file the driver writes in the study folder is listed
            outcome = _run_study_in(spec, study_folder.path, address, workers, on_progress, connect_timeout_s,
                                    cancel, keep_results)
            study_folder.finish(outcome.runs)
    finally:
        study_folder.release()
    return outcome


def allow_custom_features_of(spec: StudySpec, allowed) -> None:
    """Check the opt-in for the study's custom features (:func:`.spec.allow_custom_features`), then load
    each here once, so a feature file that fails to import is named before any run starts."""
    from ..features.custom import load_custom

    if spec.custom_features and spec.custom_allowed and allowed is False:
        allowed = True  # allowed already (a StudySpec built and allowed in Python)
    allow_custom_features(spec, allowed)
    for target in spec.custom_features.values():
        load_custom(target)


def _run_study_in(spec, out=None, address: str | None = None, workers: int | None = None,
                  on_progress: Callable[[StudyProgress], None] | None = None,
                  connect_timeout_s: float = 10.0, cancel: threading.Event | None = None,
                  keep_results: bool = False) -> StudyOutcome:
    """The study in its claimed, locked folder ``out`` (:func:`run_study_outcome`).

    ``keep_results``: run every run again (even ``done`` ones) and keep each run's
    :class:`~.result.AnalysisResult` in ``outcome.results`` by run key (what ``compare`` uses).

    ``cancel`` (a threading.Event), or Ctrl-C in the main thread, stops the study: the runs in
    progress are marked ``interrupted`` and KeyboardInterrupt is raised; the same call resumes. So
    does a KeyboardInterrupt raised otherwise (the command line's SIGTERM and SIGHUP, :mod:`..stopping`).
    """
    from ..reference import ReferenceStats
    from ..report import write_outputs
    from ..stopping import stop_reason
    from ..volume import read_volume
    from . import tables

    if not isinstance(spec, StudySpec):
        spec = load_study(spec)
    workers = workers or spec.workers
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise StudySpecError(f"workers must be a positive integer, got {workers!r}.")
    ray = require_ray()
    tables.require_pyarrow()
    out = Path(out or Path("results") / spec.name).expanduser()
    hashes = spec.hashes
    runs = expand_runs(spec)
    outcome = StudyOutcome(out, runs, keep_flagged=spec.keep_flagged)
    todo = []
    for run in runs:
        status = _read_status(out / "runs" / run.key / "status.json")
        outcome.status[run.key] = status
        if status.get("state") != DONE or keep_results:
            todo.append(run)
    if not todo:
        outcome.paths, outcome.table = tables.write_study_outputs(spec, outcome)
        return outcome

    started = _start_ray(ray, address, workers, connect_timeout_s)
    cancel = cancel or threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if cancel.is_set():
                raise KeyboardInterrupt
            cancel.set()

        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    volumes = {im.name: read_volume(im.path) for im in spec.images}
    reference = ReferenceStats.load(spec.reference) if spec.reference else None
    entries = {m.name: m for m in spec.models}
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_run_gpu = (spec.gpus_per_run or 1.0) if gpus > 0 else 0.0
    threads = 1 if per_run_gpu == 0 else None
    local = address is None
    host = socket.gethostname()
    remote = ray.remote(execute_run).options(num_cpus=1, num_gpus=per_run_gpu, max_retries=0)
    remote_group = ray.remote(execute_group).options(num_cpus=1, num_gpus=per_run_gpu, max_retries=0)
    try:
        # each model and image goes into the object store once; runs get references
        model_refs = {n: ray.put(_model_payload(m, hashes.get(m.path) or "")) for n, m in entries.items()}
        volume_refs = {n: ray.put(v) for n, v in volumes.items()}
        ref_ref, spec_ref = ray.put(reference), ray.put(spec)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if per_run_gpu:
            slots = min(slots, int(gpus / per_run_gpu) or 1)
        inflight: dict = {}
        attempts = {r.key: 0 for r in todo}
        t0, finished_now = time.perf_counter(), 0

        def submit(group: list[RunSpec]):
            heartbeats, write_tos = [], []
            for run in group:
                folder = out / "runs" / run.key
                folder.mkdir(parents=True, exist_ok=True)
                attempts[run.key] += 1
                status = {"state": RUNNING, "attempts": attempts[run.key], "run": _run_dict(run), "started": time.time()}
                outcome.status[run.key] = status  # first: a stop from here on marks the run interrupted
                _write_status(folder / "status.json", status)
                heartbeats.append(str(folder / "worker.json") if local else None)
                # a worker on this host writes the run folder itself (unless the results come back here)
                write_tos.append(None if keep_results else (host, str(folder.resolve())))
            run = group[0]
            if len(group) == 1:
                ref = remote.remote(run, model_refs[run.model], volume_refs[run.image], ref_ref, spec_ref, threads,
                                    heartbeats[0], write_tos[0])
            else:
                ref = remote_group.remote(group, model_refs[run.model], volume_refs[run.image], ref_ref, spec_ref,
                                          threads, heartbeats, write_tos)
            inflight[ref] = group

        def progress(last=""):
            if on_progress is None:
                return
            done = outcome.count(DONE)
            failed = outcome.count(FAILED)
            running = min(len(inflight), slots)
            left = len(runs) - done - failed
            eta = None
            if finished_now:  # runs finish at the rate seen so far in this session
                eta = (time.perf_counter() - t0) / finished_now * left
            on_progress(StudyProgress(len(runs), done, running, failed, left - running, eta, last))

        for group in batch_groups(todo, spec.batch, slots):
            submit(group)
        progress()

        def failed_attempt(run: RunSpec, message: str):
            nonlocal finished_now
            if attempts[run.key] <= spec.retries:
                log.warning("run %s failed (%s); retrying (%d of %d)", run.label(), message, attempts[run.key],
                            spec.retries)
                submit([run])  # a retry runs alone
                progress(f"retrying {run.label()}")
                return
            status = {"state": FAILED, "attempts": attempts[run.key], "run": _run_dict(run), "message": message}
            _write_status(out / "runs" / run.key / "status.json", status)
            outcome.status[run.key] = status
            finished_now += 1
            progress(f"failed {run.label()}: {message}")

        while inflight:
            if cancel.is_set():
                raise KeyboardInterrupt
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            if not ready:
                progress()
                continue
            ref = ready[0]
            group = inflight.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a run's failure never ends the study
                message = _failure_message(exc)
                for run in group:
                    failed_attempt(run, message)
                continue
            if len(group) == 1 and not isinstance(results, list):
                results = [results]
            for run, result in zip(group, results):
                folder = out / "runs" / run.key
                if isinstance(result, dict) and "error" in result:
                    failed_attempt(run, result["error"])
                    continue
                if not isinstance(result, dict):  # a worker on another machine, or results wanted: write here
                    write_outputs(result, folder, volumes[run.image], seed_ijk=run.seed)
                    if keep_results:
                        outcome.results[run.key] = result
                    result = _summary(result)
                status = {"state": DONE, "attempts": attempts[run.key], "run": _run_dict(run), **result}
                _write_status(folder / "status.json", status)
                outcome.status[run.key] = status
                finished_now += 1
                progress(f"done {run.label()}")
    except KeyboardInterrupt as stop:
        # every run marked running and not yet recorded: those in flight, and one whose submission or
        # recording the stop cut short (SIGTERM raises at any line, also between the two)
        message = f"stopped ({stop_reason(stop)}); run the same command again to resume"
        for key, status in list(outcome.status.items()):
            if status.get("state") == RUNNING:
                status = dict(status, state=INTERRUPTED, message=message)
                _write_status(out / "runs" / key / "status.json", status)
                outcome.status[key] = status
        if not started:
            _cancel_unfinished(ray, list(inflight))
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if started:
            from ..stopping import deferred

            with deferred():  # a stop arriving now would cut the shutdown short and leave Ray's processes
                ray.shutdown()
    outcome.paths, outcome.table = tables.write_study_outputs(spec, outcome)
    return outcome


def _cancel_unfinished(ray, refs: list) -> None:
    """Cancel the runs of ``refs`` that have not finished, on a Ray session the caller started (and
    keeps: a Slicer console, a notebook). When the study started Ray itself (on this machine or by
    joining ``--address``), it cancels nothing: ``ray.shutdown`` ends the study's job, and Ray kills
    the job's workers with it. ``ray.cancel`` of a task whose reply is arriving at that moment can
    abort the whole driver process in Ray's core worker ("Check failed: ... Tried to complete task
    that was not pending"; ray-project/ray#54798 fixed one path of that race, not all), so it is used
    only where nothing else stops the runs, and never on a task already seen to be done."""
    try:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
    except Exception:  # noqa: BLE001 - the session may already be gone
        return
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - the session may already be gone
            pass


def _run_dict(run: RunSpec) -> dict:
    return {"key": run.key, "model": run.model, "group": run.group, "image": run.image, "seed": list(run.seed),
            "seed_index": run.seed_index, "restart": run.restart, "method": run.method}


def _failure_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    if name in ("WorkerCrashedError", "NodeDiedError", "OwnerDiedError", "ActorDiedError"):
        return f"the worker running it died ({name})"
    return f"{name}: {text[-1] if text else ''}"[:500]


def print_progress(stream=None) -> Callable[[StudyProgress], None]:
    """A one-line progress display on stderr: done, running, failed, time left."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    state = {"last_print": 0.0}

    def show(p: StudyProgress) -> None:
        eta = "?" if p.eta_s is None else _duration(p.eta_s)
        width = 24
        fill = int(width * (p.done + p.failed) / max(1, p.total))
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {p.done}/{p.total} done, {p.running} running, "
                f"{p.failed} failed, {eta} left")
        now = time.monotonic()
        if tty:
            stream.write("\r" + line + " " * 4)
            if p.done + p.failed == p.total:
                stream.write("\n")
        elif p.last or now - state["last_print"] > 30:
            stream.write(line + (f"  ({p.last})" if p.last else "") + "\n")
            state["last_print"] = now
        stream.flush()

    return show


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


__all__ = ["run_study", "run_study_outcome", "StudyProgress", "StudyOutcome", "StudyEngineError", "execute_run",
           "execute_group", "batch_groups", "local_ray_options", "start_local_ray",
           "check_address", "print_progress", "require_ray", "INSTALL_HINT"]
