"""Where the panel's run could lose speed against the same run headless: an interleaved A/B.

    python benchmarks/slicer_gil_ab.py [--method robust+spectral] [--iterations 300] [--rounds 5]

The demo's run (as ``make bench``'s ``slicer_gil``: the demo network, the healthy LiTS slice, the
paper's features with the demo reference, snapshots every 5 iterations), one torch thread on every
side, three sides per round, the order reversed every other round:

- ``headless``: ``run_analysis`` in a fresh Python process, no files, no GUI loop;
- ``worker``: the panel's worker process (its progress and snapshot files), with nobody draining
  it: this process waits in ``time.sleep`` (which releases the GIL) and reads everything at the end;
- ``panel``: the same worker process drained every 150 ms into MRML nodes by the loop that holds
  the GIL as Slicer's does (Testing/slicer_main_loop.py).

``worker`` against ``headless`` is the cost of the worker process and its files; ``panel`` against
``worker`` is the cost of the drains (the main process's work on the other core). For each run:
the wall clock per iteration (the run's own clock, iterations 6 to the last) and the process's CPU
time per iteration over the same iterations (``headless``: the run's process_time; ``worker`` and
``panel``: /proc/<pid>/stat sampled at each read of the worker's reports; Linux only). CPU time
moves much less with the machine's load than the wall clock: equal CPU per iteration with unequal
wall clocks means the difference is who had a core, not the path. Prints each round and a JSON
summary (medians, and the median of the paired ratios against ``headless``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "DeepDreamAnalysis"))

WARMUP = 5


def _per_iteration(samples) -> float:
    """Seconds per iteration from ``(seconds, iterations done)`` samples, from the first past the
    warm-up to the last."""
    samples = sorted(set(samples), key=lambda s: s[1])
    past = [s for s in samples if s[1] > WARMUP]
    if len(past) < 2 or past[-1][1] == past[0][1]:
        return float("nan")
    return (past[-1][0] - past[0][0]) / (past[-1][1] - past[0][1])


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _headless_child(folder: str) -> int:
    """``python slicer_gil_ab.py --child FOLDER``: the headless side."""
    import numpy as np
    import torch

    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.models import load_model
    from DeepDreamAnalysisLib.reference import ReferenceStats
    from DeepDreamAnalysisLib.volume import Volume

    job = pickle.loads((Path(folder) / "job.pkl").read_bytes())
    torch.set_num_threads(1)
    volume = Volume(np.load(Path(folder) / "volume.npy"), spacing=job["spacing"], origin=job["origin"],
                    direction=np.asarray(job["direction"]))
    reference = ReferenceStats.load(job["reference"]) if job["reference"] else None
    wall, cpu = [], []

    def on_progress(p):
        n = p.step.iteration + 1
        wall.append((p.elapsed_s, n))
        cpu.append((time.process_time(), n))

    run_analysis(volume, job["seed"], load_model(job["model"]), job["config"], reference, on_progress=on_progress)
    print(json.dumps({"wall": _per_iteration(wall), "cpu": _per_iteration(cpu)}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default=None, help="dream method (default: the demo card's)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _headless_child(args.child)

    import numpy as np

    import slicer_main_loop as loop
    from slicer_fixtures import make_scene, slicer

    from DeepDreamAnalysisLib.config import AnalysisConfig, FeatureConfig, dream_settings, paper_features
    from DeepDreamAnalysisLib.lits import demo_case
    from DeepDreamAnalysisLib.models import load_model
    from DeepDreamAnalysisLib.process_runner import ProcessRunner
    from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore

    res = ROOT / "Resources" / "DemoModel"
    path, reference = res / "demo_unet.pt", res / "demo_reference.json"
    model = load_model(path)
    volume, seed = demo_case()
    make_scene()
    node = slicer.util.addVolumeFromArray(volume.array, name="ab")
    node.SetSpacing(*volume.spacing)
    method = args.method or dream_settings(model.card).values["method"]
    config = AnalysisConfig(dream=dream_settings(model.card, args.iterations, None, method=method).config(device="cpu"),
                            features=FeatureConfig(names=tuple(paper_features(2))), snapshot_every=5)

    def headless():
        with tempfile.TemporaryDirectory(prefix="deepdream-ab-") as folder:
            np.save(Path(folder) / "volume.npy", volume.array)
            job = {"spacing": tuple(volume.spacing), "origin": tuple(volume.origin),
                   "direction": np.asarray(volume.direction).tolist(), "seed": seed, "model": str(path),
                   "reference": str(reference), "config": config}
            (Path(folder) / "job.pkl").write_bytes(pickle.dumps(job))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "DeepDreamAnalysis"),
                                                                os.environ.get("PYTHONPATH", "")]))
            done = subprocess.run([sys.executable, __file__, "--child", folder], capture_output=True, text=True,
                                  env=env, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

    def recording(runner, wall, cpu):
        poll = runner.poll

        def recorded_poll(*a, **k):
            out = poll(*a, **k)
            for p in out:
                wall.append((p.elapsed_s, p.step.iteration + 1))
            if out and runner.process is not None:
                seconds = _proc_cpu_s(runner.process.pid)
                if seconds is not None and runner.process.poll() is None:
                    cpu.append((seconds, out[-1].step.iteration + 1))
            return out

        runner.poll = recorded_poll

    def worker():
        runner = ProcessRunner(volume, seed, model, config, None, model_path=path, reference_path=reference,
                               threads=1)
        wall, cpu = [], []
        recording(runner, wall, cpu)
        runner.start()
        while not runner.done:
            time.sleep(0.15)
            runner.poll(None)
        runner.poll(None)
        return {"wall": _per_iteration(wall), "cpu": _per_iteration(cpu)}

    def panel():
        handle = AnalysisLogicCore().run(node, path, seed, config=config, referencePath=reference,
                                         waitForCompletion=False, process=True)
        wall, cpu = [], []
        recording(handle.runner, wall, cpu)
        loop.run_through_loop(handle)
        return {"wall": _per_iteration(wall), "cpu": _per_iteration(cpu)}

    sides = {"headless": headless, "worker": worker, "panel": panel}
    got: dict[str, list[dict]] = {k: [] for k in sides}
    loads = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            got[side].append(sides[side]())
        loads.append(round(os.getloadavg()[0], 2))
        print(f"round {r}: " + ", ".join(f"{k} {1000 * v[-1]['wall']:.2f} ms/it wall, {1000 * v[-1]['cpu']:.2f} CPU"
                                         for k, v in got.items()) + f"; load {loads[-1]}", flush=True)
    summary = {"method": method, "iterations": args.iterations, "rounds": args.rounds, "load_1min": loads, "sides": {}}
    for side, runs in got.items():
        row = {}
        for clock in ("wall", "cpu"):
            row[f"{clock}_ms_median"] = round(1000 * statistics.median(x[clock] for x in runs), 2)
            # speed relative to headless in the same round (> 1: faster)
            row[f"{clock}_speed_vs_headless_median"] = round(statistics.median(
                h[clock] / x[clock] for x, h in zip(runs, got["headless"])), 3)
        summary["sides"][side] = row
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
