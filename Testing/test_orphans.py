"""Leftovers of killed processes outside a locked output folder (outputs/orphans.py, SECURITY.md):

- the Slicer panel worker's private folder (``<temp>/deepdream-run-<nonce>``): made 0700 with an owner
  file; after Slicer is killed (SIGKILL) the next start removes it once Slicer and the worker have ended,
  and only then; a forged folder, a folder holding a user's file, a link named like one are never touched;
- an atomic write's temporary file beside a target outside a locked folder: named after its process;
  after a SIGKILL mid-write the next write of the same target removes it, never a live writer's, a link,
  another machine's or a user's file.

The kills are real: a child process is killed with SIGKILL while it holds the folder or is writing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from DeepDreamAnalysisLib.atomic import atomic_path, write_text_atomic
from DeepDreamAnalysisLib.outputs import orphans, processes
from DeepDreamAnalysisLib.outputs.orphans import OWNER_NAME, RunFolder, remove_dead_run_folders, remove_dead_temps

pytestmark = pytest.mark.skipif(not orphans.SUPPORTED, reason="leftovers are only removed on POSIX systems")

TESTING = Path(__file__).resolve().parent


def _env(**extra) -> dict:
    env = dict(os.environ)
    package = str(TESTING.parent / "DeepDreamAnalysis")
    env["PYTHONPATH"] = os.pathsep.join([package, str(TESTING)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def _child(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, env=_env(**env), text=True)


def _line(process: subprocess.Popen, timeout: float = 120.0) -> str:
    """The child's next line of output (it prints once it is where the test wants it)."""
    end = time.monotonic() + timeout
    line = process.stdout.readline()
    assert line, f"the child ended early (exit {process.wait(max(1.0, end - time.monotonic()))})"
    return line.strip()


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def _holding_the_lock_of(path: Path) -> subprocess.Popen:
    """A live process (not the file's writer) that holds ``path``'s flock until killed; returns once it does."""
    holder = _child("""
        import fcntl, os, sys
        fd = os.open(%r, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
    """ % str(path))
    try:
        assert _line(holder) == "held"
    except BaseException:
        _kill(holder)
        raise
    return holder


def _dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _wait_gone(pid: int, limit_s: float = 120.0) -> None:
    end = time.monotonic() + limit_s
    while not processes.is_gone(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes.is_gone(pid), f"process {pid} is still there"


def _forged(base: Path, pid: int, files=("volume.npy", "job.pkl"), nonce="ab" * 16, start="") -> Path:
    """A folder made exactly as the tool makes one, with an owner file naming ``pid``."""
    folder = base / f"deepdream-run-{nonce}"
    folder.mkdir(mode=0o700)
    (folder / OWNER_NAME).write_text(f"deepdream-analysis worker-folder {nonce}\nprocess {pid} {start} "
                                     f"{processes.boot_id()}\n")
    for name in files:
        (folder / name).write_bytes(b"data")
    return folder


# --- process identity -------------------------------------------------------------------------


def test_a_process_is_gone_only_when_surely_ended():
    parent = os.getppid()
    assert not processes.is_gone(os.getpid()) and not processes.is_gone(parent)
    assert not processes.is_gone(parent, processes.start_time(parent), processes.boot_id())
    assert processes.is_gone(_dead_pid())
    if processes.start_time(parent):  # Linux: a PID given to a later process is not the one recorded
        assert processes.is_gone(parent, str(int(processes.start_time(parent)) + 1))
        assert processes.is_gone(parent, processes.start_time(parent), "0" * 32)  # another boot
    for odd in (0, -1, 1 << 40):  # never kill(0, ...) (the process group) or a negative PID: alive
        assert not processes.is_gone(odd)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux: a process's threads in /proc")
def test_a_process_whose_main_thread_ended_while_another_runs_is_not_gone():
    """Its main thread shows as a zombie, but its files (and their locks) live on with the other thread."""
    child = _child("""
        import ctypes, os, sys, threading, time
        threading.Thread(target=time.sleep, args=(120,)).start()
        print(os.getpid(), flush=True)
        ctypes.CDLL(None).pthread_exit(None)
    """)
    try:
        pid = int(_line(child))
        end = time.monotonic() + 30
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < end:
            time.sleep(0.02)
        assert not processes.is_gone(pid, processes.start_time(pid))
    finally:
        _kill(child)
    assert processes.is_gone(pid)


# --- the worker's folder ----------------------------------------------------------------------


def test_the_worker_folder_is_private_and_carries_its_proof(tmp_path):
    folder = RunFolder.create(tmp_path)
    try:
        assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
        nonce = folder.path.name.removeprefix("deepdream-run-")
        assert len(nonce) == 32 and int(nonce, 16) >= 0
        owner = (folder.path / OWNER_NAME).read_text().splitlines()
        assert owner[0] == f"deepdream-analysis worker-folder {nonce}"
        assert owner[1].split()[:2] == ["process", str(os.getpid())]
        assert stat.S_IMODE((folder.path / OWNER_NAME).stat().st_mode) == 0o600
        assert remove_dead_run_folders(tmp_path) == [] and folder.path.is_dir()  # this live process's own
    finally:
        folder.remove()
    assert not folder.path.exists()


def test_slicer_killed_mid_run_its_folder_goes_once_it_and_the_worker_have_ended(tmp_path, monkeypatch):
    """The panel's real worker, started by a process killed with SIGKILL as a crashing Slicer would be."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    slicer = _child("""
        import sys, time, torch
        from tiny_models import liver_like, tiny_card, tiny_net
        from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
        from DeepDreamAnalysisLib.models import load_model
        from DeepDreamAnalysisLib.process_runner import ProcessRunner
        from DeepDreamAnalysisLib.volume import Volume
        path = %r
        torch.jit.save(torch.jit.script(tiny_net(3)), path)
        tiny_card(3, roi=[12, 16, 16]).save(path + ".card.json")
        config = AnalysisConfig(dream=DreamConfig(iterations=100000, step=400.0, device="cpu"),
                                features=FeatureConfig(names=["firstorder_Mean"], backend="native"))
        runner = ProcessRunner(Volume(liver_like((24, 40, 40)), spacing=(0.8, 0.8, 2.5)), (20, 20, 12),
                               load_model(path), config, model_path=path, threads=1).start()
        while not runner.poll():
            time.sleep(0.05)
        print(runner.folder, runner.process.pid, flush=True)
        while True:
            runner.poll()
            time.sleep(0.1)
    """ % str(tmp_path / "tiny.pt"), TMPDIR=str(temp))
    try:
        folder, worker = _line(slicer).split()
        folder, worker = Path(folder), int(worker)
        assert folder.parent == temp and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert remove_dead_run_folders(temp) == [] and folder.is_dir()  # both alive: never touched
        os.kill(worker, signal.SIGSTOP)  # the worker cannot end while the test looks
        _kill(slicer)
        assert processes.is_gone(slicer.pid) and not processes.is_gone(worker)
        assert remove_dead_run_folders(temp) == [] and folder.is_dir()  # Slicer gone, the worker still there
        os.kill(worker, signal.SIGCONT)  # its stdin has closed: it cancels and ends
        _wait_gone(worker)
        assert sorted(p.name for p in folder.iterdir())  # it left its files (the outcome, the log ...)
        monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the next run's start, through its own entry point
        from DeepDreamAnalysisLib.process_runner import remove_dead_run_folders as at_start

        assert at_start() == [folder]
        assert list(temp.iterdir()) == []
    finally:
        if slicer.poll() is None:
            _kill(slicer)


def test_a_killed_process_folder_goes_and_a_live_ones_stays(tmp_path):
    holder = _child("""
        import sys
        from DeepDreamAnalysisLib.outputs.orphans import RunFolder
        folder = RunFolder.create(%r)
        for name in ("volume.npy", "job.pkl", "worker.log", "progress.bin", "snap-5.pkl", "snap-10.pkl.part",
                     "outcome.pkl.part"):
            (folder.path / name).write_bytes(b"x" * 1000)
        print(folder.path, flush=True)
        sys.stdin.read()
    """ % str(tmp_path))
    other = _child("""
        import sys
        from DeepDreamAnalysisLib.outputs.orphans import RunFolder
        print(RunFolder.create(%r).path, flush=True)
        sys.stdin.read()
    """ % str(tmp_path))
    try:
        killed, live = Path(_line(holder)), Path(_line(other))
        _kill(holder)
        assert remove_dead_run_folders(tmp_path) == [killed]
        assert not killed.exists() and live.is_dir()
    finally:
        for p in (holder, other):
            if p.poll() is None:
                _kill(p)
    assert remove_dead_run_folders(tmp_path) == [live]


def test_a_folder_whose_owner_file_a_live_process_holds_stays_whatever_pids_it_names(tmp_path):
    """The worker inherits the owner file's lock: the folder stays in use even for a process not named
    in it yet (Slicer killed between starting the worker and recording it)."""
    folder = _forged(tmp_path, _dead_pid())
    holder = _holding_the_lock_of(folder / OWNER_NAME)
    try:
        assert remove_dead_run_folders(tmp_path) == [] and (folder / "volume.npy").exists()
    finally:
        _kill(holder)
    assert remove_dead_run_folders(tmp_path) == [folder]


def test_a_folder_that_is_not_provably_the_tools_is_never_touched(tmp_path, caplog):
    dead = _dead_pid()
    # named like ours, without an owner file (e.g. an older version's): silently kept
    bare = tmp_path / f"deepdream-run-{'cd' * 16}"
    bare.mkdir()
    (bare / "volume.npy").write_bytes(b"data")
    # an owner file naming another folder's nonce, an owner file holding other text, a live process
    other_nonce = _forged(tmp_path, dead, nonce="ef" * 16)
    (other_nonce / OWNER_NAME).write_text(f"deepdream-analysis worker-folder {'12' * 16}\nprocess {dead}  \n")
    garbage = _forged(tmp_path, dead, nonce="34" * 16)
    (garbage / OWNER_NAME).write_text("my notes\n")
    live = _forged(tmp_path, os.getppid(), nonce="56" * 16, start=processes.start_time(os.getppid()))
    # an old style name, and names that only look alike
    old = tmp_path / "deepdream-run-5u1ojo0q"
    old.mkdir()
    (tmp_path / f"deepdream-run-{'AB' * 16}").mkdir()
    caplog.set_level(logging.WARNING)
    assert remove_dead_run_folders(tmp_path) == []
    assert all(p.is_dir() for p in (bare, other_nonce, garbage, live, old))
    assert (bare / "volume.npy").read_bytes() == b"data"
    assert not caplog.records  # nothing the tool could call its own: no warning either


def test_a_dead_runs_folder_holding_a_users_file_is_kept_with_a_warning(tmp_path, caplog):
    folder = _forged(tmp_path, _dead_pid())
    (folder / "notes.txt").write_text("mine")
    caplog.set_level(logging.WARNING)
    assert remove_dead_run_folders(tmp_path) == []
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "volume.npy").exists()
    assert any("notes.txt" in r.getMessage() and "did not put there" in r.getMessage() for r in caplog.records)
    (folder / "notes.txt").unlink()  # the user moved it out: the rest goes at the next start
    assert remove_dead_run_folders(tmp_path) == [folder]


@pytest.mark.parametrize("how", ["subfolder", "symlink", "hardlink", "fifo", "owner-link"])
def test_a_dead_runs_folder_with_an_odd_item_is_kept_and_nothing_outside_is_touched(tmp_path, how, caplog):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scan.npy").write_bytes(b"patient")
    base = tmp_path / "tmp"
    base.mkdir()
    folder = _forged(base, _dead_pid(), files=("job.pkl",))
    if how == "subfolder":
        (folder / "snap-1.pkl").mkdir()
    elif how == "symlink":
        (folder / "volume.npy").symlink_to(mine / "scan.npy")
    elif how == "hardlink":
        os.link(mine / "scan.npy", folder / "volume.npy")
    elif how == "fifo":
        os.mkfifo(folder / "progress.bin")
    else:
        (mine / "owner").write_bytes((folder / OWNER_NAME).read_bytes())
        (folder / OWNER_NAME).unlink()
        (folder / OWNER_NAME).symlink_to(mine / "owner")
    assert remove_dead_run_folders(base) == []
    assert folder.is_dir() and (mine / "scan.npy").read_bytes() == b"patient"


def test_a_link_named_like_a_worker_folder_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = _forged(elsewhere, _dead_pid())
    base = tmp_path / "tmp"
    base.mkdir()
    link = base / target.name
    link.symlink_to(target, target_is_directory=True)
    assert remove_dead_run_folders(base) == []
    assert link.is_symlink() and (target / "volume.npy").exists() and (target / OWNER_NAME).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_another_users_folder_is_not_touched(tmp_path):
    folder = _forged(tmp_path, _dead_pid())
    for p in [folder, *folder.iterdir()]:
        os.chown(p, 65534, 65534)
    assert remove_dead_run_folders(tmp_path) == []
    assert (folder / "volume.npy").exists()


# --- an atomic write's temporary file ---------------------------------------------------------

_WRITER = """
    import pathlib, sys
    from DeepDreamAnalysisLib.reference import ReferenceStats
    real = pathlib.Path.write_text
    def stalled(self, text, *a, **k):  # the write of the file blocks half-way, as on a slow or full disk
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            print(self, flush=True)
            sys.stdin.read()
    pathlib.Path.write_text = stalled
    ReferenceStats({"firstorder_Mean": 1.0}, {"firstorder_Mean": 2.0}, {"firstorder_Mean": 3}).save(%r)
"""


def test_a_write_killed_midway_leaves_a_temporary_file_the_next_write_of_that_file_removes(tmp_path):
    target = tmp_path / "reference.json"
    writer = _child(_WRITER % str(target))
    try:
        tmp = Path(_line(writer))
        assert tmp.parent == tmp_path and tmp.name.startswith(f".reference.json.deepdream-tmp-{writer.pid}-")
        assert tmp.name.endswith(".tmp.json") and tmp.stat().st_size > 0
        _kill(writer)
    finally:
        if writer.poll() is None:
            _kill(writer)
    assert tmp.exists() and not target.exists()  # what a SIGKILL leaves
    write_text_atomic(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.json"]


def test_a_live_writers_temporary_file_is_never_removed(tmp_path):
    target = tmp_path / "reference.json"
    writer = _child(_WRITER % str(target))
    try:
        tmp = Path(_line(writer))
        fd = os.open(tmp, os.O_RDONLY)
        try:  # the writer holds its temporary file's lock while it writes
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        write_text_atomic(target, "{}\n")  # another write of the same file meanwhile
        assert tmp.exists() and target.read_text() == "{}\n"
    finally:
        _kill(writer)
    write_text_atomic(target, "[]\n")
    assert not tmp.exists() and target.read_text() == "[]\n"


def test_only_this_machines_dead_temporary_files_of_that_target_go(tmp_path):
    target = tmp_path / "card.json"
    dead, host = _dead_pid(), orphans.host_tag()
    live = os.getppid()

    def name(pid, host=host, start=0, of="card.json", nonce="0123456789abcdef", suffix=".tmp.json"):
        return f".{of}.deepdream-tmp-{pid}-{start}-{host}-{nonce}{suffix}"

    (tmp_path / "mine").write_text("keep")
    items = {
        name(dead): "gone",
        name(dead, nonce="fedcba9876543210", suffix=".tmp"): "gone",
        name(live, start=processes.start_time(live) or 0): "kept: alive",
        name(dead, host="00000000" if host != "00000000" else "11111111"): "kept: another machine",
        name(dead, of="other.json"): "kept: another target",
        name(dead, nonce="xyz"): "kept: not the pattern",
        f".card.json.{dead}.tmp.json": "kept: not the pattern",
        ".card.json.bak": "kept: a user's file",
    }
    for item in items:
        (tmp_path / item).write_text("x")
    link = name(dead, nonce="aaaaaaaaaaaaaaaa")
    (tmp_path / link).symlink_to(tmp_path / "mine")
    hard = name(dead, nonce="bbbbbbbbbbbbbbbb")
    os.link(tmp_path / "mine", tmp_path / hard)
    folder = name(dead, nonce="cccccccccccccccc")
    (tmp_path / folder).mkdir()
    removed = remove_dead_temps(target)
    assert sorted(removed) == sorted(n for n, why in items.items() if why == "gone")
    assert all((tmp_path / n).exists() for n, why in items.items() if why != "gone")
    assert (tmp_path / link).is_symlink() and (tmp_path / hard).exists() and (tmp_path / folder).is_dir()
    assert (tmp_path / "mine").read_text() == "keep"


def test_a_temporary_file_whose_lock_a_live_process_holds_stays_whatever_pid_it_names(tmp_path):
    """A writer this machine's process table cannot see (another PID namespace: a container, a flatpak)
    still holds its temporary file's lock while it writes."""
    target = tmp_path / "stats.json"
    stale = tmp_path / f".stats.json.deepdream-tmp-{_dead_pid()}-0-{orphans.host_tag()}-0123456789abcdef.tmp.json"
    stale.write_text("half")
    holder = _holding_the_lock_of(stale)
    try:
        write_text_atomic(target, "{}")
        assert stale.read_text() == "half"
    finally:
        _kill(holder)
    write_text_atomic(target, "{}")
    assert not stale.exists()


def test_a_temporary_name_of_a_long_target_fits_and_is_recognised(tmp_path):
    target = tmp_path / ("r" * 200 + ".json")
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode()) <= 255 and orphans.TEMP_MARK in tmp.name
        tmp.write_text("x")
        name = tmp.name
    stale = tmp_path / name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-", 1)  # as a killed writer leaves it
    stale.write_text("half")
    write_text_atomic(target, "z")
    assert not stale.exists() and target.read_text() == "z"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- a study worker's scratch folders -----------------------------------------------------------


def test_a_study_worker_killed_while_loading_a_shipped_model_leaves_a_copy_the_next_worker_removes(tmp_path,
                                                                                                   monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    worker = _child("""
        import sys
        import DeepDreamAnalysisLib.models as models
        from DeepDreamAnalysisLib.studies import engine
        def stuck(path, **kwargs):  # the load takes long (a large model): the worker is killed meanwhile
            print(path, flush=True)
            sys.stdin.read()
        models.load_model = stuck
        engine._load_shipped_model({"sha256": "x", "bytes": b"weights", "filename": "a.pt", "card_bytes": b"{}",
                                    "path": "/elsewhere/a.pt"})
    """, TMPDIR=str(temp))
    try:
        copy = Path(_line(worker))
        folder = copy.parent
        assert folder.parent == temp and folder.name.startswith("ddstudy-") and copy.read_bytes() == b"weights"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and (folder / "card.json").exists()
        assert remove_dead_run_folders(temp) == [] and folder.is_dir()  # the worker lives
        _kill(worker)
    finally:
        if worker.poll() is None:
            _kill(worker)
    from DeepDreamAnalysisLib.studies import engine

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    mine = engine._scratch_folder()  # the next worker's: the dead one's copy goes first
    try:
        assert not folder.exists() and [p.name for p in temp.iterdir()] == [mine.path.name]
    finally:
        mine.remove()


def test_a_dead_study_workers_feature_copy_goes_with_its_byte_code_and_only_then(tmp_path, caplog):
    worker = _child("""
        import importlib.util, sys
        from DeepDreamAnalysisLib.outputs.orphans import FEATURES_PREFIX, RunFolder
        folder = RunFolder.create(%r, prefix=FEATURES_PREFIX)
        copy = folder.add_file("my_features.py")
        copy.write_text("def seed_value(image, mask, spacing):\\n    return 0.0\\n")
        spec = importlib.util.spec_from_file_location("my_features", copy)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # writes __pycache__/my_features.*.pyc
        print(folder.path, flush=True)
        sys.stdin.read()
    """ % str(tmp_path), PYTHONDONTWRITEBYTECODE="")  # as Python does by default
    try:
        folder = Path(_line(worker))
        assert folder.name.startswith("ddstudy-features-") and list((folder / "__pycache__").glob("my_features.*.pyc"))
        _kill(worker)
    finally:
        if worker.poll() is None:
            _kill(worker)
    stray = folder / "__pycache__" / "other.cpython-311.pyc"
    stray.write_bytes(b"not the tool's")
    caplog.set_level(logging.WARNING)
    assert remove_dead_run_folders(tmp_path) == [] and stray.exists()
    assert any("__pycache__" in r.getMessage() and "study worker" in r.getMessage() for r in caplog.records)
    stray.unlink()
    (folder / "notes.txt").write_text("mine")  # a file the owner file does not name
    assert remove_dead_run_folders(tmp_path) == [] and (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    assert remove_dead_run_folders(tmp_path) == [folder] and not folder.exists()


def test_a_folder_names_only_plain_files_as_its_own(tmp_path):
    folder = RunFolder.create(tmp_path, prefix=orphans.STUDY_PREFIX)
    try:
        for bad in ("", ".", "..", "a/b", OWNER_NAME, "__pycache__", "a\0b"):
            with pytest.raises(ValueError):
                folder.add_file(bad)
        with pytest.raises(ValueError):
            RunFolder.create(tmp_path, prefix="mine-")
    finally:
        folder.remove()
