"""Reliability (issue 6) for the engine and the command line: bad input is refused with a message
naming the problem and the fix, leaving nothing half-made and the user's files untouched; faults
during a run keep what came before; cancellation marks the partial result.

What other files already cover is not repeated here: the model loader's messages for every bad model
file (test_models.py), card fields (test_model_card.py), malformed reference files (test_reference.py),
NaN voxels / seed outside / multichannel models (test_analysis.py), NaN gradients and model exceptions
in the loop (test_dream.py), Ctrl-C (test_cli.py), failed image writes (test_report.py).
"""

import csv
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import EXIT_BAD_INPUT, EXIT_FAULT, main
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import ImageError, OutputError, SeedError
from DeepDreamAnalysisLib.features import register_feature
from DeepDreamAnalysisLib.report import write_outputs
from DeepDreamAnalysisLib.runner import AnalysisRunner
from DeepDreamAnalysisLib.volume import Volume, read_volume

from tiny_models import TinyModel, liver_like, tiny_card, tiny_model, tiny_net, write_case

FEATURES = ("firstorder_RootMeanSquared", "firstorder_Entropy")
FAST = ["--iterations", "4", "--step", "400", "--features", ",".join(FEATURES)]
SEED = (24, 20, 1)


def _config(iterations=6, names=FEATURES, **dream):
    dream.setdefault("step", 400.0)
    dream.setdefault("device", "cpu")
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, **dream),
                          features=FeatureConfig(names=names, backend="native"), snapshot_every=2)


@pytest.fixture
def volume():
    return Volume(liver_like((3, 40, 48)), spacing=(0.8, 0.8, 2.5))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def _digest(folder: Path) -> dict:
    """name -> sha256 of every file under ``folder`` (to show the user's files are untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(case, out, *extra, image=None, model=None, seed="24,20,1"):
    return main(["run", "--image", str(image or case["image"]), "--model", str(model or case["model"]),
                 "--seed", seed, "--out", str(out), *FAST, *extra])


def _refused(capsys, code, *texts):
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "error: " in err
    for t in texts:
        assert t in err, (t, err)
    return err


# ------------------------------------------------------------------------------------------- image


def _write_4d(path: Path, time_points: int):
    frames = [sitk.GetImageFromArray(liver_like((3, 40, 48), seed=t)) for t in range(time_points)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))


def test_4d_series_is_refused_before_anything_is_written(case, tmp_path, capsys):
    image = tmp_path / "series.nii.gz"
    _write_4d(image, 3)
    before = _digest(tmp_path)
    code = _cli(case, tmp_path / "out", image=image)
    _refused(capsys, code, "4D image (3 time points)", "Extract one time point")
    assert not (tmp_path / "out").exists(), "an output folder was left behind"
    assert _digest(tmp_path) == before


def test_4d_image_with_one_time_point_is_a_3d_volume(tmp_path):
    image = tmp_path / "one.nii.gz"
    _write_4d(image, 1)
    assert read_volume(image).array.shape == (3, 40, 48)


def test_vector_image_is_refused(case, tmp_path, capsys):
    image = tmp_path / "rgb.nrrd"
    channels = [sitk.GetImageFromArray(liver_like((3, 40, 48), seed=c)) for c in range(3)]
    sitk.WriteImage(sitk.Compose(channels), str(image))
    code = _cli(case, tmp_path / "deep" / "out", image=image)
    _refused(capsys, code, "3 components per voxel", "scalar", "Extract one channel")
    assert not (tmp_path / "deep").exists()


def test_label_map_is_analysed_as_a_scalar_image_with_a_warning(tmp_path, caplog):
    """Decision: a label map is a scalar volume, so it is accepted; a warning says it looks like one."""
    labels = np.zeros((3, 40, 48), np.uint8)
    labels[:, 10:30, 10:40] = 1
    labels[:, 18:22, 20:26] = 2
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    with caplog.at_level(logging.WARNING):
        result = run_analysis(read_volume(path), SEED, tiny_model(2), _config(iterations=3))
    assert result.status == "completed"
    assert "looks like a label map" in caplog.text and "0, 1, 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a CT (many values) gives no such warning
        run_analysis(Volume(np.round(liver_like((3, 40, 48)))), SEED, tiny_model(2), _config(iterations=2))
    assert "label map" not in caplog.text


def test_constant_image_runs_with_a_warning_and_noise_start_needs_no_image(caplog):
    """Decision: a constant image is a valid start (the dream grows from a blank image); it is warned about."""
    flat = Volume(np.full((3, 40, 48), 40.0, np.float32))
    with caplog.at_level(logging.WARNING):
        result = run_analysis(flat, SEED, tiny_model(2), _config(iterations=4))
    assert result.status == "completed"
    assert result.steps[-1].objective > result.steps[0].objective
    assert "constant (40.0 everywhere)" in caplog.text and "right volume" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_analysis(flat, SEED, tiny_model(2), _config(iterations=2, start="noise"))
    assert "constant" not in caplog.text


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_voxels_are_refused(volume, bad):
    volume.array[1, 3, 4] = bad
    with pytest.raises(ImageError, match="1 NaN or infinite voxels. Replace them"):
        run_analysis(volume, SEED, tiny_model(2), _config())


# --------------------------------------------------------------------------------------------- seed


class FieldOfView(torch.nn.Module):
    """A network that only sees voxels with i >= 24 (as one with a fixed field-of-view mask)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_net(2)

    def forward(self, x):
        fov = torch.zeros_like(x)
        fov[..., 24:] = 1.0
        return self.inner(x * fov)


def test_seed_where_the_model_cannot_see_is_refused(volume):
    model = TinyModel(FieldOfView(), tiny_card(2, roi=[40, 48]))
    with pytest.raises(SeedError, match="does not depend on the image.*Pick a seed inside the region"):
        run_analysis(volume, (5, 20, 1), model, _config())
    assert run_analysis(volume, (36, 20, 1), model, _config(iterations=2)).status == "completed"


def test_seed_that_is_not_numbers_is_refused(volume):
    for seed in [(np.inf, 1, 1), ("a", 1, 1), (1, 2)]:
        with pytest.raises(SeedError, match="three"):
            run_analysis(volume, seed, tiny_model(2), _config())


# ----------------------------------------------------------------------------- model, card, reference


def _bad_model_files(folder: Path, case) -> dict:
    folder.mkdir(exist_ok=True)
    files = {}
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    files["corrupt"] = folder / "corrupt.pt"
    files["corrupt"].write_bytes(case["model"].read_bytes()[:300])
    files["nifti_as_pt"] = folder / "image.pt"
    files["nifti_as_pt"].write_bytes(case["image"].read_bytes())
    files["state_dict"] = folder / "weights.pth"
    torch.save(tiny_net(2).state_dict(), files["state_dict"])
    card = json.loads(case["card"].read_text())
    for f in files.values():
        Path(str(f) + ".card.json").write_text(json.dumps(card))
    return files


@pytest.mark.parametrize("kind,texts", [
    ("empty", ["is empty (0 bytes)", "save or copy it again"]),
    ("corrupt", ["corrupt"]),
    ("nifti_as_pt", ["not a model file"]),
    ("state_dict", ["network"]),
])
def test_bad_model_file_is_refused_and_nothing_is_written(case, tmp_path, capsys, kind, texts):
    files = _bad_model_files(tmp_path / "models", case)
    before = _digest(tmp_path)
    code = _cli(case, tmp_path / "out", model=files[kind])
    _refused(capsys, code, *texts)
    assert not (tmp_path / "out").exists()
    assert _digest(tmp_path) == before


def test_card_with_wrong_types_is_refused_naming_the_field(case, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(case["model"], folder / "tiny.pt")
    card = json.loads(case["card"].read_text())
    card["out_channels"] = "two"
    (folder / "tiny.pt.card.json").write_text(json.dumps(card))
    code = _cli(case, tmp_path / "out", model=folder / "tiny.pt")
    _refused(capsys, code, "out_channels must be an integer", "'two'")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_kept_when_input_is_refused(case, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    code = _cli(case, out, "--overwrite", seed="9999,0,0")  # a folder of other files needs --overwrite
    _refused(capsys, code, "outside the volume", "Pick a seed inside")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "the user's own file"


@pytest.mark.parametrize("text,message", [
    ('{"features": {"firstorder_RootMeanSquared": {"mean": 1, "std": 0, "n": 5}}}', "standard deviation"),
    ('{"features": [1, 2]}', "lacks the 'features' object"),
    ("not json at all", "not valid JSON"),
])
def test_bad_reference_file_is_refused_before_the_run(case, tmp_path, capsys, text, message):
    ref = tmp_path / "stats.json"
    ref.write_text(text)
    code = _cli(case, tmp_path / "out", "--reference", str(ref))
    _refused(capsys, code, message, "stats.json")
    assert not (tmp_path / "out").exists()
    assert ref.read_text() == text


# ------------------------------------------------------------------------------------------ features


def test_custom_feature_that_raises_or_returns_text_gives_nan_and_the_run_completes(volume, tmp_path, caplog):
    def fails(image, mask, spacing):
        raise RuntimeError("my feature broke")

    register_feature("rel_fails", fails)
    register_feature("rel_text", lambda image, mask, spacing: "big")
    register_feature("rel_ok", lambda image, mask, spacing: float(mask.sum()))
    config = _config(iterations=8, names=("firstorder_RootMeanSquared", "rel_fails", "rel_text", "rel_ok"))
    with caplog.at_level(logging.WARNING):
        result = run_analysis(volume, SEED, tiny_model(2), config)
    assert result.status == "completed"
    assert np.isnan(result.column("rel_fails")).all() and np.isnan(result.column("rel_text")).all()
    masked = [s for s in result.steps if s.mask_voxels >= 2]
    assert masked, "the dream never made a mask; the test needs one"
    assert all(s.features["rel_ok"] == s.mask_voxels for s in masked)
    assert set(result.metadata["feature_failures"]) == {"rel_fails", "rel_text"}
    assert "RuntimeError: my feature broke" in result.metadata["feature_failures"]["rel_fails"]
    assert len([r for r in caplog.records if "rel_fails" in r.getMessage()]) == 1
    paths = write_outputs(result, tmp_path, volume)
    run = json.loads(paths["json"].read_text())
    assert run["final"]["rel_fails"]["value"] is None and "rel_text" in run["feature_failures"]


# ------------------------------------------------------------------------------- paths and end to end


def test_paths_with_spaces_and_non_ascii_letters_end_to_end(case, tmp_path):
    folder = tmp_path / "Données patient ü" / "Bild 1 – Leber"
    folder.mkdir(parents=True)
    image = folder / "CT Leber é.nii.gz"
    model = folder / "modèle ø.pt"
    shutil.copy(case["image"], image)
    shutil.copy(case["model"], model)
    shutil.copy(case["card"], folder / "modèle ø.pt.card.json")
    out = folder / "Ergebnisse ß"
    assert _cli(case, out, image=image, model=model) == 0
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "completed" and run["model"]["path"] == str(model)
    for key, rel in run["files"].items():
        assert (out / rel).is_file(), key
    assert sitk.ReadImage(str(out / run["files"]["image@0"])).GetSize() == (24, 24, 1)


# ------------------------------------------------------------------------------------- run faults


class FailsAfter(torch.nn.Module):
    """The tiny network, raising ``error`` from its ``calls``-th forward of the transformed copies with
    gradient on (the default method's; the seed-window probes and the forwards without gradient are
    not counted)."""

    def __init__(self, error: BaseException, calls: int):
        super().__init__()
        self.inner = tiny_net(2)
        self.error, self.after, self.calls = error, calls, 0

    def forward(self, x):
        self.calls += bool(x.requires_grad) and x.shape[0] > 1
        if self.calls > self.after:
            raise self.error
        return self.inner(x)


def test_out_of_gpu_memory_is_a_fault_that_suggests_a_smaller_crop_and_the_cpu(volume, tmp_path):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    model = TinyModel(FailsAfter(oom, 3), tiny_card(2))
    result = run_analysis(volume, SEED, model, _config(iterations=10))
    assert result.status == "fault" and len(result.steps) == 3
    message = result.metadata["fault"]
    assert "Out of GPU memory at iteration 3" in message
    assert "smaller crop (roi_size)" in message and "--device cpu" in message
    run = json.loads(write_outputs(result, tmp_path, volume)["json"].read_text())
    assert run["status"] == "fault" and run["fault"] == message and run["iterations_recorded"] == 3


def test_exception_inside_the_model_keeps_the_iterations_before_it(volume, tmp_path):
    model = TinyModel(FailsAfter(ValueError("shape trouble in block 3"), 4), tiny_card(2))
    runner = AnalysisRunner(volume, SEED, model, _config(iterations=10)).start()
    assert runner.join(60)
    assert runner.error is None, "a model exception must come back as a fault, not an error"
    result = runner.result
    assert result.status == "fault" and [s.iteration for s in result.steps] == [0, 1, 2, 3]
    assert "ValueError at iteration 4: shape trouble in block 3" in result.metadata["fault"]
    assert result.snapshots[-1].iteration <= 3


class NanAfterCalls(torch.nn.Module):
    """TorchScript-able: the tiny network's logits, NaN from the ``after``-th forward of a batch of
    transformed copies on (a buffer counts; the loader's and the seed window's probes are batches of one)."""

    def __init__(self, after: int):
        super().__init__()
        self.inner = tiny_net(2)
        self.after = after
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if x.shape[0] > 1:
            self.calls.add_(1)
        out = self.inner(x)
        if int(self.calls) > self.after:
            out = out * float("nan")
        return out


def test_nan_gradient_in_the_command_line_writes_the_partial_result_and_exits_1(case, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.jit.save(torch.jit.script(NanAfterCalls(6)), str(folder / "nan.pt"))
    shutil.copy(case["card"], folder / "nan.pt.card.json")
    out = tmp_path / "out"
    code = main(["run", "--image", str(case["image"]), "--model", str(folder / "nan.pt"), "--seed", "24,20,1",
                 "--out", str(out), "--iterations", "50", "--step", "400", "--features", ",".join(FEATURES)])
    captured = capsys.readouterr()
    assert code == EXIT_FAULT, captured.err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "fault"
    assert "The gradient became NaN or infinite at iteration" in run["fault"] and "smaller step" in run["fault"]
    bad = int(run["fault"].split("at iteration ")[1].split(";")[0])
    assert 0 < bad < 6  # iteration 0 used two of the good calls (the copies' windows and their audit)
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["iteration"]) for r in rows] == list(range(bad))
    assert all(math.isfinite(float(r["probability"])) for r in rows)
    assert (out / "strip.png").is_file() and (out / "report.html").is_file()
    assert "fault: The gradient became NaN" in captured.err


# ------------------------------------------------------------------------------------ output folder


def test_output_folder_removed_during_the_run_is_made_again(volume, tmp_path):
    """Decision: the results are what matters; a folder deleted while the run went on is recreated."""
    out = tmp_path / "results"
    out.mkdir()

    def remove(progress):
        if progress.step.iteration == 2 and out.exists():
            shutil.rmtree(out)

    result = run_analysis(volume, SEED, tiny_model(2), _config(iterations=5), on_progress=remove)
    assert not out.exists()
    paths = write_outputs(result, out, volume)
    assert json.loads(paths["json"].read_text())["status"] == "completed"


def test_output_folder_replaced_by_a_file_during_the_run_raises_output_error(volume, tmp_path):
    out = tmp_path / "results"
    result = run_analysis(volume, SEED, tiny_model(2), _config(iterations=3))
    out.write_text("someone put a file here")
    with pytest.raises(OutputError, match="Cannot write into the output folder.*Choose a writable folder"):
        write_outputs(result, out / "run1", volume)
    assert out.read_text() == "someone put a file here"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_disk_full_while_writing_leaves_only_complete_files(volume, tmp_path, monkeypatch):
    """The full disk is simulated: os.replace (the last step of every atomic write) fails with ENOSPC
    from the fourth file on. No tmpfs is mounted: the test must run without root."""
    result = run_analysis(volume, SEED, tiny_model(2), _config(iterations=4))
    real_replace = os.replace
    done = []

    def replace(src, dst):
        if len(done) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(Path(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left on device.*Check free space"):
        write_outputs(result, out, volume)
    monkeypatch.undo()
    left = sorted(p for p in out.rglob("*") if p.is_file())
    assert left == sorted(set(done)), "a file other than the completed ones was left"
    assert not [p for p in out.rglob(".*")], "a temporary file was left"
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert len(rows) == 4
    for p in left:
        if p.suffix == ".png":
            assert p.read_bytes().startswith(b"\x89PNG") and p.read_bytes().endswith(b"IEND\xaeB`\x82")


# -------------------------------------------------------------------------------------- cancellation


def test_console_cancel_marks_the_partial_result_and_it_is_written(volume, tmp_path):
    started = threading.Event()
    runner = AnalysisRunner(volume, SEED, tiny_model(2), _config(iterations=100_000))
    runner.start()
    while not runner.poll():
        assert runner.is_running
        started.wait(0.01)
    runner.cancel()
    assert runner.join(30)
    result = runner.result
    assert result.status == "cancelled" and result.metadata["status"] == "cancelled"
    assert 0 < len(result.steps) < 100_000
    assert result.snapshots[-1].iteration == result.steps[-1].iteration
    paths = write_outputs(result, tmp_path, volume)
    run = json.loads(paths["json"].read_text())
    assert run["status"] == "cancelled" and run["iterations_recorded"] == len(result.steps)
    assert f"image@{result.steps[-1].iteration}" in paths
    assert "Status: <b>cancelled</b>" in paths["html"].read_text()
