"""The analysis in its own process: ``python -m DeepDreamAnalysisLib.worker FOLDER``.

Started by :class:`~.process_runner.ProcessRunner` (in Slicer with ``PythonSlicer``), so the dream
loop never competes with Slicer's main thread for the GIL. Everything goes through ``FOLDER``:

- in: ``volume.npy`` (the image, float32 [k, j, i]) and ``job.pkl`` (spacing, origin, direction,
  seed (i, j, k), model path, whether code targets are allowed, the :class:`~.config.AnalysisConfig`,
  the reference statistics path, the torch thread count: one core fewer than there are);
- out: ``progress.bin``, length-prefixed pickled frames ``(Progress without snapshot, snapshot file
  name or None)``, appended and flushed after each iteration (one write call); ``snap-<iteration>.pkl``
  (the :class:`~.result.Snapshot`: the crop's image, probability and mask, pickled with protocol 5,
  written before the frame that names it; half the cost of an ``.npz``, measured); ``outcome.pkl``
  (``("result", AnalysisResult)`` or ``("error", exception)``), written last by rename.

A job with ``kind: "compare"`` (:class:`~.process_runner.ProcessComparisonRunner`) compares models
instead: ``model_paths`` (name -> file), ``restarts`` and ``restart_noise_std`` go to
``studies.compare.compare_models``; its frames are ``(CompareProgress without snapshot, None)`` and
its outcome ``("result", Comparison)``.

Control: a line ``cancel`` on stdin, or stdin closing (the parent died or let go), cancels the run;
it ends within one iteration with a ``cancelled`` result. Imports torch; never Qt, VTK or MRML.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import sys
import threading
from pathlib import Path

import numpy as np

FRAME_HEADER = struct.Struct("<I")
MAX_UNREAD_SNAPSHOTS = 16
"""The worker deletes each snapshot file this many snapshots after writing it, if the parent has not read
(and deleted) it by then: bounded disk use when the parent drains slowly (the final result still holds
every kept snapshot)."""


def _watch_stdin(cancel: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "cancel":
            cancel.set()
    cancel.set()  # stdin closed: the parent is gone or has let go


class _Writer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.stream = open(folder / "progress.bin", "ab")
        self.snapshots: list[Path] = []

    def __call__(self, report) -> None:
        inner = getattr(report, "progress", None)  # a comparison's CompareProgress wraps a run's Progress
        progress = report if inner is None else inner
        snap_name = None
        snap = progress.snapshot
        if snap is not None and inner is None:  # a comparison shows no live images: no snapshot files
            snap_name = f"snap-{snap.iteration}.pkl"
            path = self.folder / snap_name
            tmp = self.folder / (snap_name + ".part")
            with open(tmp, "wb") as f:
                pickle.dump(snap, f, protocol=5)
            os.replace(tmp, path)
            self.snapshots.append(path)
            if len(self.snapshots) > MAX_UNREAD_SNAPSHOTS:  # the parent deletes what it has read
                for stale in self.snapshots[:-MAX_UNREAD_SNAPSHOTS]:
                    try:
                        stale.unlink()
                    except OSError:
                        pass
                self.snapshots = self.snapshots[-MAX_UNREAD_SNAPSHOTS:]
        light = type(progress)(step=progress.step, snapshot=None, total_iterations=progress.total_iterations,
                               elapsed_s=progress.elapsed_s, eta_s=progress.eta_s,
                               late_steps=list(getattr(progress, "late_steps", []) or []))
        if inner is not None:
            light = dataclasses.replace(report, progress=light)
        data = pickle.dumps((light, snap_name), protocol=pickle.HIGHEST_PROTOCOL)
        self.stream.write(FRAME_HEADER.pack(len(data)) + data)
        self.stream.flush()


def _write_outcome(folder: Path, kind: str, value) -> None:
    try:
        data = pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled still tells its message
        data = pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value}")))
    tmp = folder / "outcome.pkl.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / "outcome.pkl")


def run_job(folder: Path, cancel: threading.Event) -> int:
    """Load the job in ``folder``, run it, write the outcome; 0 when an outcome was written."""
    writer = _Writer(folder)
    try:
        job = pickle.loads((folder / "job.pkl").read_bytes())
        if job.get("torch_threads"):  # process_runner.worker_threads: one core is left to Slicer
            import torch

            torch.set_num_threads(int(job["torch_threads"]))
        from .models import load_model
        from .volume import Volume

        volume = Volume(np.load(folder / "volume.npy"), spacing=job["spacing"], origin=job["origin"],
                        direction=np.asarray(job["direction"]))
        (folder / "volume.npy").unlink()  # read: the image's copy leaves the disk at once
        reference = None
        if job.get("reference_path"):
            from .reference import ReferenceStats

            reference = ReferenceStats.load(job["reference_path"])
        if job.get("kind") == "compare":
            from .studies.compare import DEFAULT_RESTART_NOISE_STD, compare_models

            models = {name: load_model(path, device="cpu", allow_code_targets=job["allow_code_targets"])
                      for name, path in job["model_paths"].items()}
            noise = job.get("restart_noise_std")
            result = compare_models(volume, tuple(job["seed_ijk"]), models, job["config"], reference,
                                    restarts=job["restarts"], on_progress=writer, cancel=cancel,
                                    restart_noise_std=DEFAULT_RESTART_NOISE_STD if noise is None else noise)
        else:
            from .analysis import run_analysis

            model = load_model(job["model_path"], device="cpu", allow_code_targets=job["allow_code_targets"])
            result = run_analysis(volume, tuple(job["seed_ijk"]), model, job["config"], reference,
                                  on_progress=writer, cancel=cancel)
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        _write_outcome(folder, "error", exc)
        return 0
    finally:
        writer.stream.close()
    _write_outcome(folder, "result", result)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m DeepDreamAnalysisLib.worker FOLDER (started by the Slicer module)", file=sys.stderr)
        return 2
    cancel = threading.Event()
    threading.Thread(target=_watch_stdin, args=(cancel,), daemon=True).start()
    return run_job(Path(argv[0]), cancel)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the outcome is written: skip the interpreter's teardown (torch's takes up to a second)
