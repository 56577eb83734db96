"""Exact seed windows for the transformed copies (DeepDreamAnalysisLib/dreaming/window.py): on real
MONAI networks the windowed copies give the full-crop copies' objective, gradient and dream (same
random transforms), a network that mixes the whole image falls back to full-crop copies, and a window
found not exact during a run is dropped for good, with the reason recorded."""

from pathlib import Path

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.card import ModelCard
from DeepDreamAnalysisLib.config import DreamConfig
from DeepDreamAnalysisLib.dream import DreamLoop
from DeepDreamAnalysisLib.dreaming.window import CopyWindow, WindowPlan, find_window
from DeepDreamAnalysisLib.models import load_model

from tiny_models import liver_like

monai_nets = pytest.importorskip("monai.networks.nets")

CPU = torch.device("cpu")
DEMO = Path(__file__).resolve().parents[1] / "Resources" / "DemoModel" / "demo_unet.pt"


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    model = load_model(DEMO)
    return model.network, model.card


def _card(dims, **over):
    data = dict(name="t", spatial_dims=dims, in_channels=1, out_channels=2, activation="softmax", target_class=1,
                preprocessing={"type": "window", "min": -100.0, "max": 250.0}, size_divisible=4)
    data.update(over)
    return ModelCard.from_dict(data)


def _unet(dims, norm="batch", act="PRELU", seed=0, out_channels=2):
    torch.manual_seed(seed)
    net = monai_nets.UNet(spatial_dims=dims, in_channels=1, out_channels=out_channels, channels=(4, 8, 16), strides=(2, 2),
                          num_res_units=1, norm=norm, act=act)
    if norm == "batch":  # trained-looking running statistics, not the identity
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _run(net, card, image, seed, cfg, window=True, spacing=None):
    loop = DreamLoop(net, card, image, seed, cfg, CPU, spacing=spacing, copy_window=window)
    states = [(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone()) for s in loop]
    return loop, states


def _assert_same_dream(a, b, image_atol=1e-2):
    assert len(a) == len(b)
    for (oa, pa, ia, qa), (ob, pb, ib, qb) in zip(a, b):
        assert oa == pytest.approx(ob, rel=1e-4, abs=1e-4)
        assert pa == pytest.approx(pb, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(qa, qb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ia, ib, rtol=0, atol=image_atol)


def _first_gradient(net, card, image, seed, cfg, window, spacing=None):
    loop = DreamLoop(net, card, image, seed, cfg, CPU, spacing=spacing, copy_window=window)
    x = loop.initial_image().requires_grad_(True)
    objective, _ = loop.forward(x)
    (grad,) = torch.autograd.grad(objective, x)
    return float(objective.detach()), grad


@pytest.mark.parametrize("method", ["robust", "robust+spectral"])
def test_windowed_copies_dream_as_full_crop_copies_on_the_demo_network(demo, method):
    net, card = demo
    image = liver_like((1, 96, 96))
    cfg = DreamConfig(iterations=12, method=method, random_seed=5)
    loop, windowed = _run(net, card, image, (0, 48, 48), cfg)
    assert loop.window is not None and loop.copy_window_record()["copy_window"] == [24, 24], loop.window_plan
    assert "exact, verified" in loop.window_plan.note
    _, full = _run(net, card, image, (0, 48, 48), cfg, window=False)
    _assert_same_dream(windowed, full)
    ow, gw = _first_gradient(net, card, image, (0, 48, 48), cfg, True)
    of, gf = _first_gradient(net, card, image, (0, 48, 48), cfg, False)
    assert ow == pytest.approx(of, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(gw, gf, rtol=1e-4, atol=1e-5 * float(gf.abs().max()))
    assert loop.window_plan.window is not None  # no mismatch seen during the run


def test_windowed_copies_of_a_3d_unet_with_anisotropic_spacing():
    net = _unet(3)
    card = _card(3)
    image = liver_like((32, 48, 48))
    seed = (16, 24, 22)
    spacing = (0.8, 0.8, 2.5)  # (i, j, k) mm
    cfg = DreamConfig(iterations=4, method="robust+spectral", random_seed=1, method_options={"copies": 3})
    loop, windowed = _run(net, card, image, seed, cfg, spacing=spacing)
    w = loop.window
    assert w is not None, loop.window_plan.note
    assert all(a % 4 == 0 for a in w.start) and np.prod(w.size) < 0.6 * image.size
    _, full = _run(net, card, image, seed, cfg, window=False, spacing=spacing)
    _assert_same_dream(windowed, full)


def test_log_odds_accentuate_and_redirected_relus_go_through_the_window():
    net = _unet(2, act="RELU", seed=2, out_channels=3)  # torch.nn.ReLU modules: the redirect (dreaming/redirect.py)
    card = _card(2, out_channels=3)
    image = liver_like((1, 48, 48))
    cfg = DreamConfig(iterations=8, method="accentuate+robust", objective="log_odds", random_seed=2)
    loop, windowed = _run(net, card, image, (0, 24, 24), cfg)
    assert loop.window is not None, loop.window_plan.note
    full_loop, full = _run(net, card, image, (0, 24, 24), cfg, window=False)
    _assert_same_dream(windowed, full)
    assert loop.redirects.redirected == full_loop.redirects.redirected


def test_lesion_spectrum_with_robust_goes_through_the_window(demo):
    from DeepDreamAnalysisLib.reference import ReferenceStats

    ref_path = DEMO.parent / "demo_reference.json"
    if not ref_path.is_file():
        pytest.skip("no demo reference")
    reference = ReferenceStats.load(ref_path)
    net, card = demo
    image = liver_like((1, 96, 96))
    cfg = DreamConfig(iterations=6, method="lesion-spectrum+robust", random_seed=3)
    a = DreamLoop(net, card, image, (0, 48, 48), cfg, CPU, reference=reference)
    b = DreamLoop(net, card, image, (0, 48, 48), cfg, CPU, reference=reference, copy_window=False)
    assert a.window is not None
    _assert_same_dream([(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone()) for s in a],
                       [(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone()) for s in b])


def test_an_instance_norm_network_falls_back_to_full_crop_copies():
    net = _unet(2, norm="instance")  # MONAI's default norm: every output depends on the whole image
    card = _card(2)
    loop = DreamLoop(net, card, liver_like((1, 48, 48)), (0, 24, 24), DreamConfig(iterations=2, method="robust"), CPU)
    assert loop.window is None
    record = loop.copy_window_record()
    assert record["copy_window"] is None and "full-crop copies" in record["copy_window_note"]
    assert "48x48" in record["copy_window_note"]
    assert len(list(loop)) == 2


def test_a_crop_smaller_than_the_field_falls_back(demo):
    net, card = demo
    loop = DreamLoop(net, card, liver_like((1, 16, 16)), (0, 8, 8), DreamConfig(iterations=2, method="robust"), CPU)
    assert loop.window is None and "full-crop copies" in loop.window_plan.note


def test_paper_and_single_copy_methods_have_no_window(demo):
    net, card = demo
    for method in ("paper", "spectral"):
        loop = DreamLoop(net, card, liver_like((1, 96, 96)), (0, 48, 48), DreamConfig(iterations=1, method=method), CPU)
        assert loop.window_plan is None and loop.copy_window_record()["copy_window"] is None


def test_a_window_found_not_exact_during_the_run_is_dropped_and_the_iteration_redone(demo):
    net, card = demo
    image = liver_like((1, 96, 96))
    cfg = DreamConfig(iterations=5, method="robust", random_seed=4)
    loop = DreamLoop(net, card, image, (0, 48, 48), cfg, CPU)
    loop.window_plan = WindowPlan(CopyWindow((40, 40), (16, 16), (8, 8)), "too small on purpose")
    states = [(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone()) for s in loop]
    assert loop.window is None
    assert loop.copy_window_record()["copy_window_note"].startswith(
        "full-crop copies from iteration 0: the copies' seed logits on the window differ")
    _, full = _run(net, card, image, (0, 48, 48), cfg, window=False)
    _assert_same_dream(states, full, image_atol=1e-4)


def test_the_window_is_deterministic_and_independent_of_the_start_image(demo):
    net, card = demo
    a = find_window(net, card, (1, 96, 96), (0, 48, 48), CPU)
    runs = [[s.image.clone() for s in DreamLoop(net, card, liver_like((1, 96, 96), seed=s0), (0, 48, 48),
                                                DreamConfig(iterations=4, method="robust", random_seed=3), CPU)]
            for s0 in (0, 0)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    assert a.window == CopyWindow((36, 36), (24, 24), (12, 12), grid=4)
    near_border = find_window(net, card, (1, 96, 96), (0, 5, 90), CPU).window
    assert near_border is not None and near_border.start[0] == 0 and near_border.start[1] + near_border.size[1] == 96


def test_run_json_records_the_window(tmp_path, demo):
    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.config import AnalysisConfig, FeatureConfig
    from DeepDreamAnalysisLib.volume import Volume

    model = load_model(DEMO)
    volume = Volume(liver_like((1, 96, 96)), spacing=(1.6, 1.6, 3.0))
    cfg = AnalysisConfig(dream=DreamConfig(iterations=2, method="robust"), features=FeatureConfig(names=()))
    result = run_analysis(volume, (48, 48, 0), model, cfg)
    assert result.metadata["copy_window"] == [24, 24] and "exact" in result.metadata["copy_window_note"]
    assert result.metadata["mask_near_seed"].startswith("exact, in a box around the seed")
    cfg = AnalysisConfig(dream=DreamConfig(iterations=2, method="paper"), features=FeatureConfig(names=()))
    paper = run_analysis(volume, (48, 48, 0), model, cfg).metadata
    assert paper["copy_window"] is None and paper["mask_near_seed"].startswith("off: no seed window")


def test_batched_members_with_windows_equal_separate_runs(demo):
    from DeepDreamAnalysisLib.engine.batched import BatchedDreamLoop

    net, card = demo
    members = [(liver_like((1, 96, 96), seed=0), (0, 48, 48), "robust+spectral", 0),
               (liver_like((1, 96, 96), seed=1), (0, 48, 48), "robust+spectral", 1),
               (liver_like((1, 96, 96), seed=2), (0, 6, 90), "robust", 2),  # a smaller window at the border
               (liver_like((1, 96, 96), seed=3), (0, 48, 48), "paper", 3)]

    def loops(window=True):
        return [DreamLoop(net, card, image, seed, DreamConfig(iterations=6, method=method, random_seed=r), CPU,
                          copy_window=window) for image, seed, method, r in members]

    batch = loops()
    assert batch[0].window.size == (24, 24) and batch[2].window.size != (24, 24) and batch[3].window is None
    together = [[] for _ in members]
    for events in BatchedDreamLoop(batch):
        for e in events:
            s = e.state
            together[e.index].append((s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone()))
    for m, loop in enumerate(loops()):
        _assert_same_dream(together[m], [(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone())
                                         for s in loop])
    for m, loop in enumerate(loops(window=False)):  # and as full-crop copies
        _assert_same_dream(together[m], [(s.objective, s.probability_at_seed, s.image.clone(), s.probability.clone())
                                         for s in loop])
    assert all(loop.window is not None for loop in batch[:3])


# ----------------------------------------------------------------------------- the mask near the seed


def _full_mask(net, card, image, seed, threshold=0.5):
    """The mask as a run found it before near-seed boxes: the full crop's forward, then its component."""
    from DeepDreamAnalysisLib.mask import seed_component

    with torch.no_grad():
        z = net((image[0] if card.spatial_dims == 2 else image)[None, None] * card.preprocessing.scale
                + card.preprocessing.offset)[0]
    p = torch.softmax(z, 0)[card.target_class] if card.activation == "softmax" else torch.sigmoid(z[card.target_class])
    return seed_component((p[None] if card.spatial_dims == 2 else p).numpy(), seed, threshold)


def test_the_mask_near_the_seed_equals_the_full_crops_at_every_iteration(demo):
    """The demo dream from a healthy-looking crop: empty masks while the seed is below 0.5 (no full
    forward), then boxes around the seed that grow with the dream, checked against the full crop."""
    net, card = demo
    image, seed = liver_like((1, 96, 96)), (0, 48, 48)
    loop = DreamLoop(net, card, image, seed, DreamConfig(iterations=40, method="robust+spectral", random_seed=1), CPU)
    loop.box_radius = 2  # a first box smaller than the dream's mask: it must grow, within the iteration
    below = near = 0
    for state in loop:
        assert state.seed_mask is not None
        assert np.array_equal(state.seed_mask, _full_mask(net, card, state.image, seed)), state.iteration
        below += state.probability_at_seed <= 0.5
        near += int(state.seed_mask.sum()) > 0
    assert below >= 3 and near >= 10 and loop.box_checked and loop.box_off is None
    assert loop.box_radius >= 4 * 2  # the dream outgrew the first box at least twice
    assert loop.copy_window_record()["mask_near_seed"].startswith("exact, in a box around the seed")


def test_batched_members_find_the_same_masks_near_their_seeds(demo):
    from DeepDreamAnalysisLib.engine.batched import BatchedDreamLoop

    net, card = demo
    starts = [liver_like((1, 96, 96), seed=r) for r in range(3)]
    seeds = [(0, 48, 48), (0, 48, 48), (0, 40, 52)]
    loops = [DreamLoop(net, card, starts[r], seeds[r], DreamConfig(iterations=30, method="robust+spectral",
                                                                   random_seed=r), CPU) for r in range(3)]
    masks = 0
    for events in BatchedDreamLoop(loops):
        for e in events:
            assert np.array_equal(e.state.seed_mask, _full_mask(net, card, e.state.image, seeds[e.index]))
            masks += int(e.state.seed_mask.sum()) > 0
    assert masks >= 30 and all(lp.box_checked and lp.box_off is None for lp in loops)


def test_a_box_found_not_exact_turns_the_masks_near_the_seed_off(demo, monkeypatch):
    """A box whose input window lacks the outputs' receptive field (here: made too tight on purpose)
    is caught at its first use: full maps for the rest of the run, the same masks, and run.json says why."""
    import dataclasses

    from DeepDreamAnalysisLib import seed_outputs
    from DeepDreamAnalysisLib.dreaming.near_seed import plan_box

    def too_tight(window, spatial, seed, radius):  # the output box rounded out to the grid, no field around it
        box = plan_box(window, spatial, seed, radius)
        if box is None:
            return None
        inp = tuple(slice(o.start // 4 * 4, -(-o.stop // 4) * 4) for o in box.out)
        return dataclasses.replace(box, inp=inp, inner=tuple(slice(o.start - i.start, o.stop - i.start)
                                                             for o, i in zip(box.out, inp)))

    monkeypatch.setattr(seed_outputs, "plan_box", too_tight)
    net, card = demo
    image, seed = liver_like((1, 96, 96)), (0, 48, 48)
    loop = DreamLoop(net, card, image, seed, DreamConfig(iterations=25, method="robust+spectral", random_seed=1), CPU)
    for state in loop:
        mask = state.seed_mask
        if mask is None:
            from DeepDreamAnalysisLib.mask import seed_component

            mask = seed_component(state.probability.numpy(), seed, 0.5)
        assert np.array_equal(mask, _full_mask(net, card, state.image, seed))
    assert loop.box_off is not None and "differed from the full crop's" in loop.box_off
    assert loop.copy_window_record()["mask_near_seed"].startswith("off: at iteration")


class _Smoothing3d(torch.nn.Module):
    """A local 3D network with a known field: two 5x5x5 box filters (9 voxels across), logits
    (-s, s) of the smoothed image. Its probability map is a smooth blob around a bright object."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv3d(1, 1, 5, padding=2, bias=False)
        self.b = torch.nn.Conv3d(1, 1, 5, padding=2, bias=False)
        for conv in (self.a, self.b):
            torch.nn.init.constant_(conv.weight, 1 / 125)

    def forward(self, x):
        s = self.b(self.a(x))
        return torch.cat([-s, s], dim=1)


def test_masks_near_the_seed_of_a_3d_network_with_anisotropic_spacing():
    """A 3D network (two 5x5x5 convolutions) on a 40 x 48 x 48 crop with a bright ellipsoid at the
    seed, anisotropic spacing: the mask at every iteration equals the full crop's, with a first box
    too small on purpose (it grows along every axis within the iteration)."""
    card = _card(3, size_divisible=1, preprocessing={"type": "window", "min": 100.0, "max": 200.0})
    net = _Smoothing3d().eval()
    k, j, i = np.mgrid[:40, :48, :48]
    image = (80.0 + 60.0 * (((k - 20) / 4.0) ** 2 + ((j - 24) / 7.0) ** 2 + ((i - 24) / 6.0) ** 2 < 1)).astype(np.float32)
    seed = (20, 24, 24)
    loop = DreamLoop(net, card, image, seed, DreamConfig(iterations=6, method="robust", random_seed=0), CPU,
                     spacing=(0.8, 0.8, 2.5))
    assert loop.window is not None and tuple(loop.window.size) == (9, 9, 9)
    loop.box_radius = 1
    sizes = []
    for state in loop:
        assert state.seed_mask is not None
        assert np.array_equal(state.seed_mask, _full_mask(net, card, state.image, seed)), state.iteration
        sizes.append(int(state.seed_mask.sum()))
    assert min(sizes) > 100 and loop.box_checked and loop.box_off is None and loop.box_radius > 4


def test_batched_members_copies_are_sampled_together_with_the_same_numbers(demo):
    """The members of a batch with the same window sample their copies in one call
    (engine/batched.py windowed_inputs): each member's own random draws, the same inputs and the same
    input gradients, to the last bit, as each member's own copies."""
    from DeepDreamAnalysisLib.engine.batched import windowed_inputs

    net, card = demo

    def members():
        return [DreamLoop(net, card, liver_like((1, 96, 96), seed=r), (0, 48, 48),
                          DreamConfig(iterations=1, method="robust+spectral", random_seed=r), CPU) for r in range(3)]

    together, alone = members(), members()
    xa = [lp.x0.clone().requires_grad_(True) for lp in together]
    xb = [lp.x0.clone().requires_grad_(True) for lp in alone]
    inputs = windowed_inputs(together, xa)
    own = [lp.window_input(x) for lp, x in zip(alone, xb)]
    assert all(torch.equal(a, b) for a, b in zip(inputs, own))
    assert not torch.equal(inputs[0][1:], inputs[1][1:])  # each member's own random transforms
    weights = torch.randn(own[0].shape, generator=torch.Generator().manual_seed(0))
    ga = torch.autograd.grad(sum((a * weights).sum() for a in inputs), xa)
    gb = torch.autograd.grad(sum((b * weights).sum() for b in own), xb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert all(torch.equal(a.method.transforms.last[0], b.method.transforms.last[0]) for a, b in zip(together, alone))


def test_members_outputs_read_together_equal_each_read_alone(demo, monkeypatch):
    """Several dreams' objectives, seed probabilities and audits read from one batch of window logits
    (seed_outputs.windowed_objectives, as batched restarts do) give each dream exactly what reading its
    own rows alone gives; the audit runs the members' full-crop copies in one forward, or one member
    per forward where they would not fit (AUDIT_BATCH_VOXELS), with the same maps."""
    from DeepDreamAnalysisLib import seed_outputs

    net, card = demo
    loops = [DreamLoop(net, card, liver_like((1, 96, 96), seed=r), (0, 48, 48),
                       DreamConfig(iterations=1, method="robust+spectral", random_seed=r), CPU) for r in range(3)]
    xs = [lp.x0 for lp in loops]
    inputs = [lp.window_input(x) for lp, x in zip(loops, xs)]
    with torch.no_grad():
        logits = net(torch.cat(inputs))
    calls = []

    def run(batch):
        calls.append(batch.shape[0])
        return net(batch)

    for iteration in (1, 0):  # 0: an audited iteration
        for lp in loops:
            lp._iteration = iteration
        calls.clear()
        together = seed_outputs.windowed_objectives(loops, logits, xs, run)
        assert calls == ([] if iteration else [12])
        monkeypatch.setattr(seed_outputs, "AUDIT_BATCH_VOXELS", 1)
        for m, lp in enumerate(loops):
            calls.clear()
            ((objective, maps),) = seed_outputs.windowed_objectives([lp], logits[4 * m:4 * m + 4], [xs[m]], run)
            assert calls == ([] if iteration else [4])
            assert torch.equal(objective, together[m][0]) and maps.p_seed == together[m][1].p_seed
            if iteration == 0:
                torch.testing.assert_close(maps.probability, together[m][1].probability, rtol=0, atol=1e-6)
        monkeypatch.undo()
    assert len({round(maps.p_seed, 9) for _, maps in together}) == 3  # three different dreams


def test_the_reach_of_several_boxes_at_once_is_each_ones_own():
    """near_seed.reaches on G masks at once: per mask, None when a voxel above the threshold lies on an
    open side of the box, else the farthest such voxel's distance from the seed along any axis (0 when
    none), as the definition computed one mask at a time."""
    from DeepDreamAnalysisLib.dreaming.near_seed import Box, reaches

    box = Box(inp=(slice(0, 20), slice(0, 24)), out=(slice(2, 14), slice(3, 19)), inner=(slice(2, 14), slice(3, 19)),
              open_sides=((True, False), (False, True)))
    seed = (8, 10)
    rng = np.random.default_rng(0)
    above = np.zeros((40, 12, 16), dtype=bool)
    for g in range(40):
        r = rng.integers(0, 9)
        j0, i0 = seed[0] - 2, seed[1] - 3
        above[g, max(0, j0 - r):j0 + r + 1, max(0, i0 - r):i0 + r + 1] = rng.random((12, 16))[
            max(0, j0 - r):j0 + r + 1, max(0, i0 - r):i0 + r + 1] > 0.3
    above[3] = False

    def one(a):
        if a[0].any() or a[:, -1].any():  # the open sides: low along j, high along i
            return None
        where = np.argwhere(a)
        return 0 if len(where) == 0 else int(np.abs(where - np.array([seed[0] - 2, seed[1] - 3])).max())

    expected = [one(a) for a in above]
    assert reaches(torch.from_numpy(above), box, seed) == expected
    assert expected[3] == 0 and None in expected and any(e not in (None, 0) for e in expected)
