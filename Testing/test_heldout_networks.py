"""The dream defaults on networks nobody tuned them on (Testing/Data/heldout, issue #9 part 5).

Each held-out network dreams from its lesion-free image with **no dream setting** (no method, step,
objective or iteration count): the probability at the seed must pass 0.5 within the default number of
iterations, as a compact object at the seed (its component a small share of the crop, off the crop's
border) and without a ``wrong_class`` / ``no_dream`` / ``mask_exploded`` flag. The only thing added to
the defaults is an early stop once the seed's probability has stayed above 0.5 for 3 iterations, to
keep the test short; it does not change any iteration before it.

scripts/evaluate_methods.py runs the same check for every method and more seed points, and writes
the table in docs/dream-methods.md ("Evidence").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.mask import seed_component
from DeepDreamAnalysisLib.models import load_model
from DeepDreamAnalysisLib.volume import read_volume

HELDOUT = Path(__file__).parent / "Data" / "heldout"
HELDOUT2 = Path(__file__).parent / "Data" / "heldout2"
"""The second set, made after all tuning (Testing/Data/heldout2/README.md)."""
NETWORKS = sorted(p.name for p in HELDOUT.iterdir() if (p / "model.card.json").exists())
FOLDERS = {p.name: p for root in (HELDOUT, HELDOUT2) for p in sorted(root.iterdir()) if (p / "model.card.json").exists()}


def test_the_heldout_set_covers_what_the_defaults_could_depend_on():
    cards = [json.loads((HELDOUT / n / "model.card.json").read_text()) for n in NETWORKS]
    assert {c["spatial_dims"] for c in cards} == {2, 3}
    assert {c["activation"] for c in cards} == {"sigmoid", "softmax"}
    assert {c["preprocessing"]["type"] for c in cards} == {"window", "normalize"}
    assert max(c["out_channels"] for c in cards) > 2 and min(c["out_channels"] for c in cards) <= 2
    assert len({c["network"]["name"] for c in cards}) == len(cards)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_the_defaults_dream_a_compact_object_on_a_heldout_network(name):
    folder = FOLDERS[name]
    model = load_model(folder / "model.pt", card=folder / "model.card.json")
    volume = read_volume(folder / "healthy.nii.gz")
    seed_ijk = tuple(json.loads((folder / "seeds.json").read_text())["seeds_ijk"][0])
    defaults = DreamConfig()
    config = AnalysisConfig(
        dream=DreamConfig(device="cpu", stop_probability=0.5, stop_patience=3),
        features=FeatureConfig(names=("firstorder_Mean",), backend="native"),
    )
    result = run_analysis(volume, seed_ijk, model, config)

    probabilities = [s.probability for s in result.steps]
    assert max(probabilities) > 0.5, (
        f"{name}: p(seed) never passed 0.5 in {len(probabilities)} iterations (max {max(probabilities):.3f}); "
        f"flags {[f.code for f in result.quality_flags]}")
    assert len(result.steps) <= defaults.iterations + 1
    last = result.snapshots[-1]
    prob = np.asarray(last.probability)
    prob = prob[None] if prob.ndim == 2 else prob
    seed_kji = tuple(int(s) - c for s, c in zip(reversed(seed_ijk), result.crop.start))
    component = seed_component(prob, seed_kji, 0.5)
    assert component.any()
    assert component.sum() <= 0.10 * prob.size, f"{name}: the dreamed object covers {component.mean():.0%} of the crop"
    for axis in range(3):
        if prob.shape[axis] > 1:
            assert not component.take(0, axis).any() and not component.take(-1, axis).any(), \
                f"{name}: the dreamed object touches the crop border"
    bad = {"wrong_class", "no_dream", "mask_exploded"} & {f.code for f in result.quality_flags}
    assert not bad, f"{name}: {sorted(bad)}"
