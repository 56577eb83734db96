"""A real, headless MRML scene for tests (the slicer-core package: Slicer's MRML libraries without
Qt). Import the fixture in a test module: ``from slicer_fixtures import mrml_scene``.

The scene has the application logic with the Sequences and Segmentations module logics registered,
as Slicer's application does at start-up, so that sequence browsers update their proxy nodes and
segmentations convert labelmaps.
"""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML headless")


def make_scene():
    """A new scene set as ``slicer.mrmlScene``, with its logics (kept alive on the scene object)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    logics = [app_logic]
    for name, cls in (("Sequences", slicer.vtkSlicerSequencesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics.append(logic)
    slicer.mrmlScene = scene
    return scene, logics


@pytest.fixture
def mrml_scene():
    scene, logics = make_scene()
    yield scene
    for logic in reversed(logics):
        logic.SetMRMLScene(None)
    scene.Clear(True)
    slicer.mrmlScene = None
