"""The gradient-ascent loop: a step raises the objective, clamping, determinism, start, stops, faults."""

import math

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.config import DreamConfig
from DeepDreamAnalysisLib.dream import DreamLoop, crop_around_seed
from DeepDreamAnalysisLib.errors import ConfigError, ModelError, RunFault

from tiny_models import liver_like, tiny_card, tiny_net

CPU = torch.device("cpu")


def _run(cfg, spatial_dims=2, image=None, card=None, net=None):
    # these tests pin the paper's update (the default method is tested in test_dream_methods.py)
    if cfg.method == DreamConfig().method:
        cfg.method = "paper"
    image = liver_like((1, 24, 24) if spatial_dims == 2 else (12, 12, 12)) if image is None else image
    seed = tuple(n // 2 for n in image.shape)
    loop = DreamLoop(net or tiny_net(spatial_dims), card or tiny_card(spatial_dims), image, seed, cfg, CPU)
    return [(s.iteration, s.objective, s.probability_at_seed, s.image.clone()) for s in loop]


@pytest.mark.parametrize("dims", [2, 3])
def test_each_step_raises_the_objective(dims):
    states = _run(DreamConfig(iterations=6, step=50.0), dims)
    objectives = [s[1] for s in states]
    assert all(b > a for a, b in zip(objectives, objectives[1:])), objectives
    assert states[0][0] == 0 and len(states) == 6


def test_first_state_is_the_start_image():
    image = liver_like((1, 24, 24))
    states = _run(DreamConfig(iterations=2, step=50.0), image=image)
    np.testing.assert_array_equal(states[0][3].numpy(), image)
    assert not np.array_equal(states[1][3].numpy(), image)


def test_update_follows_the_gradient_exactly():
    """X1 = X0 + alpha * dlogit/dX0, computed independently with autograd."""
    image = liver_like((1, 24, 24))
    net, card = tiny_net(2), tiny_card(2)
    x = torch.tensor(image, requires_grad=True)
    logit = net(((x * card.preprocessing.scale + card.preprocessing.offset)[0])[None, None])[0, 1, 12, 12]
    (g,) = torch.autograd.grad(logit, x)
    states = _run(DreamConfig(iterations=2, step=7.0), image=image, net=net, card=card)
    np.testing.assert_allclose(states[1][3].numpy(), image + 7.0 * g.numpy(), rtol=1e-5, atol=1e-4)


def test_image_is_clamped_to_the_card_intensity_range():
    card = tiny_card(2, intensity_range=[0.0, 150.0])
    states = _run(DreamConfig(iterations=5, step=1e6), card=card)
    final = states[-1][3].numpy()
    assert final.min() >= 0.0 and final.max() <= 150.0
    assert (final == 150.0).any() or (final == 0.0).any()


def test_runs_are_deterministic_and_noise_depends_on_the_random_seed():
    a = _run(DreamConfig(iterations=4, step=50.0, start="noise", random_seed=3))
    b = _run(DreamConfig(iterations=4, step=50.0, start="noise", random_seed=3))
    c = _run(DreamConfig(iterations=4, step=50.0, start="noise", random_seed=4))
    for sa, sb in zip(a, b):
        assert sa[1] == sb[1]
        assert torch.equal(sa[3], sb[3])
    assert not torch.equal(a[0][3], c[0][3])


def test_noise_start_has_the_window_statistics():
    states = _run(DreamConfig(iterations=1, start="noise"), image=np.zeros((1, 64, 64), np.float32))
    x = states[0][3].numpy()
    assert abs(x.mean() - 75.0) < 5.0  # centre of the window [-100, 250]
    assert abs(x.std() - 350.0 / 6) < 5.0


def test_normalised_gradient_moves_at_most_step_per_voxel():
    image = liver_like((1, 24, 24))
    states = _run(DreamConfig(iterations=2, step=3.0, normalize_gradient=True), image=image)
    delta = np.abs(states[1][3].numpy() - image)
    assert delta.max() == pytest.approx(3.0, rel=1e-5)


def test_update_region_leaves_far_voxels_alone():
    image = liver_like((1, 24, 24))
    states = _run(DreamConfig(iterations=2, step=50.0, update_radius=3), image=image)
    delta = np.abs(states[1][3].numpy() - image)[0]
    jj, ii = np.mgrid[:24, :24]
    far = (jj - 12) ** 2 + (ii - 12) ** 2 > 9
    assert delta[far].max() == 0.0 and delta[~far].max() > 0.0


def test_probability_stop_ends_early():
    net = tiny_net(2)
    cfg = DreamConfig(iterations=200, step=2000.0, stop_probability=0.05, stop_patience=3)
    states = _run(cfg, net=net)
    assert len(states) < 200
    assert all(s[2] > 0.05 for s in states[-3:])


def test_nan_gradient_is_a_fault_naming_the_iteration():
    class Explodes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_net(2)

        def forward(self, x):
            out = self.inner(x)
            return out * torch.where(x.mean() > 0.45, torch.tensor(float("nan")), torch.tensor(1.0))

    image = np.full((1, 24, 24), 100.0, np.float32)  # window input 0.571 > 0.45 -> NaN at once
    loop = DreamLoop(Explodes(), tiny_card(2), image, (0, 12, 12), DreamConfig(iterations=5), CPU)
    with pytest.raises(RunFault, match="iteration 0"):
        list(loop)


def test_exception_in_the_model_is_a_fault():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    loop = DreamLoop(Broken(), tiny_card(2), liver_like((1, 24, 24)), (0, 12, 12), DreamConfig(iterations=3), CPU)
    with pytest.raises(RunFault, match="ValueError at iteration 0: boom"):
        list(loop)


def test_wrong_output_shape_names_the_card_fields():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24 * 24, 2))
    loop = DreamLoop(net, tiny_card(2), liver_like((1, 24, 24)), (0, 12, 12), DreamConfig(iterations=1), CPU)
    with pytest.raises(ModelError, match="spatial_dims and out_channels"):
        list(loop)


def test_crop_is_centred_and_stays_inside():
    crop = crop_around_seed((50, 60, 70), (25, 30, 35), (16, 16, 16), 3)
    assert crop.start == (17, 22, 27) and crop.size == (16, 16, 16)
    edge = crop_around_seed((50, 60, 70), (0, 59, 69), (16, 16, 16), 3)
    assert edge.start == (0, 44, 54)
    small = crop_around_seed((5, 60, 70), (2, 30, 35), (16, 16, 16), 3, size_divisible=4)
    assert small.size == (4, 16, 16)
    two_d = crop_around_seed((50, 60, 70), (7, 30, 35), (32, 32), 2)
    assert two_d.start[0] == 7 and two_d.size == (1, 32, 32)


def test_bad_configuration_values_are_refused():
    for cfg, text in [(DreamConfig(iterations=0), "iterations"), (DreamConfig(step=-1.0), "step"),
                      (DreamConfig(step=float("nan")), "step"), (DreamConfig(start="zeros"), "start"),
                      (DreamConfig(threshold=1.5), "threshold"), (DreamConfig(device="tpu"), "device")]:
        with pytest.raises(ConfigError, match=text):
            cfg.validate()
    assert DreamConfig().step is None  # automatic: 1.0 for paper, else 1% of the intensity window
