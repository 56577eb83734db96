"""Outputs of an analysis: curves.csv, run.json, curves.png, snapshots, strip.png, report.html."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepDreamAnalysisLib.errors import OutputError
from DeepDreamAnalysisLib.reference import ReferenceStats
from DeepDreamAnalysisLib.report import write_curves_csv, write_outputs
from DeepDreamAnalysisLib.result import AnalysisResult, Crop, Snapshot, Step
from DeepDreamAnalysisLib.volume import Volume

FEATURES = ("firstorder_Entropy", "shape2D_Elongation")


def _volume():
    direction = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    return Volume(np.zeros((5, 40, 50), np.float32), spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 5.0),
                  direction=direction)


def _result(reference=None, iterations=10):
    crop = Crop(start=(2, 10, 15), size=(1, 16, 16))
    steps, snaps = [], []
    for it in range(iterations):
        p = it / (iterations - 1)
        feats = {"firstorder_Entropy": math.nan if it < 3 else 1.0 + 0.1 * it,
                 "shape2D_Elongation": math.nan if it < 3 else 0.5}
        steps.append(Step(it, objective=-2.0 + it, probability=p, mask_voxels=0 if it < 3 else it, features=feats))
        if it % 3 == 0 or it == iterations - 1:
            img = np.full((1, 16, 16), 50.0 + it, np.float32)
            prob = np.full((1, 16, 16), p, np.float32)
            mask = np.zeros((1, 16, 16), bool)
            mask[0, 6:9, 6:6 + max(it // 3, 1)] = it >= 3
            snaps.append(Snapshot(it, img, prob, mask))
    meta = {"input": {"seed_ijk": [22, 18, 2]}, "device": "cpu", "random_seed": 0}
    return AnalysisResult(steps, snaps, crop, FEATURES, reference, meta, "completed")


def _reference():
    return ReferenceStats({"firstorder_Entropy": 1.5, "shape2D_Elongation": 0.7},
                          {"firstorder_Entropy": 0.5, "shape2D_Elongation": 0.1},
                          {"firstorder_Entropy": 20, "shape2D_Elongation": 20}, source="ref.json")


def test_curves_csv_columns_values_and_nan_as_empty(tmp_path):
    res = _result(_reference())
    path = write_curves_csv(res, tmp_path / "curves.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["iteration", "objective", "probability", "mask_voxels", *FEATURES,
                             "firstorder_Entropy_z", "shape2D_Elongation_z"]
    assert len(rows) == 10
    assert rows[0]["firstorder_Entropy"] == "" and rows[0]["firstorder_Entropy_z"] == ""
    assert float(rows[5]["firstorder_Entropy"]) == pytest.approx(1.5)
    assert float(rows[9]["firstorder_Entropy_z"]) == pytest.approx((1.9 - 1.5) / 0.5)
    assert float(rows[4]["shape2D_Elongation_z"]) == pytest.approx(-2.0)
    assert rows[7]["iteration"] == "7" and rows[7]["mask_voxels"] == "7"


def test_write_outputs_files_are_complete_and_valid(tmp_path):
    vol = _volume()
    res = _result(_reference())
    paths = write_outputs(res, tmp_path / "out", vol)
    out = tmp_path / "out"
    for key in ("csv", "json", "plot", "strip", "html"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["normalised"] is True
    assert run["features"] == list(FEATURES)
    assert run["first_iteration_above_0.5"] == 5
    assert run["final"]["firstorder_Entropy"]["value"] == pytest.approx(1.9)
    assert run["final"]["firstorder_Entropy"]["z"] == pytest.approx(0.8)
    assert run["reference_stats"]["features"]["shape2D_Elongation"]["std"] == 0.1
    assert run["random_seed"] == 0

    # snapshots: first, ~1/3, ~2/3, last of [0, 3, 6, 9]
    iters = sorted({int(k.split("@")[1]) for k in paths if "@" in k})
    assert iters == [0, 3, 6, 9]
    img = sitk.ReadImage(str(paths["image@6"]))
    assert img.GetSize() == (16, 16, 1)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing)
    np.testing.assert_allclose(img.GetDirection(), vol.direction.ravel())
    # the crop's first voxel (i, j, k) = (15, 10, 2) lies where it lies in the volume
    np.testing.assert_allclose(img.GetOrigin(), vol.index_to_physical((15, 10, 2)))
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), res.snapshots[2].image)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["mask@9"])))
    assert mask.dtype == np.uint8 and mask.sum() == 9
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["probability@9"])))
    assert prob.max() == pytest.approx(1.0)

    from matplotlib.image import imread
    for key in ("plot", "strip"):
        arr = imread(paths[key])
        assert arr.ndim == 3 and arr.shape[0] > 100 and arr.shape[1] > 100
    strip = imread(paths["strip"])
    red = (strip[..., 0] > 0.8) & (strip[..., 1] < 0.3) & (strip[..., 2] < 0.3)
    assert red.sum() > 5, "the seed's red cross is missing"

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "firstorder_Entropy" in page and "src=\"http" not in page


def test_without_reference_outputs_say_raw_values(tmp_path):
    res = _result(None)
    paths = write_outputs(res, tmp_path, _volume())
    run = json.loads(paths["json"].read_text())
    assert run["normalised"] is False
    assert "raw feature values" in run["note"]
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert not any(c.endswith("_z") for c in header)
    assert "raw feature values" in paths["html"].read_text()


def test_snapshot_format_nrrd(tmp_path):
    paths = write_outputs(_result(None), tmp_path, _volume(), formats=("nrrd",))
    assert paths["image@0"].name == "iter_0000_image.nrrd"
    assert sitk.ReadImage(str(paths["image@0"])).GetSize() == (16, 16, 1)


def test_unwritable_folder_raises_output_error_and_writes_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="Cannot write into the output folder"):
        write_outputs(_result(None), blocker / "out", _volume())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failed_write_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails (disk full) leaves neither a truncated file nor a temporary one.

    The full disk is simulated: SimpleITK's writer writes a few bytes and then fails.
    """
    import SimpleITK

    def full_disk(*args, **kwargs):
        Path(str(args[1])).write_bytes(b"partial")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(SimpleITK, "WriteImage", full_disk)
    with pytest.raises(OutputError, match="Check free space"):
        write_outputs(_result(None), tmp_path, _volume())
    assert not (tmp_path / "snapshots" / "iter_0000_image.nii.gz").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    import os
    import stat

    from DeepDreamAnalysisLib.atomic import write_text_atomic

    target = tmp_path / "shared.txt"
    write_text_atomic(target, "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert target.read_text() == "hello"


def test_run_outputs_carry_the_sensitivity_summary(tmp_path):
    import csv as _csv
    import json as _json

    from DeepDreamAnalysisLib.report import write_outputs

    result = _result(reference=_reference())
    paths = write_outputs(result, tmp_path / "out", _volume())
    rows = list(_csv.DictReader(paths["sensitivity"].open()))
    assert [r["feature"] for r in rows] == list(result.feature_names)
    run = _json.loads(paths["json"].read_text())
    assert [r["feature"] for r in run["sensitivity"]] == list(result.feature_names)
    assert "sensitivity score" in paths["html"].read_text()


def _snapshot_listing(out):
    on_disk = sorted(p.name for p in (out / "snapshots").iterdir())
    run = json.loads((out / "run.json").read_text())
    listed = sorted(Path(v).name for v in run["files"].values() if Path(v).parts[0] == "snapshots")
    return on_disk, listed


def test_rerun_into_the_same_folder_keeps_only_the_new_runs_snapshots(tmp_path):
    out = tmp_path / "out"
    write_outputs(_result(None, iterations=10), out, _volume())  # snapshots 0, 3, 6, 9
    first, _ = _snapshot_listing(out)
    assert "iter_0009_mask.nii.gz" in first and len(first) == 12

    paths = write_outputs(_result(None, iterations=5), out, _volume())  # snapshots 0, 3, 4
    on_disk, listed = _snapshot_listing(out)
    expected = sorted(f"iter_{i:04d}_{kind}.nii.gz" for i in (0, 3, 4) for kind in ("image", "probability", "mask"))
    assert on_disk == listed == expected
    assert paths["image@4"] == out / "snapshots" / "iter_0004_image.nii.gz" and paths["image@4"].is_file()
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(paths["image@4"])))[0, 0, 0] == pytest.approx(54.0)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary folders left behind"


def test_rerun_failing_part_way_leaves_the_old_snapshots_intact(tmp_path, monkeypatch):
    import SimpleITK

    out = tmp_path / "out"
    write_outputs(_result(None, iterations=10), out, _volume())
    before = {p.name: p.read_bytes() for p in (out / "snapshots").iterdir()}
    real_write = SimpleITK.WriteImage
    calls = []

    def fail_on_sixth(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 6:  # after iteration 3's probability (it differs between the runs)
            raise RuntimeError("No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(SimpleITK, "WriteImage", fail_on_sixth)
    with pytest.raises(OutputError, match="Check free space"):
        write_outputs(_result(None, iterations=5), out, _volume())
    assert {p.name: p.read_bytes() for p in (out / "snapshots").iterdir()} == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary folders left behind"
