"""The CPU convolution kernels the dream loop picks (DeepDreamAnalysisLib/dreaming/convolutions.py).

On the real demo network and a real 3D MONAI UNet: the transformed copies' small window batch runs
through torch's native kernels (oneDNN and NNPACK off for its forward AND its backward), a large 3D
batch keeps torch's own choice, ``paper`` never changes anything (its numbers stay torch's
defaults'), the switches are restored after a run and after a model that raises, and the dream with
the picked kernels equals the dream with torch's defaults up to floating-point rounding.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.config import DreamConfig
from DeepDreamAnalysisLib.dream import DreamLoop
from DeepDreamAnalysisLib.dreaming import convolutions
from DeepDreamAnalysisLib.engine.batched import BatchedDreamLoop
from DeepDreamAnalysisLib.errors import RunFault
from DeepDreamAnalysisLib.models import load_model

from test_copy_window import _card, _unet
from tiny_models import liver_like

CPU = torch.device("cpu")
DEMO = Path(__file__).resolve().parents[1] / "Resources" / "DemoModel" / "demo_unet.pt"


class KernelLog:
    """Records, at every forward of the network, the batch's shape, whether gradients are recorded and
    which kernels torch may use (oneDNN, NNPACK); and, at every backward of its first convolution,
    the same switches."""

    def __init__(self, network):
        self.forwards, self.backwards = [], []
        self._handles = [network.register_forward_pre_hook(self._pre)]
        first = next(m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        self._handles.append(first.register_full_backward_pre_hook(self._back))

    def _pre(self, module, args):
        self.forwards.append((tuple(args[0].shape), torch.is_grad_enabled(), torch.backends.mkldnn.enabled,
                              torch._C._get_nnpack_enabled()))

    def _back(self, module, grad_output):
        self.backwards.append((torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()))

    def close(self):
        for h in self._handles:
            h.remove()


@pytest.fixture(scope="module")
def demo():
    model = load_model(DEMO)
    return model.network, model.card


def _start(card):
    shape = (1,) + tuple(card.roi_size)
    return np.random.default_rng(0).normal(110.0, 15.0, shape).astype(np.float32), tuple(n // 2 for n in shape)


def test_window_batch_runs_native_kernels_forward_and_backward(demo):
    net, card = demo
    start, seed = _start(card)
    log = KernelLog(net)
    try:
        loop = DreamLoop(net, card, start, seed, DreamConfig(iterations=3, method="robust"), CPU)
        log.forwards.clear(); log.backwards.clear()  # the window probes at set-up use torch's own choice
        for state in loop:
            state.probability  # the full map, as a snapshot reads it (computed when read: dreaming/near_seed.py)
    finally:
        log.close()
    assert loop.window is not None and tuple(loop.window.size) == (24, 24)
    windows = [f for f in log.forwards if f[0] == (4, 1, 24, 24)]
    fulls = [f for f in log.forwards if f[0] == (1, 1, 96, 96)]
    assert len(windows) == 3 and len(fulls) == 2  # iteration 0's map comes from its window audit
    # the 4 windows (2,304 voxels, with gradient) and the full crop (9,216 voxels, no gradient): native
    assert all(grad and not mkldnn and not nnpack for _, grad, mkldnn, nnpack in windows)
    assert all(not grad and not mkldnn and not nnpack for _, grad, mkldnn, nnpack in fulls)
    assert log.backwards and all(not mkldnn and not nnpack for mkldnn, nnpack in log.backwards)
    assert torch.backends.mkldnn.enabled and torch._C._get_nnpack_enabled()  # restored


def test_paper_keeps_torch_defaults_and_its_numbers(demo):
    net, card = demo
    start, seed = _start(card)
    log = KernelLog(net)
    try:
        states = [(s.objective, s.image.clone()) for s in
                  DreamLoop(net, card, start, seed, DreamConfig(iterations=4, method="paper", step=500.0), CPU)]
    finally:
        log.close()
    assert log.forwards and all(mkldnn and nnpack for _, _, mkldnn, nnpack in log.forwards)
    assert all(mkldnn and nnpack for mkldnn, nnpack in log.backwards)
    # and the same numbers as a loop written out by hand with torch's defaults, to the last bit
    x = torch.as_tensor(start)
    pre = card.preprocessing
    for it, (objective, image) in enumerate(states):
        assert torch.equal(image, x)
        x = x.clone().requires_grad_(True)
        z = net((x * pre.scale + pre.offset)[0][None, None])[0, card.target_class][seed[1:]]
        (g,) = torch.autograd.grad(z, x)
        assert objective == float(z.detach())
        lo, hi = card.intensity_range
        x = (x.detach() + 500.0 * g).clamp(lo, hi)


def test_large_3d_batch_keeps_onednn_and_small_3d_window_goes_native():
    assert convolutions.prefers_native("cpu", 3, 4 * 8 ** 3)  # 2,048 voxels with gradient
    assert not convolutions.prefers_native("cpu", 3, 4 * 16 ** 3)  # 16,384
    assert not convolutions.prefers_native("cpu", 3, 32 ** 3, gradient=False)  # a 3D crop's forward alone
    assert convolutions.prefers_native("cpu", 2, 16 * 24 ** 2)  # 4 restarts x 4 copies' windows
    assert convolutions.prefers_native("cpu", 2, 4 * 56 ** 2, gradient=False)  # 4 restarts' boxes near the seed
    assert not convolutions.prefers_native("cpu", 2, 4 * 96 ** 2, gradient=False)  # 4 full demo crops
    assert not convolutions.prefers_native("cpu", 2, 256 ** 2)
    assert not convolutions.prefers_native("cuda", 2, 4 * 24 ** 2)  # a GPU: nothing changes
    net = _unet(3)
    card = _card(3, spacing=[1.0, 1.0, 3.0])
    image = liver_like((16, 32, 32), seed=3)
    log = KernelLog(net)
    try:
        loop = DreamLoop(net, card, image, (8, 16, 16), DreamConfig(iterations=2, method="robust"), CPU,
                         spacing=(1.0, 1.0, 3.0), copy_window=False)
        list(loop)
    finally:
        log.close()
    copies = [f for f in log.forwards if f[0] == (4, 1, 16, 32, 32)]  # 65,536 voxels with gradient
    assert copies and all(mkldnn for _, _, mkldnn, _ in copies)


def test_switches_restored_when_the_model_raises(demo):
    net, card = demo
    start, seed = _start(card)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] > 2 and args[0].shape[0] == 4:
            raise RuntimeError("broken layer")

    handle = net.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RunFault, match="broken layer"):
            list(DreamLoop(net, card, start, seed, DreamConfig(iterations=5, method="robust"), CPU))
    finally:
        handle.remove()
    assert torch.backends.mkldnn.enabled and torch._C._get_nnpack_enabled()


def test_user_switch_is_respected(demo):
    """A user who turned oneDNN off keeps it off after a run (the loop restores, never forces)."""
    net, card = demo
    start, seed = _start(card)
    torch.backends.mkldnn.enabled = False
    try:
        list(DreamLoop(net, card, start, seed, DreamConfig(iterations=2, method="robust"), CPU))
        assert torch.backends.mkldnn.enabled is False
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("method", ["robust+spectral", "accentuate+robust"])
def test_picked_kernels_give_the_default_kernels_dream(demo, monkeypatch, method):
    net, card = demo
    start, seed = _start(card)
    cfg = DreamConfig(iterations=8, method=method)

    def dream():
        return [(s.objective, s.image.clone(), s.probability.clone()) for s in DreamLoop(net, card, start, seed, cfg, CPU)]

    picked = dream()
    monkeypatch.setattr(convolutions, "NATIVE_MAX_VOXELS", {})
    default = dream()
    for (oa, ia, pa), (ob, ib, pb) in zip(picked, default):
        assert oa == pytest.approx(ob, rel=1e-4, abs=1e-4)
        assert torch.allclose(ia, ib, atol=1e-2)  # HU
        assert torch.allclose(pa, pb, atol=1e-4)


def test_batched_restarts_pick_native_kernels_for_their_windows(demo):
    net, card = demo
    start, seed = _start(card)
    loops = [DreamLoop(net, card, start, seed, DreamConfig(iterations=2, method="robust", random_seed=r), CPU)
             for r in range(4)]
    log = KernelLog(net)
    try:
        list(BatchedDreamLoop(loops))
    finally:
        log.close()
    windows = [f for f in log.forwards if f[0] == (16, 1, 24, 24)]  # 4 restarts x 4 copies: 9,216 voxels
    # at iteration 0, the members' audits of their 4 copies on the full crop, in one forward: 147,456 voxels, no
    # gradient (no other full crop: the seeds are below the threshold, their masks empty, dreaming/near_seed.py)
    fulls = [f for f in log.forwards if f[0] == (16, 1, 96, 96)]
    assert len(windows) == 2 and all(not mkldnn for _, _, mkldnn, _ in windows)
    assert len(fulls) == 1 and all(mkldnn for _, _, mkldnn, _ in fulls)
    assert len(log.forwards) == 3
    assert log.backwards and all(not mkldnn for mkldnn, _ in log.backwards)


def test_frozen_global_flags_leave_torch_choice(demo):
    """After torch.backends.disable_global_flags() the switch cannot be set: the run goes on with torch's kernels."""
    net, card = demo
    start, seed = _start(card)
    flags = torch.backends.flags_frozen.__globals__  # the module that holds the frozen flag
    torch.backends.disable_global_flags()
    log = KernelLog(net)
    try:
        assert torch.backends.flags_frozen()
        states = list(DreamLoop(net, card, start, seed, DreamConfig(iterations=2, method="robust"), CPU))
    finally:
        log.close()
        flags["__allow_nonbracketed_mutation_flag"] = True
    assert len(states) == 2
    assert log.forwards and all(mkldnn and nnpack for _, _, mkldnn, nnpack in log.forwards)
