"""Feature sets: values equal to pyradiomics on the same crop, NaN for empty and tiny masks, names,
backend choice, custom features and the 135-degree line features."""

import logging
import math
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepDreamAnalysisLib.config import FeatureConfig, paper_features
from DeepDreamAnalysisLib.errors import FeatureError
from DeepDreamAnalysisLib.features import NATIVE_FEATURES, build_feature_set, list_features, register_feature
from DeepDreamAnalysisLib.features.catalog import CLASS_FEATURES
from DeepDreamAnalysisLib.features.custom import line135_response, line135_selectivity, line_kernel, load_custom
from DeepDreamAnalysisLib.features.radiomics_backend import bounding_box

SPACING = (0.8, 0.7, 2.5)  # (i, j, k) mm
MORE = ("firstorder_Kurtosis", "glrlm_RunEntropy", "glszm_ZoneEntropy", "ngtdm_Busyness", "glcm_Idmn")


def _blob(shape=(9, 40, 44), seed=0, two_d=False):
    """A textured, irregular lesion-like object in noise: image [k, j, i] HU, mask bool."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(float)
    c = np.array(shape) / 2
    r = np.sqrt(((k - c[0]) * 2.5 / 1.5) ** 2 + ((j - c[1]) / 1.3) ** 2 + (i - c[2]) ** 2)
    mask = r < 9 + 2 * np.sin(3 * np.arctan2(j - c[1], i - c[2]))
    image = rng.normal(60, 25, shape) - 40 * mask + rng.normal(0, 15, shape) * mask
    if two_d:
        kk = shape[0] // 2
        return image[kk:kk + 1], mask[kk:kk + 1]
    return image, mask


def _pyradiomics_direct(image, mask, spacing, names, bin_width, force2d):
    """pyradiomics' own extractor on the same crop (mask bounding box + 2 voxels)."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    box = bounding_box(mask, pad=2)
    img = sitk.GetImageFromArray(np.ascontiguousarray(image[box], dtype=np.float64))
    msk = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    img.SetSpacing(spacing)
    msk.SetSpacing(spacing)
    ex = RadiomicsFeatureExtractor(binWidth=bin_width, force2D=force2d, force2Ddimension=0, additionalInfo=False)
    ex.disableAllFeatures()
    by_class = {}
    for n in names:
        cls, feat = n.split("_", 1)
        by_class.setdefault(cls, []).append(feat)
    ex.enableFeaturesByName(**by_class)
    out = ex.execute(img, msk)
    return {n: float(out[f"original_{n}"]) for n in names}


def test_catalog_lists_pyradiomics_non_deprecated_features():
    from radiomics import getFeatureClasses

    for cls, feature_class in getFeatureClasses().items():
        expected = sorted(n for n, deprecated in feature_class.getFeatureNames().items() if not deprecated)
        assert sorted(CLASS_FEATURES[cls]) == expected, cls


def test_list_features_groups_for_2d_and_3d():
    g3, g2 = list_features(3), list_features(2)
    assert "shape" in g3 and "shape2D" not in g3 and "shape2D" in g2 and "shape" not in g2
    assert "glcm_Contrast" in g3["glcm"] and "shape2D_Elongation" in g2["shape2D"]
    assert {"line135_response", "line135_selectivity"} <= set(g2["custom"])
    assert list(g3)[:3] == ["firstorder", "shape", "glcm"]


@pytest.mark.parametrize("two_d", [False, True])
def test_pyradiomics_backend_equals_pyradiomics_called_directly(two_d):
    image, mask = _blob(two_d=two_d)
    dims = 2 if two_d else 3
    names = paper_features(dims) + MORE
    fs = build_feature_set(FeatureConfig(names=names, backend="pyradiomics", bin_width=10.0), dims)
    assert set(fs.backend_of.values()) == {"pyradiomics"}
    ours = fs.compute(image, mask, SPACING)
    theirs = _pyradiomics_direct(image, mask, SPACING, names, 10.0, two_d)
    assert list(ours) == list(names)
    for n in names:
        assert ours[n] == pytest.approx(theirs[n], rel=1e-12, abs=1e-12), n
    assert all(math.isfinite(v) for v in ours.values())


def test_values_do_not_depend_on_how_much_image_surrounds_the_mask():
    image, mask = _blob()
    fs = build_feature_set(FeatureConfig(names=paper_features(3), backend="pyradiomics"), 3)
    full = fs.compute(image, mask, SPACING)
    box = bounding_box(mask, pad=1)
    cropped = fs.compute(image[box], mask[box], SPACING)
    for n in full:
        assert cropped[n] == pytest.approx(full[n], rel=1e-12), n


@pytest.mark.parametrize("backend", ["auto", "pyradiomics"])
@pytest.mark.parametrize("dims", [2, 3])
def test_empty_and_one_voxel_masks_give_nan(backend, dims):
    image, _ = _blob(two_d=dims == 2)
    names = paper_features(dims) + ("line135_response",)
    fs = build_feature_set(FeatureConfig(names=names, backend=backend), dims)
    empty = np.zeros(image.shape, bool)
    one = empty.copy()
    one[0, 10, 10] = True
    for m in (empty, one):
        values = fs.compute(image, m, SPACING)
        assert list(values) == list(names)
        assert all(math.isnan(v) for v in values.values()), values


def test_min_mask_voxels_setting():
    image, _ = _blob(two_d=True)
    m = np.zeros(image.shape, bool)
    m[0, 10:13, 10:13] = True  # 9 voxels
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean",), backend="pyradiomics", min_mask_voxels=10), 2)
    assert math.isnan(fs.compute(image, m, SPACING)["firstorder_Mean"])
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean",), backend="pyradiomics", min_mask_voxels=9), 2)
    assert fs.compute(image, m, SPACING)["firstorder_Mean"] == pytest.approx(image[m].mean())


@pytest.mark.parametrize("backend", ["auto", "pyradiomics"])
def test_degenerate_masks_never_raise(backend, caplog):
    """One-row and one-column masks, a two-voxel mask, a constant image: NaN or a value, no exception,
    and nothing printed at ERROR level."""
    image, _ = _blob(two_d=True)
    names = paper_features(2) + ("glrlm_RunEntropy", "ngtdm_Coarseness", "glszm_ZoneEntropy")
    fs = build_feature_set(FeatureConfig(names=names, backend=backend), 2)
    masks = []
    for sl in [(0, 10, slice(5, 15)), (0, slice(5, 15), 10), (0, 10, slice(5, 7))]:
        m = np.zeros(image.shape, bool)
        m[sl] = True
        masks.append(m)
    with caplog.at_level(logging.WARNING):
        for m in masks:
            values = fs.compute(image, m, SPACING)
            assert set(values) == set(names)
        values = fs.compute(np.full(image.shape, 40.0), masks[0], SPACING)
        assert values["firstorder_RootMeanSquared"] == pytest.approx(40.0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_torch_tensor_input_gives_the_same_values():
    image, mask = _blob(two_d=True)
    names = paper_features(2) + ("glrlm_RunEntropy", "line135_selectivity")
    fs = build_feature_set(FeatureConfig(names=names), 2)
    a = fs.compute(image, mask, SPACING)
    b = fs.compute(torch.from_numpy(image.astype(np.float32)), torch.from_numpy(mask), SPACING)
    for n in names:
        assert b[n] == pytest.approx(a[n], rel=1e-4), n


def test_default_names_are_the_papers():
    assert build_feature_set(FeatureConfig(), 3).names == paper_features(3)
    assert build_feature_set(FeatureConfig(), 2).names == paper_features(2)
    assert build_feature_set(FeatureConfig(names=("glcm_Contrast", "firstorder_Entropy")), 2).names == (
        "glcm_Contrast", "firstorder_Entropy")


def test_unknown_name_lists_close_matches():
    with pytest.raises(FeatureError) as err:
        build_feature_set(FeatureConfig(names=("firstorder_Entrpy",)), 3)
    msg = str(err.value)
    assert "firstorder_Entropy" in msg and "deepdream-analysis features" in msg
    with pytest.raises(FeatureError, match="shape2D_"):
        build_feature_set(FeatureConfig(names=("shape_Sphericity",)), 2)
    with pytest.raises(FeatureError, match="Unknown feature 'banana'"):
        build_feature_set(FeatureConfig(names=("banana",)), 3)


def test_backend_choice():
    names = paper_features(3)
    assert set(names) <= NATIVE_FEATURES, "the native backend should cover the paper's features"
    auto = build_feature_set(FeatureConfig(names=names), 3)
    assert set(auto.backend_of.values()) == {"native"}
    mixed = build_feature_set(FeatureConfig(names=names + ("ngtdm_Busyness", "line135_response")), 3)
    assert mixed.backend_of["ngtdm_Busyness"] == "pyradiomics"
    assert mixed.backend_of["glcm_Contrast"] == "native"
    assert mixed.backend_of["line135_response"] == "custom"
    with pytest.raises(FeatureError, match="ngtdm_Busyness"):
        build_feature_set(FeatureConfig(names=("ngtdm_Busyness",), backend="native"), 3)
    forced = build_feature_set(FeatureConfig(names=names, backend="pyradiomics"), 3)
    assert set(forced.backend_of.values()) == {"pyradiomics"}


def test_native_and_pyradiomics_backends_agree_on_the_papers_features():
    image, mask = _blob()
    a = build_feature_set(FeatureConfig(backend="native"), 3).compute(image, mask, SPACING)
    b = build_feature_set(FeatureConfig(backend="pyradiomics"), 3).compute(image, mask, SPACING)
    for n in a:
        assert a[n] == pytest.approx(b[n], rel=1e-4), n


def test_without_pyradiomics(monkeypatch, caplog):
    """pyradiomics missing: auto keeps the native features and says which it dropped and how to
    install pyradiomics; an explicit pyradiomics backend raises with the install command."""
    monkeypatch.setitem(sys.modules, "radiomics", None)  # makes `import radiomics` fail
    with caplog.at_level(logging.WARNING):
        fs = build_feature_set(FeatureConfig(names=("firstorder_Entropy", "glrlm_RunEntropy", "ngtdm_Busyness")), 3)
    assert fs.names == ("firstorder_Entropy", "glrlm_RunEntropy")
    assert "ngtdm_Busyness" in caplog.text and "pip install" in caplog.text
    with pytest.raises(FeatureError, match="pip install"):
        build_feature_set(FeatureConfig(names=("firstorder_Entropy",), backend="pyradiomics"), 3)


# ----------------------------------------------------------------------------- custom features


def _write_module(folder, name, body):
    path = folder / f"{name}.py"
    path.write_text(body)
    return path


FEATURE_SOURCE = """
import numpy as np

def masked_max(image, mask, spacing):
    return float(image[mask].max())

def voxel_volume(image, mask, spacing):
    return float(mask.sum() * spacing[0] * spacing[1] * spacing[2])

not_callable = 3
"""


def test_custom_feature_from_module_name(tmp_path, monkeypatch):
    _write_module(tmp_path, "my_lab_features", FEATURE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    image, mask = _blob(two_d=True)
    fs = build_feature_set(FeatureConfig(names=("glcm_Contrast", "vmax"),
                                         custom={"vmax": "my_lab_features:masked_max"}), 2)
    assert fs.backend_of["vmax"] == "custom"
    assert fs.compute(image, mask, SPACING)["vmax"] == pytest.approx(image[mask].max())


def test_custom_feature_from_file_path_and_default_names(tmp_path):
    path = _write_module(tmp_path, "feats with space", FEATURE_SOURCE)
    image, mask = _blob(two_d=True)
    fs = build_feature_set(FeatureConfig(custom={"vol": f"{path}:voxel_volume"}), 2)
    assert fs.names == paper_features(2) + ("vol",)
    assert fs.compute(image, mask, SPACING)["vol"] == pytest.approx(mask.sum() * 0.8 * 0.7 * 2.5)


def test_custom_feature_load_errors(tmp_path):
    path = _write_module(tmp_path, "feats", FEATURE_SOURCE)
    broken = _write_module(tmp_path, "broken", "import no_such_module_here\n")
    cases = [
        ("no_colon_here", "module:function"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        (f"{tmp_path}/missing.py:f", "does not exist"),
        (f"{path}:nope", "has no attribute 'nope'"),
        (f"{path}:not_callable", "not a function"),
        (f"{broken}:f", "importing .*broken.py failed"),
    ]
    for target, message in cases:
        with pytest.raises(FeatureError, match=message):
            load_custom(target)
    with pytest.raises(FeatureError, match="Custom feature"):
        build_feature_set(FeatureConfig(custom={"x": "no_such_module_xyz:f"}), 2)


def test_raising_or_non_number_custom_feature_gives_nan_and_one_warning(caplog):
    def boom(image, mask, spacing):
        raise ZeroDivisionError("division by zero in my feature")

    register_feature("test_boom", boom)
    register_feature("test_text", lambda image, mask, spacing: "large")
    register_feature("test_np", lambda image, mask, spacing: np.float32(2.5))
    image, mask = _blob(two_d=True)
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean", "test_boom", "test_text", "test_np")), 2)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            values = fs.compute(image, mask, SPACING)
            assert math.isnan(values["test_boom"]) and math.isnan(values["test_text"])
            assert values["test_np"] == 2.5
            assert values["firstorder_Mean"] == pytest.approx(image[mask].mean())
    boom_warnings = [r for r in caplog.records if "test_boom" in r.getMessage()]
    assert len(boom_warnings) == 1 and "ZeroDivisionError" in boom_warnings[0].getMessage()
    assert len([r for r in caplog.records if "test_text" in r.getMessage()]) == 1
    assert set(fs.failures) == {"test_boom", "test_text"}


# ----------------------------------------------------------------------------- line features


def _lines(angle, shape=(1, 41, 41), contrast=100.0, seed=3):
    """Short bright segments along 135 degrees (array[j + t, i + t]) or 45 degrees (array[j - t, i + t])."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 5, shape)
    for j0 in range(6, 35, 7):
        for i0 in range(6, 35, 9):
            for t in range(-3, 4):
                jj = j0 + t
                ii = i0 + t if angle == 135 else i0 - t
                img[0, jj, ii] += contrast
    return img


def test_line_kernel_orientation_and_zero_mean():
    k135, k45 = line_kernel(135), line_kernel(45)
    assert abs(k135.sum()) < 1e-12 and abs(k45.sum()) < 1e-12
    assert np.all(np.diag(k135) > 0.1) and np.all(np.diag(np.fliplr(k45)) > 0.1)
    np.testing.assert_allclose(k45, np.fliplr(k135))
    k0 = line_kernel(0)
    assert np.all(k0[3] > 0.1) and np.all(k0[:3] < 0)


def test_line135_responds_more_to_135_than_to_45_degree_lines():
    mask = np.ones((1, 41, 41), bool)
    a, b = _lines(135), _lines(45)
    assert line135_response(a, mask) > 2 * line135_response(b, mask)
    assert line135_response(a, mask) == pytest.approx(100.0, rel=0.15)
    assert line135_selectivity(a, mask) > 0.5
    assert line135_selectivity(b, mask) < -0.5
    noise = np.random.default_rng(0).normal(0, 30, (1, 41, 41))
    assert abs(line135_selectivity(noise, mask)) < 0.2


def test_line135_selectivity_does_not_track_contrast():
    mask = np.ones((1, 41, 41), bool)
    low, high = _lines(135, contrast=50.0), _lines(135, contrast=400.0)
    assert line135_response(high, mask) > 5 * line135_response(low, mask)
    assert line135_selectivity(high, mask) == pytest.approx(line135_selectivity(low, mask), abs=0.1)
    assert math.isnan(line135_selectivity(np.full((1, 9, 9), 7.0), np.ones((1, 9, 9), bool)))


def test_line_features_look_inside_the_mask_bounding_box():
    img = _lines(45)
    img[0, 30:38, 30:38] = 0.0
    for t in range(-3, 4):
        img[0, 34 + t, 34 + t] = 100.0  # one 135-degree segment in the corner
    corner = np.zeros(img.shape, bool)
    corner[0, 31:38, 31:38] = True
    elsewhere = np.zeros(img.shape, bool)
    elsewhere[0, 5:15, 5:15] = True
    assert line135_selectivity(img, corner) > 0.5 > line135_selectivity(img, elsewhere)
    assert math.isnan(line135_response(img, np.zeros(img.shape, bool)))
