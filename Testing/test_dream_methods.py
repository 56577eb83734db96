"""Dream methods (docs/dream-methods.md): each dreams, K copies are one batched forward, the spectral
update knows the spacing, options are checked, the card's dream block is used, paper is unchanged."""

import math

import pytest
import torch

from DeepDreamAnalysisLib.config import DreamConfig, dream_settings
from DeepDreamAnalysisLib.dream import DreamLoop
from DeepDreamAnalysisLib.dreaming import list_methods
from DeepDreamAnalysisLib.dreaming.spectral import SpectralPreconditioner, frequency_weights
from DeepDreamAnalysisLib.dreaming.transforms import RandomTransforms
from DeepDreamAnalysisLib.errors import ConfigError, ModelCardError

from tiny_models import liver_like, tiny_card, tiny_net

CPU = torch.device("cpu")
METHODS = ["ascent", "robust", "spectral", "accentuate", "adam", "robust+spectral", "robust+spectral+adam"]


def _loop(cfg, dims=2, net=None, card=None, image=None, spacing=None):
    image = liver_like((1, 24, 24) if dims == 2 else (12, 12, 12)) if image is None else image
    seed = tuple(n // 2 for n in image.shape)
    return DreamLoop(net or tiny_net(dims), card or tiny_card(dims), image, seed, cfg, CPU, spacing=spacing)


def test_every_method_is_listed_with_a_description_and_a_source():
    methods = {m.name: m for m in list_methods()}
    assert {"paper", "ascent", "robust", "spectral", "accentuate", "adam"} <= set(methods)
    assert all(m.description and m.source for m in methods.values())
    assert methods["robust"].options["copies"] >= 2 and "decay" in methods["spectral"].options


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_raises_the_probability_at_the_seed(method, dims):
    torch.manual_seed(0)
    states = [(s.probability_at_seed, s.image.clone()) for s in _loop(DreamConfig(iterations=15, method=method, step=30.0), dims)]
    assert states[-1][0] > states[0][0] + 0.02, (method, [round(p, 3) for p, _ in states])
    assert not torch.equal(states[-1][1], states[0][1])


def test_the_default_step_is_one_percent_of_the_window_per_iteration():
    loop = _loop(DreamConfig(iterations=2, method="ascent"))
    images = [s.image.clone() for s in loop]
    assert float((images[1] - images[0]).abs().max()) == pytest.approx(3.5, rel=1e-4)  # window [-100, 250] HU


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.batches = net, 0, []

    def forward(self, x):
        self.calls += 1
        self.batches.append(x.shape[0])
        return self.net(x)


def test_k_transformed_copies_are_one_batched_forward():
    net = CountingNet(tiny_net(3))
    cfg = DreamConfig(iterations=3, method="robust", method_options={"copies": 6})
    loop = DreamLoop(net, tiny_card(3), liver_like((12, 12, 12)), (6, 6, 6), cfg, CPU, copy_window=False)
    assert len(list(loop)) == 3
    assert net.calls == 3 and net.batches == [6, 6, 6]
    # with an exact seed window (dreaming/window.py): the 6 windows in one batch; iteration 0 audits the 6
    # copies on the full crop; nothing else while the seed is below the threshold (dreaming/near_seed.py)
    net = CountingNet(tiny_net(3))
    loop = DreamLoop(net, tiny_card(3), liver_like((12, 12, 12)), (6, 6, 6), cfg, CPU)
    probes = net.calls
    states = list(loop)
    assert loop.window is not None and len(states) == 3 and all(s.probability_at_seed <= 0.5 for s in states)
    assert net.batches[probes:] == [6, 6, 6, 6]


def test_batched_copies_equal_separate_ones():
    image = torch.as_tensor(liver_like((8, 16, 16)))
    t = RandomTransforms((8, 16, 16), (4, 8, 8), (2.0, 0.8, 0.8), 3, copies=4, jitter=2, scale=0.1, rotate=10,
                         noise_std=0.0)
    mats, shift = t.draw()
    together = t.apply(image, mats, shift)
    one_by_one = torch.cat([t.apply(image, mats[m:m + 1], shift[m:m + 1]) for m in range(3)])
    torch.testing.assert_close(together, one_by_one)
    identity = t.apply(image, torch.diag(1 / t.spacing).unsqueeze(0), torch.zeros(1, 3))
    torch.testing.assert_close(identity[0], image, atol=1e-3, rtol=0)


def test_the_random_transforms_come_from_the_generator_in_a_fixed_order():
    """One iteration's draws are the generator's next uniform numbers in the order zooms, angles,
    shifts (one call for all; a dream repeated with the same seed, batched or alone, draws the same)."""
    for n, shape, spacing in ((2, (1, 24, 32), (2.0, 0.8, 0.7)), (3, (8, 16, 16), (3.0, 0.9, 0.9))):
        for copies in (2, 4, 7):
            t = RandomTransforms(shape, tuple(s // 2 for s in shape), spacing, n, copies=copies, jitter=2, scale=0.1,
                                 rotate=10, noise_std=0.0, random_seed=11)
            mats, shift = t.draw()
            g = torch.Generator().manual_seed(11 + 7919)
            m = copies - 1
            zoom = 1 + 0.1 * (torch.rand(m, generator=g) * 2 - 1)
            angle = math.radians(10) * (torch.rand(m, generator=g) * 2 - 1)
            expected_shift = 2 * (torch.rand(m, n, generator=g) * 2 - 1)
            torch.testing.assert_close(shift, expected_shift, rtol=0, atol=1e-6)
            sp = torch.tensor(spacing[3 - n:])
            assert torch.allclose(mats[:, -2, -2], torch.cos(angle) * zoom / sp[-2], atol=1e-6)
            assert torch.allclose(mats[:, -1, -2], torch.sin(angle) * zoom / sp[-1], atol=1e-6)
            assert torch.allclose(mats[:, -2, -1], -torch.sin(angle) * zoom / sp[-2], atol=1e-6)
            if n == 3:
                assert torch.allclose(mats[:, 0, 0], zoom / sp[0], atol=1e-6)


def test_transforms_are_deterministic_under_a_seed():
    runs = [[s.image.clone() for s in _loop(DreamConfig(iterations=4, method="robust", random_seed=3))] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    other = [s.image.clone() for s in _loop(DreamConfig(iterations=4, method="robust", random_seed=4))]
    assert not torch.equal(runs[0][-1], other[-1])


def test_spectral_weights_follow_the_real_spacing():
    iso = frequency_weights((16, 16, 16), (1.0, 1.0, 1.0), 1.0)
    aniso = frequency_weights((16, 16, 16), (5.0, 0.8, 0.8), 1.0)
    assert not torch.allclose(iso, aniso)
    # along k (5 mm voxels) the highest frequency is 0.1 cycles/mm, in-plane 0.625: k keeps more weight
    assert float(aniso[8, 0, 0]) > float(aniso[0, 8, 0]) == pytest.approx(float(aniso[0, 0, 8]))
    g = torch.zeros(16, 16, 16)
    g[8, 8, 8] = 1.0
    smooth = SpectralPreconditioner((16, 16, 16), (5.0, 0.8, 0.8), 1.0, 3)(g)
    # smoothing is isotropic in millimetres: a spike spreads over fewer 5 mm voxels than 0.8 mm ones
    assert float(smooth[8, 9, 8]) > float(smooth[9, 8, 8])
    iso_smooth = SpectralPreconditioner((16, 16, 16), (1.0, 1.0, 1.0), 1.0, 3)(g)
    assert float(iso_smooth[9, 8, 8]) == pytest.approx(float(iso_smooth[8, 9, 8]))


def test_accentuate_changes_the_image_only_near_the_seed():
    loop = _loop(DreamConfig(iterations=10, method="accentuate", method_options={"sigma_mm": 2.0}))
    images = [s.image.clone() for s in loop]
    change = (images[-1] - images[0]).abs()[0]
    assert float(change[12, 12]) > 0 and float(change[0, 0]) < 1e-3 * float(change.max())
    assert loop.update_region is not None and float(loop.update_region[0, 12, 12]) == 1.0


def test_update_region_is_exposed():
    assert _loop(DreamConfig(iterations=1)).update_region is None
    region = _loop(DreamConfig(iterations=1, update_radius=3.0)).update_region
    assert region.shape == (1, 24, 24) and float(region.sum()) == 29.0


@pytest.mark.parametrize("method, options, text", [
    ("dreamy", {}, "Unknown dream method 'dreamy'.*Known methods: paper"),
    ("paper+robust", {}, "combines with nothing"),
    ("robust", {"decay": 1.0}, "'decay' belongs to the 'spectral' method.*robust\\+spectral"),
    ("robust", {"colour": 1}, "'colour' is not an option.*copies, jitter"),
    ("robust", {"jitter": -1}, "jitter=-1 is out of range"),
    ("robust", {"scale": 0}, None),
    ("robust", {"copies": 0}, "copies=0"),
    ("spectral", {"decay": -0.5}, "decay=-0.5 is out of range"),
])
def test_unknown_methods_and_bad_options_are_refused(method, options, text):
    cfg = DreamConfig(method=method, method_options=options)
    if text is None:
        cfg.validate()  # scale 0: no zoom, allowed
        return
    with pytest.raises(ConfigError, match=text):
        cfg.validate()


def test_the_cards_dream_block_is_used_unless_the_user_says_otherwise():
    card = tiny_card(2, dream={"method": "robust", "method_options": {"copies": 3}, "iterations": 7,
                               "objective": "log_odds", "noise_std": 12.0})
    s = dream_settings(card)
    assert s.values["method"] == "robust" and s.values["iterations"] == 7 and s.values["noise_std"] == 12.0
    assert s.values["step"] is None and s.origin["method"] == "from the model card"
    cfg = s.config()
    assert cfg.method_options == {"copies": 3} and cfg.objective == "log_odds"
    user = dream_settings(card, iterations=9, method="spectral", method_options={"decay": 2.0})
    assert (user.values["iterations"], user.values["method"], user.values["method_options"]) == (9, "spectral", {"decay": 2.0})
    assert user.origin["method"] == "as given" and user.values["objective"] == "log_odds"
    assert dream_settings(None).values["method"] == DreamConfig().method


def test_a_card_dream_block_with_an_unknown_key_is_refused():
    with pytest.raises(ModelCardError, match="unknown key.*'stepsize'.*valid keys: method"):
        dream_settings(tiny_card(2, dream={"stepsize": 3}))


def test_paper_is_the_papers_update_exactly():
    image = liver_like((1, 24, 24))
    states = [s.image.clone() for s in _loop(DreamConfig(iterations=3, method="paper", step=40.0,
                                                         objective="logit"), image=image)]
    # by hand: X1 = clamp(X0 + 40 * dI/dX0)
    net, card = tiny_net(2), tiny_card(2)
    x = torch.as_tensor(image).clone().requires_grad_(True)
    pre = card.preprocessing
    z = net((x * pre.scale + pre.offset)[0][None, None])
    (g,) = torch.autograd.grad(z[0, 1, 12, 12], x)
    assert torch.equal(states[1], (x.detach() + 40.0 * g).clamp(*card.intensity_range))


def _result(objectives, probabilities, flags=(), method="robust+spectral", step=None):
    from DeepDreamAnalysisLib.engine.quality import QualityFlag
    from DeepDreamAnalysisLib.result import AnalysisResult, Crop, Step

    steps = [Step(i, o, p, 0, {}) for i, (o, p) in enumerate(zip(objectives, probabilities))]
    return AnalysisResult(steps, [], Crop((0, 0, 0), (1, 8, 8)), (), metadata={
        "configuration": {"dream": {"method": method, "step": step}}},
        quality_flags=[QualityFlag(code, "x") for code in flags])


def test_hints_name_the_cause():
    from DeepDreamAnalysisLib.cli import step_hint

    wrong = step_hint(_result([0.0, 5.0], [0.1, 0.3], flags=("wrong_class",)))
    assert "another class wins" in wrong and "--objective log_odds" in wrong
    exploded = step_hint(_result([0.0, 5.0], [0.1, 0.9], flags=("mask_exploded",)))
    assert "--update-radius" in exploded and "--threshold" in exploded
    still = step_hint(_result([-3.0, -3.0001], [0.05, 0.05], method="paper", step=2.0))
    assert "Nothing moved" in still and "now 2; try 200" in still
    slow = step_hint(_result([-6.0, -2.0], [0.01, 0.2], step=3.5))
    assert "more --iterations" in slow
    assert step_hint(_result([0.0, 5.0], [0.1, 0.9])) is None


def test_a_card_step_without_a_method_is_the_papers_alpha():
    old_card = tiny_card(2, dream={"step": 500.0, "iterations": 300})
    s = dream_settings(old_card)
    assert (s.values["method"], s.values["step"]) == ("paper", 500.0)
    # another method does not take 500 as image units per iteration: its own default step applies
    robust = dream_settings(old_card, method="robust")
    assert robust.values["step"] is None and "for paper" in robust.origin["step"]


@pytest.mark.parametrize("dims", [2, 3])
def test_batched_members_update_in_one_stacked_step_with_each_members_own_numbers(dims):
    """A batch's members whose methods update alike (engine/batched.py) take one stacked step: each
    member's own update up to rounding (a stacked Fourier transform may sum in another order; each
    is normalised by its own largest value); a member that updates otherwise (Adam) makes them go one by one."""
    from DeepDreamAnalysisLib.dreaming.method import update_together

    shape = (1, 24, 32) if dims == 2 else (8, 16, 16)
    gen = torch.Generator().manual_seed(0)
    loops = [_loop(DreamConfig(iterations=1, method="robust+spectral", random_seed=r), dims=dims,
                   image=liver_like(shape, seed=r)) for r in range(3)]
    methods = [lp.method for lp in loops]
    xs = [lp.x0.clone() for lp in loops]
    grads = [torch.randn(shape, generator=gen) * 10 ** r for r in range(3)]  # each its own scale
    assert all(methods[0].same_update(m) for m in methods[1:])
    together = update_together(methods, xs, grads)
    alone = [m.update(x, g) for m, x, g in zip(methods, xs, grads)]
    assert all(torch.allclose(t, a, rtol=0, atol=1e-4) for t, a in zip(together, alone))  # of steps of 1-15 HU
    assert not torch.allclose(together[0], xs[0], rtol=0, atol=1e-2)
    adam = _loop(DreamConfig(iterations=1, method="adam+spectral"), dims=dims, image=liver_like(shape)).method
    assert not methods[0].same_update(adam)
    mixed = update_together(methods[:2] + [adam], xs, grads)
    assert torch.equal(mixed[0], methods[0].update(xs[0], grads[0]))
