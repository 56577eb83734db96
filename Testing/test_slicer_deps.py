"""Installing the module's requirements inside Slicer: asked before, torch and Slicer's packages pinned.

Runs on slicer-core's real ``slicer.util``; only the dialog and pip are replaced by recorders (a
test must not show a dialog or install packages).
"""

from __future__ import annotations

import os

import pytest

from slicer_fixtures import slicer  # noqa: F401 - skips without slicer-core

from DeepDreamAnalysisLib import slicer_deps


@pytest.fixture
def install_flow(monkeypatch, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("surely-not-installed-deepdream-pkg>=1.0\n")
    monkeypatch.setattr(slicer_deps, "REQUIREMENTS", requirements)
    monkeypatch.setattr(slicer_deps, "_approved_this_session", False)
    answers, asked, pip_calls = [], [], []

    def confirm(text, **kwargs):
        asked.append(text)
        return answers.pop(0)

    def pip_install(args):
        constraints = args.split(" -c ", 1)[1].strip().strip('"') if " -c " in args else None
        pip_calls.append((args, open(constraints).read() if constraints else None))  # as pip reads it
        requirements.write_text("")  # as if pip had installed it

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    return answers, asked, pip_calls, requirements


def test_a_refusal_is_asked_again_on_the_next_apply_and_nothing_is_installed(install_flow):
    answers, asked, pip_calls, requirements = install_flow
    answers += [False, False]
    assert slicer_deps.ensure_dependencies(askConfirmation=True) is False
    assert slicer_deps.ensure_dependencies(askConfirmation=True) is False
    assert len(asked) == 2 and "surely-not-installed-deepdream-pkg>=1.0" in asked[0]
    assert pip_calls == []


def test_after_a_yes_pip_gets_a_constraint_that_pins_torch_and_slicers_packages(install_flow):
    answers, asked, pip_calls, requirements = install_flow
    answers += [True]
    assert slicer_deps.ensure_dependencies(askConfirmation=True) is True
    assert len(asked) == 1 and len(pip_calls) == 1
    args, text = pip_calls[0]
    assert '"surely-not-installed-deepdream-pkg>=1.0"' in args and " -c " in args
    constraints = args.split(" -c ", 1)[1].strip().strip('"')
    assert not os.path.exists(os.path.dirname(constraints))  # its temporary folder went once pip was done
    import numpy
    import torch

    pins = text.splitlines()
    assert f"torch=={torch.__version__}" in pins and f"numpy=={numpy.__version__}" in pins
    requirements.write_text("surely-not-installed-deepdream-pkg>=1.0\n")  # needed again: no second question
    assert slicer_deps.ensure_dependencies(askConfirmation=True) is True
    assert len(asked) == 1 and len(pip_calls) == 2
