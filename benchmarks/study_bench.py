"""Study-engine benchmarks (issue 12), run by ``run_benchmarks.py`` (``make bench``).

    study_overhead   20 runs through the study engine with 1 worker / the same 20 runs in a plain
                     loop                                                        (target <= 1.10)
    study_scaling    throughput with 2 workers / with 1 worker                   (target >= 1.7)

Both use the bundled demo network on a 128x128 liver-like slice, ``batch: 1`` (each run on its own;
``batched_restarts`` measures batching).

What "overhead" means here: the plain loop is what a user would script without the engine, in
one process: for each run of the study, the same start image and configuration (the engine's own
:func:`~DeepDreamAnalysisLib.studies.engine._run_inputs`), ``run_analysis`` and ``write_outputs``
into a folder per run, so both sides write the same run folders (curves, figures, snapshots,
report, manifest). The engine's side is everything ``run_study`` does on top: the study folder's
lock and manifest, a ``status.json`` per run, Ray's scheduling and object store, and the tables,
pooled figure and report at the end. Ray's start-up and each worker's first run (process start,
torch import, model load) are timed separately and left out of the ratios, which measure the
engine in its steady state: what a study of many runs sees. ``engine_run_work_s`` is the runs' own
work on the worker (``run_analysis`` and writing the run folder, summed from each ``status.json``)
and ``engine_other_s`` the rest of the 1-worker study's wall time (the engine proper): a ratio above
1 with ``engine_other_s`` small means the worker ran the same work slower (the machine), not that
the engine costs more.

Same conditions on both sides: one torch thread (the plain loop sets it, the engine's workers set
it), and the same CPU priority: the engine's local Ray runs its workers at the priority of the
process that starts it (:func:`~DeepDreamAnalysisLib.studies.engine.local_ray_options`; Ray's own
default runs them 15 nice levels lower, which made every run yield to any other program). The
bench starts Ray exactly as ``run_study`` does, and records the worker's priority and threads
next to the plain loop's (``plain_threads``, ``worker_threads``, ``plain_nice``, ``worker_nice``).

Load drift: the plain loop runs its first half before the 1-worker study and its second half after
it, so a load that rises or falls steadily during the benchmark weighs on both sides alike. The
1-minute load average before and after is recorded: other processes on the cores distort the
scaling ratio.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "Resources" / "DemoModel" / "demo_unet.pt"


def _inputs(folder: Path, runs: int, iterations: int) -> dict:
    """A study dict of ``runs`` runs: the demo network, one slice, runs/2 seed points x 2 restarts."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(110.0, 15.0, (1, 128, 128)).astype(np.float32))
    img.SetSpacing((1.6, 1.6, 3.0))
    image = folder / "slice.nii.gz"
    sitk.WriteImage(img, str(image))
    seeds = [[40 + 4 * (n % 6), 40 + 4 * (n // 6), 0] for n in range(runs // 2)]
    return {"name": "bench", "models": [{"name": "demo", "path": str(DEMO)}],
            "images": [{"name": "slice", "path": str(image), "seeds": seeds}], "restarts": 2,
            "dream": {"iterations": iterations, "step": 2000.0}, "feature_backend": "native", "feature_every": 5,
            "snapshot_every": 20, "batch": 1}  # the engine's own overhead and scaling, per run (batched_restarts
    # measures batching)


class _PlainLoop:
    """The same runs one after another in this process (what a user would script without the engine)."""

    def __init__(self, spec, out: Path):
        import torch

        from DeepDreamAnalysisLib.analysis import run_analysis
        from DeepDreamAnalysisLib.models import load_model
        from DeepDreamAnalysisLib.studies import expand_runs
        from DeepDreamAnalysisLib.studies.engine import _run_inputs
        from DeepDreamAnalysisLib.volume import read_volume

        torch.set_num_threads(1)
        self.spec, self.out = spec, out
        self.volume = read_volume(spec.images[0].path)
        self.model = load_model(spec.models[0].path)
        self.runs = expand_runs(spec)
        start, config = _run_inputs(self.runs[0], self.model, self.volume, spec)
        run_analysis(start, self.runs[0].seed, self.model, config)  # warm-up
        self.threads, self.nice = torch.get_num_threads(), os.nice(0)

    def __call__(self, runs) -> float:
        from DeepDreamAnalysisLib.analysis import run_analysis
        from DeepDreamAnalysisLib.report import write_outputs
        from DeepDreamAnalysisLib.studies.engine import _run_inputs

        t = time.perf_counter()
        for run in runs:
            start, config = _run_inputs(run, self.model, self.volume, self.spec)
            result = run_analysis(start, run.seed, self.model, config)
            write_outputs(result, self.out / run.key, self.volume, seed_ijk=run.seed)
        return time.perf_counter() - t


def _engine(spec_dict, folder: Path, workers: int, name: str) -> dict:
    """Start Ray as ``run_study`` does with ``workers`` CPUs, warm every worker up, then time the study."""
    import ray

    from DeepDreamAnalysisLib.studies import load_study, run_study_outcome
    from DeepDreamAnalysisLib.studies.engine import local_ray_options

    t = time.perf_counter()
    ray.init(**local_ray_options(workers))
    startup = time.perf_counter() - t
    try:
        warm = dict(spec_dict, images=[dict(spec_dict["images"][0], seeds=spec_dict["images"][0]["seeds"][:workers])],
                    restarts=1, name=f"warm{workers}")
        (folder / f"warm{workers}.json").write_text(json.dumps(warm))
        t = time.perf_counter()
        run_study_outcome(load_study(folder / f"warm{workers}.json"), folder / f"warm{workers}")
        warmup = time.perf_counter() - t
        (folder / f"{name}.json").write_text(json.dumps(spec_dict))
        spec = load_study(folder / f"{name}.json")
        t = time.perf_counter()
        outcome = run_study_outcome(spec, folder / name)
        wall = time.perf_counter() - t
        assert outcome.count("done") == len(outcome.runs), "a benchmark run failed"
        # the runs' own work on the workers (run_analysis + writing the run folder, from status.json):
        # the rest of the wall time is the engine's (scheduling, status files, the tables at the end)
        work = sum((s.get("wall_s") or 0.0) + (s.get("write_s") or 0.0) for s in outcome.status.values())

        def worker_state():  # nested: shipped by value (this module is not importable on the workers)
            import os

            import torch

            return os.nice(0), torch.get_num_threads()

        nice, threads = ray.get(ray.remote(worker_state).options(num_cpus=1).remote())
    finally:
        ray.shutdown()
    return {"wall_s": wall, "startup_s": startup, "warmup_s": warmup, "runs": len(outcome.runs),
            "worker_nice": nice, "worker_threads": threads, "run_work_s": work}


def bench_study(runs: int = 20, iterations: int = 60) -> dict:
    """Both study benchmarks in one go (they share the inputs); returns two result dicts."""
    import torch

    from DeepDreamAnalysisLib.studies import load_study

    load_before = os.getloadavg()[0]
    threads_before = torch.get_num_threads()  # the plain loop runs with one thread, as a study worker does
    try:
        with tempfile.TemporaryDirectory(prefix="ddbench-study-") as tmp:
            folder = Path(tmp)
            spec_dict = _inputs(folder, runs, iterations)
            (folder / "plain.json").write_text(json.dumps(spec_dict))
            loop = _PlainLoop(load_study(folder / "plain.json"), folder / "plain")
            half = len(loop.runs) // 2
            plain_first = loop(loop.runs[:half])  # the plain loop brackets the 1-worker study (load drift)
            one = _engine(spec_dict, folder, 1, "one")
            plain_second = loop(loop.runs[half:])
            two = _engine(spec_dict, folder, 2, "two")
    finally:
        torch.set_num_threads(threads_before)  # the benchmarks after this one run with the process's threads
    plain = plain_first + plain_second
    load_after = os.getloadavg()[0]
    common = {"runs": runs, "iterations": iterations, "load_1min_before": round(load_before, 2),
              "load_1min_after": round(load_after, 2)}
    overhead = {"ratio": one["wall_s"] / plain, "engine_1_worker_s": one["wall_s"], "plain_loop_s": plain,
                "plain_halves_s": [round(plain_first, 2), round(plain_second, 2)],
                "engine_run_work_s": one["run_work_s"], "engine_other_s": one["wall_s"] - one["run_work_s"],
                "ray_startup_s": one["startup_s"], "worker_warmup_s": one["warmup_s"],
                "plain_threads": loop.threads, "worker_threads": one["worker_threads"],
                "plain_nice": loop.nice, "worker_nice": one["worker_nice"], **common}
    scaling = {"ratio": one["wall_s"] / two["wall_s"], "workers_1_s": one["wall_s"], "workers_2_s": two["wall_s"],
               "cores": os.cpu_count(), "worker_nice": two["worker_nice"], **common}
    return {"study_overhead": overhead, "study_scaling": scaling}
