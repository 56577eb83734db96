"""Reference statistics: round trip, z-scores on a hand-made example, lesions from masks, errors."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from DeepDreamAnalysisLib.config import FeatureConfig
from DeepDreamAnalysisLib.errors import ImageError, ReferenceStatsError
from DeepDreamAnalysisLib.features import build_feature_set
from DeepDreamAnalysisLib.reference import ReferenceStats, compute_reference
from DeepDreamAnalysisLib.volume import Volume


def _stats(**over):
    data = dict(mean={"firstorder_Mean": 10.0, "glcm_Contrast": 2.0},
                std={"firstorder_Mean": 4.0, "glcm_Contrast": 0.5},
                n={"firstorder_Mean": 12, "glcm_Contrast": 11},
                settings={"bin_width": 25.0, "spatial_dims": 2}, sources=[{"image": "a.nii.gz", "mask": "b.nii.gz"}],
                lesion_count=12)
    data.update(over)
    return ReferenceStats(**data)


def test_round_trip_and_zscores(tmp_path):
    s = _stats()
    path = s.save(tmp_path / "stats.json")
    t = ReferenceStats.load(path)
    assert t.mean == s.mean and t.std == s.std and t.n == s.n
    assert t.settings["bin_width"] == 25.0 and t.lesion_count == 12 and t.source == str(path)
    assert "glcm_Contrast" in t and "glcm_Idmn" not in t
    np.testing.assert_allclose(t.zscore("firstorder_Mean", [10.0, 14.0, 2.0, math.nan]), [0.0, 1.0, -2.0, math.nan])
    np.testing.assert_allclose(t.zscore("glcm_Contrast", 3.0), 2.0)
    assert not list(tmp_path.glob(".*")), "temporary file left behind"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"features": 3}', "lacks the 'features' object"),
    ('{"features": {}}', "holds no features"),
    ('{"features": {"glcm_Contrast": {"mean": 1.0, "n": 3}}}', "glcm_Contrast lacks std"),
    ('{"features": {"glcm_Contrast": {"mean": "x", "std": 1, "n": 3}}}', "must be numbers"),
    ('{"features": {"glcm_Contrast": {"mean": 1.0, "std": 0.0, "n": 3}}}',
     "standard deviation of glcm_Contrast is 0.0.*more reference lesions"),
    ('{"features": {"glcm_Contrast": {"mean": 1.0, "std": null, "n": 1}}}',
     "standard deviation of glcm_Contrast is nan.*more reference lesions"),
])
def test_malformed_files_name_the_problem(tmp_path, text, message):
    p = tmp_path / "stats.json"
    p.write_text(text)
    with pytest.raises(ReferenceStatsError, match=message):
        ReferenceStats.load(p)


def test_missing_file():
    with pytest.raises(ReferenceStatsError, match="not found.*deepdream-analysis reference"):
        ReferenceStats.load("/nonexistent/stats.json")


def test_require_names_missing_features_and_how_to_recompute(tmp_path):
    s = ReferenceStats.load(_stats().save(tmp_path / "stats.json"))
    s.require(["firstorder_Mean"])
    with pytest.raises(ReferenceStatsError) as err:
        s.require(["firstorder_Mean", "shape2D_Elongation", "glcm_Idmn"])
    msg = str(err.value)
    assert "shape2D_Elongation, glcm_Idmn" in msg and "deepdream-analysis reference" in msg
    assert "--features firstorder_Mean,shape2D_Elongation,glcm_Idmn" in msg
    with pytest.raises(ReferenceStatsError, match="glcm_Idmn"):
        s.zscore("glcm_Idmn", [1.0])


def _label_map():
    """Image [k, j, i] and a label map with three 3D lesions (label 2) and one of label 1."""
    rng = np.random.default_rng(1)
    img = rng.normal(100, 10, (6, 40, 40)).astype(np.float32)
    lab = np.zeros(img.shape, np.float32)
    lab[1:4, 5:11, 5:11] = 2      # 3 slices x 36
    lab[2:5, 20:24, 25:33] = 2    # 3 slices x 32
    lab[1:3, 30:37, 5:9] = 2      # 2 slices x 28
    lab[4, 30:32, 30:32] = 1      # another label
    lab[0, 0, 39] = 2             # one voxel: skipped
    for box in [(slice(1, 4), slice(5, 11), slice(5, 11))]:
        img[box] -= 40
    return img, lab


def test_compute_reference_3d_components_match_a_hand_computation(tmp_path):
    img, lab = _label_map()
    spacing = (0.8, 0.8, 2.0)
    sitk_img = sitk.GetImageFromArray(img)
    sitk_img.SetSpacing(spacing)
    sitk_lab = sitk.GetImageFromArray(lab.astype(np.uint8))
    sitk_lab.SetSpacing(spacing)
    sitk.WriteImage(sitk_img, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(sitk_lab, str(tmp_path / "seg.nii.gz"))
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean", "shape_VoxelVolume")), 3)
    stats = compute_reference([(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz")], fs, label=2)
    assert stats.lesion_count == 3 and stats.n["firstorder_Mean"] == 3
    means = [img[1:4, 5:11, 5:11].mean(), img[2:5, 20:24, 25:33].mean(), img[1:3, 30:37, 5:9].mean()]
    assert stats.mean["firstorder_Mean"] == pytest.approx(np.mean(means), rel=1e-6)
    assert stats.std["firstorder_Mean"] == pytest.approx(np.std(means, ddof=1), rel=1e-6)
    volumes = np.array([108, 96, 56]) * 0.8 * 0.8 * 2.0
    assert stats.mean["shape_VoxelVolume"] == pytest.approx(volumes.mean())
    assert stats.settings["spatial_dims"] == 3 and stats.sources[0]["lesions"] == 3
    # all non-zero labels: the label-1 lesion counts too
    assert compute_reference([(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz")], fs).lesion_count == 4
    # the file round-trips
    again = ReferenceStats.load(stats.save(tmp_path / "ref.json"))
    assert again.mean == stats.mean and json.loads((tmp_path / "ref.json").read_text())["lesion_count"] == 3


def test_compute_reference_2d_counts_each_slice_component():
    img, lab = _label_map()
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean", "shape2D_PixelSurface")), 2)
    stats = compute_reference([(Volume(img, (0.5, 0.5, 3.0)), Volume(lab, (0.5, 0.5, 3.0)))], fs, label=2)
    assert stats.lesion_count == 3 + 3 + 2
    areas = [36] * 3 + [32] * 3 + [28] * 2
    assert stats.mean["shape2D_PixelSurface"] == pytest.approx(np.mean(areas) * 0.25)


def test_compute_reference_errors():
    img, lab = _label_map()
    fs = build_feature_set(FeatureConfig(names=("firstorder_Mean",)), 3)
    with pytest.raises(ImageError, match="same grid"):
        compute_reference([(Volume(img), Volume(lab[:, :30]))], fs)
    with pytest.raises(ReferenceStatsError, match="No lesion.*label 7"):
        compute_reference([(Volume(img), Volume(lab))], fs, label=7)
    one = np.zeros_like(lab)
    one[1:3, 5:9, 5:9] = 1
    with pytest.raises(ReferenceStatsError, match="standard deviation of firstorder_Mean.*more reference lesions"):
        compute_reference([(Volume(img), Volume(one))], fs)
