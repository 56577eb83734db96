"""The analysis in a worker process, drained without ever waiting (the Slicer panel's run).

Inside Slicer a Python thread only runs while the main thread runs Python: the main thread holds
the GIL while Qt idles in C++, so a worker *thread* crawls (docs/slicer-panel.md, "Why a
process"). :class:`ProcessRunner` has the interface of :class:`~.runner.AnalysisRunner` (``start``,
``poll``, ``cancel``, ``done``, ``join``, ``result``, ``error``) but runs
:mod:`DeepDreamAnalysisLib.worker` in a child process (``PythonSlicer`` in Slicer, else
``sys.executable``) and talks to it through files in a private temporary folder
(``<temp>/deepdream-run-<nonce>``, mode 0700; one that a crash of Slicer left is removed by the next
start, once its processes have ended: :mod:`.outputs.orphans`):

- inputs: the image (``volume.npy``) and the job (geometry, seed, model path, configuration,
  reference path) written at :meth:`start`;
- progress: :meth:`poll` reads the frames appended to ``progress.bin`` since the last call and the
  snapshot files they name (non-blocking file reads; no pipe to wait on, no thread in this process);
- cancel: a ``cancel`` line on the child's stdin; if it has not ended ``CANCEL_GRACE_S`` later, a
  later :meth:`poll` or :meth:`join` terminates it. :meth:`terminate` ends it at once (scene close,
  module reload, Slicer quitting; it waits at most 1 s for the process to be gone, so that its
  temporary files can be removed). The child also cancels itself when its stdin closes, so it
  never outlives Slicer;
- the end: ``outcome.pkl`` holds the result or the error. A child that dies without one (killed,
  out of memory, crashed) gives a :class:`WorkerProcessError` naming the exit code and the last
  lines of its log; the iterations already polled stay with the caller.

:class:`ProcessComparisonRunner` does the same for a model comparison
(``studies.compare.compare_models``: several model files, restarts, one image and seed): the same
files, the same frames (each a ``CompareProgress``), the same cancel and crash handling; its result
is the ``Comparison``.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import AnalysisConfig
from .errors import DeepDreamError
from .outputs import orphans
from .result import AnalysisResult, Progress, Snapshot
from .worker import FRAME_HEADER

log = logging.getLogger(__name__)

MAX_FRAMES_PER_POLL = 500
"""Reports one :meth:`ProcessRunner.poll` returns at most; the rest wait for the next (``backlog``).
A drain costs about 0.1 ms of main-thread time per report (measured on the demo: 263 reports in one
drain, 28 ms), so a drain after a long stall of Slicer's main thread (a modal dialog, a long console
command) stays near 50 ms instead of growing with the stall; the backlog goes at 500 reports a tick,
far faster than any run makes them."""

CANCEL_GRACE_S = 2.0
"""Seconds a cancelled child gets to end by itself (it stops within one iteration) before it is
terminated."""


class WorkerProcessError(DeepDreamError):
    """The analysis process ended without a result (killed, out of memory, crashed)."""

    partial = None


def python_executable() -> str:
    """The interpreter for the worker: ``PythonSlicer`` inside Slicer (Slicer's Python with its
    packages), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        home = os.path.dirname(sys.executable)
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            found = shutil.which(name) or shutil.which(name, path=home)
            if found:
                return found
    return sys.executable


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the system tells it, else the count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_threads(cores: int | None = None) -> int:
    """torch CPU threads for the worker process: one core fewer than there are, at least one.

    The core left over is Slicer's (drains, rendering, the user's clicks). Measured on a 2-core
    machine (docs/slicer-panel.md, "Speed"): torch's default (one thread per core) runs the demo at
    5.5 ms an iteration when nothing else runs, but at 190-660 ms as soon as any other process wants
    a core (OpenMP threads spin-wait for a preempted team-mate), while one thread stays at 6-16 ms."""
    return max(1, (available_cores() if cores is None else int(cores)) - 1)


def remove_dead_run_folders() -> list[Path]:
    """Remove the temporary folders that runs of processes which have ended left behind (Slicer crashed
    or was killed mid-run): only folders proven the tool's, see :mod:`.outputs.orphans`. Never raises."""
    try:
        return orphans.remove_dead_run_folders()
    except Exception as exc:  # noqa: BLE001 - a clean-up never stops a run
        log.warning("Could not look for the temporary folders of earlier runs: %s", exc)
        return []


def _package_parent() -> str:
    return str(Path(__file__).resolve().parent.parent)


class ProcessRunner:
    """Run one analysis in a child process. See the module docstring."""

    what = "analysis"
    """What the child computes, for messages."""

    def __init__(self, volume, seed_ijk, model, config: AnalysisConfig | None = None, reference=None,
                 *, model_path=None, reference_path=None, allow_code_targets: bool = False,
                 queue_size: int = 4, python: str | None = None, threads: int | None = None):
        self.volume = volume
        self.seed_ijk = tuple(int(v) for v in seed_ijk)
        self.model = model
        self.config = config or AnalysisConfig()
        self.reference = reference
        path = str(model_path if model_path is not None else getattr(model, "path", "") or "")
        self.model_path = str(Path(path).resolve()) if path.strip() not in ("", ".") else ""
        self.reference_path = None if reference_path is None or str(reference_path).strip() in ("", ".") \
            else str(Path(reference_path).resolve())
        self.allow_code_targets = bool(allow_code_targets)
        self.queue_size = queue_size
        self.python = python or python_executable()
        self.threads = worker_threads() if threads is None else max(1, int(threads))
        """torch CPU threads of the worker (default :func:`worker_threads`: one core fewer than there are)."""
        self.folder: Path | None = None
        """The private temporary folder shared with the child (``<temp>/deepdream-run-<nonce>``, mode 0700,
        :class:`~.outputs.orphans.RunFolder`); None before :meth:`start` and once removed."""
        self._scratch: orphans.RunFolder | None = None
        self.process: subprocess.Popen | None = None
        self.result: AnalysisResult | None = None
        self.error: BaseException | None = None
        self.last_progress: Progress | None = None
        self.received = 0
        self._offset = 0
        self._buffer = b""
        self._cancel_at: float | None = None
        self._terminated = False
        self._collected = False
        self._log = None
        self._pending: list[Progress] = []

    # --- AnalysisRunner's interface -----------------------------------------------------------

    @property
    def crop(self):
        from .analysis import plan_crop

        return plan_crop(self.volume, self.seed_ijk, self.model.card, self.config)

    def _check(self) -> None:
        """Refuse, before anything is written, what the child could not load."""
        if not self.model_path or not Path(self.model_path).exists():
            raise DeepDreamError(f"The worker process loads the model from its file, and {self.model_path!r} "
                                 "does not exist. Give the model's path (not a model object), or run in-process.")

    def _job(self) -> dict:
        """What ``job.pkl`` holds besides the image (worker.py's module docstring)."""
        return {"spacing": tuple(self.volume.spacing), "origin": tuple(self.volume.origin),
                "direction": np.asarray(self.volume.direction).tolist(), "seed_ijk": self.seed_ijk,
                "model_path": self.model_path, "allow_code_targets": self.allow_code_targets,
                "config": self.config, "reference_path": self.reference_path,
                "torch_threads": self.threads}

    def start(self) -> "ProcessRunner":
        if self.process is not None:
            raise RuntimeError("This runner was started already; make a new one for another run.")
        self._check()
        remove_dead_run_folders()
        self._scratch = orphans.RunFolder.create()
        self.folder = self._scratch.path
        try:
            np.save(self.folder / "volume.npy", np.ascontiguousarray(self.volume.array, dtype=np.float32))
            (self.folder / "job.pkl").write_bytes(pickle.dumps(self._job(), protocol=pickle.HIGHEST_PROTOCOL))
            self._log = open(self.folder / "worker.log", "wb")
        except BaseException:  # a full disk: the copy of the image goes at once
            self._cleanup()
            raise
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_package_parent()] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self.process = subprocess.Popen(
                [self.python, "-m", "DeepDreamAnalysisLib.worker", str(self.folder)], stdin=subprocess.PIPE,
                stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.folder),
                pass_fds=self._scratch.pass_fds, **kwargs)  # the worker holds the folder's lock too
            self._scratch.add_process(self.process.pid)
        except OSError as exc:
            self._cleanup()
            raise DeepDreamError(f"Could not start the {self.what} process ({self.python}): {exc}. "
                                 "Run in-process instead (process=False).") from None
        return self

    def poll(self, max_frames: int | None = MAX_FRAMES_PER_POLL) -> list[Progress]:
        """What the child reported since the last call, oldest first, at most ``max_frames`` (None: all;
        the rest stay in :attr:`backlog` for the next call). Non-blocking; enforces the cancel grace."""
        self._enforce_grace()
        self._pending += self._read_frames()
        if max_frames is None or len(self._pending) <= max_frames:
            out, self._pending = self._pending, []
        else:
            out, self._pending = self._pending[:max_frames], self._pending[max_frames:]
        if out:
            self.last_progress = out[-1]
            self.received += len(out)
        return out

    @property
    def backlog(self) -> int:
        """Reports read from the child but not yet returned by :meth:`poll`."""
        return len(self._pending)

    def cancel(self) -> None:
        """Ask the child to stop (it ends within one iteration with a ``cancelled`` result); it is
        terminated if it is still there ``CANCEL_GRACE_S`` later, at the next poll or join."""
        if self._cancel_at is None:
            self._cancel_at = time.monotonic()
        self._send("cancel\n")

    def terminate(self) -> None:
        """End the child now (nothing more is read from it); the files go."""
        if self._cancel_at is None:
            self._cancel_at = time.monotonic()
        self._terminated = True
        if self.process is not None and self.process.poll() is None:
            self._send("cancel\n")
            self.process.terminate()
            try:  # it ends in milliseconds; a short wait lets its files go now
                self.process.wait(0.5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                try:
                    self.process.wait(0.5)
                except subprocess.TimeoutExpired:
                    pass
        self._collected = True
        if self.error is None and self.result is None:
            self.error = WorkerProcessError(f"The {self.what} process was stopped.")
        self._cleanup_when_gone()

    @property
    def cancelled(self) -> bool:
        return self._cancel_at is not None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def done(self) -> bool:
        if self.process is None or self.process.poll() is None:
            return False
        self._collect()
        self._cleanup_when_gone()
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the child (up to ``timeout`` s); True when it has ended."""
        if self.process is None:
            return False
        end = None if timeout is None else time.monotonic() + timeout
        while self.process.poll() is None:
            self._enforce_grace()
            left = 0.1 if end is None else min(0.1, end - time.monotonic())
            if left <= 0:
                return False
            try:
                self.process.wait(left)
            except subprocess.TimeoutExpired:
                pass
        return True

    def wait(self) -> AnalysisResult:
        self.join()
        self.done  # noqa: B018 - collects the outcome
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    # --- internals ----------------------------------------------------------------------------

    def _send(self, text: str) -> None:
        if self.process is None or self.process.stdin is None:
            return
        try:
            self.process.stdin.write(text.encode())
            self.process.stdin.flush()
        except (OSError, ValueError):  # the child is gone already
            pass

    def _enforce_grace(self) -> None:
        if self._cancel_at is None or self.process is None or self.process.poll() is not None:
            return
        late = time.monotonic() - self._cancel_at
        if late > CANCEL_GRACE_S + 3.0:
            self.process.kill()
        elif late > CANCEL_GRACE_S:
            self.process.terminate()

    def _read_frames(self) -> list[Progress]:
        if self.folder is None or self._terminated:
            return []
        try:
            with open(self.folder / "progress.bin", "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        buf = self._buffer + data
        frames = []
        pos = 0
        while len(buf) - pos >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(buf, pos)
            if len(buf) - pos - FRAME_HEADER.size < n:
                break
            frames.append(pickle.loads(buf[pos + FRAME_HEADER.size:pos + FRAME_HEADER.size + n]))
            pos += FRAME_HEADER.size + n
        self._buffer = buf[pos:]
        with_snap = [i for i, (_, name) in enumerate(frames) if name]
        keep = set(with_snap[-self.queue_size:])
        out = []
        for i, (progress, name) in enumerate(frames):
            if name:
                path = self.folder / name
                if i in keep:
                    progress.snapshot = self._load_snapshot(path)
                try:
                    path.unlink()
                except OSError:
                    pass
            out.append(progress)
        return out

    @staticmethod
    def _load_snapshot(path: Path) -> Snapshot | None:
        try:
            with open(path, "rb") as f:
                snap = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError):  # deleted by the child (undrained for too long)
            return None
        return snap if isinstance(snap, Snapshot) else None

    def _collect(self) -> None:
        if self._collected:
            return
        self._collected = True
        self._pending += self._read_frames()  # what the child wrote after the last poll
        code = self.process.returncode
        outcome = None
        try:
            outcome = pickle.loads((self.folder / "outcome.pkl").read_bytes())
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            pass
        if outcome is not None:
            kind, value = outcome
            if kind == "result":
                self.result = value
            else:
                self.error = value
        else:
            how = {-9: "killed (SIGKILL: often the system running out of memory)",
                   -15: "terminated (SIGTERM)"}.get(code, f"exit code {code}")
            if self._cancel_at is not None and code in (-9, -15, 1):
                how += ", after it was asked to cancel"
            self.error = WorkerProcessError(self._lost_message(how, self._log_tail()))
        self._cleanup_when_gone()

    def _lost_message(self, how: str, tail: str) -> str:
        return (f"The analysis process ended without a result ({how}). The {self.received} iterations received "
                f"before are kept in the output nodes." + (f" Its last output: {tail}" if tail else "")
                + " If it ran out of memory, use a smaller crop (roi_size) or the CPU.")

    def _log_tail(self, chars: int = 600) -> str:
        try:
            text = (self.folder / "worker.log").read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""
        return " ".join(text.split())

    def _cleanup_when_gone(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return  # still ending: a later done/join cleans up
        self._cleanup()

    def _cleanup(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._scratch is not None:
            self._scratch.remove()
            self._scratch = None
            self.folder = None


class ProcessComparisonRunner(ProcessRunner):
    """Compare models (``studies.compare.compare_models``) in a child process: the interface of
    :class:`ProcessRunner`; :meth:`poll` returns ``CompareProgress`` reports (without snapshots),
    ``result`` is the ``Comparison``. A cancelled comparison ends within one iteration with the
    restarts that finished, or with ``compare_models``' DeepDreamError when no model had finished one.
    """

    what = "comparison"

    def __init__(self, volume, seed_ijk, model_paths: dict, config: AnalysisConfig | None = None, *,
                 reference_path=None, restarts: int = 3, restart_noise_std: float | None = None,
                 allow_code_targets: bool = False, python: str | None = None, threads: int | None = None):
        super().__init__(volume, seed_ijk, None, config, None, model_path="", reference_path=reference_path,
                         allow_code_targets=allow_code_targets, python=python, threads=threads)
        self.model_paths = {str(name): str(Path(path).resolve()) for name, path in model_paths.items()}
        self.restarts = restarts
        self.restart_noise_std = restart_noise_std

    @property
    def crop(self):
        raise AttributeError("A comparison has no single crop.")

    def _check(self) -> None:
        if not self.model_paths:
            raise DeepDreamError("Give at least one model file to compare.")
        for name, path in self.model_paths.items():
            if not Path(path).exists():
                raise DeepDreamError(f"The comparison process loads each model from its file, and {path!r} "
                                     f"({name}) does not exist. Give model paths, or compare in-process.")

    def _job(self) -> dict:
        job = super()._job()
        job.update(kind="compare", model_paths=self.model_paths, restarts=self.restarts,
                   restart_noise_std=self.restart_noise_std)
        return job

    def _lost_message(self, how: str, tail: str) -> str:
        return (f"The comparison process ended without a result ({how}); nothing is shown. "
                + (f"Its last output: {tail}" if tail else "")
                + " If it ran out of memory, compare fewer models or restarts at once, or use the CPU.")
