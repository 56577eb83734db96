"""A dream whose seed output stops depending on the image (every ReLU feeding the seed off): the
normalised methods redirect the stuck gradient (Lucid's redirected ReLU, only where it is stuck), and
a run that still stalls says so, with the cause and the fix, instead of "a larger step"."""

import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import step_hint
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.dream import DreamLoop
from DeepDreamAnalysisLib.dreaming.redirect import RedirectCounter, _RedirectedReLU, redirected_relus, relu_modules
from DeepDreamAnalysisLib.errors import SeedError
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, liver_like, tiny_card

CPU = torch.device("cpu")
SEED = (12, 12, 0)


def feature_net(weight: float, bias: float, head, head_bias, inplace=False) -> torch.nn.Module:
    """Per voxel: one feature ``relu(weight * x + bias)`` (x the windowed image, about 0.6 for liver),
    then the class logits ``head * feature + head_bias``."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU(inplace=inplace), torch.nn.Conv2d(1, 2, 1))
    net[0].weight.data[:] = weight
    net[0].bias.data[:] = bias
    net[2].weight.data[:, 0, 0, 0] = torch.tensor(head)
    net[2].bias.data[:] = torch.tensor(head_bias)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _config(method, iterations=20, **dream):
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, method=method, step=20.0, normalize_gradient=True,
                                            **dream), features=FeatureConfig(names=("firstorder_Mean",)))


def test_the_redirected_gradient_flows_only_where_the_ordinary_one_is_stuck():
    counter = RedirectCounter()
    x = torch.tensor([[-1.0, -2.0, -0.5], [1.0, -1.0, 2.0]], requires_grad=True)  # item 0 all off, item 1 half on
    y = _RedirectedReLU.apply(x, False, counter)
    assert torch.equal(y, x.detach().clamp(min=0))
    (g,) = torch.autograd.grad(y, x, grad_outputs=torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, -3.0]]))
    # item 0: ordinary gradient all zero -> passed where raising the unit raises the objective (g > 0)
    assert g[0].tolist() == [1.0, 0.0, 2.0]
    # item 1: the ordinary gradient flows -> unchanged (the off unit stays at 0)
    assert g[1].tolist() == [1.0, 0.0, -3.0]
    assert counter.redirected == 1


def test_the_patch_is_removed_and_in_place_relus_stay_in_place():
    net = feature_net(1.0, -5.0, [0.0, 1.0], [0.0, 0.0], inplace=True)
    relus = relu_modules(net)
    assert len(relus) == 1
    x = torch.ones(1, 1, 4, 4)
    with redirected_relus(relus, RedirectCounter()):
        patched = net(x)
    assert "forward" not in vars(relus[0])
    assert torch.equal(patched, net(x))


def test_an_off_relu_at_the_start_stops_paper_but_not_the_normalised_methods():
    # the feature is off everywhere (x - 5 < 0) and the target's logit rises with it
    net = feature_net(1.0, -5.0, [0.0, 3.0], [0.0, -2.0])
    card = tiny_card(2)
    image = liver_like((1, 24, 24), std=5.0)
    with pytest.raises(SeedError, match="does not depend on the image"):
        list(DreamLoop(net, card, image, (0, 12, 12), DreamConfig(iterations=3, method="paper", step=20.0,
                                                                   normalize_gradient=True), CPU))
    loop = DreamLoop(net, card, image, (0, 12, 12), DreamConfig(iterations=120, method="ascent", step=40.0), CPU)
    probs = [s.probability_at_seed for s in loop]
    assert loop.redirects.redirected > 0
    assert probs[0] < 0.2 and probs[-1] > 0.5, [round(p, 3) for p in probs[::10]]


@pytest.mark.parametrize("method, fix", [("paper", "Use a method other than paper"), ("ascent", "--start noise")])
def test_a_run_that_stalls_names_the_cause_not_the_step(method, fix):
    # raising the target lowers the feature until its ReLU is off at the seed; then the logits are the bias
    # (p(target) = sigmoid(-1) = 0.27) and nothing can move them: redirecting would not help either
    net = feature_net(-1.0, 0.75, [2.0, -4.0], [0.0, -1.0])
    model = TinyModel(net, tiny_card(2))
    volume = Volume(liver_like((1, 24, 24), std=5.0), spacing=(0.8, 0.8, 2.5))
    result = run_analysis(volume, SEED, model, _config(method))
    flag = next(f for f in result.quality_flags if f.code == "no_dream")
    assert "stopped depending on the image" in flag.message and "exactly zero" in flag.message
    assert result.metadata["seed_output_constant"] is True
    hint = step_hint(result)
    assert "stopped depending on the image" in hint and fix in hint and "larger --step" not in hint


def test_batched_restarts_redirect_as_separate_runs():
    from DeepDreamAnalysisLib.engine.batched import BatchMember, run_batched

    model = TinyModel(feature_net(1.0, -5.0, [0.0, 3.0], [0.0, -2.0]), tiny_card(2))
    volume = Volume(liver_like((1, 24, 24), std=5.0), spacing=(0.8, 0.8, 2.5))
    members = [BatchMember(volume, SEED, AnalysisConfig(
        dream=DreamConfig(iterations=40, method="ascent", step=80.0, random_seed=r),
        features=FeatureConfig(names=("firstorder_Mean",)))) for r in range(2)]
    together = run_batched(model, members)
    apart = run_batched(model, members, batch=False)
    assert together[0].metadata["batch"]["batched"] is True
    for a, b in zip(together, apart):
        assert [s.probability for s in a.steps] == pytest.approx([s.probability for s in b.steps], abs=1e-5)
        assert a.steps[-1].probability > a.steps[0].probability + 0.1
