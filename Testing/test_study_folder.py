"""The study folder is protected like a run folder (outputs/: lock, manifest, input and link checks).

Every case here is refused before Ray starts, so no cluster is needed; the reruns of a finished study
(which need one) are in test_study.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from DeepDreamAnalysisLib import cli
from DeepDreamAnalysisLib.atomic import write_text_atomic
from DeepDreamAnalysisLib.errors import OutputError
from DeepDreamAnalysisLib.outputs import LOCK_NAME, MANIFEST_NAME, ManifestWriter
from DeepDreamAnalysisLib.studies import load_study, run_study
from DeepDreamAnalysisLib.studies.engine import StudyEngineError, claim_folder
from tiny_models import liver_like, tiny_card, tiny_net

pytest.importorskip("ray", reason="the study extra (ray) is installed by `make test`")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("study_folder_inputs")
    model = folder / "a.pt"
    torch.jit.script(tiny_net(2)).save(str(model))
    (folder / "a.card.json").write_text(json.dumps(tiny_card(2).to_dict()))
    img = sitk.GetImageFromArray(liver_like((1, 40, 48)))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(folder / "ct.nii.gz"))
    return {"folder": folder, "model": model, "image": folder / "ct.nii.gz"}


def _study(inputs, where: Path, **over) -> Path:
    spec = {"name": "tiny", "models": [{"name": "a", "path": str(inputs["model"])}],
            "images": [{"name": "ct", "path": str(inputs["image"]), "seeds": [[24, 20, 0]]}],
            "dream": {"iterations": 2, "step": 15.0}, "features": ["firstorder_Mean"], "feature_backend": "native"}
    spec.update(over)
    where.mkdir(parents=True, exist_ok=True)
    path = where / "study.json"
    path.write_text(json.dumps(spec))
    return path


def _tree(folder: Path) -> dict:
    if not os.path.lexists(folder):
        return None
    return {p.relative_to(folder).as_posix(): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
                                               else "dir") for p in sorted(folder.rglob("*"))}


def _study_cli(study: Path, out: Path, *extra) -> list[str]:
    return ["study", str(study), "--out", str(out), "--connect-timeout", "1", *extra]


def test_a_second_study_into_the_same_folder_fails_at_once_naming_the_other(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from DeepDreamAnalysisLib.outputs import FolderLock; "
        f"FolderLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert cli.main(_study_cli(_study(inputs, tmp_path), out)) == 2
        err = capsys.readouterr().err
        assert f"(process {child.pid}) is writing into {out}" in err and "choose another output folder" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the other's lock, nothing of ours
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("where", ["study_file_inside", "model_inside", "out_inside_the_inputs"])
def test_a_study_folder_holding_an_input_is_refused(inputs, tmp_path, capsys, where):
    import shutil

    case = tmp_path / "case"
    shutil.copytree(inputs["folder"], case)
    local = {"model": case / "a.pt", "image": case / "ct.nii.gz"}
    if where == "study_file_inside":
        study, out = _study(local, case / "out"), case / "out"
    elif where == "model_inside":
        study, out = _study(local, tmp_path / "spec"), case
    else:
        study, out = _study(local, tmp_path / "spec"), case / "a.pt" / "results"
    before = _tree(case)
    assert cli.main(_study_cli(study, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "cannot be used: the input" in err and ("is inside the output folder" in err or "contains" in err)
    assert _tree(case) == before


def test_a_non_empty_folder_of_other_files_is_refused_and_overwrite_never_replaces_them(inputs, tmp_path, capsys):
    study = _study(inputs, tmp_path / "spec")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    (out / "report.html").write_text("my report")
    before = _tree(out)
    assert cli.main(_study_cli(study, out)) == 2
    err = capsys.readouterr().err
    assert "is not empty (report.html, thesis.docx)" in err and "--overwrite" in err
    assert cli.main(_study_cli(study, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "report.html is in the way" in err and "Move that file away" in err
    assert _tree(out) == before


def test_a_copied_manifest_does_not_make_a_users_folder_a_study_folder(inputs, tmp_path, capsys):
    study = _study(inputs, tmp_path / "spec")
    ours = tmp_path / "ours"
    claim_folder(ours, load_study(study)).release()  # a study folder: study.json and its manifest
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "study.json").write_text("my own study notes")
    (mine / MANIFEST_NAME).write_bytes((ours / MANIFEST_NAME).read_bytes())
    before = _tree(mine)
    assert cli.main(_study_cli(study, mine)) == 2
    assert "lists no file as the tool wrote it" in capsys.readouterr().err
    assert cli.main(_study_cli(study, mine, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "study.json is listed in" in err and "is not the file the tool wrote" in err
    assert _tree(mine) == before


def test_the_folder_of_a_run_is_not_taken_for_a_study(inputs, tmp_path, capsys):
    out = tmp_path / "run_out"
    out.mkdir()
    with ManifestWriter(out) as manifest:  # what `run` leaves: its files and their manifest
        write_text_atomic(out / "curves.csv", "iteration,probability\n0,0.1\n")
        manifest.finish()
    before = _tree(out)
    assert cli.main(_study_cli(_study(inputs, tmp_path / "spec"), out)) == 2
    err = capsys.readouterr().err
    assert "holds results of another deepdream-analysis command (curves.csv" in err and "not of a study" in err
    assert _tree(out) == before


def test_the_folder_of_another_study_is_refused_before_anything_is_written(inputs, tmp_path):
    out = tmp_path / "out"
    claim_folder(out, load_study(_study(inputs, tmp_path / "one"))).release()
    before = _tree(out)
    with pytest.raises(StudyEngineError, match="holds another study"):
        run_study(_study(inputs, tmp_path / "two", restarts=2), out)
    assert _tree(out) == before


@pytest.mark.parametrize("link", ["runs", "runs/0123456789abcdef"])
def test_links_in_the_study_folder_are_never_written_or_deleted_through(inputs, tmp_path, capsys, link):
    study = _study(inputs, tmp_path / "spec")
    out = tmp_path / "out"
    claim_folder(out, load_study(study)).release()
    if link != "runs":
        (out / "runs").mkdir()
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "status.json").write_text("mine")
    (out / link).symlink_to(mine, target_is_directory=True)
    before, mine_before = _tree(out), _tree(mine)
    assert cli.main(_study_cli(study, out)) == 2
    err = capsys.readouterr().err
    assert f"{out / link} is a link to another folder" in err and "Remove it, or choose another --out" in err
    assert _tree(out) == before and _tree(mine) == mine_before
    with pytest.raises(OutputError, match="is a link to another folder"):
        run_study(study, out)


def test_two_studies_of_one_process_into_one_folder(inputs, tmp_path):
    """The folder lock is re-entrant within a process; a second study there (a thread, a console) is refused."""
    study = load_study(_study(inputs, tmp_path / "spec"))
    out = tmp_path / "out"
    first = claim_folder(out, study)
    try:
        with pytest.raises(OutputError, match=r"Another study of this process \(process \d+\) is writing into"):
            claim_folder(out, study)
        assert (out / LOCK_NAME).exists()  # the first study still holds its lock
    finally:
        first.release()
    assert not (out / LOCK_NAME).exists()
    claim_folder(out, study).release()  # free again
