"""Study-engine benchmarks (issue 12), run by ``run_benchmarks.py`` (``make bench``).

    study_overhead   20 runs through the study engine with 1 worker / the same 20 runs in a plain
                     loop (run_analysis + write_outputs), both on one core with one torch thread
                                                                                 (target <= 1.10)
    study_scaling    throughput with 2 workers / with 1 worker                   (target >= 1.7)

Both use the bundled demo network on a 128x128 liver-like slice. Ray's start-up and each
worker's first run (process start, torch import, model load) are timed separately and left out of
the ratios, which measure the engine in its steady state: what a study of many runs sees.
The 1-minute load average before and after is recorded: other processes on the cores distort
the scaling ratio.
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


def _plain_loop(spec, out: Path) -> float:
    """The same runs one after another in this process (what a user would script without the engine)."""
    import torch

    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.models import load_model
    from DeepDreamAnalysisLib.report import write_outputs
    from DeepDreamAnalysisLib.studies import expand_runs
    from DeepDreamAnalysisLib.studies.spec import analysis_config
    from DeepDreamAnalysisLib.volume import read_volume

    torch.set_num_threads(1)
    volume = read_volume(spec.images[0].path)
    model = load_model(spec.models[0].path)
    runs = expand_runs(spec)
    run_analysis(volume, runs[0].seed, model, analysis_config(spec, runs[0].method, model.card))  # warm-up
    t = time.perf_counter()
    for run in runs:
        import dataclasses

        base = analysis_config(spec, run.method, model.card)
        cfg = dataclasses.replace(base, dream=dataclasses.replace(base.dream, random_seed=run.restart))
        start = volume
        if run.restart > 0:
            from DeepDreamAnalysisLib.studies.compare import _perturbed

            start = _perturbed(volume, run.seed, model.card, cfg, spec.restart_noise_std, run.restart)
        result = run_analysis(start, run.seed, model, cfg)
        write_outputs(result, out / run.key, volume, seed_ijk=run.seed)
    return time.perf_counter() - t


def _engine(spec_dict, folder: Path, workers: int, name: str) -> dict:
    """Start Ray with ``workers`` CPUs, warm every worker up, then time the study."""
    import ray

    from DeepDreamAnalysisLib.studies import load_study, run_study_outcome

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
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
    finally:
        ray.shutdown()
    return {"wall_s": wall, "startup_s": startup, "warmup_s": warmup, "runs": len(outcome.runs)}


def bench_study(runs: int = 20, iterations: int = 60) -> dict:
    """Both study benchmarks in one go (they share the inputs); returns two result dicts."""
    from DeepDreamAnalysisLib.studies import load_study

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ddbench-study-") as tmp:
        folder = Path(tmp)
        spec_dict = _inputs(folder, runs, iterations)
        (folder / "plain.json").write_text(json.dumps(spec_dict))
        plain = _plain_loop(load_study(folder / "plain.json"), folder / "plain")
        one = _engine(spec_dict, folder, 1, "one")
        two = _engine(spec_dict, folder, 2, "two")
    load_after = os.getloadavg()[0]
    common = {"runs": runs, "iterations": iterations, "load_1min_before": round(load_before, 2),
              "load_1min_after": round(load_after, 2)}
    overhead = {"ratio": one["wall_s"] / plain, "engine_1_worker_s": one["wall_s"], "plain_loop_s": plain,
                "ray_startup_s": one["startup_s"], "worker_warmup_s": one["warmup_s"], **common}
    scaling = {"ratio": one["wall_s"] / two["wall_s"], "workers_1_s": one["wall_s"], "workers_2_s": two["wall_s"],
               "cores": os.cpu_count(), **common}
    return {"study_overhead": overhead, "study_scaling": scaling}
