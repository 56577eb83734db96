"""The MRML bridge (scene.py) and the headless Slicer logic, against Slicer's real MRML classes
(slicer-core), fed by real engine runs on a tiny network."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
import vtk

from slicer_fixtures import mrml_scene, slicer  # noqa: F401 - fixture
from tiny_models import liver_like, tiny_card, tiny_model, tiny_net

from DeepDreamAnalysisLib import scene
from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import SeedError
from DeepDreamAnalysisLib.reference import ReferenceStats
from DeepDreamAnalysisLib.result import Progress
from DeepDreamAnalysisLib.runner import AnalysisRunner
from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore, RunHandle, RunInProgressError
from DeepDreamAnalysisLib.volume import Volume

FEATURES = ("firstorder_RootMeanSquared", "firstorder_Entropy")
REFERENCE = ReferenceStats(mean={"firstorder_RootMeanSquared": 100.0, "firstorder_Entropy": 2.0},
                           std={"firstorder_RootMeanSquared": 20.0, "firstorder_Entropy": 0.5},
                           n={"firstorder_RootMeanSquared": 30, "firstorder_Entropy": 30})
SHAPE = (3, 40, 48)  # k, j, i
SEED = (24, 20, 1)  # i, j, k


def _config(iterations=12, snapshot_every=2):
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, step=400.0, device="cpu"),
                          features=FeatureConfig(names=FEATURES, backend="native"), snapshot_every=snapshot_every)


def _input_node(array=None, spacing=(0.8, 0.7, 2.5), origin=(10.0, -20.0, 5.0), rotate=True):
    array = liver_like(SHAPE) if array is None else array
    node = slicer.util.addVolumeFromArray(array, name="input")
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if rotate:  # a rotation about S and an axis flip, so that direction errors show
        c, s = math.cos(0.3), math.sin(0.3)
        node.SetIJKToRASDirections(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]))
    return node


@pytest.fixture(scope="module")
def engine_run():
    """One real run (2D tiny network, native features, reference) and every report it made."""
    volume = Volume(liver_like(SHAPE), spacing=(0.8, 0.7, 2.5))
    reports: list[Progress] = []
    result = run_analysis(volume, SEED, tiny_model(2), _config(), REFERENCE, on_progress=reports.append)
    return volume, result, reports


def _ras_of_voxel(node, ijk):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array(m.MultiplyPoint([*map(float, ijk), 1.0])[:3])


def _segment_array_in_input_frame(seg_node, input_node):
    """The mask as a [k, j, i] array over the whole input grid (for comparing positions)."""
    labelmap = seg_node.GetSegmentation().GetSegment(scene.SEGMENT_ID).GetRepresentation("Binary labelmap")
    from vtk.util import numpy_support

    e = labelmap.GetExtent()
    arr = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    full = np.zeros(slicer.util.arrayFromVolume(input_node).shape, np.uint8)
    full[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = arr
    return full


# ----------------------------------------------------------------------------- geometry

def test_volume_from_node_keeps_voxels_and_converts_geometry_to_lps(mrml_scene):
    node = _input_node()
    vol = scene.volume_from_node(node)
    np.testing.assert_array_equal(vol.array, slicer.util.arrayFromVolume(node))
    assert vol.array.shape == SHAPE and vol.spacing == pytest.approx((0.8, 0.7, 2.5))
    for ijk in [(0, 0, 0), (47, 39, 2), (5, 17, 1)]:
        ras = _ras_of_voxel(node, ijk)
        lps = vol.index_to_physical(ijk)
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)


def test_seed_under_nested_parent_transforms_maps_to_the_right_voxel(mrml_scene):
    node = _input_node()
    outer = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    inner = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    rot = np.eye(4)
    rot[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # 90 degrees about S
    rot[:3, 3] = (30.0, -12.0, 7.0)
    shift = np.eye(4)
    shift[:3, 3] = (-5.0, 4.0, 100.0)
    outer.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(rot))
    inner.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    markups = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for ijk in [(24, 20, 1), (0, 0, 0), (47, 39, 2)]:
        world = (rot @ shift @ np.append(_ras_of_voxel(node, ijk), 1.0))[:3]
        markups.RemoveAllControlPoints()
        markups.AddControlPointWorld(vtk.vtkVector3d(*world))
        assert scene.seed_ijk_from_markups(markups, node) == ijk
        # 0.4 voxel off still rounds to the same voxel
        near = (rot @ shift @ np.append(_ras_of_voxel(node, np.add(ijk, (0.4, -0.4, 0.3))), 1.0))[:3]
        assert scene.seed_ijk_from_ras(near, node) == ijk
        np.testing.assert_allclose(scene.ras_from_ijk(ijk, node), world, atol=1e-9)
    outside = (rot @ shift @ np.append(_ras_of_voxel(node, (24, 20, 5)), 1.0))[:3]
    with pytest.raises(SeedError, match=r"outside 'input'.*Place the seed point inside"):
        scene.seed_ijk_from_ras(outside, node)
    markups.RemoveAllControlPoints()
    with pytest.raises(SeedError, match="no placed point"):
        scene.seed_ijk_from_markups(markups, node)


# ----------------------------------------------------------------------------- nodes from a run

def test_real_run_becomes_nodes_with_the_input_geometry(mrml_scene, engine_run):
    _, result, reports = engine_run
    node = _input_node()
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    updater = scene.SceneUpdater(node, result.crop, result.feature_names, REFERENCE, total_iterations=12,
                                 options=scene.SceneOptions(record_every=4))
    for start in range(0, len(reports), 5):  # drains of five reports
        updater.update(reports[start:start + 5])
    nodes = updater.finish(result)

    # dream image: crop-sized, [k, j, i], placed where the crop is in the input, same transform
    last = result.snapshots[-1]
    image = slicer.util.arrayFromVolume(nodes.image)
    assert image.shape == tuple(result.crop.size)
    np.testing.assert_allclose(image, last.image, rtol=1e-6)
    k0, j0, i0 = result.crop.start
    np.testing.assert_allclose(_ras_of_voxel(nodes.image, (0, 0, 0)), _ras_of_voxel(node, (i0, j0, k0)), atol=1e-9)
    np.testing.assert_allclose(_ras_of_voxel(nodes.image, (3, 5, 0)), _ras_of_voxel(node, (i0 + 3, j0 + 5, k0)),
                               atol=1e-9)
    assert nodes.image.GetTransformNodeID() == transform.GetID() == nodes.mask.GetTransformNodeID()

    # mask: the last snapshot's mask, at the crop's place in the input grid
    expected = np.zeros(SHAPE, np.uint8)
    expected[result.crop.slices] = last.mask
    assert expected.sum() > 0
    np.testing.assert_array_equal(_segment_array_in_input_frame(nodes.mask, node), expected)

    # curves: one row per iteration, raw and z columns equal to the result's
    table = nodes.table
    assert table.GetNumberOfRows() == len(result.steps) == 12
    for name in result.columns():
        column = slicer.util.arrayFromTableColumn(table, name)
        np.testing.assert_allclose(column, result.column(name), equal_nan=True)
    z = slicer.util.arrayFromTableColumn(table, "firstorder_RootMeanSquared_z")
    raw = slicer.util.arrayFromTableColumn(table, "firstorder_RootMeanSquared")
    np.testing.assert_allclose(z, (raw - 100.0) / 20.0, equal_nan=True)

    # chart: one series per feature (z-scores) plus the band at -1 and 1
    chart = nodes.chart
    assert chart.GetNumberOfPlotSeriesNodes() == len(FEATURES) + 2
    ys = {chart.GetNthPlotSeriesNode(n).GetYColumnName() for n in range(chart.GetNumberOfPlotSeriesNodes())}
    assert ys == {f"{f}_z" for f in FEATURES} | {"low", "high"}
    band = nodes.get("band")
    assert list(slicer.util.arrayFromTableColumn(band, "low")) == [-1.0, -1.0]
    assert list(slicer.util.arrayFromTableColumn(band, "high")) == [1.0, 1.0]

    # sequences: every 4th iteration and the last, crop-sized; the browser scrubs image and mask
    assert updater.recorded_iterations == [0, 4, 8, 11]
    assert nodes.imageSequence.GetNumberOfDataNodes() == 4 == nodes.maskSequence.GetNumberOfDataNodes()
    browser = nodes.browser
    assert browser.GetSelectedItemNumber() == 3
    browser.SetSelectedItemNumber(1)  # iteration 4
    snap4 = result.snapshot_at(4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes.image), snap4.image, rtol=1e-6)
    expected4 = np.zeros(SHAPE, np.uint8)
    expected4[result.crop.slices] = snap4.mask
    np.testing.assert_array_equal(_segment_array_in_input_frame(nodes.mask, node), expected4)

    # metadata: JSON text node and attributes
    meta = json.loads(nodes.metadata.GetText())
    assert meta["status"] == "completed" and meta["slicer"]["crop_start_kji"] == list(result.crop.start)
    assert meta["input"]["seed_ijk"] == list(SEED)
    assert all(n.GetAttribute(scene.ATTR_STATUS) == "completed" for n in nodes.all_nodes())


def test_sequences_stay_under_their_cap(mrml_scene, engine_run):
    _, result, reports = engine_run
    updater = scene.SceneUpdater(_input_node(), result.crop, result.feature_names, None,
                                 options=scene.SceneOptions(record_every=1, max_sequence_items=3))
    for p in reports:
        updater.update([p])
        assert updater.nodes.imageSequence.GetNumberOfDataNodes() <= 3
    nodes = updater.finish(result)
    assert nodes.imageSequence.GetNumberOfDataNodes() <= 3
    recorded = updater.recorded_iterations
    assert recorded[0] == 0 and recorded[-1] == 11
    # without a reference: raw curves, no band
    assert nodes.get("band") is None
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == len(FEATURES)


def test_replace_or_new_output_nodes(mrml_scene, engine_run):
    _, result, _ = engine_run
    node = _input_node()
    first = scene.show_result(result, node)
    count = mrml_scene.GetNumberOfNodes()
    second = scene.show_result(result, node, scene.SceneOptions(new_nodes=False))
    assert mrml_scene.GetNumberOfNodes() == count
    assert first.image is None and second.image is not None
    third = scene.show_result(result, node, scene.SceneOptions(new_nodes=True))
    assert second.image is not None and third.image is not None
    assert second.image.GetID() != third.image.GetID()
    assert len(scene.find_run_nodes(mrml_scene, second.run_id)) == len(scene.find_run_nodes(mrml_scene))


# ----------------------------------------------------------------------------- live runs

def _live_handle(node, iterations, **options):
    volume = scene.volume_from_node(node)
    config = _config(iterations=iterations, snapshot_every=1)
    model = tiny_model(2)
    crop = AnalysisLogicCore.cropFor(volume, SEED, model.card, config)
    updater = scene.SceneUpdater(node, crop, FEATURES, REFERENCE, total_iterations=iterations,
                                 options=scene.SceneOptions(**options))
    runner = AnalysisRunner(volume, SEED, model, config, REFERENCE, queue_size=2)
    return RunHandle(runner, updater)


def test_cancelled_run_leaves_consistent_nodes(mrml_scene):
    node = _input_node()
    handle = _live_handle(node, 100000, record_every=2)
    handle.runner.start()
    while handle.updater.last_iteration is None or handle.updater.last_iteration < 5:
        assert handle.processEvents()
        handle.runner.join(0.05)
    handle.cancel()
    while handle.processEvents():
        handle.runner.join(0.05)
    result = handle.result
    assert result.status == "cancelled" and handle.status == "cancelled"
    nodes = handle.nodes
    assert nodes.table.GetNumberOfRows() == len(result.steps) >= 6
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(nodes.table, "iteration"),
                                  [s.iteration for s in result.steps])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes.image), result.snapshots[-1].image, rtol=1e-6)
    assert handle.updater.recorded_iterations[-1] == result.snapshots[-1].iteration
    assert nodes.browser is not None
    assert {(n.GetName(), n.GetAttribute(scene.ATTR_STATUS)) for n in nodes.all_nodes()} == \
        {(n.GetName(), "cancelled") for n in nodes.all_nodes()}
    assert json.loads(nodes.metadata.GetText())["status"] == "cancelled"


def test_nodes_deleted_mid_run_do_not_break_the_drain(mrml_scene):
    node = _input_node()
    handle = _live_handle(node, 100000, record_every=1)
    handle.runner.start()

    def drain_until(iteration):
        while handle.updater.last_iteration is None or handle.updater.last_iteration < iteration:
            assert handle.processEvents()
            handle.runner.join(0.05)

    drain_until(3)
    nodes = handle.nodes
    old_ids = {r: nodes.get(r).GetID() for r in ("image", "mask", "table", "chart", "imageSequence")}
    for role in ("image", "mask", "table", "chart", "imageSequence", "band"):
        mrml_scene.RemoveNode(nodes.get(role))
    mrml_scene.RemoveNode(nodes.series(FEATURES[0]))
    drain_until(handle.updater.last_iteration + 3)  # drains after the deletion
    handle.cancel()
    result = handle.wait(interval=0.05)
    assert result.status == "cancelled" and handle.error is None
    for role, old in old_ids.items():
        assert nodes.get(role) is not None and nodes.get(role).GetID() != old
    # refilled with every row, not only the later ones
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(nodes.table, "iteration"),
                                  [s.iteration for s in result.steps])
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == len(FEATURES) + 2
    for n in range(nodes.chart.GetNumberOfPlotSeriesNodes()):
        assert nodes.chart.GetNthPlotSeriesNode(n).GetTableNode() is not None
    np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes.image), result.snapshots[-1].image, rtol=1e-6)
    # the input itself deleted: the mask is still made, with the remembered geometry
    mrml_scene.RemoveNode(nodes.mask)
    mrml_scene.RemoveNode(node)
    handle.updater.finish(result)
    assert handle.nodes.mask.GetSegmentation().GetSegment(scene.SEGMENT_ID) is not None


# ----------------------------------------------------------------------------- the logic, headless

@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny_net(2)), str(path))
    tiny_card(2).save(tmp_path / "tiny.pt.card.json")
    return path


def test_logic_blocking_run_from_a_model_file(mrml_scene, model_file, tmp_path):
    node = _input_node()
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"features": {f: {"mean": REFERENCE.mean[f], "std": REFERENCE.std[f], "n": 30}
                                                  for f in FEATURES}}))
    messages, progress = [], []
    logic = AnalysisLogicCore()
    result = logic.run(node, model_file, SEED, iterations=6, step=400.0, features=list(FEATURES),
                       referencePath=reference, device="cpu", recordEvery=2, logCallback=messages.append,
                       progressCallback=progress.append)
    assert result.status == "completed" and len(result.steps) == 6
    assert result.normalised
    nodes = logic.handle.nodes
    assert nodes.table.GetNumberOfRows() == 6
    assert nodes.get("band") is not None
    assert progress and progress[-1].step.iteration == 5
    assert any("Run completed" in m for m in messages), messages


def test_logic_seed_forms_agree_and_nonblocking_handle_cancels(mrml_scene, model_file):
    node = _input_node()
    logic = AnalysisLogicCore()
    markups = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    world = scene.ras_from_ijk(SEED, node)
    markups.AddControlPointWorld(vtk.vtkVector3d(*world))
    assert logic.resolveSeed(node, markups) == logic.resolveSeed(node, SEED) == \
        logic.resolveSeed(node, seedRAS=world) == SEED
    with pytest.raises(SeedError, match="not both"):
        logic.resolveSeed(node, SEED, seedRAS=world)
    with pytest.raises(SeedError, match="outside"):
        logic.resolveSeed(node, (48, 0, 0))
    handle = logic.run(node, model_file, markups, iterations=100000, step=400.0, features=list(FEATURES),
                       device="cpu", waitForCompletion=False)
    assert isinstance(handle, RunHandle) and logic.isRunning
    with pytest.raises(RunInProgressError, match="already running"):
        logic.run(node, model_file, SEED, iterations=3)
    while handle.lastProgress is None:
        handle.processEvents()
        handle.runner.join(0.05)
    handle.cancel()
    assert handle.wait(timeout=30) is not None
    assert handle.status == "cancelled" and not logic.isRunning


# ----------------------------------------------------------------------------- several runs, several models

def _reference_file(tmp_path):
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"features": {f: {"mean": REFERENCE.mean[f], "std": REFERENCE.std[f], "n": 30}
                                             for f in FEATURES}}))
    return path


def _chart_series(chart):
    return [chart.GetNthPlotSeriesNode(n) for n in range(chart.GetNumberOfPlotSeriesNodes())]


def test_several_runs_in_one_chart(mrml_scene, model_file, tmp_path):
    from DeepDreamAnalysisLib.errors import FeatureError

    node = _input_node()
    reference = _reference_file(tmp_path)
    logic = AnalysisLogicCore()
    handles, results = [], []
    for seed, iterations in (((24, 20, 1), 4), ((20, 18, 1), 6), ((28, 22, 1), 5)):
        results.append(logic.run(node, model_file, seed, iterations=iterations, step=400.0, features=list(FEATURES),
                                 referencePath=reference, device="cpu", newNodes=True))
        handles.append(logic.handle)
    tables = [h.nodes.table for h in handles]
    assert all(t is not None for t in tables) and len({t.GetID() for t in tables}) == 3  # earlier runs kept
    count = mrml_scene.GetNumberOfNodes()

    # runs given as a handle, a run ID and a table node
    chart = scene.show_runs_in_chart([handles[0], handles[1].nodes.run_id, tables[2]], "firstorder_Entropy")
    series = _chart_series(chart)
    assert len(series) == 3 + 2  # one per run and the normal band
    for s, table, result in zip(series, tables, results):
        assert s.GetTableNodeID() == table.GetID() and s.GetYColumnName() == "firstorder_Entropy_z"
        np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "firstorder_Entropy_z"),
                                   result.zscores("firstorder_Entropy"), equal_nan=True)
    labels = [s.GetName() for s in series[:3]]
    assert "seed (24, 20, 1)" in labels[0] and "seed (20, 18, 1)" in labels[1] and len(set(labels)) == 3
    band = series[3].GetTableNode()
    assert list(slicer.util.arrayFromTableColumn(band, "iteration")) == [0.0, 5.0]  # spans the longest run
    assert {s.GetYColumnName() for s in series[3:]} == {"low", "high"}
    assert "z-score" in chart.GetTitle() and "3 runs" in chart.GetTitle()

    # reused for raw values of another feature, with own labels: the old curves go, no band
    same = scene.show_runs_in_chart(handles[:2], "firstorder_RootMeanSquared", labels=["first", "second"],
                                    kind="raw", chart=chart)
    assert same is chart
    series = _chart_series(chart)
    assert [s.GetName() for s in series] == ["first", "second"]
    assert {s.GetYColumnName() for s in series} == {"firstorder_RootMeanSquared"}
    assert mrml_scene.GetNumberOfNodes() == count + 1 + 2  # the chart and its two curves; nothing left over

    # a run without reference statistics: auto falls back to raw values for all; z is refused
    results.append(logic.run(node, model_file, SEED, iterations=3, step=400.0, features=list(FEATURES),
                             device="cpu", newNodes=True))
    mixed = [*handles, logic.handle]
    raw_chart = scene.show_runs_in_chart(mixed, "firstorder_Entropy")
    assert {s.GetYColumnName() for s in _chart_series(raw_chart)} == {"firstorder_Entropy"}
    with pytest.raises(FeatureError, match=r"No z-scores of 'firstorder_Entropy' in .*without reference statistics"):
        scene.show_runs_in_chart(mixed, "firstorder_Entropy", kind="z")
    with pytest.raises(FeatureError, match=r"No values of 'shape2D_Elongation'.*Features of these runs: "
                                           r"firstorder_Entropy, firstorder_RootMeanSquared"):
        scene.show_runs_in_chart(mixed, "shape2D_Elongation")
    # removing a chart leaves the runs' tables
    before = mrml_scene.GetNumberOfNodes()
    assert scene.remove_chart(chart) == 3
    assert mrml_scene.GetNumberOfNodes() == before - 3 and all(mrml_scene.IsNodePresent(t) for t in tables)


def _two_model_comparison(restarts=2, iterations=4):
    from DeepDreamAnalysisLib.compare import compare_models
    from tiny_models import TinyModel

    models = {"net A": tiny_model(2), "net B": TinyModel(tiny_net(2, seed=1), tiny_card(2))}
    volume = Volume(liver_like(SHAPE), spacing=(0.8, 0.7, 2.5))
    return compare_models(volume, SEED, models, _config(iterations=iterations), REFERENCE, restarts=restarts)


def test_comparison_of_models_as_tables_and_one_chart(mrml_scene):
    from DeepDreamAnalysisLib.errors import FeatureError

    comp = _two_model_comparison()
    nodes = scene.show_comparison(comp)
    assert set(nodes.tables) == {"net A", "net B"}
    for model, table in nodes.tables.items():
        np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "iteration"), comp.iterations)
        for curve in ("probability", *FEATURES):
            for stat in ("mean", "std", "min", "max"):
                np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, f"{curve}_{stat}"),
                                           getattr(comp, stat)(model, curve), equal_nan=True)
    # the z-score means differ between the two networks (it is their comparison)
    a = slicer.util.arrayFromTableColumn(nodes.tables["net A"], "firstorder_RootMeanSquared_mean")
    b = slicer.util.arrayFromTableColumn(nodes.tables["net B"], "firstorder_RootMeanSquared_mean")
    assert not np.allclose(a, b, equal_nan=True)
    chart = nodes.chart
    series = _chart_series(chart)
    assert len(series) == 2 * 3 + 2  # mean, min, max per model, and the band
    assert nodes.series("net A").GetYColumnName() == f"{FEATURES[0]}_mean"
    assert nodes.series("net B", "max").GetYColumnName() == f"{FEATURES[0]}_max"
    assert nodes.series("net B").GetTableNodeID() == nodes.tables["net B"].GetID()
    assert nodes.series("net A").GetColor() != nodes.series("net B").GetColor()
    assert "z-score" in chart.GetTitle()
    meta = json.loads(nodes.metadata.GetText())
    assert meta["status"] == "completed" and meta["models_order"] == ["net A", "net B"] and meta["restarts"] == 2

    scene.show_comparison_feature(nodes, "probability")  # raw probability: no band
    assert {s.GetYColumnName() for s in _chart_series(chart)} == {"probability_mean", "probability_min",
                                                                   "probability_max"}
    assert chart.GetNumberOfPlotSeriesNodes() == 6 and "raw value" in chart.GetTitle()
    scene.show_comparison_feature(nodes, FEATURES[1])
    assert chart.GetNumberOfPlotSeriesNodes() == 8
    with pytest.raises(FeatureError, match=r"no curve 'glcm_Contrast'; it has: probability, "):
        scene.show_comparison_feature(nodes, "glcm_Contrast")
    one = scene.show_comparison(comp, feature=FEATURES[1], spread=False, name="means only")
    assert one.chart.GetNumberOfPlotSeriesNodes() == 2 + 2
    assert scene.remove_chart(one.chart) == 1 + 2 + 2 + 1  # series, band curves and table, chart


def test_logic_compares_models_from_files_and_shows_them(mrml_scene, tmp_path):
    node = _input_node()
    paths = {}
    for name, seed in (("A", 0), ("B", 1)):
        path = tmp_path / f"{name}.pt"
        torch.jit.save(torch.jit.script(tiny_net(2, seed=seed)), str(path))
        tiny_card(2).save(tmp_path / f"{name}.pt.card.json")
        paths[name] = path
    progress, idles, messages = [], [], []
    logic = AnalysisLogicCore()
    comp = logic.compareModels(node, paths, SEED, restarts=2, iterations=3, step=400.0, features=list(FEATURES),
                               referencePath=_reference_file(tmp_path), device="cpu",
                               progressCallback=progress.append, idle=lambda: idles.append(1),
                               logCallback=messages.append, interval=0.01)
    assert comp.models == ["A", "B"] and comp.restarts == 2 and comp.metadata["status"] == "completed"
    assert comp.normalised and len(comp.iterations) == 3
    assert idles and progress and {p.model for p in progress} <= {"A", "B"}
    nodes = logic.comparisonNodes
    assert set(nodes.tables) == {"A", "B"} and nodes.chart.GetNumberOfPlotSeriesNodes() == 2 * 3 + 2
    assert any("Comparison completed" in m for m in messages), messages
    assert not logic.isRunning

    # the scene closed while it runs: cancelled, nothing shown in the new scene
    def close_on_second_idle():
        idles.append(2)
        if idles.count(2) == 2:
            slicer.mrmlScene.Clear(0)

    threads = threading.active_count()
    comp = logic.compareModels(node, paths, SEED, restarts=3, iterations=100000, step=400.0,
                               features=list(FEATURES), device="cpu", idle=close_on_second_idle, interval=0.01)
    assert comp is None and logic.comparisonNodes is None  # cancelled before any model had finished a run
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLPlotChartNode") is None and not logic.isRunning
    assert threading.active_count() == threads  # the comparison's worker has ended


def test_placing_the_seed_again_moves_it_and_the_seed_list_is_found_again(mrml_scene):
    """The panel's seed list is uncapped (a full list makes Slicer start a new one on the next
    click); keep_last_point leaves only the newest point, and the list is reused, not made anew."""
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 10, 10), np.float32), name="v")
    seed = scene.find_or_make_seed_node()
    assert seed.GetMaximumNumberOfControlPoints() <= 0  # no cap
    seed.AddControlPoint(2.0, 3.0, 1.0)
    seed.AddControlPoint(5.0, 6.0, 2.0)  # a second click
    scene.keep_last_point(seed)
    assert seed.GetNumberOfControlPoints() == 1
    assert scene.seed_ijk_from_markups(seed, volume) == scene.seed_ijk_from_ras((5.0, 6.0, 2.0), volume) != (2, 3, 1)
    assert scene.find_or_make_seed_node() is seed
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
