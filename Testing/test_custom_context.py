"""Custom features that know the seed, the spacing, the start image and the iteration; window
features computed whatever the mask; names that would collide with the tool's columns refused."""

import csv
import math

import numpy as np
import pytest

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import main
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import FeatureError
from DeepDreamAnalysisLib.features import FeatureContext, build_feature_set, custom_feature, register_feature
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import blur_model, liver_like, write_case

SEED = (24, 20, 1)  # i, j, k
DREAMS = dict(weights=[0.0, 20.0], biases=[0.0, -16.0])


@pytest.fixture
def volume():
    return Volume(liver_like((3, 40, 48), std=5.0), spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 5.0))


def _config(names, every=1, iterations=12):
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, step=20.0, normalize_gradient=True),
                          features=FeatureConfig(names=names, every=every), snapshot_every=5)


def test_a_context_feature_receives_the_seed_spacing_start_and_iteration(volume):
    seen = []

    def at_seed(image, mask, spacing, context):
        seen.append((context, float(image[context.seed_kji])))
        return float(image[context.seed_kji] - context.start_image[context.seed_kji])

    register_feature("ctx_test_change_at_seed", at_seed)
    result = run_analysis(volume, SEED, blur_model(**DREAMS), _config(("firstorder_Mean", "ctx_test_change_at_seed")))
    assert seen, "the feature was never called"
    ctx, value = seen[-1]
    assert isinstance(ctx, FeatureContext)
    assert ctx.seed_ijk == SEED and ctx.spacing == (0.8, 0.7, 2.5)
    assert ctx.crop == result.crop
    k0, j0, i0 = result.crop.start
    assert ctx.seed_kji == (1 - k0, 20 - j0, 24 - i0)
    assert ctx.seed_mm == pytest.approx((10.0 + 24 * 0.8, -20.0 + 20 * 0.7, 5.0 + 1 * 2.5))
    np.testing.assert_array_equal(ctx.start_image, volume.array[result.crop.slices])
    assert ctx.iteration == result.steps[-1].iteration
    last = result.snapshots[-1]
    assert value == pytest.approx(float(last.image[ctx.seed_kji]))
    change = result.column("ctx_test_change_at_seed")
    assert change[-1] == pytest.approx(value - float(volume.array[1, 20, 24]), abs=1e-3)
    assert change[-1] > 20.0  # the dream brightened the seed


def test_a_window_feature_is_computed_at_every_iteration_whatever_the_mask(volume):
    @custom_feature(window=True)
    def seed_value(image, mask, spacing, context=None):
        return float(image[context.seed_kji])

    def masked_mean(image, mask, spacing):  # the old signature still works
        return float(image[mask].mean())

    register_feature("ctx_test_seed_value", seed_value)
    register_feature("ctx_test_masked_mean", masked_mean)
    result = run_analysis(volume, SEED, blur_model(**DREAMS),
                          _config(("ctx_test_seed_value", "ctx_test_masked_mean"), every=5))
    window = result.column("ctx_test_seed_value")
    assert result.steps[0].mask_voxels == 0
    assert np.isfinite(window).all()  # iteration 0 (empty mask) and between --feature-every iterations
    assert window[0] == pytest.approx(float(volume.array[1, 20, 24]), abs=1e-3)
    assert np.all(np.diff(window) > 0)
    masked = result.column("ctx_test_masked_mean")
    assert math.isnan(masked[0]) and math.isnan(masked[6])  # empty mask at 0; iteration 6 is not a multiple of 5
    assert np.isfinite(masked[-1])


def test_a_fourth_positional_parameter_gets_the_context_and_reference_lesions_get_the_spacing():
    got = []

    def four(image, mask, spacing, where):
        got.append(where)
        return 1.0

    register_feature("ctx_test_four", four)
    fs = build_feature_set(FeatureConfig(names=("ctx_test_four",)), 3)
    image = np.zeros((4, 5, 6))
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:3, 1:3] = True
    assert fs.compute(image, mask, (1.0, 1.0, 2.0)) == {"ctx_test_four": 1.0}
    assert got[-1] == FeatureContext(spacing=(1.0, 1.0, 2.0))
    assert got[-1].seed_kji is None and got[-1].iteration is None


@pytest.mark.parametrize("name, why", [
    ("probability", "a curve every run writes"),
    ("mask_voxels", "a curve every run writes"),
    ("firstorder_Mean", "a radiomics feature"),
    ("shape2D_Perimeter", "a radiomics feature"),
    ("line135_response", "a built-in custom feature"),
    ("area_z", "z-scores"),
])
def test_a_custom_feature_named_like_a_builtin_is_refused(name, why):
    with pytest.raises(FeatureError, match=why) as err:
        register_feature(name, lambda image, mask, spacing: 0.0)
    assert f"my_{name}" in str(err.value)
    with pytest.raises(FeatureError, match=why):
        build_feature_set(FeatureConfig(custom={name: "math:sqrt"}), 3)


def test_the_command_refuses_a_colliding_name_and_keeps_custom_features_with_features_none(tmp_path, capsys):
    case = write_case(tmp_path / "case")
    feature_file = tmp_path / "myfeat.py"
    feature_file.write_text("def seed_hu(image, mask, spacing, context):\n"
                            "    return float(image[context.seed_kji])\n")
    base = ["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1",
            "--iterations", "3", "--step", "10"]
    rc = main(base + ["--out", str(tmp_path / "bad"), "--custom-feature", f"probability={feature_file}:seed_hu"])
    assert rc == 2
    assert "cannot be named 'probability'" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(base + ["--out", str(out), "--features", "none", "--custom-feature", f"seed_hu={feature_file}:seed_hu"]) == 0
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert "seed_hu" in rows[0] and "firstorder_Mean" not in rows[0]
    assert rows[0]["seed_hu"] != ""


def test_custom_features_survive_an_empty_feature_selection_in_python():
    fs = build_feature_set(FeatureConfig(names=(), custom={"ctx_test_sqrt": "math:sqrt"}), 3)
    assert fs.names == ("ctx_test_sqrt",) and fs.backend_of == {"ctx_test_sqrt": "custom"}
    assert build_feature_set(FeatureConfig(names=()), 3).names == ()
