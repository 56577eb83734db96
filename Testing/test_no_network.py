"""The analysis never opens a network connection (issue 6, item 4).

A full analysis (load_model from files, run_analysis with native and pyradiomics features,
write_outputs) and the command line run with networking blocked: ``socket.socket.connect``,
``connect_ex`` and ``socket.create_connection`` raise, and a Python audit hook records every
``socket.connect`` event (it also sees connections made through references to the socket methods
taken before the test patched them). The tests assert that nothing tried to connect.
"""

import json
import socket
import sys

import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.cli import main
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.models import load_model
from DeepDreamAnalysisLib.report import write_outputs
from DeepDreamAnalysisLib.volume import read_volume

from tiny_models import tiny_card, tiny_net, write_case

_ATTEMPTS: list = []
_WATCHING = [False]


def _audit(event, args):
    if _WATCHING[0] and event in ("socket.connect", "socket.getaddrinfo"):
        _ATTEMPTS.append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it only records while a test watches


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        _ATTEMPTS.append(("blocked", repr(args)[:200]))
        raise OSError("networking is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    _ATTEMPTS.clear()
    _WATCHING[0] = True
    yield _ATTEMPTS
    _WATCHING[0] = False


def test_the_blocking_works(no_network):
    """The guard itself: a connection attempt is refused and recorded (else the tests below prove nothing)."""
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("127.0.0.1", 9))
    assert no_network


def test_full_analysis_from_files_opens_no_connection(tmp_path, no_network):
    case = write_case(tmp_path / "case")
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    state_dict = tmp_path / "case" / "conv.pth"
    torch.save(conv.state_dict(), state_dict)
    card = tiny_card(2).to_dict()
    card["network"] = {"name": "torch.nn.Conv2d",
                       "args": {"in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding": 1}}
    volume = read_volume(case["image"])
    config = AnalysisConfig(dream=DreamConfig(iterations=8, step=400.0, device="cpu"),
                            features=FeatureConfig(names=("firstorder_Entropy", "glcm_Contrast", "glszm_ZoneEntropy"),
                                                   backend="auto"), snapshot_every=2)
    for model in (load_model(case["model"]), load_model(state_dict, card=card)):
        result = run_analysis(volume, (24, 20, 1), model, config)
        paths = write_outputs(result, tmp_path / f"out-{model.format}", volume)
        assert result.status == "completed"
        assert json.loads(paths["json"].read_text())["status"] == "completed"
        if model.format == "torchscript":  # its dream makes a mask: the pyradiomics worker process answered
            assert not all(v != v for v in result.column("glszm_ZoneEntropy"))
    assert no_network == [], f"something tried to connect: {no_network}"


def test_command_line_run_opens_no_connection(tmp_path, no_network, capsys):
    case = write_case(tmp_path / "case")
    out = tmp_path / "out"
    code = main(["run", "--image", str(case["image"]), "--model", str(case["model"]), "--seed", "24,20,1",
                 "--out", str(out), "--iterations", "3", "--step", "400", "--features", "firstorder_Mean"])
    assert code == 0, capsys.readouterr().err
    assert (out / "report.html").is_file()
    assert no_network == [], f"something tried to connect: {no_network}"
