"""Property-based tests (hypothesis): whatever a caller passes, the engine runs or raises one of its
own documented errors (a :class:`DeepDreamError` subclass), never anything else.

Covers configurations (DreamConfig, FeatureConfig, AnalysisConfig values of any type), small random
volumes (any shape, spacing, NaN/inf voxels), seeds (in and out of range, not numbers), model cards
that do or do not fit the network, random masks given to the feature sets, and reference
statistics dictionaries. The networks are tiny real convolution nets; runs are 1-3 iterations.
Model card dictionaries alone are covered by test_model_card.py.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.card import ModelCard
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import DeepDreamError, ModelCardError, ModelError, RunFault
from DeepDreamAnalysisLib.features import build_feature_set
from DeepDreamAnalysisLib.reference import ReferenceStats
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, liver_like, tiny_card, tiny_net

# DDA_HYPOTHESIS_EXAMPLES=500 explores more (slower); CI keeps the default.
FAST = settings(max_examples=int(os.environ.get("DDA_HYPOTHESIS_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEATURES = ("firstorder_Mean", "firstorder_Entropy")

# Any JSON-like value, with small numbers only (an "iterations" of 10**6 would be a valid, slow run).
ODD = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.text(max_size=4) | st.lists(st.integers(-2, 30), max_size=4) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
SMALL_FLOAT = st.floats(-5, 5) | st.floats(allow_nan=True, allow_infinity=True)

NETS = {2: tiny_net(2), 3: tiny_net(3)}


def _model(dims: int, **card):
    return TinyModel(NETS[dims], tiny_card(dims, roi=[8, 8] if dims == 2 else [4, 6, 6], **card))


def _volume(dims: int) -> Volume:
    return Volume(liver_like((3, 10, 12) if dims == 2 else (6, 10, 12)), spacing=(0.8, 0.8, 2.5))


def _runs_or_own_error(volume, seed, model, config, reference=None):
    """run_analysis either returns a result (with a known status) or raises a DeepDreamError."""
    try:
        result = run_analysis(volume, seed, model, config, reference)
    except DeepDreamError as exc:
        assert str(exc).strip(), "an error without a message"
        return None
    assert result.status in ("completed", "stopped", "cancelled", "fault")
    if result.status == "fault":
        assert result.metadata["fault"]
    assert result.metadata["status"] == result.status
    return result


dream_values = st.fixed_dictionaries({}, optional={
    "iterations": st.integers(-1, 3) | ODD,
    "step": SMALL_FLOAT | ODD,
    "objective": st.sampled_from(["logit", "log_odds", "prob"]) | ODD,
    "normalize_gradient": st.booleans(),
    "update_radius": st.none() | SMALL_FLOAT | ODD,
    "l2_weight": SMALL_FLOAT | ODD,
    "tv_weight": SMALL_FLOAT | ODD,
    "stop_probability": st.none() | st.floats(-0.5, 1.5) | ODD,
    "stop_patience": st.integers(-1, 3) | ODD,
    "start": st.sampled_from(["image", "noise", "zeros"]) | ODD,
    "noise_mean": st.none() | SMALL_FLOAT | ODD,
    "noise_std": st.none() | SMALL_FLOAT | ODD,
    "random_seed": st.integers(-3, 2**40) | ODD,
    "roi_size": st.none() | st.lists(st.integers(-1, 12), max_size=4).map(tuple) | ODD,
    "threshold": st.floats(-0.5, 1.5) | ODD,
    "device": st.sampled_from(["auto", "cpu", "cuda", "tpu"]) | ODD,
})

feature_values = st.fixed_dictionaries({}, optional={
    "names": st.none() | st.lists(st.sampled_from(FEATURES + ("glcm_Nope", "shape2D_Elongation")), max_size=3).map(tuple)
    | ODD,
    "backend": st.sampled_from(["auto", "native", "torch"]) | ODD,
    "every": st.integers(-1, 3) | ODD,
    "bin_width": SMALL_FLOAT | ODD,
    "min_mask_voxels": st.integers(-1, 5) | ODD,
    "custom": st.just({}) | ODD,
})

analysis_values = st.fixed_dictionaries({}, optional={
    "snapshot_every": st.integers(-1, 3) | ODD,
    "max_snapshots": st.integers(-1, 4) | ODD,
})


@FAST
@given(dims=st.sampled_from([2, 3]), dream=dream_values, feats=feature_values, extra=analysis_values)
@example(dims=2, dream={"threshold": "a"}, feats={}, extra={})
@example(dims=2, dream={"stop_patience": "3"}, feats={}, extra={})
@example(dims=2, dream={"random_seed": None}, feats={}, extra={})
@example(dims=2, dream={"roi_size": 5}, feats={}, extra={})
@example(dims=2, dream={"step": "3"}, feats={}, extra={})
@example(dims=2, dream={}, feats={"names": "firstorder_Mean"}, extra={})
@example(dims=2, dream={}, feats={"custom": None}, extra={})
@example(dims=2, dream={}, feats={"min_mask_voxels": "a"}, extra={})
@example(dims=2, dream={}, feats={}, extra={"snapshot_every": "a"})
def test_any_configuration_runs_or_is_refused_with_an_engine_error(dims, dream, feats, extra):
    dream.setdefault("iterations", 2)
    dream.setdefault("device", "cpu")
    feats.setdefault("names", FEATURES)
    feats.setdefault("backend", "native")
    try:
        config = AnalysisConfig(dream=DreamConfig(**dream), features=FeatureConfig(**feats), **extra)
    except DeepDreamError:
        return
    if isinstance(config.dream.iterations, int) and not isinstance(config.dream.iterations, bool):
        assert config.dream.iterations <= 3
    _runs_or_own_error(_volume(dims), (6, 5, 1), _model(dims), config)


@FAST
@given(dims=st.sampled_from([2, 3]), dream=dream_values)
def test_a_configuration_that_validates_is_a_usable_one(dims, dream):
    """validate() is the gate: after it passes, the run never fails on a configuration value."""
    dream.setdefault("iterations", 2)
    dream["device"] = "cpu"
    config = AnalysisConfig(dream=DreamConfig(**dream), features=FeatureConfig(names=FEATURES, backend="native"))
    try:
        config.validate()
    except DeepDreamError:
        return
    result = _runs_or_own_error(_volume(dims), (6, 5, 1), _model(dims), config)
    if result is not None and result.status == "fault":
        assert "NaN or infinite" in result.metadata["fault"]  # a huge step or weight may overflow


volumes = st.integers(1, 4).flatmap(lambda k: st.integers(1, 9).flatmap(lambda j: st.integers(1, 9).flatmap(
    lambda i: arrays(np.float64, (k, j, i), elements=st.floats(-3000, 3000) | st.sampled_from([np.nan, np.inf, 0.0])))))
seeds = st.tuples(st.integers(-2, 10), st.integers(-2, 10), st.integers(-2, 5)) | st.lists(SMALL_FLOAT, max_size=4) | ODD


@FAST
@given(dims=st.sampled_from([2, 3]), array=volumes, seed=seeds,
       spacing=st.tuples(SMALL_FLOAT, SMALL_FLOAT, SMALL_FLOAT) | ODD, start=st.sampled_from(["image", "noise"]))
def test_any_small_volume_and_seed_runs_or_is_refused(dims, array, seed, spacing, start):
    try:
        volume = Volume(array, spacing=spacing)
    except DeepDreamError:
        return
    config = AnalysisConfig(dream=DreamConfig(iterations=2, step=50.0, start=start, device="cpu"),
                            features=FeatureConfig(names=FEATURES, backend="native"), snapshot_every=1)
    result = _runs_or_own_error(volume, seed, _model(dims), config)
    if result is not None:
        assert result.status == "completed"
        assert all(s.image.shape == result.snapshots[0].image.shape for s in result.snapshots)
        if start == "image":
            assert np.isfinite(volume.array).all()


card_fields = st.fixed_dictionaries({}, optional={
    "spatial_dims": st.sampled_from([2, 3]),
    "out_channels": st.integers(1, 4),
    "activation": st.sampled_from(["softmax", "sigmoid"]),
    "target_class": st.integers(0, 3),
    "preprocessing": st.sampled_from([{"type": "none"}, {"type": "normalize", "mean": 50.0, "std": 20.0},
                                      {"type": "window", "min": -100.0, "max": 250.0}]),
    "roi_size": st.lists(st.integers(1, 10), min_size=2, max_size=3),
    "intensity_range": st.sampled_from([[-1024.0, 3071.0], [0.0, 1.0], [-5.0, 5.0]]),
    "size_divisible": st.integers(1, 16),
})


@FAST
@given(net_dims=st.sampled_from([2, 3]), net_out=st.sampled_from([1, 2, 3]), fields=card_fields)
def test_a_card_that_does_not_fit_the_network_is_an_engine_error(net_dims, net_out, fields):
    """Cards that contradict the network (dims, channels, class) never escape as torch errors."""
    data = dict(name="p", spatial_dims=net_dims, in_channels=1, out_channels=2, activation="softmax",
                target_class=1, preprocessing={"type": "window", "min": -100.0, "max": 250.0})
    data.update(fields)
    try:
        card = ModelCard.from_dict(data)
    except DeepDreamError:
        return
    model = TinyModel(tiny_net(net_dims, out_channels=net_out), card)
    config = AnalysisConfig(dream=DreamConfig(iterations=2, step=10.0, device="cpu"),
                            features=FeatureConfig(names=FEATURES, backend="native"))
    fits = card.spatial_dims == net_dims and card.out_channels == net_out
    if not fits:
        # A ModelError naming the card field, or (when torch itself refuses the input shape) a fault at
        # iteration 0 that names torch's complaint. load_model's probe turns the latter into a ModelError too.
        try:
            result = run_analysis(_volume(3), (6, 5, 1), model, config)
        except ModelError as exc:
            assert "model card" in str(exc) or "size_divisible" in str(exc)
            return
        assert result.status == "fault" and not result.steps
        assert "at iteration 0" in result.metadata["fault"]
        return
    result = _runs_or_own_error(_volume(3), (6, 5, 1), model, config)
    if result is not None:
        assert result.status == "completed"


@FAST
@given(dims=st.sampled_from([2, 3]), data=st.data(), backend=st.sampled_from(["native", "pyradiomics"]))
def test_feature_sets_never_raise_on_any_mask(dims, data, backend):
    """An empty, one-voxel, scattered or full mask gives a number or NaN for every feature."""
    shape = (1, 7, 8) if dims == 2 else (4, 6, 7)
    mask = data.draw(arrays(np.bool_, shape), label="mask")
    image = data.draw(arrays(np.float32, shape, elements=st.floats(-1000, 1000, width=32)), label="image")
    names = ("firstorder_Entropy", "glcm_Contrast", "shape2D_Elongation" if dims == 2 else "shape_Sphericity")
    fs = build_feature_set(FeatureConfig(names=names, backend=backend), dims)
    values = fs.compute(image, mask, (0.8, 0.8, 2.5))
    assert set(values) == set(names)
    assert all(isinstance(v, float) for v in values.values())
    if mask.sum() < 2:
        assert all(math.isnan(v) for v in values.values())


reference_entry = st.fixed_dictionaries({"mean": st.floats(-5, 5), "std": st.floats(0.1, 5), "n": st.integers(2, 50)}) \
    | st.fixed_dictionaries({}, optional={"mean": SMALL_FLOAT | ODD, "std": SMALL_FLOAT | ODD,
                                          "n": st.integers(-1, 50) | SMALL_FLOAT | ODD})


@FAST
@given(features=st.dictionaries(st.sampled_from(FEATURES), reference_entry | ODD, max_size=2) | ODD,
       rest=st.fixed_dictionaries({}, optional={"settings": ODD, "sources": ODD, "lesion_count": st.text(max_size=2) | ODD,
                                                "format": ODD, "version": ODD}))
@example(features={"firstorder_Mean": {"mean": 1, "std": 1, "n": 2}}, rest={"lesion_count": "x"})
@example(features={"firstorder_Mean": {"mean": 1, "std": 1, "n": math.inf}}, rest={})
@example(features={"firstorder_Mean": {"mean": 1, "std": 1, "n": 2}}, rest={"settings": [1], "sources": 3})
def test_any_reference_dict_loads_or_is_a_reference_error(features, rest):
    try:
        stats = ReferenceStats.from_dict({"features": features, **rest}, source="stats.json")
    except DeepDreamError as exc:
        assert "stats.json" in str(exc) or "Reference" in str(exc)
        return
    for name in stats.features:
        assert math.isfinite(stats.mean[name]) and stats.std[name] > 0
        assert stats.zscore(name, [stats.mean[name]])[0] == 0.0
    stats.to_dict()


def test_a_nan_fault_from_a_huge_step_is_reported_not_raised():
    """A step so large that the image overflows float32 ends as a fault, never as an exception."""
    with pytest.raises(ModelCardError, match="intensity_range .* must lie within"):  # issue #11: sane ranges
        tiny_card(2, roi=[8, 8], intensity_range=[-3.0e38, 3.0e38])
    model = TinyModel(NETS[2], tiny_card(2, roi=[8, 8], intensity_range=[-1.0e7, 1.0e7]))
    config = AnalysisConfig(dream=DreamConfig(iterations=3, step=1e38, device="cpu"),
                            features=FeatureConfig(names=FEATURES, backend="native"))
    result = run_analysis(_volume(2), (6, 5, 1), model, config)
    assert result.status in ("fault", "completed")
    if result.status == "fault":
        assert "NaN or infinite" in result.metadata["fault"]
        assert isinstance(RunFault(result.metadata["fault"]), DeepDreamError)
