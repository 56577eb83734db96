"""The module's Widget on real Qt: DeepDreamAnalysis.py's DeepDreamAnalysisWidget with the real .ui
file loaded by Qt's uic (PyQt5, offscreen), real MRML nodes (slicer-core) and a real worker process.

A STAND-IN, NOT SLICER: the Slicer/CTK widgets, the parameter-node wrapper, PythonQt's calling style
and slicer.app are small stand-ins with the names, properties and signals of Slicer 5.10's
(Testing/slicer_qt_standins.py says which). It catches typos in widget names, .ui properties and
signal signatures, and drives setup, binding, a model chosen, Apply -> progress -> Cancel, a run to
the end, scene close and cleanup twice.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from slicer_fixtures import mrml_scene, slicer  # noqa: E402,F401 - fixture
from tiny_models import liver_like, tiny_card, tiny_net  # noqa: E402

import slicer_qt_standins as standins  # noqa: E402


@pytest.fixture
def panel(mrml_scene, monkeypatch, tmp_path):
    app, errors = standins.install(monkeypatch, slicer)
    module = standins.load_module()
    widget = module.DeepDreamAnalysisWidget()
    widget.setup()
    model = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny_net(3)), str(model))
    card = tiny_card(3, roi=[12, 16, 16]).to_dict()
    card["dream"] = {"iterations": 6, "step": 300.0}
    (tmp_path / "tiny.pt.card.json").write_text(json.dumps(card))
    volume = slicer.util.addVolumeFromArray(liver_like((24, 40, 40)), name="CT")
    volume.SetSpacing(0.8, 0.8, 2.5)
    yield widget, app, errors, model, volume
    widget.cleanup()


def _until(condition, timeout=120.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        standins.app().processEvents()
        time.sleep(0.02)


@pytest.mark.slow
def test_the_panel_on_real_qt(panel, mrml_scene):
    widget, app, errors, model, volume = panel
    ui, p = widget.ui, widget._parameterNode
    # setup: only the Place button of the markups widget shows; one seed list, reused on enter
    assert not ui.seedPlaceWidget.buttonsVisible and not ui.seedPlaceWidget.placeButton().isHidden()
    seed = p.seed
    widget.enter()
    assert p.seed is seed and mrml_scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
    # binding: parameter -> widget and widget -> parameter; empty paths stay empty
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.property("count"))] == ["auto", "cuda", "cpu"]
    p.recordEvery = 3
    assert ui.recordEverySpinBox.value() == 3
    ui.stepSpinBox.setValue(2.5)
    assert p.step == 2.5
    assert ui.modelPathLineEdit.currentPath == "" and not ui.applyButton.enabled
    assert ui.inputVolumeSelector.currentNode() is volume or p.inputVolume is None
    p.inputVolume = volume
    # a model chosen: its card's dream settings fill iterations and step; the 3D shape group only
    ui.modelPathLineEdit.currentPath = str(model)
    assert p.modelPath == str(model) and p.iterations == 6 and p.step == 300.0
    assert "model card" in ui.statusLabel.text
    hidden = [ui.featureTree.topLevelItem(g).text(0) for g in range(ui.featureTree.topLevelItemCount)
              if ui.featureTree.topLevelItem(g).isHidden()]
    assert hidden == ["Shape (2D models)"]
    # the seed: placing again moves it
    seed.AddControlPoint(10.0, 12.0, 20.0)
    seed.AddControlPoint(12.0, 14.0, 22.0)
    assert seed.GetNumberOfControlPoints() == 1
    assert ui.applyButton.enabled
    p.device = "cpu"

    # Apply -> progress -> Cancel
    p.iterations = 100000
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and not ui.parametersCollapsibleButton.enabled, errors
    _until(lambda: ui.progressBar.value >= 2)
    ui.applyButton.click()
    _until(lambda: ui.applyButton.text == "Apply")
    assert ui.statusLabel.text.startswith("Cancelled"), ui.statusLabel.text
    assert widget.logic.handle.status == "cancelled" and not errors

    # a run to the end
    p.iterations = 4
    ui.applyButton.click()
    _until(lambda: ui.applyButton.text == "Apply")
    assert widget.logic.handle.status == "completed", (ui.statusLabel.text, errors)
    assert widget.logic.handle.nodes.table.GetNumberOfRows() == 4 and ui.progressBar.value == 4

    # unticking every feature: a clear message, no run
    for item in widget._featureItems():
        item.setCheckState(0, standins.QtCore.Qt.Unchecked)
    ui.applyButton.click()
    assert any("No feature is ticked" in e for e in errors) and ui.applyButton.text == "Apply"
    errors.clear()
    widget._checkFeatureItems([])

    # scene close mid-run
    p.iterations = 100000
    ui.applyButton.click()
    handle = widget.logic.handle
    mrml_scene.Clear(0)
    assert handle.status == "cancelled" and ui.statusLabel.text == "Cancelled: the scene was closed."
    handle.runner.process.wait(10)

    # cleanup twice (reload, then Slicer quitting): aboutToQuit connected once and disconnected once
    assert [s for s, _ in app.connections] == ["aboutToQuit()"]
    widget.cleanup()
    widget.cleanup()
    assert app.connections == []


@pytest.mark.slow
def test_the_logic_timer_drains_a_non_blocking_comparison_in_a_worker_process(panel, tmp_path):
    """DeepDreamAnalysisLogic.compareModels(waitForCompletion=False): a worker process, drained by the
    logic's real QTimer (the same timer and drain path as a run)."""
    widget, app, errors, model, volume = panel
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(tiny_net(3, seed=1)), str(other))
    (tmp_path / "other.pt.card.json").write_text((tmp_path / "tiny.pt.card.json").read_text())
    logic = widget.logic
    handle = logic.compareModels(volume, {"a": model, "b": other}, (20, 20, 12), restarts=2,
                                 waitForCompletion=False, device="cpu")
    assert handle.runner.process is not None and logic._timer.isActive()
    _until(lambda: not handle.is_running)
    assert handle.status == "completed", handle.error
    assert set(logic.comparisonNodes.tables) == {"a", "b"}
    _until(lambda: not logic._timer.isActive(), timeout=5)
    assert not errors
