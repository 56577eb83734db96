"""Where the time of `method robust` goes, per iteration, on the demo network (docs/dream-methods.md, "Cost").

    python benchmarks/robust_cost.py [--threads 1] [--iterations 30]

Prints the time per iteration of `paper` and `robust` (K = 4 copies; on the exact seed window of
dreaming/window.py, and on the full crop) through the DreamLoop and the parts of a robust iteration
measured alone: the network's forward + backward on a batch of K and of 1, on K seed windows, its
forward without gradient on the full crop (each with the CPU kernels the loop picks,
dreaming/convolutions.py, and the windows and the full crop also with torch's default kernels), drawing the K-1 random transforms, building their
sampling grid, sampling the copies (grid_sample forward and backward), and the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "DeepDreamAnalysis"))
sys.path.insert(0, str(HERE))

from DeepDreamAnalysisLib.config import DreamConfig  # noqa: E402
from DeepDreamAnalysisLib.dream import DreamLoop  # noqa: E402
from DeepDreamAnalysisLib.dreaming.convolutions import convolutions_for  # noqa: E402
from run_benchmarks import demo_model  # noqa: E402


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def breakdown(iterations: int = 30, copies: int = 4) -> dict:
    model = demo_model()
    net, card = model.network, model.card
    shape = (1,) + tuple(card.roi_size or (96, 96))
    start = np.random.default_rng(0).normal(110.0, 15.0, shape).astype(np.float32)
    seed = tuple(n // 2 for n in shape)
    dev = torch.device("cpu")

    def loop(method, window=True):
        return lambda: [None for _ in DreamLoop(net, card, start, seed, DreamConfig(
            iterations=iterations, method=method, method_options={"copies": copies} if "robust" in method else {}), dev,
            copy_window=window)]

    out = {"paper_ms": 1000 * best(loop("paper"), 3) / iterations,
           "robust_ms": 1000 * best(loop("robust"), 3) / iterations,
           "robust_full_crop_ms": 1000 * best(loop("robust", False), 3) / iterations}
    probe = DreamLoop(net, card, start, seed, DreamConfig(iterations=1, method="robust",
                                                          method_options={"copies": copies}), dev)
    t = probe.method.transforms
    x = torch.as_tensor(start)

    def network(batch, kernels=False):
        inp = torch.randn((batch, 1) + shape[1:], requires_grad=True)

        def run():
            with convolutions_for(dev, 2, inp.numel()) if kernels else contextlib.nullcontext():
                return torch.autograd.grad(net(inp)[:, 1, seed[1], seed[2]].sum(), inp)
        return run

    reps = 20
    out["network_batch1_ms"] = 1000 * best(network(1), 5)
    out["network_batch1_native_kernels_ms"] = 1000 * best(network(1, kernels=True), 5)
    out[f"network_batch{copies}_ms"] = 1000 * best(network(copies), 5)
    window = probe.window  # the exact seed window the copies run on (dreaming/window.py), or None
    out["copy_window"] = list(window.size) if window is not None else probe.window_plan.note
    if window is not None:
        win = torch.randn((copies, 1) + tuple(window.size), requires_grad=True)

        def windows(kernels):
            def run():  # forward AND backward with the kernels the loop picks (dreaming/convolutions.py)
                with convolutions_for(dev, 2, win.numel()) if kernels else contextlib.nullcontext():
                    return torch.autograd.grad(net(win)[(slice(None), 1) + tuple(window.seed)].sum(), win)
            return run
        out[f"network_window_batch{copies}_ms"] = 1000 * best(windows(True), 5)
        out[f"network_window_batch{copies}_torch_default_kernels_ms"] = 1000 * best(windows(False), 5)
        full = torch.randn((1, 1) + shape[1:])

        def no_grad(kernels):
            def run():
                with torch.no_grad(), convolutions_for(dev, 2, full.numel(), False) if kernels else contextlib.nullcontext():
                    net(full)
            return run
        out["network_batch1_no_grad_ms"] = 1000 * best(no_grad(True), 5)
        out["network_batch1_no_grad_torch_default_kernels_ms"] = 1000 * best(no_grad(False), 5)
    out["draw_ms"] = 1000 * best(lambda: [t.draw() for _ in range(reps)], 3) / reps
    mats, shift = t.draw()
    out["grid_ms"] = 1000 * best(lambda: [t.theta(mats, shift) for _ in range(reps)], 3) / reps
    image = x[0].clone().requires_grad_(True)

    def sample():
        copies_ = t.apply(image, mats, shift, None, window)  # on the seed window when there is one
        torch.autograd.grad(copies_.sum(), image)

    out["sample_fwd_bwd_ms"] = 1000 * best(lambda: [sample() for _ in range(reps)], 3) / reps
    network_part = (out[f"network_window_batch{copies}_ms"] + out["network_batch1_no_grad_ms"] if window is not None
                    else out[f"network_batch{copies}_ms"])
    parts = network_part + out["draw_ms"] + out["grid_ms"] + out["sample_fwd_bwd_ms"]
    out["rest_ms"] = out["robust_ms"] - parts
    out["ratio"] = out["robust_ms"] / out["paper_ms"]
    out["network_ratio"] = out[f"network_batch{copies}_ms"] / out["network_batch1_ms"]
    out["threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=30)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for k, v in breakdown(args.iterations).items():
        print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
