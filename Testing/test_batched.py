"""Batched restarts: several dreams of one network as one batch equal the same dreams run separately."""

import dataclasses

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.engine.batched import BatchMember, batchable, run_batched
from DeepDreamAnalysisLib.errors import SeedError
from DeepDreamAnalysisLib.studies.compare import _perturbed
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, liver_like, tiny_card

FEATURES = ("firstorder_Mean", "firstorder_RootMeanSquared", "shape2D_PixelSurface")
SEED = (12, 12, 0)


def small_unet_like(seed: int = 3) -> torch.nn.Module:
    """Three convolutions with a non-linearity and a pooled branch (not linear: per-member gradients
    genuinely differ), eval mode."""
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 6, 3, padding=1)
            self.b = torch.nn.Conv2d(6, 6, 3, padding=1)
            self.c = torch.nn.Conv2d(12, 2, 1)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            d = torch.nn.functional.interpolate(torch.relu(self.b(torch.nn.functional.avg_pool2d(h, 2))),
                                                scale_factor=2.0)
            return self.c(torch.cat([h, d], dim=1))

    net = Net().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def model():
    return TinyModel(small_unet_like(), tiny_card(2))


@pytest.fixture(scope="module")
def volume():
    return Volume(liver_like((1, 28, 30)), spacing=(0.8, 0.8, 2.5))


def _members(volume, model, method, restarts=3, every=2):
    base = AnalysisConfig(dream=DreamConfig(iterations=6, method=method, **({"step": 20.0, "normalize_gradient": True}
                                                                           if method == "paper" else {})),
                          features=FeatureConfig(names=FEATURES, backend="native", every=every), snapshot_every=3)
    out = []
    for r in range(restarts):
        config = dataclasses.replace(base, dream=dataclasses.replace(base.dream, random_seed=base.dream.random_seed + r))
        start = volume if r == 0 else _perturbed(volume, SEED, model.card, config, 10.0, config.dream.random_seed)
        out.append(BatchMember(start, SEED, config))
    return out


@pytest.mark.parametrize("method", ["paper", "robust+spectral"])
def test_batched_restarts_equal_separate_runs(volume, model, method):
    members = _members(volume, model, method)
    batched = run_batched(model, members)
    separate = [run_analysis(m.volume, m.seed_ijk, model, m.config) for m in members]
    assert [r.metadata["batch"] for r in batched] == [{"batched": True, "size": 3}] * 3
    finals = []
    for b, s in zip(batched, separate):
        assert b.status == s.status == "completed"
        assert len(b.steps) == len(s.steps) == 6
        for sb, ss in zip(b.steps, s.steps):
            assert sb.objective == pytest.approx(ss.objective, rel=1e-4, abs=1e-4)
            assert sb.probability == pytest.approx(ss.probability, abs=1e-5)
            assert sb.mask_voxels == ss.mask_voxels
            for name in FEATURES:
                np.testing.assert_allclose(sb.features[name], ss.features[name], rtol=1e-4, atol=1e-4)
        assert [sn.iteration for sn in b.snapshots] == [sn.iteration for sn in s.snapshots]
        for nb, ns in zip(b.snapshots, s.snapshots):
            np.testing.assert_allclose(nb.image, ns.image, atol=1e-3)
            np.testing.assert_allclose(nb.probability, ns.probability, atol=1e-5)
        assert [f.code for f in b.quality_flags] == [f.code for f in s.quality_flags]
        finals.append(b.snapshots[-1].image)
    # the members are different dreams (their own start images and random transforms), not one copied
    assert not np.allclose(finals[0], finals[1], atol=1e-2)
    assert not np.allclose(finals[1], finals[2], atol=1e-2)


@pytest.mark.parametrize("method", ["paper", "robust+spectral"])
def test_members_stop_on_their_own(volume, model, method):
    """A member that stops early leaves the batch; the others go on to their last iteration, each
    as its separate run (with ``robust+spectral`` the two left are still updated as one stack)."""
    members = _members(volume, model, method, restarts=3)
    members[1].config = dataclasses.replace(members[1].config, dream=dataclasses.replace(
        members[1].config.dream, stop_probability=1e-9, stop_patience=2))
    batched = run_batched(model, members)
    separate = [run_analysis(m.volume, m.seed_ijk, model, m.config) for m in members]
    assert batched[1].status == separate[1].status == "stopped"
    assert len(batched[1].steps) == len(separate[1].steps) == 2
    for b, s in ((batched[0], separate[0]), (batched[2], separate[2])):
        assert b.status == "completed" and len(b.steps) == 6
        assert [st.objective for st in b.steps] == pytest.approx([st.objective for st in s.steps], rel=1e-4, abs=1e-4)
        assert b.steps[-1].probability == pytest.approx(s.steps[-1].probability, abs=1e-5)
        np.testing.assert_allclose(b.snapshots[-1].image, s.snapshots[-1].image, atol=1e-3)


class FixedBatchOne(torch.nn.Module):
    """Like a TorchScript model traced with a batch of one: whatever the batch, one output row."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x[:1])


def test_a_network_that_cannot_batch_runs_the_members_separately(volume):
    net = small_unet_like()
    model = TinyModel(FixedBatchOne(net), tiny_card(2))
    members = _members(volume, model, "paper", restarts=2)
    ok, why = batchable(model.network, [torch.zeros(1, 1, 24, 24)] * 2)
    assert not ok and "fixed batch of one" in why
    results = run_batched(model, members)
    for r in results:
        assert r.metadata["batch"]["batched"] is False
        assert "fixed batch of one" in r.metadata["batch"]["note"]
        assert r.status == "completed" and len(r.steps) == 6
    alone = run_analysis(members[1].volume, SEED, TinyModel(net, tiny_card(2)), members[1].config)
    assert results[1].steps[-1].objective == pytest.approx(alone.steps[-1].objective, rel=1e-6)


def test_batch_statistics_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2)).train()
    ok, why = batchable(net, [torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)])
    assert not ok and "BatchNorm" in why


def test_bad_input_of_one_member_is_raised_as_in_a_separate_run(volume, model):
    members = _members(volume, model, "paper", restarts=2)
    members[1].seed_ijk = (500, 12, 0)
    with pytest.raises(SeedError):
        run_batched(model, members)


def test_compare_batches_the_restarts_of_each_model(volume, model):
    from DeepDreamAnalysisLib.studies.compare import compare_models

    config = _members(volume, model, "robust+spectral", restarts=1)[0].config
    models = {"a": model, "b": TinyModel(small_unet_like(seed=5), tiny_card(2))}
    batched = compare_models(volume, SEED, models, config, restarts=2, restart_noise_std=10.0)
    separate = compare_models(volume, SEED, models, config, restarts=2, restart_noise_std=10.0, batch=False)
    assert batched.metadata["batched_restarts"] == {"a": [True, True], "b": [True, True]}
    assert separate.metadata["batched_restarts"] == {"a": [False, False], "b": [False, False]}
    for name in models:
        np.testing.assert_allclose(batched.base[name], separate.base[name], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched.raw[name], separate.raw[name], rtol=1e-4, atol=1e-4)


def _states_alone_and_batched(dims, specs, shape, seeds):
    """Each member's (iteration, objective, image) run alone (a DreamLoop) and in one batch."""
    from DeepDreamAnalysisLib.dream import DreamLoop
    from DeepDreamAnalysisLib.engine.batched import BatchedDreamLoop
    from tiny_models import tiny_net

    net = tiny_net(dims)
    card = tiny_card(dims, roi=shape[1:] if dims == 2 else shape)

    def make():
        return [DreamLoop(net, card, liver_like(shape, seed=i), seeds[i], DreamConfig(iterations=n, random_seed=i, **kw),
                          torch.device("cpu")) for i, (n, kw) in enumerate(specs)]

    alone = [[(s.iteration, s.objective, s.image.clone()) for s in loop] for loop in make()]
    loops = make()
    together: list = [[] for _ in loops]
    for events in BatchedDreamLoop(loops):
        for event in events:
            assert event.error is None
            together[event.index].append((event.state.iteration, event.state.objective, event.state.image.clone()))
    return alone, together, loops


def test_a_batch_of_3d_dreams_with_mixed_methods_equals_each_alone():
    """3D members with four methods in one batch (paper's whole crop beside the others' windows),
    different numbers of iterations and one stopping early: each member's images and objectives are
    its own run's, with the others' leaving the batch as they end."""
    specs = [(5, dict(method="robust")), (3, dict(method="paper", step=20.0, normalize_gradient=True)),
             (5, dict(method="robust+spectral")), (4, dict(method="robust", stop_probability=1e-9, stop_patience=2)),
             (5, dict(method="adam+robust"))]
    alone, together, loops = _states_alone_and_batched(3, specs, (12, 12, 12), [(6, 6, 6)] * 5)
    assert [len(a) for a in together] == [len(a) for a in alone] == [5, 3, 5, 2, 5]
    assert loops[0].window is not None and loops[1].window is None
    for a, b in zip(alone, together):
        for (ia, oa, xa), (ib, ob, xb) in zip(a, b):
            assert ia == ib and ob == pytest.approx(oa, rel=1e-5, abs=1e-5)
            torch.testing.assert_close(xb, xa, rtol=0, atol=1e-4)


def test_members_on_different_windows_each_equal_their_own_run():
    """2D members at two seeds (two windows: their copies sampled and read in two groups) and one
    leaving early: each equals its run alone."""
    specs = [(6, dict(method="robust")), (3, dict(method="robust")), (6, dict(method="robust+spectral")),
             (6, dict(method="robust"))]
    alone, together, loops = _states_alone_and_batched(2, specs, (1, 40, 48),
                                                       [(0, 20, 24), (0, 20, 24), (0, 18, 20), (0, 18, 20)])
    assert loops[0].window is not None and loops[0].window != loops[2].window
    for a, b in zip(alone, together):
        assert len(a) == len(b)
        for (ia, oa, xa), (ib, ob, xb) in zip(a, b):
            assert ia == ib and ob == pytest.approx(oa, rel=1e-5, abs=1e-5)
            torch.testing.assert_close(xb, xa, rtol=0, atol=1e-4)


def test_half_precision_gradients_are_checked_without_rounding():
    """A half-precision model's gradient of 1e5 (above float16's largest) or 1e-8 (below its
    smallest) is finite and moving, as a separate run finds it."""
    from DeepDreamAnalysisLib.engine.batched import member_checks

    objectives = [torch.tensor(1.5, dtype=torch.float16), torch.tensor(-2.0, dtype=torch.float16)]
    grads = torch.zeros(2, 1, 4, 4)
    grads[0, 0, 1, 1], grads[1, 0, 2, 2] = 1e5, 1e-8
    values, finite, moving = member_checks(objectives, grads)
    assert values == [1.5, -2.0] and finite == [True, True] and moving == [True, True]
    grads[1, 0, 0, 0] = float("nan")
    grads[0] = 0
    assert member_checks(objectives, grads)[1:] == ([True, False], [False, False])
