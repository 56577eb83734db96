"""A stand-in for Slicer's main loop that holds the GIL, for tests and ``make bench``.

What it imitates: inside Slicer, Python is embedded without PythonQt's thread support, so the main
thread keeps the GIL while Qt's event loop waits in C++ for the next event; a Python thread of
Slicer's process only runs while the main thread itself runs Python (a timer callback, a console
command). :func:`run_through_loop` idles in C code *holding* the GIL (``ctypes.PyDLL(None).usleep``:
PyDLL calls do not release it) and calls the panel's drain (``handle.processEvents()``) every
``tick_s`` (the module's 150 ms ``qt.QTimer``). ``time.sleep`` would release the GIL and hide the
problem. It is not Slicer: no Qt events are processed and nothing is painted; it measures how fast
the run goes and how long each drain keeps the main thread busy.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field

TICK_S = 0.150

_usleep = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held during the call
_usleep.argtypes = [ctypes.c_uint]


def idle_holding_gil(seconds: float) -> None:
    """Wait ``seconds`` in C code without releasing the GIL (as Qt's event loop in Slicer)."""
    _usleep(int(seconds * 1e6))


WARMUP_ITERATIONS = 5
"""Iterations left out of a rate (first-call costs: lazy imports, allocations)."""


def _rate(stamps) -> float:
    """Iterations per second from ``(elapsed_s, iterations done)`` stamps of the run's own clock
    (``Progress.elapsed_s``: from the loop's start, before the worker's start-up is over and
    without it), from the first stamp past the warm-up to the last. Both sides of a comparison
    pass one stamp per iteration, so both count the same window (iterations 6 to the last)."""
    stamps = sorted(set(stamps), key=lambda s: s[1])
    stamps = [s for s in stamps if s[1] > WARMUP_ITERATIONS] or list(stamps)
    if len(stamps) < 2 or stamps[-1][0] <= stamps[0][0]:
        return float("nan")
    (t_a, n_a), (t_b, n_b) = stamps[0], stamps[-1]
    return (n_b - n_a) / (t_b - t_a)


@dataclass
class LoopFigures:
    """What :func:`run_through_loop` measured. ``rate``: iterations per second of the run, from the
    run's own clock (``Progress.elapsed_s``) of every iteration the main thread received, past the
    warm-up (a starved worker thread shows as a slow clock; the drain's 150 ms ticks do not blur it).
    ``startup_s``: from the start to the first iteration received (a worker process's start-up).
    ``max_drain_s``: the longest drain, wall clock (it includes time the main process waited for a
    core on a loaded machine); ``max_drain_cpu_s``: the most CPU time one drain used (the drain's
    own work)."""

    iterations: int = 0
    rate: float = float("nan")
    startup_s: float = float("nan")
    max_drain_s: float = 0.0
    max_drain_cpu_s: float = 0.0
    cancel_latency_s: float | None = None
    iteration_s: float = float("nan")
    status: str = ""
    receipts: list = field(default_factory=list, repr=False)


def _iterations_done(report) -> int:
    """Iterations a report stands for: a run's ``Progress`` counts its own; a comparison's
    ``CompareProgress`` counts the runs before it too (restarts run as a batch, so this is a rough,
    not always increasing, count)."""
    step = getattr(report, "step", None)
    if step is not None:
        return step.iteration + 1
    return report.run_index * report.progress.total_iterations + report.progress.step.iteration + 1


def _run_handle_class():
    from DeepDreamAnalysisLib.slicer_logic import RunHandle

    return RunHandle


def run_through_loop(handle, *, tick_s: float = TICK_S, cancel_after: int | None = None, timeout_s: float = 300.0,
                     hold_gil: bool = True) -> LoopFigures:
    """Drain ``handle`` (a :class:`~DeepDreamAnalysisLib.slicer_logic.RunHandle`, or a
    ``ComparisonHandle``: then ``rate`` stays NaN and iterations count roughly) from a loop that
    idles ``tick_s`` between drains, holding the GIL (``hold_gil``) or not (``time.sleep``).
    ``cancel_after``: call ``handle.cancel()`` at the first drain that has received that many
    iterations, and measure how long until the run has ended."""
    figures = LoopFigures()
    runner = getattr(handle, "runner", None)
    poll = getattr(runner, "poll", None)
    if poll is not None and isinstance(handle, _run_handle_class()):
        def recording_poll():  # every iteration's stamp, not only the last of each drain
            out = poll()
            figures.receipts.extend((p.elapsed_s, p.step.iteration + 1) for p in out)
            return out

        runner.poll = recording_poll
    started = time.perf_counter()
    cancelled_at = None
    seen = 0
    while True:
        if hold_gil:
            idle_holding_gil(tick_s)
        else:
            time.sleep(tick_s)
        t0, c0 = time.perf_counter(), time.thread_time()
        going = handle.processEvents()
        now = time.perf_counter()
        figures.max_drain_s = max(figures.max_drain_s, now - t0)
        figures.max_drain_cpu_s = max(figures.max_drain_cpu_s, time.thread_time() - c0)
        last = handle.lastProgress
        if last is not None and _iterations_done(last) > seen:
            seen = _iterations_done(last)
            if figures.startup_s != figures.startup_s:
                figures.startup_s = now - started
        if not going:
            break
        if cancel_after is not None and cancelled_at is None and seen >= cancel_after:
            handle.cancel()
            cancelled_at = time.perf_counter()
        if now - started > timeout_s:
            handle.cancel()
            handle.wait(timeout=30)
            raise TimeoutError(f"the run did not end within {timeout_s} s")
    end = time.perf_counter()
    figures.status = handle.status
    figures.iterations = seen
    figures.rate = _rate(figures.receipts)
    if figures.rate > 0:
        figures.iteration_s = 1.0 / figures.rate
    if cancelled_at is not None:
        figures.cancel_latency_s = end - cancelled_at
    return figures


def headless_rate(volume, seed_ijk, model, config) -> float:
    """Iterations per second of the same run with no GUI loop at all (``run_analysis`` called
    directly), counted as :func:`run_through_loop` counts."""
    from DeepDreamAnalysisLib.analysis import run_analysis

    stamps: list[tuple[float, int]] = []
    run_analysis(volume, seed_ijk, model, config,
                 on_progress=lambda p: stamps.append((p.elapsed_s, p.step.iteration + 1)))
    return _rate(stamps)


def headless_rate_in_fresh_process(volume, seed_ijk, model_path, config, reference_path=None,
                                   threads: int | None = None, timeout_s: float = 600.0) -> float:
    """Iterations per second of the same run as a command-line user gets it: a fresh Python process
    (cold start, as ``deepdream-analysis run``) calling ``run_analysis`` with no GUI loop, the same
    image, seed, model file, configuration and reference, and ``threads`` torch threads (None:
    torch's default, one per core, as the command line uses). Counted as :func:`run_through_loop`
    counts (the run's own clock, past the warm-up)."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="deepdream-headless-") as folder:
        folder = Path(folder)
        np.save(folder / "volume.npy", np.ascontiguousarray(volume.array, dtype=np.float32))
        job = {"spacing": tuple(volume.spacing), "origin": tuple(volume.origin),
               "direction": np.asarray(volume.direction).tolist(), "seed_ijk": tuple(int(v) for v in seed_ijk),
               "model_path": str(model_path), "config": config,
               "reference_path": None if reference_path is None else str(reference_path), "threads": threads}
        (folder / "job.pkl").write_bytes(pickle.dumps(job))
        import DeepDreamAnalysisLib

        env = dict(os.environ)
        package_parent = str(Path(DeepDreamAnalysisLib.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in [env.get("PYTHONPATH")] if p])
        done = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"the headless run failed: {done.stderr[-2000:]}")
        return float(json.loads(done.stdout.strip().splitlines()[-1])["rate"])


def _headless_main(folder: str) -> int:
    """``python slicer_main_loop.py FOLDER``: the fresh process of :func:`headless_rate_in_fresh_process`."""
    import numpy as np
    import torch

    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.models import load_model
    from DeepDreamAnalysisLib.volume import Volume

    folder = Path(folder)
    job = pickle.loads((folder / "job.pkl").read_bytes())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    volume = Volume(np.load(folder / "volume.npy"), spacing=job["spacing"], origin=job["origin"],
                    direction=np.asarray(job["direction"]))
    reference = None
    if job.get("reference_path"):
        from DeepDreamAnalysisLib.reference import ReferenceStats

        reference = ReferenceStats.load(job["reference_path"])
    stamps: list[tuple[float, int]] = []
    run_analysis(volume, job["seed_ijk"], load_model(job["model_path"]), job["config"], reference,
                 on_progress=lambda p: stamps.append((p.elapsed_s, p.step.iteration + 1)))
    print(json.dumps({"rate": _rate(stamps), "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(_headless_main(sys.argv[1]))
