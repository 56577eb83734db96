"""Model cards: every wrong field names itself; a card that contradicts its network is caught at load;
docs/model-card.md documents every field and its examples are valid cards."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from DeepDreamAnalysisLib.card import CARD_TEMPLATE, REQUIRED_FIELDS, ModelCard, Preprocessing, find_card
from DeepDreamAnalysisLib.errors import ModelCardError
from DeepDreamAnalysisLib.models import load_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "model-card.md"
GOOD = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "activation": "softmax", "target_class": 1,
        "preprocessing": {"type": "window", "min": -100, "max": 250}}


def card(**over):
    data = dict(GOOD)
    data.update(over)
    return ModelCard.from_dict(data, source="Model card test.json")


@pytest.mark.parametrize("missing", REQUIRED_FIELDS)
def test_missing_field_is_named_with_an_example(missing):
    data = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ModelCardError) as err:
        ModelCard.from_dict(data, source="Model card test.json")
    msg = str(err.value)
    assert f"lacks the field(s) {missing}." in msg and "docs/model-card.md" in msg
    # the example value printed can be pasted into the card
    example = json.loads(msg[msg.index("{"): msg.rindex("}") + 1])
    assert example == {missing: CARD_TEMPLATE[missing]}


@pytest.mark.parametrize("field_name, value, message", [
    ("spatial_dims", "2", "spatial_dims must be an integer, got '2'"),
    ("spatial_dims", 4, "spatial_dims is 4; it must be one of (2, 3)"),
    ("in_channels", 1.5, "in_channels must be an integer, got 1.5"),
    ("in_channels", 0, "in_channels is 0; it must be at least 1"),
    ("out_channels", True, "out_channels must be an integer, got True"),
    ("activation", "relu", "activation is 'relu'; use 'sigmoid' or 'softmax'"),
    ("target_class", -1, "target_class is -1; it must be at least 0"),
    ("preprocessing", "window", "preprocessing must be an object"),
    ("preprocessing", {"type": "clip"}, "preprocessing.type is 'clip'"),
    ("preprocessing", {"type": "window", "min": 10, "max": 10}, "preprocessing.max (10.0) must be greater"),
    ("preprocessing", {"type": "normalize", "std": 0}, "preprocessing.std must be positive"),
    ("preprocessing", {"type": "window", "min": "low"}, "preprocessing.min must be a finite number"),
    ("preprocessing", {"type": "window", "centre": 40}, "preprocessing has an unknown field"),
    ("roi_size", [96, 96, 96], "roi_size [96, 96, 96] must hold 2 positive sizes"),
    ("roi_size", [96.5, 96], "roi_size must be a list of integers"),
    ("roi_size", "96x96", "roi_size must be a list of numbers"),
    ("spacing", [0, 1, 1], "spacing [0.0, 1.0, 1.0] must be 2 or 3 positive numbers"),
    ("intensity_range", [100, -100], "intensity_range [100.0, -100.0] must be [low, high]"),
    ("size_divisible", 0, "size_divisible is 0; it must be at least 1"),
    ("network", "UNet", "network must be an object like"),
])
def test_wrong_type_or_value_names_the_field(field_name, value, message):
    with pytest.raises(ModelCardError) as err:
        card(**{field_name: value})
    assert str(err.value).startswith("Model card test.json: ")
    assert message in str(err.value)


def test_target_class_must_be_an_output_channel():
    with pytest.raises(ModelCardError, match="target_class is 2 but the model has out_channels=2; use a class index "
                                             "from 0 to 1"):
        card(target_class=2)
    with pytest.raises(ModelCardError, match="softmax' needs out_channels >= 2"):
        card(out_channels=1, target_class=0)
    assert card(out_channels=1, target_class=0, activation="sigmoid").target_class == 0


def test_integral_floats_are_accepted_and_values_normalised():
    c = card(in_channels=1.0, roi_size=[64, 48], spacing=[0.8, 0.8, 2.5])
    assert c.in_channels == 1 and isinstance(c.in_channels, int)
    assert c.roi_size == (64, 48) and c.spacing == (0.8, 0.8, 2.5)
    assert isinstance(c.preprocessing, Preprocessing) and c.preprocessing.scale == pytest.approx(1 / 350)


def test_unknown_keys_are_kept_and_round_trip(tmp_path):
    c = card(demo={"iterations": 50}, name="x")
    assert c.extra == {"demo": {"iterations": 50}}
    c.save(tmp_path / "c.json")
    again = ModelCard.load(tmp_path / "c.json")
    assert again == c


def test_card_file_errors(tmp_path):
    with pytest.raises(ModelCardError, match="Model card not found"):
        ModelCard.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{spatial_dims: 2")
    with pytest.raises(ModelCardError, match="bad.json is not valid JSON"):
        ModelCard.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ModelCardError, match="must be a JSON object"):
        ModelCard.load(tmp_path / "list.json")


def test_find_card_order(tmp_path):
    model = tmp_path / "unet.pt"
    model.write_bytes(b"x")
    assert find_card(model) is None
    (tmp_path / "card.json").write_text("{}")
    assert find_card(model) == tmp_path / "card.json"
    (tmp_path / "unet.card.json").write_text("{}")
    assert find_card(model) == tmp_path / "unet.card.json"
    (tmp_path / "unet.pt.card.json").write_text("{}")
    assert find_card(model) == tmp_path / "unet.pt.card.json"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "card.json").write_text("{}")
    assert find_card(bundle) == bundle / "card.json"


# ------------------------------------------------------------------------------ card against the model

def _torchscript(tmp_path, in_ch=1, out_ch=2, dims=2):
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(conv(in_ch, 3, 3, padding=1), torch.nn.Tanh(), conv(3, out_ch, 1)).eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.mark.parametrize("net_kw, card_kw, message", [
    ({"in_ch": 3}, {}, "The card says in_channels=1 but the network's first convolution expects 3: fix in_channels"),
    ({"out_ch": 4}, {}, "The card says out_channels=2 but the network returns 4 channels: fix out_channels"),
    ({}, {"spatial_dims": 3, "roi_size": [8, 8, 8]}, "The card says spatial_dims=3 but the network is 2D"),
    ({"dims": 3}, {"roi_size": [8, 8]}, "The card says spatial_dims=2 but the network is 3D"),
])
def test_card_contradicting_the_model_is_caught_at_load(tmp_path, net_kw, card_kw, message):
    path = _torchscript(tmp_path, **net_kw)
    data = dict(GOOD, roi_size=[16, 16])
    data.update(card_kw)
    with pytest.raises(ModelCardError, match=re.escape(message)):
        load_model(path, card=data)


def test_card_beside_model_with_wrong_field_names_file_and_field(tmp_path):
    path = _torchscript(tmp_path)
    (tmp_path / "net.pt.card.json").write_text(json.dumps(dict(GOOD, target_class=5)))
    with pytest.raises(ModelCardError, match=r"Model card net.pt.card.json: target_class is 5"):
        load_model(path)


# ------------------------------------------------------------------------------ the documentation

def test_doc_documents_every_card_field():
    text = DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    card_fields = {f.name for f in fields(ModelCard)} - {"extra"}
    assert card_fields <= documented, f"undocumented: {card_fields - documented}"
    for kind in ("window", "normalize", "none"):
        assert f'"type": "{kind}"' in text
    assert "## Security" in text and "weights_only=True" in text and "allow_code_targets=True" in text


def test_doc_examples_are_valid_cards_for_2d_and_3d():
    text = DOC.read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    cards = [ModelCard.from_dict(b) for b in blocks]
    assert {c.spatial_dims for c in cards} == {2, 3}
    for c, b in zip(cards, blocks):
        assert set(b) - {"extra"} <= {f.name for f in fields(ModelCard)}  # no typo lands in extra
        assert len(c.roi_size) == c.spatial_dims


def test_doc_2d_example_builds_its_network(tmp_path):
    """The state-dict example's `network` really builds a MONAI UNet that loads and passes the probe."""
    text = DOC.read_text(encoding="utf-8")
    example = next(json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S) if '"network"' in b)
    from DeepDreamAnalysisLib.models import build_named_network

    net, executes = build_named_network(example["network"])
    path = tmp_path / "unet2d.pt"
    torch.save(net.state_dict(), path)
    model = load_model(path, card=example)
    assert model.card.name == "liver-lesion-unet-2d" and executes is False and model.executes_code is False


# ------------------------------------------------------------------------------ property-based

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)
FIELD_VALUES = {
    "spatial_dims": st.sampled_from([2, 3, 1, 4, 2.0, "2", None]),
    "in_channels": st.integers(-1, 4) | JSONISH,
    "out_channels": st.integers(-1, 4) | JSONISH,
    "activation": st.sampled_from(["softmax", "sigmoid", "relu", 3]),
    "target_class": st.integers(-1, 4) | JSONISH,
    "preprocessing": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["window", "normalize", "none", "x"]), "min": JSONISH, "max": JSONISH,
        "mean": JSONISH, "std": JSONISH, "out_min": JSONISH, "bogus": JSONISH}) | JSONISH,
    "roi_size": st.lists(st.integers(-2, 200), max_size=4) | JSONISH,
    "spacing": st.lists(st.floats(-1, 5), max_size=4) | JSONISH,
    "intensity_range": st.lists(st.floats(-2000, 4000), max_size=3) | JSONISH,
    "size_divisible": st.integers(-1, 32) | JSONISH,
    "network": JSONISH,
    "name": JSONISH,
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_any_card_dict_is_a_card_or_a_model_card_error(data):
    try:
        c = ModelCard.from_dict(data)
    except ModelCardError as exc:
        assert str(exc)
        return
    assert c.spatial_dims in (2, 3) and 0 <= c.target_class < c.out_channels
    assert c.preprocessing.scale > 0 or c.preprocessing.type == "window"
