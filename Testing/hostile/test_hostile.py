"""Run the hostile corpus (corpus.py) against the command line and the Python API (issue #11).

Each case asserts: the exit code (2 bad input, 1 fault) with an ``error:`` line that matches the
case's message (the problem and the fix), no traceback, the inputs unmodified, the output folder as
it was before (or absent when it did not exist: no empty folder left), no temporary or lock file
left anywhere, no code run (the marker file), and, where the case has one, the same message from
the Python API as a DeepDreamError. Each case is bounded in time (an alarm ends a hang).
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

from DeepDreamAnalysisLib import bundle  # noqa: E402
from DeepDreamAnalysisLib.cli import main  # noqa: E402
from DeepDreamAnalysisLib.errors import DeepDreamError  # noqa: E402

CASE_TIMEOUT_S = 60  # a sanity bound: a case that hangs fails instead of blocking the suite
CASE_MEMORY_BYTES = 1 << 30  # a sanity bound on the peak memory a refused case may add
LEFTOVER = re.compile(r"(^\..*\.tmp|^\.snapshots-new-|^\.snapshots-old-|^deepdream\.lock$|^\.write-test\.)")


def test_the_corpus_is_large_and_covers_every_class():
    names = sorted(corpus.GENERATORS)
    assert len(names) >= 150, len(names)
    for prefix in ("bundle_", "card_", "pickle_", "image_", "model_", "out_", "reference_", "seed_", "option_"):
        assert sum(n.startswith(prefix) for n in names) >= 5 or prefix in ("model_",), prefix


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return corpus.make_workspace(tmp_path_factory.mktemp("hostile_base"))


def _workspace(base: corpus.Workspace, root: Path) -> corpus.Workspace:
    inputs = root / "inputs"
    shutil.copytree(base.inputs, inputs)
    return corpus.Workspace(root=root, inputs=inputs, model=inputs / base.model.name, card=inputs / base.card.name,
                            image=inputs / base.image.name, unet_weights=inputs / base.unet_weights.name,
                            out=root / "out")


def _snapshot(folder: Path) -> dict | None:
    """Every entry under ``folder`` with its type and content hash; FIFOs and devices are never opened."""
    if not os.path.lexists(folder):
        return None
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = os.fsencode(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def _leftovers(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if LEFTOVER.search(name):
                found.append(os.path.join(dirpath, name))
    return found


class _Timeout(Exception):
    pass


def _run_in_process(argv, capsys) -> tuple[int, str]:
    def alarm(signum, frame):
        raise _Timeout(f"the case ran longer than {CASE_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def _run_in_child(argv) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "DeepDreamAnalysisLib.cli", *argv], capture_output=True,
                          timeout=CASE_TIMEOUT_S)
    return proc.returncode, proc.stderr.decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("name", sorted(corpus.GENERATORS))
def test_hostile_case(name, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bundle, "MAX_WEIGHTS_BYTES", 8 << 20)  # the weights bomb need not be gigabytes
    ws = _workspace(base, tmp_path)
    case = corpus.GENERATORS[name](ws)
    try:
        if case.prepare_out is not None:
            case.prepare_out(ws.out)
        inputs_before = _snapshot(ws.inputs)
        out_before = _snapshot(ws.out)
        leftovers_before = set(_leftovers(tmp_path))  # a lock another process holds is not ours
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        if case.subprocess:
            code, err = _run_in_child([os.fsdecode(a) if isinstance(a, bytes) else a for a in case.argv])
        else:
            code, err = _run_in_process(case.argv, capsys)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
        assert grown < CASE_MEMORY_BYTES, f"the case raised the peak memory by {grown / 2**20:.0f} MiB"
        assert code == case.code, err
        assert "Traceback" not in err, err
        assert "error:" in err, err
        assert re.search(case.message, err, re.S), (case.message, err)
        assert "weights_only=False" not in err
        assert _snapshot(ws.inputs) == inputs_before, "an input was modified"
        assert _snapshot(ws.out) == out_before, "the output folder changed (or an empty one was left)"
        assert not ws.marker.exists(), "code from the input ran"
        assert set(_leftovers(tmp_path)) == leftovers_before, _leftovers(tmp_path)
        if case.api is not None:
            with pytest.raises(DeepDreamError) as err_api:
                case.api()
            assert re.search(case.message, str(err_api.value), re.S), (case.message, str(err_api.value))
            assert _snapshot(ws.inputs) == inputs_before
            assert not ws.marker.exists()
    finally:
        while corpus.LOCK_HOLDERS:
            child = corpus.LOCK_HOLDERS.pop()
            child.kill()
            child.wait()
