"""Output folders (issue #11): the tool never deletes or replaces a file it did not write, refuses an
output folder that holds an input, locks the folder against a second run, and handles SIGTERM and a
second Ctrl-C without leaving half-written results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from DeepDreamAnalysisLib.cli import main
from DeepDreamAnalysisLib.outputs import LOCK_NAME, MANIFEST_NAME, FolderLock

from tiny_models import tiny_card, write_case

FAST = ["--iterations", "4", "--step", "400", "--features", "firstorder_Mean", "--snapshot-every", "1"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def _run(case, out, *extra, image=None):
    return main(["run", "--image", str(image or case["image"]), "--model", str(case["model"]), "--seed", "24,20,1",
                 "--out", str(out), *FAST, *extra])


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused_untouched(case, out: Path, capsys) -> str:
    """Run into ``out``; assert the run is refused (exit 2) and no file in ``out`` changed; its stderr."""
    before = _tree(out)
    assert _run(case, out) == 2
    err = capsys.readouterr().err
    assert _tree(out) == before
    return err


def test_rerun_replaces_only_the_tools_files(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(case, out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and "run.json" in manifest["files"] and "curves.csv" in manifest["files"]
    assert any(f.startswith("snapshots/") for f in manifest["files"])
    (out / "my_notes.txt").write_text("mine")
    (out / "snapshots" / "my_annotation.nii.gz").write_bytes(b"mine too")
    assert _run(case, out, "--iterations", "2") == 0
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "snapshots" / "my_annotation.nii.gz").read_bytes() == b"mine too"
    after = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert "my_notes.txt" not in after and not (out / "snapshots" / "iter_0003_mask.nii.gz").exists()
    assert not (out / LOCK_NAME).exists()


def test_non_empty_folder_without_manifest_is_refused_unless_overwrite(case, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    assert _run(case, out) == 2
    err = capsys.readouterr().err
    assert "is not empty (thesis.docx)" in err and "--overwrite" in err and "Traceback" not in err
    assert _tree(out) == {"thesis.docx": b"years of work"}
    assert _run(case, out, "--overwrite") == 0
    assert (out / "thesis.docx").read_bytes() == b"years of work" and (out / "run.json").is_file()


def test_overwrite_never_replaces_a_file_the_tool_did_not_write(case, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "curves.csv").write_text("my own curves")
    assert _run(case, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "curves.csv is in the way" in err and "Move that file away" in err
    assert (out / "curves.csv").read_text() == "my own curves"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["input_inside_out", "out_is_input_folder", "out_inside_input_folder"])
def test_output_folder_holding_an_input_is_refused(case, tmp_path, capsys, where):
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    image = folder / "ct.nii.gz"
    shutil.copy(case["image"], image)
    (folder / "other.txt").write_text("keep")
    out = {"input_inside_out": tmp_path, "out_is_input_folder": folder,
           "out_inside_input_folder": image / "results"}[where]
    if where == "out_inside_input_folder":  # a DICOM folder as input, out inside it
        image = folder
        out = folder / "results"
    before = _tree(tmp_path)
    assert _run(case, out, "--overwrite", image=image) == 2
    err = capsys.readouterr().err
    assert "cannot be used: the input" in err and ("is inside the output folder" in err or "contains the output" in err)
    assert _tree(tmp_path) == before and not (folder / "results").exists()


def test_second_run_into_a_locked_folder_fails_at_once(case, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # another process holds the lock: a child python that takes it and waits
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from DeepDreamAnalysisLib.outputs import FolderLock; "
        f"FolderLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert _run(case, out) == 2
        err = capsys.readouterr().err
        assert "Another deepdream-analysis run (process" in err and "is writing into" in err
        assert not (out / "run.json").exists()
    finally:
        child.kill()
        child.wait()
    assert _run(case, out) == 0  # the lock died with its process


def test_lock_is_reentrant_in_one_process_and_removed(tmp_path):
    with FolderLock(tmp_path):
        with FolderLock(tmp_path):
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ signals

SLOWNET = '''
import time
import torch


class SlowNet(torch.nn.Module):
    """A 2D network whose forward waits `delay` seconds from call `after` on, writing a marker first."""

    def __init__(self, marker, delay, after):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.marker, self.delay, self.after, self.calls = marker, delay, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            with open(self.marker, "a") as fh:
                fh.write(str(self.calls) + "\\n")
            time.sleep(self.delay)
        return self.conv(x)
'''


def _slow_case(tmp_path, delay, after):
    code = tmp_path / "code"
    code.mkdir()
    (code / "slownet.py").write_text(SLOWNET)
    marker = tmp_path / "marker.txt"
    torch.manual_seed(0)
    weights = tmp_path / "slow.pt"
    torch.save(torch.nn.Conv2d(1, 2, 3, padding=1).state_dict(), weights)
    state = torch.load(weights)
    torch.save({f"conv.{k}": v for k, v in state.items()}, weights)
    card = tiny_card(2).to_dict()
    card["network"] = {"name": "slownet.SlowNet", "args": {"marker": str(marker), "delay": delay, "after": after}}
    (tmp_path / "slow.card.json").write_text(json.dumps(card))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    return weights, marker, env


def _start(case, weights, out, env, iterations):
    return subprocess.Popen(
        [sys.executable, "-m", "DeepDreamAnalysisLib.cli", "run", "--image", str(case["image"]), "--model",
         str(weights), "--seed", "24,20,1", "--out", str(out), "--allow-code-targets", "--iterations",
         str(iterations), "--step", "400", "--features", "firstorder_Mean", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(marker: Path, proc, timeout=60):
    end = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1] if proc.poll() is not None else "no forward pass started"


def _ctrl_c_twice(proc, within: float) -> str:
    """Ctrl-C; once the command says it is cancelling (its handler ran), Ctrl-C again; then the
    command must end within ``within`` s. Returns its stderr. Two signals that arrive before the
    first one's handler has run are handled once: on a loaded machine a fixed pause between them
    can be too short, and the second Ctrl-C is lost."""
    import threading

    err: list[str] = []
    readers = [threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True),
               threading.Thread(target=proc.stdout.read, daemon=True)]  # a full pipe would block the child
    for reader in readers:
        reader.start()
    proc.send_signal(signal.SIGINT)
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None and not any("cancelling" in line for line in err):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=within)
    for reader in readers:
        reader.join(10)
    return "".join(err)


def test_sigterm_writes_the_partial_result_marked_cancelled(case, tmp_path):
    weights, marker, env = _slow_case(tmp_path, delay=0.2, after=3)
    out = tmp_path / "out"
    proc = _start(case, weights, out, env, iterations=500)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Terminated: cancelling" in err and "Traceback" not in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "cancelled"
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is True
    assert not (out / LOCK_NAME).exists() and not [p for p in out.rglob(".*")]


def test_second_ctrl_c_ends_at_once_during_a_long_forward_pass(case, tmp_path):
    weights, marker, env = _slow_case(tmp_path, delay=120, after=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / MANIFEST_NAME).write_text(json.dumps({"tool": "deepdream-analysis", "complete": True, "files": []}))
    before = _tree(out)
    proc = _start(case, weights, out, env, iterations=50)
    _wait_for(marker, proc)
    err = _ctrl_c_twice(proc, within=20)  # the forward pass would take 120 s
    assert proc.returncode == 130, err
    assert "stopped at once; nothing was written" in err and "Traceback" not in err
    assert _tree(out) == before  # as it was before the run: no lock, no half-written file


def test_second_ctrl_c_leaves_no_new_folder(case, tmp_path):
    weights, marker, env = _slow_case(tmp_path, delay=120, after=2)
    out = tmp_path / "new" / "out"
    proc = _start(case, weights, out, env, iterations=50)
    _wait_for(marker, proc)
    err = _ctrl_c_twice(proc, within=20)
    assert proc.returncode == 130, err
    assert not (tmp_path / "new").exists()


def test_python_api_write_outputs_never_replaces_a_users_file(case, tmp_path):
    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
    from DeepDreamAnalysisLib.errors import OutputError
    from DeepDreamAnalysisLib.report import write_outputs
    from DeepDreamAnalysisLib.volume import read_volume

    from tiny_models import tiny_model

    volume = read_volume(case["image"])
    config = AnalysisConfig(dream=DreamConfig(iterations=2, step=400.0, device="cpu"),
                            features=FeatureConfig(names=("firstorder_Mean",), backend="native"))
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), config)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("my notes")
    with pytest.raises(OutputError, match="run.json is in the way"):
        write_outputs(result, out, volume)
    assert (out / "run.json").read_text() == "my notes"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_compare_keeps_the_users_files_and_lists_its_own(case, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--image", str(case["image"]), "--seed", "24,20,1", "--model", f"a={case['model']}",
            "--card", str(case["card"]), "--restarts", "1", "--iterations", "2", "--step", "400",
            "--features", "firstorder_Mean", "--feature-backend", "native", "--out", str(out)]
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    assert main(argv) == 2
    assert "is not empty (mine.txt)" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert "comparison.json" in manifest["files"] and "mine.txt" not in manifest["files"]
    assert main(argv) == 0  # a rerun: the folder is the tool's now
    assert (out / "mine.txt").read_text() == "mine"
    assert not (out / LOCK_NAME).exists()


def test_a_rerun_never_deletes_or_writes_through_a_linked_snapshots_folder(case, tmp_path):
    """The manifest lists snapshots/iter_*.nii.gz; the user then made snapshots/ a link to their own folder."""
    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
    from DeepDreamAnalysisLib.errors import OutputError
    from DeepDreamAnalysisLib.report import write_outputs
    from DeepDreamAnalysisLib.volume import read_volume

    from tiny_models import tiny_model

    volume = read_volume(case["image"])
    config = AnalysisConfig(dream=DreamConfig(iterations=2, step=400.0, device="cpu"),
                            features=FeatureConfig(names=("firstorder_Mean",), backend="native"))
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), config)
    out = tmp_path / "out"
    write_outputs(result, out, volume)
    listed = [f for f in json.loads((out / MANIFEST_NAME).read_text())["files"] if f.startswith("snapshots/")]
    assert listed
    mine = tmp_path / "my_scans"
    (out / "snapshots").rename(tmp_path / "old_snapshots")
    mine.mkdir()
    for rel in listed:  # the user's own files, named like ours
        (mine / Path(rel).name).write_text("mine")
    (out / "snapshots").symlink_to(mine, target_is_directory=True)
    with pytest.raises(OutputError, match="is a link to another folder"):
        write_outputs(result, out, volume)
    assert sorted(p.name for p in mine.iterdir()) == sorted(Path(r).name for r in listed)
    assert all(p.read_text() == "mine" for p in mine.iterdir())


# ----------------------------------------------------------------------------- the manifest records what it wrote


def test_manifest_records_size_mtime_and_hash_of_each_file(case, tmp_path):
    import hashlib

    out = tmp_path / "out"
    assert _run(case, out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["records"]) == set(manifest["files"])
    rec = manifest["records"]["run.json"]
    st = (out / "run.json").stat()
    assert rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns
    assert rec["sha256"] == hashlib.sha256((out / "run.json").read_bytes()).hexdigest()


def test_a_manifest_copied_into_a_users_folder_cannot_replace_their_files(case, tmp_path, capsys):
    ours = tmp_path / "ours"
    assert _run(case, ours) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "curves.csv").write_text("my own curves")
    (mine / "thesis.docx").write_bytes(b"years of work")
    (mine / MANIFEST_NAME).write_bytes((ours / MANIFEST_NAME).read_bytes())  # copied (or forged) by hand
    before = _tree(mine)
    assert _run(case, mine) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "lists no file as the tool wrote it" in err and "Traceback" not in err
    assert _tree(mine) == before
    assert _run(case, mine, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "curves.csv is listed in" in err and "is not the file the tool wrote" in err and "Move that file away" in err
    assert _tree(mine) == before


def test_a_forged_manifest_listing_a_users_file_never_gets_it_deleted(case, tmp_path, caplog):
    out = tmp_path / "out"
    assert _run(case, out) == 0
    (out / "notes.txt").write_text("mine")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"].append("notes.txt")  # edited by hand: a rerun would delete a stale listed file
    manifest["records"]["notes.txt"] = {"size": 999, "mtime_ns": 1}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert _run(case, out) == 0
    err = caplog.text  # the command line shows warnings as "WARNING: ..." on stderr
    assert "notes.txt is listed in" in err and "its size is 4 bytes, the tool wrote 999" in err
    assert "the tool left it as it is" in err
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads((out / MANIFEST_NAME).read_text())["files"]


def test_an_edited_output_is_not_replaced_and_the_message_names_it(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(case, out) == 0
    with open(out / "curves.csv", "a") as fh:
        fh.write("# my remark\n")
    edited = (out / "curves.csv").read_bytes()
    assert _run(case, out) == 2
    err = capsys.readouterr().err
    assert "curves.csv is listed in" in err and "its size is" in err and "Move that file away" in err
    assert (out / "curves.csv").read_bytes() == edited


def test_reruns_into_a_copied_results_folder_still_work(case, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    assert _run(case, out) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy)  # new modification times, same contents
    assert _run(case, copy, "--iterations", "2") == 0
    assert not (copy / "snapshots" / "iter_0003_mask.nii.gz").exists()  # the copy's old snapshots were ours


def test_a_manifest_without_records_is_not_trusted(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(case, out) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["records"]  # an older version's manifest, or a forged one
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    err = _refused_untouched(case, out, capsys)
    assert "no record of what the tool wrote" in err or "lists no file as the tool wrote it" in err


# ----------------------------------------------------------------------------- a process killed mid-write

_KILLED_AFTER_RENAME = """
import os, signal, sys
from pathlib import Path
real = os.replace
def replace(src, dst):  # the process dies the moment this file is in place, before the manifest records it
    real(src, dst)
    if Path(dst).as_posix().endswith({which!r}) or ({which!r} == "snapshots/" and "/snapshots/iter_" in Path(dst).as_posix()):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from DeepDreamAnalysisLib.cli import main
sys.exit(main({argv!r}))
"""


def _run_killed_after_rename(case, out: Path, which: str) -> None:
    """Run into the new folder ``out`` in a child process that SIGKILLs itself the moment ``which``
    (a file name, or "snapshots/" for the first snapshot) is renamed into place."""
    out.mkdir()
    argv = ["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1", "--out",
            str(out), *FAST]
    (out / MANIFEST_NAME).write_text(json.dumps({"tool": "deepdream-analysis", "complete": True, "files": [],
                                                 "records": {}}))
    child = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RENAME.format(which=which, argv=argv)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.parametrize("which", ["curves.csv", "snapshots/"])
def test_a_run_killed_right_after_a_rename_leaves_files_the_rerun_recognises(case, tmp_path, capsys, which):
    """What a study's worker meets at Ctrl-C (Ray kills it): the file is in place, the manifest's
    final record of it is not written. The rerun must know the file as the tool's (its record was
    noted before the rename), replace it and finish; a user's file beside it stays untouched."""
    out = tmp_path / "out"
    _run_killed_after_rename(case, out, which)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False
    placed = [f for f in manifest["files"] if f.endswith("curves.csv") or f.startswith("snapshots/")]
    assert placed and any(f in manifest["pending"] for f in placed)
    (out / "my_notes.txt").write_text("mine")
    assert _run(case, out) == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["pending"] == {}
    assert set(manifest["records"]) == set(manifest["files"])
    assert (out / "my_notes.txt").read_text() == "mine"


def test_a_file_replaced_by_the_user_after_a_killed_write_is_still_refused(case, tmp_path, capsys):
    """A pending record names what the tool was about to put there: anything else is left alone."""
    out = tmp_path / "out"
    _run_killed_after_rename(case, out, "curves.csv")
    (out / "curves.csv").write_text("my own curves, written over the tool's")
    assert _run(case, out) == 2  # nothing else of the tool's is there yet: the folder counts as not empty
    assert "is not empty" in capsys.readouterr().err
    assert _run(case, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "curves.csv is listed in" in err and "the tool wrote" in err and "Move that file away" in err
    assert (out / "curves.csv").read_text() == "my own curves, written over the tool's"


# ----------------------------------------------------------------------------- staging items a killed run leaves

_KILLED_BEFORE_RENAME = """
import os, signal, sys
real = os.replace
seen = [0]
def replace(src, dst):  # the process dies with a finished temporary file in place, before its {nth}th rename
    if {where!r} in os.fspath(dst):
        seen[0] += 1
        if seen[0] == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
from DeepDreamAnalysisLib.cli import main
sys.exit(main({argv!r}))
"""


def _run_killed_before_rename(case, out: Path, where: str, nth: int = 1) -> None:
    """Run into ``out`` in a child process that SIGKILLs itself just before the ``nth`` rename of a file
    into a path containing ``where`` (its temporary file written, the rename not done)."""
    argv = ["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1", "--out",
            str(out), *FAST]
    child = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RENAME.format(where=where, nth=nth, argv=argv)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr


def _hidden(folder: Path) -> list[str]:
    """The hidden items anywhere under ``folder`` (links not followed)."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files if n.startswith("."))


def _killed_in_staging(case, out: Path) -> Path:
    """A complete run into ``out``, the user's files beside it, then a rerun killed while writing its
    snapshots into the staging folder; returns that folder."""
    assert _run(case, out) == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "snapshots" / "my_annotation.nii.gz").write_bytes(b"mine too")
    _run_killed_before_rename(case, out, "/.snapshots-new-", nth=3)
    staging = [p for p in out.iterdir() if p.name.startswith(".snapshots-new-")]
    assert len(staging) == 1 and staging[0].is_dir()
    inside = sorted(p.name for p in staging[0].iterdir())
    assert len([n for n in inside if n.startswith("iter_")]) == 2 and any(".tmp." in n for n in inside), inside
    assert (out / LOCK_NAME).exists()  # the lock died with the process; its file (the staging log) stays
    return staging[0]


def test_a_rerun_removes_the_staging_folder_a_killed_run_left(case, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    _killed_in_staging(case, out)
    assert _run(case, out) == 0, capsys.readouterr().err
    assert _hidden(out) == []  # the staging folder, its files, every temporary file and the lock are gone
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "snapshots" / "my_annotation.nii.gz").read_bytes() == b"mine too"
    assert not [r for r in caplog.records if "staging item" in r.getMessage()]
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is True


def test_a_folder_killed_before_its_first_manifest_is_not_refused_as_not_empty(case, tmp_path, capsys):
    """Killed while saving the first manifest: no manifest, only the tool's hidden leftovers (the staging
    folder, the temporary files of curves.csv and of the manifest). They used to make the folder count as
    "not empty" (a rerun was refused); now the rerun removes them and runs."""
    out = tmp_path / "out"
    _run_killed_before_rename(case, out, MANIFEST_NAME)
    assert not (out / MANIFEST_NAME).exists()
    left = sorted(p.name for p in out.iterdir())
    assert any(n.startswith(".snapshots-new-") for n in left) and any(n.startswith(f".{MANIFEST_NAME}.") for n in left)
    assert _run(case, out) == 0, capsys.readouterr().err
    assert _hidden(out) == []


def test_a_staging_folder_replaced_by_a_link_is_never_followed(case, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    staging = _killed_in_staging(case, out)
    mine = tmp_path / "my_scans"
    mine.mkdir()
    for name in [p.name for p in staging.iterdir()] + ["thesis.docx"]:  # named like the tool's files, and not
        (mine / name).write_text("mine")
    staging.rename(tmp_path / "moved_away")
    staging.symlink_to(mine, target_is_directory=True)
    assert _run(case, out) == 0, capsys.readouterr().err
    assert staging.is_symlink() and os.readlink(staging) == str(mine)
    assert sorted(p.name for p in mine.iterdir()) and all(p.read_text() == "mine" for p in mine.iterdir())
    assert len(list(mine.iterdir())) == len(list((tmp_path / "moved_away").iterdir())) + 1
    warned = [r.getMessage() for r in caplog.records if str(staging) in r.getMessage()]
    assert warned and "link" in warned[0] and "Remove the link yourself" in warned[0]


def test_a_staging_folder_holding_a_users_file_is_kept_until_it_is_moved_out(case, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    staging = _killed_in_staging(case, out)
    (staging / "my_extra.txt").write_text("mine")
    tools = sorted(p.name for p in staging.iterdir() if p.name != "my_extra.txt")
    assert _run(case, out) == 0, capsys.readouterr().err
    assert (staging / "my_extra.txt").read_text() == "mine"
    assert sorted(p.name for p in staging.iterdir()) == sorted(tools + ["my_extra.txt"])  # left as it was
    warned = [r.getMessage() for r in caplog.records if str(staging) in r.getMessage()]
    assert warned and "my_extra.txt" in warned[0] and "Move your files out of it" in warned[0]
    assert (out / LOCK_NAME).exists()  # the log of the kept folder stays for the next run
    (staging / "my_extra.txt").rename(tmp_path / "my_extra.txt")
    caplog.clear()
    assert _run(case, out) == 0  # only the tool's files are left in it now: removed
    assert _hidden(out) == [] and (out / "my_notes.txt").read_text() == "mine"
    assert not [r for r in caplog.records if "staging item" in r.getMessage()]


_KILLED_IN_A_SUBFOLDER = """
import os, signal, sys
from pathlib import Path
from DeepDreamAnalysisLib.atomic import write_text_atomic
from DeepDreamAnalysisLib.outputs import FolderLock
FolderLock({out!r}).acquire()
def replace(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
write_text_atomic(Path({out!r}) / "runs" / "k1" / "status.json", "{{}}")
"""


def test_a_temporary_file_in_a_subfolder_is_removed_by_the_next_lock_holder(tmp_path):
    """A study writes runs/<key>/status.json under the study folder's lock: a kill leaves its temporary
    file there; the next process to take the folder's lock removes it, and nothing else."""
    out = tmp_path / "study"
    (out / "runs" / "k1").mkdir(parents=True)
    (out / "runs" / "k1" / ".my_hidden_notes").write_text("mine")
    child = subprocess.run([sys.executable, "-c", _KILLED_IN_A_SUBFOLDER.format(out=str(out))], capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(_hidden(out / "runs")) == 2
    with FolderLock(out):
        assert _hidden(out / "runs") == ["k1/.my_hidden_notes"]
    assert not (out / LOCK_NAME).exists() and (out / "runs" / "k1" / ".my_hidden_notes").read_text() == "mine"


def test_a_forged_staging_log_never_gets_a_users_file_deleted(case, tmp_path, capsys):
    """The log names only what the tool made; a lock file edited to name the user's files deletes nothing."""
    out = tmp_path / "mine"
    out.mkdir()
    nonce = "0123456789abcdef" * 2
    (out / "thesis.docx").write_text("years of work")
    (out / ".config").write_text("mine")
    (out / f".backup-{nonce}").mkdir()
    (out / f".backup-{nonce}" / "photo.jpg").write_text("mine")
    (out / f".{nonce}-file").symlink_to(out / "thesis.docx")
    logged = ["thesis.docx", ".config", "../outside", f".backup-{nonce}", f".{nonce}-file", "/etc/passwd"]
    (out / LOCK_NAME).write_text(f"1 deepdream-analysis {nonce}\n" + "".join(f"{nonce} {json.dumps(r)}\n" for r in logged))
    before = _tree(out)
    assert _run(case, out, "--overwrite") == 0, capsys.readouterr().err
    assert all(_tree(out)[k] == v for k, v in before.items() if k != LOCK_NAME)
    assert (out / f".{nonce}-file").is_symlink()


@pytest.mark.parametrize("kind", ["data", "link", "folder"])
def test_a_file_named_like_the_lock_that_is_not_the_tools_is_never_touched(case, tmp_path, capsys, kind):
    out = tmp_path / "out"
    assert _run(case, out) == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("years of work")
    lock = out / LOCK_NAME
    if kind == "data":
        lock.write_text("my own lock file, years of work\n")
    elif kind == "link":
        lock.symlink_to(precious)
    else:
        lock.mkdir()
        (lock / "inside.txt").write_text("mine")
    err = _refused_untouched(case, out, capsys)
    assert "is not a lock file of deepdream-analysis" in err and "Move it away" in err
    assert precious.read_text() == "years of work"
    assert lock.is_symlink() == (kind == "link")


def test_hidden_items_the_tool_did_not_log_still_count_and_are_kept(case, tmp_path, capsys):
    """An older version's staging folder (random name, no log) or a hidden folder of the user's: never
    deleted, the folder still counts as not empty, and the message says what it may be."""
    out = tmp_path / "out"
    (out / ".snapshots-new-q1w2e3").mkdir(parents=True)
    (out / ".snapshots-new-q1w2e3" / "iter_0000_image.nii.gz").write_bytes(b"maybe mine")
    err = _refused_untouched(case, out, capsys)
    assert "is not empty (.snapshots-new-q1w2e3)" in err and "Hidden items such as .snapshots-new-q1w2e3" in err


_WORKER_KILLED_AT_ITS_HEARTBEAT = """
import os, signal
from DeepDreamAnalysisLib.studies import engine
def replace(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
engine._worker_setup(None, 1, [{beat!r}], None)
"""


def test_a_study_worker_killed_while_writing_its_heartbeat_leaves_nothing_the_next_run_keeps(tmp_path):
    """A study's worker writes runs/<key>/worker.json first; killed then (Ray kills a worker at a stop), it
    leaves the heartbeat's temporary file, which the next run into that folder removes."""
    run = tmp_path / "study" / "runs" / "k1"
    run.mkdir(parents=True)
    child = subprocess.run([sys.executable, "-c", _WORKER_KILLED_AT_ITS_HEARTBEAT.format(beat=str(run / "worker.json"))],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(_hidden(run)) == 1 and (run / LOCK_NAME).exists()
    with FolderLock(run):
        assert _hidden(run) == []
    assert sorted(p.name for p in run.iterdir()) == []
