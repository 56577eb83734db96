"""Faults during a run and bad input, through the headless Slicer logic (issue 6), on Slicer's real
MRML classes (slicer-core) with real engine runs on a tiny network.

Decisions under test (docs/slicer-panel.md, "When things go wrong"):
- the input volume or the seed node deleted mid-run: the run goes on with its own copy and ends normally;
- the scene closed mid-run: the run is cancelled, its worker ends, nothing is recreated in the new scene;
- run() while a run is going: refused with RunInProgressError; the first run is not disturbed;
- bad input: a DeepDreamError subclass naming the problem, and no node created, changed or removed.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import vtk

from slicer_fixtures import mrml_scene, slicer  # noqa: F401 - fixture
from tiny_models import TinyModel, liver_like, tiny_card, tiny_model, tiny_net

from DeepDreamAnalysisLib import scene
from DeepDreamAnalysisLib.config import PAPER_FEATURES_2D, PAPER_FEATURES_3D
from DeepDreamAnalysisLib.errors import DeepDreamError, FeatureError, ImageError, ModelError, ReferenceStatsError, SeedError
from DeepDreamAnalysisLib.reference import ReferenceStats
from DeepDreamAnalysisLib.slicer_logic import (AnalysisLogicCore, RunInProgressError, active_run, dream_settings,
                                               features_for_dims, model_card_hints)

FEATURES = ["firstorder_RootMeanSquared", "firstorder_Entropy"]
SHAPE = (3, 40, 48)  # k, j, i
SEED = (24, 20, 1)  # i, j, k


def _input_node(name="input"):
    node = slicer.util.addVolumeFromArray(liver_like(SHAPE), name=name)
    node.SetSpacing(0.8, 0.7, 2.5)
    node.SetOrigin(10.0, -20.0, 5.0)
    return node


def _user_nodes(mrml_scene):
    """Nodes a user has besides the input: another volume, a point list, a table."""
    other = slicer.util.addVolumeFromArray(liver_like(SHAPE, seed=3), name="other CT")
    points = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    points.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0))
    notes = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "notes")
    notes.GetTable().AddColumn(vtk.vtkDoubleArray())
    return other, points, notes


def _state(node):
    """What a user would see of a node: name, class, and its voxels / points / rows."""
    if node.IsA("vtkMRMLVolumeNode"):
        content = slicer.util.arrayFromVolume(node).copy()
    elif node.IsA("vtkMRMLMarkupsNode"):
        content = np.array([node.GetNthControlPointPosition(i) for i in range(node.GetNumberOfControlPoints())])
    elif node.IsA("vtkMRMLTableNode"):
        content = np.array([node.GetNumberOfRows(), node.GetNumberOfColumns()])
    else:
        content = None
    return node.GetName(), node.GetClassName(), content


def _same_state(a, b):
    return a[:2] == b[:2] and (a[2] is None and b[2] is None or np.array_equal(a[2], b[2]))


def _markups_at(mrml_scene, node, ijk, name="seed"):
    markups = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    markups.AddControlPointWorld(vtk.vtkVector3d(*scene.ras_from_ijk(ijk, node)))
    return markups


def _drain_until(handle, iteration, limit_s=30.0):
    end = time.monotonic() + limit_s
    while handle.lastProgress is None or handle.lastProgress.step.iteration < iteration:
        assert handle.processEvents(), f"the run ended early: {handle.status} {handle.error}"
        handle.runner.join(0.02)
        assert time.monotonic() < end, "the run made no progress"


def _ids(mrml_scene):
    return {mrml_scene.GetNthNode(n).GetID() for n in range(mrml_scene.GetNumberOfNodes())}


class _Slow(torch.nn.Module):
    """The tiny network, 30 ms per call: a short run that surely lasts past the first drains."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(2)

    def forward(self, x):
        time.sleep(0.03)
        return self.net(x)


def _slow_model():
    return TinyModel(_Slow(), tiny_card(2))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny model é.pt"  # a space and a non-ASCII letter, as users' paths have
    torch.jit.save(torch.jit.script(tiny_net(2)), str(path))
    tiny_card(2).save(tmp_path / "tiny model é.pt.card.json")
    return path


# ----------------------------------------------------------------------------- faults mid-run

def test_input_volume_deleted_mid_run_the_run_goes_on_and_other_nodes_are_untouched(mrml_scene):
    node = _input_node()
    user = _user_nodes(mrml_scene)
    before = [_state(n) for n in user]
    messages = []
    logic = AnalysisLogicCore()
    handle = logic.run(node, seed=SEED, model=_slow_model(), iterations=14, step=400.0, features=FEATURES,
                       device="cpu", recordEvery=2, waitForCompletion=False, logCallback=messages.append)
    _drain_until(handle, 2)
    mrml_scene.RemoveNode(node)
    assert handle.is_running
    result = handle.wait(interval=0.02)  # no exception out of the drain
    assert result.status == "completed" and handle.status == "completed" and len(result.steps) == 14
    nodes = handle.nodes
    assert nodes.table.GetNumberOfRows() == 14
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes.image), result.snapshots[-1].image, rtol=1e-6)
    assert nodes.mask.GetSegmentation().GetSegment(scene.SEGMENT_ID) is not None
    assert all(n.GetAttribute(scene.ATTR_STATUS) == "completed" for n in nodes.all_nodes())
    assert any("input volume 'input' was removed" in m and "goes on" in m for m in messages), messages
    assert not any("Could not" in m for m in messages), messages
    assert all(_same_state(a, _state(n)) for a, n in zip(before, user))
    assert all(mrml_scene.IsNodePresent(n) for n in user)


def test_seed_node_deleted_mid_run_the_run_continues_from_its_voxel(mrml_scene):
    node = _input_node()
    markups = _markups_at(mrml_scene, node, SEED)
    logic = AnalysisLogicCore()
    handle = logic.run(node, seed=markups, model=_slow_model(), iterations=12, step=400.0, features=FEATURES,
                       device="cpu", waitForCompletion=False)
    _drain_until(handle, 1)
    mrml_scene.RemoveNode(markups)
    assert handle.is_running
    result = handle.wait(interval=0.02)
    assert result.status == "completed" and len(result.steps) == 12
    assert result.metadata["input"]["seed_ijk"] == list(SEED)
    assert json.loads(handle.nodes.metadata.GetText())["seed_ijk"] == list(SEED)
    assert handle.nodes.table.GetNumberOfRows() == 12
    assert mrml_scene.IsNodePresent(node)


def test_scene_closed_mid_run_cancels_it_and_recreates_nothing(mrml_scene, model_file):
    node = _input_node()
    finished, messages = [], []
    logic = AnalysisLogicCore()
    handle = logic.run(node, model_file, SEED, iterations=100000, step=400.0, features=FEATURES, device="cpu",
                       waitForCompletion=False, finishedCallback=finished.append, logCallback=messages.append)
    _drain_until(handle, 2)
    worker = handle.runner._thread
    slicer.mrmlScene.Clear(0)
    assert not logic.isRunning and active_run() is None and handle.status == "cancelled"
    assert finished == [handle] and any("scene was closed" in m for m in messages), messages
    after_close = _ids(mrml_scene)
    # the timer keeps ticking for a moment: it must stop, and not bring the nodes back
    t0 = time.monotonic()
    for _ in range(20):
        assert handle.processEvents() is False
        time.sleep(0.02)
    worker.join(5.0)
    assert not worker.is_alive(), "the worker thread still runs after the scene closed"
    print(f"\nworker ended {time.monotonic() - t0:.2f} s after the scene closed")
    assert handle.processEvents() is False
    assert _ids(mrml_scene) == after_close and scene.find_run_nodes(mrml_scene) == []
    assert handle.nodes.image is None and handle.nodes.all_nodes() == []  # gone with the scene
    assert handle.wait(timeout=5).status == "cancelled"  # the worker's partial result, marked cancelled
    # a new run in the new scene works
    node2 = _input_node("after close")
    result = logic.run(node2, model_file, SEED, iterations=3, step=400.0, features=FEATURES, device="cpu")
    assert result.status == "completed" and logic.handle.nodes.table.GetNumberOfRows() == 3


def test_scene_closed_during_a_blocking_run_returns_the_cancelled_result(mrml_scene, model_file):
    node = _input_node()
    ticks = []

    def idle():  # stands in for slicer.app.processEvents: the user closes the scene meanwhile
        ticks.append(1)
        if len(ticks) == 3:
            slicer.mrmlScene.Clear(0)

    logic = AnalysisLogicCore()
    t0 = time.monotonic()
    result = logic.run(node, model_file, SEED, iterations=100000, step=400.0, features=FEATURES, device="cpu",
                       idle=idle)
    assert result is not None and result.status == "cancelled"
    assert time.monotonic() - t0 < 30 and not logic.handle.runner.is_running
    assert scene.find_run_nodes(mrml_scene) == []


def test_second_run_is_refused_and_the_first_goes_on_then_console_cancel_marks_it(mrml_scene, model_file):
    node = _input_node()
    logic = AnalysisLogicCore()
    handle = logic.run(node, model_file, SEED, iterations=100000, step=400.0, features=FEATURES, device="cpu",
                       recordEvery=2, waitForCompletion=False)
    _drain_until(handle, 1)
    ids = _ids(mrml_scene)
    for other in (logic, AnalysisLogicCore()):  # the same logic (console) or another one (the panel's)
        with pytest.raises(RunInProgressError, match=r"already running \(iteration \d+/100000\).*cancel it first.*"
                                                     r"wait for it to end") as info:
            other.run(node, model_file, SEED, iterations=3, device="cpu")
        assert isinstance(info.value, DeepDreamError)
        assert _ids(mrml_scene) == ids  # no node made or removed
    with pytest.raises(RunInProgressError):
        logic.compareModels(node, {"a": model_file}, SEED, iterations=2, device="cpu")
    _drain_until(handle, handle.lastProgress.step.iteration + 2)  # the first run still goes on
    logic.cancel()  # the console's cancel
    result = handle.wait(timeout=30, interval=0.02)
    assert result.status == "cancelled" and result.metadata["status"] == "cancelled"
    nodes = handle.nodes
    assert {n.GetAttribute(scene.ATTR_STATUS) for n in nodes.all_nodes()} == {"cancelled"}
    for n in range(nodes.imageSequence.GetNumberOfDataNodes()):  # scrubbing shows "cancelled" too
        assert nodes.imageSequence.GetNthDataNode(n).GetAttribute(scene.ATTR_STATUS) == "cancelled"
    assert json.loads(nodes.metadata.GetText())["status"] == "cancelled"
    assert nodes.metadata.GetAttribute("DeepDreamAnalysis.status") == '"cancelled"'
    assert nodes.table.GetNumberOfRows() == len(result.steps)
    # once it has ended, a new run starts
    assert logic.run(node, model_file, SEED, iterations=2, step=400.0, features=FEATURES,
                     device="cpu").status == "completed"


def test_a_run_ended_but_never_drained_does_not_block_the_next(mrml_scene):
    node = _input_node()
    logic = AnalysisLogicCore()
    handle = logic.run(node, seed=SEED, model=tiny_model(2), iterations=2, step=400.0, features=FEATURES,
                       device="cpu", waitForCompletion=False)
    handle.runner.join(30)  # nobody calls processEvents (a script without a timer)
    result = logic.run(node, seed=SEED, model=tiny_model(2), iterations=2, step=400.0, features=FEATURES,
                       device="cpu", newNodes=True)
    assert result.status == "completed"
    assert handle.status == "completed" and handle.nodes.table.GetNumberOfRows() == 2  # finished first


class _BreaksAt(torch.nn.Module):
    """A tiny network whose forward raises from its n-th forward of the transformed copies with gradient
    on (a fault inside the model; the seed window's probes and the forwards without gradient not counted)."""

    def __init__(self, n):
        super().__init__()
        self.net = tiny_net(2)
        self.calls = 0
        self.n = n

    def forward(self, x):
        self.calls += bool(x.requires_grad) and x.shape[0] > 1
        if self.calls >= self.n:
            raise RuntimeError("simulated failure inside the network")
        return self.net(x)


def test_exception_inside_the_model_mid_run_marks_the_nodes_fault_and_keeps_the_curves(mrml_scene):
    node = _input_node()
    messages, callbacks = [], []
    logic = AnalysisLogicCore()
    model = TinyModel(_BreaksAt(6), tiny_card(2))
    handle = logic.run(node, seed=SEED, model=model, iterations=50, step=400.0, features=FEATURES, device="cpu",
                       waitForCompletion=False, logCallback=messages.append,
                       finishedCallback=lambda h: callbacks.append(h.status))
    result = handle.wait(timeout=60, interval=0.02)  # no exception: the fault is the result's status
    assert result.status == "fault" and "simulated failure" in result.metadata["fault"]
    nodes = handle.nodes
    assert 0 < nodes.table.GetNumberOfRows() == len(result.steps) < 50
    assert {n.GetAttribute(scene.ATTR_STATUS) for n in nodes.all_nodes()} == {"fault"}
    assert "simulated failure" in json.loads(nodes.metadata.GetText())["fault"]
    assert callbacks == ["fault"] and any("stopped on a fault" in m for m in messages), messages
    assert not logic.isRunning


def test_a_failing_user_callback_never_breaks_the_drain(mrml_scene):
    node = _input_node()

    def broken(*_):
        raise ValueError("bug in the user's callback")

    logic = AnalysisLogicCore()
    handle = logic.run(node, seed=SEED, model=tiny_model(2), iterations=4, step=400.0, features=FEATURES,
                       device="cpu", waitForCompletion=False, progressCallback=broken, logCallback=broken,
                       finishedCallback=broken)
    result = handle.wait(timeout=60, interval=0.02)
    assert result.status == "completed" and handle.nodes.table.GetNumberOfRows() == 4


# ----------------------------------------------------------------------------- bad input

def test_bad_input_through_the_logic_is_refused_with_nothing_made_or_touched(mrml_scene, model_file, tmp_path):
    node = _input_node()
    logic = AnalysisLogicCore()
    first = logic.run(node, model_file, SEED, iterations=2, step=400.0, features=FEATURES, device="cpu")
    assert first.status == "completed"
    previous_run = {n.GetID() for n in scene.find_run_nodes(mrml_scene)}
    labelmap = slicer.util.addVolumeFromArray((liver_like(SHAPE) > 110).astype(np.uint8), name="liver label",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    rgb = slicer.util.addVolumeFromArray(np.zeros((*SHAPE, 3), np.uint8), name="photo",
                                         nodeClassName="vtkMRMLVectorVolumeNode")
    outside = _markups_at(mrml_scene, node, SEED)
    outside.SetNthControlPointPositionWorld(0, *scene.ras_from_ijk((24, 20, 9), node))  # k = 9 > 2
    user = [node, labelmap, rgb, outside, *_user_nodes(mrml_scene)]
    before_states = [_state(n) for n in user]
    before_ids = _ids(mrml_scene)
    cases = [
        (dict(volumeNode=labelmap), ImageError, r"'liver label' is a label map.*Select the grey-level volume"),
        (dict(volumeNode=rgb), ImageError, r"'photo' is a vector volume with 3 value\(s\) per voxel.*one grey value"),
        (dict(seed=outside), SeedError, r"outside 'input'.*Place the seed point inside the image"),
        (dict(seed=(24, 20, 3)), SeedError, r"outside the volume"),
        (dict(modelPath=tmp_path / "no such model.pt"), ModelError, r"Model file not found: .*no such model\.pt"),
        (dict(volumeNode=None), ImageError, r"No input volume given"),
        (dict(device="tpu"), DeepDreamError, r"device must be one of auto, cuda, cpu"),
    ]
    for change, error, message in cases:
        kwargs = dict(volumeNode=node, modelPath=model_file, seed=SEED, iterations=2, step=400.0,
                      features=FEATURES, device="cpu")
        kwargs.update(change)
        with pytest.raises(error, match=message):
            logic.run(**kwargs)
        assert _ids(mrml_scene) == before_ids, f"{change}: nodes were made or removed"
        assert not logic.isRunning and active_run() is None
    assert all(_same_state(a, _state(n)) for a, n in zip(before_states, user))
    assert {n.GetID() for n in scene.find_run_nodes(mrml_scene)} == previous_run  # the last run's nodes stay
    assert logic.handle.result is first


def test_compare_models_refuses_a_label_map_before_running_anything(mrml_scene, model_file):
    labelmap = slicer.util.addVolumeFromArray(np.ones(SHAPE, np.uint8), name="seg",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    ids = _ids(mrml_scene)
    with pytest.raises(ImageError, match="label map"):
        AnalysisLogicCore().compareModels(labelmap, {"a": model_file}, SEED, iterations=2, device="cpu")
    assert _ids(mrml_scene) == ids and active_run() is None


# ----------------------------------------------------------------------------- features and model dimensionality

def test_features_for_dims_translates_the_papers_shape_features_and_drops_other_shapes():
    both = list(PAPER_FEATURES_2D) + list(PAPER_FEATURES_3D)  # what the panel sent with both groups ticked
    assert features_for_dims(both, 3)[0] == PAPER_FEATURES_3D
    assert features_for_dims(both, 2)[0] == PAPER_FEATURES_2D
    names, notes = features_for_dims(["shape2D_MaximumDiameter", "shape2D_Perimeter", "glcm_Contrast"], 3)
    assert names == ("shape_Maximum3DDiameter", "glcm_Contrast")
    assert any("shape2D_MaximumDiameter -> shape_Maximum3DDiameter" in n for n in notes), notes
    assert any("left out shape2D_Perimeter" in n for n in notes), notes
    names, notes = features_for_dims(["shape_Sphericity", "shape_VoxelVolume", "firstorder_Mean"], 2)
    assert names == ("shape2D_Sphericity", "firstorder_Mean") and any("shape_VoxelVolume" in n for n in notes)
    assert features_for_dims(None, 3) == (None, ())
    assert features_for_dims(["shape_Elongation", "firstorder_Mean"], 3) == (("shape_Elongation", "firstorder_Mean"), ())


def test_a_run_given_both_shape_groups_uses_the_models_and_says_so(mrml_scene):
    """The panel's default ticks (the paper's features in 2D and 3D form) must run, not fail."""
    messages = []
    for dims, shape in ((3, (8, 24, 24)), (2, SHAPE)):
        node = slicer.util.addVolumeFromArray(liver_like(shape), name=f"ct{dims}")
        seed = (shape[2] // 2, shape[1] // 2, shape[0] // 2)
        model = tiny_model(dims, roi=[8, 12, 12] if dims == 3 else None)
        result = AnalysisLogicCore().run(node, seed=seed, model=model, iterations=2, step=400.0, device="cpu",
                                         features=list(PAPER_FEATURES_2D) + list(PAPER_FEATURES_3D),
                                         logCallback=messages.append)
        assert result.status == "completed"
        assert tuple(result.feature_names) == (PAPER_FEATURES_3D if dims == 3 else PAPER_FEATURES_2D)
    assert any("The model is 3D: using shape2D_MaximumDiameter -> shape_Maximum3DDiameter" in m for m in messages)
    assert any("The model is 2D: using shape_Maximum3DDiameter -> shape2D_MaximumDiameter" in m for m in messages)


# ----------------------------------------------------------------------------- a refused run keeps the last run's nodes

def _run_nodes_state(mrml_scene):
    nodes = scene.find_run_nodes(mrml_scene)
    return {n.GetID(): (_state(n), n.GetAttribute(scene.ATTR_STATUS), n.GetMTime()) for n in nodes}


def test_a_run_refused_for_its_features_or_reference_leaves_the_last_runs_nodes_unchanged(mrml_scene, model_file,
                                                                                           tmp_path):
    node = _input_node()
    logic = AnalysisLogicCore()
    first = logic.run(node, model_file, SEED, iterations=2, step=400.0, features=FEATURES, device="cpu")
    assert first.status == "completed"
    before = _run_nodes_state(mrml_scene)
    before_ids = _ids(mrml_scene)
    assert len(before) >= 5
    partial = tmp_path / "reference.json"
    ReferenceStats(mean={FEATURES[0]: 100.0}, std={FEATURES[0]: 10.0}, n={FEATURES[0]: 5}).save(partial)
    cases = [
        (dict(features=["firstorder_Entropy", "glcm_NoSuchFeature"]), FeatureError, r"Unknown feature 'glcm_NoSuchFeature'"),
        (dict(referencePath=partial), ReferenceStatsError, rf"has no statistics for {FEATURES[1]}"),
        (dict(referencePath=tmp_path / "missing.json"), ReferenceStatsError, r"not found"),
    ]
    for change, error, message in cases:
        for newNodes in (False, True):
            kwargs = dict(volumeNode=node, modelPath=model_file, seed=SEED, iterations=2, step=400.0,
                          features=FEATURES, device="cpu", newNodes=newNodes, waitForCompletion=False)
            kwargs.update(change)
            with pytest.raises(error, match=message):
                logic.run(**kwargs)
            assert _ids(mrml_scene) == before_ids, f"{change}: nodes were made or removed"
            after = _run_nodes_state(mrml_scene)
            assert after.keys() == before.keys()
            for key, (state, status, mtime) in before.items():
                assert _same_state(state, after[key][0]) and after[key][1] == status
                assert after[key][2] == mtime, f"{change}: node {key} was modified"
            assert not logic.isRunning and active_run() is None
    assert logic.handle.result is first and logic.handle.nodes.table.GetNumberOfRows() == 2


# ----------------------------------------------------------------------------- the card's recommended dream settings

def _model_with_card(folder, **over):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny_net(2)), str(path))
    (folder / "tiny.pt.card.json").write_text(json.dumps(tiny_card(2, **over).to_dict()))
    return path


def test_the_cards_dream_settings_are_used_when_none_are_given(mrml_scene, tmp_path):
    path = _model_with_card(tmp_path / "a", dream={"step": 400.0, "iterations": 3})
    assert model_card_hints(path) == (2, {"step": 400.0, "iterations": 3})
    node = _input_node()
    messages = []
    logic = AnalysisLogicCore()
    result = logic.run(node, path, SEED, features=FEATURES, device="cpu", logCallback=messages.append)
    assert len(result.steps) == 3 and result.metadata["configuration"]["dream"]["step"] == 400.0
    assert any("iterations 3 from the model card, step 400 from the model card" in m for m in messages), messages
    result = logic.run(node, path, SEED, iterations=2, features=FEATURES, device="cpu", logCallback=messages.append)
    assert len(result.steps) == 2 and result.metadata["configuration"]["dream"]["step"] == 400.0
    assert any("iterations 2 as given, step 400 from the model card" in m for m in messages), messages
    result = logic.run(node, path, SEED, iterations=2, step=50.0, features=FEATURES, device="cpu")
    assert result.metadata["configuration"]["dream"]["step"] == 50.0


def test_without_a_recommendation_the_defaults_apply(tmp_path):
    # the default method's step is automatic (1% of the card's window, docs/dream-methods.md)
    assert dream_settings(tiny_card(2), None, None) == (300, None, "iterations 300 from the default, step auto from the default")
    assert dream_settings(None, 5, 2.0)[:2] == (5, 2.0)
    assert dream_settings(tiny_card(2, dream={"step": 250.0}), None, None)[:2] == (300, 250.0)
    path = _model_with_card(tmp_path / "b")
    assert model_card_hints(path) == (2, {})
    assert model_card_hints(tmp_path / "nothing.pt") == (None, {})
    assert model_card_hints("") == (None, {})


def test_without_pyradiomics_only_pyradiomics_features_are_left_out():
    from DeepDreamAnalysisLib.slicer_logic import choose_features

    kept, dropped = choose_features(["firstorder_Entropy", "glrlm_RunEntropy_typo", "line135_response",
                                     "ngtdm_Busyness"], 2, have_radiomics=False)
    assert dropped == ("ngtdm_Busyness",)
    assert kept == ("firstorder_Entropy", "glrlm_RunEntropy_typo", "line135_response")
