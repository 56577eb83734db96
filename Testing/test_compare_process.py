"""A model comparison in a worker process, drained by a main loop that holds the GIL as Slicer's does.

``logic.compareModels(..., waitForCompletion=False)`` goes to a worker process for model paths
(``process_runner.ProcessComparisonRunner``; a thread would starve under Slicer's main loop). The
models are real: the demo network (Resources/DemoModel) and a second small MONAI UNet (the held-out
``ct2d_unet``), compared on the held-out network's healthy slice.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slicer_fixtures import mrml_scene, slicer  # noqa: F401 - fixture
from slicer_main_loop import run_through_loop

from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig, paper_features
from DeepDreamAnalysisLib.process_runner import ProcessComparisonRunner, WorkerProcessError
from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore, ComparisonHandle, RunInProgressError
from DeepDreamAnalysisLib.volume import read_volume

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "Resources" / "DemoModel" / "demo_unet.pt"
HELDOUT = ROOT / "Testing" / "Data" / "heldout" / "ct2d_unet"
SEED = (64, 64, 0)
MODELS = {"demo": DEMO, "ct2d": HELDOUT / "model.pt"}


@pytest.fixture
def node(mrml_scene):
    volume = read_volume(HELDOUT / "healthy.nii.gz")
    n = slicer.util.addVolumeFromArray(volume.array, name="healthy")
    n.SetSpacing(*volume.spacing)
    return n


def config(iterations: int) -> AnalysisConfig:
    """The demo card's method; both networks dream a mask within 20 iterations here."""
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, method="robust+spectral", step=None, device="cpu"),
                          features=FeatureConfig(names=tuple(paper_features(2)), backend="native"))


def _arrays(comp):
    return {m: (comp.raw[m], comp.base[m]) for m in comp.models}


@pytest.mark.slow
def test_a_comparison_in_a_worker_process_completes_under_the_gil_holding_loop_as_in_process(node):
    progress, finished, messages = [], [], []
    logic = AnalysisLogicCore()
    handle = logic.compareModels(node, MODELS, SEED, restarts=2, config=config(20), waitForCompletion=False,
                                 progressCallback=progress.append, finishedCallback=finished.append,
                                 logCallback=messages.append)
    assert isinstance(handle, ComparisonHandle) and isinstance(handle.runner, ProcessComparisonRunner)
    assert handle.status == "running" and logic.isRunning
    with pytest.raises(RunInProgressError, match="model comparison"):
        logic.compareModels(node, MODELS, SEED, restarts=2, config=config(20), waitForCompletion=False)
    figures = run_through_loop(handle, timeout_s=240)
    assert handle.status == "completed", handle.error
    assert finished == [handle] and not logic.isRunning
    assert progress and {p.model for p in progress} <= {"demo", "ct2d"}
    assert progress[-1].progress.snapshot is None  # reports come without images
    assert figures.max_drain_s < 1.0, f"a drain kept the main thread {figures.max_drain_s:.2f} s"
    comp = handle.result
    assert comp.models == ["demo", "ct2d"] and comp.restarts == 2 and comp.metadata["status"] == "completed"
    assert handle.nodes is logic.comparisonNodes and set(handle.nodes.tables) == {"demo", "ct2d"}
    assert any("in a worker process" in m for m in messages) and any("Comparison completed" in m for m in messages)
    assert handle.runner.folder is None  # its temporary files are gone

    for m in comp.models:  # both networks dreamed a mask: the feature curves have values
        assert comp.base[m][:, -1, 2].min() > 0 and np.isfinite(comp.raw[m][:, -1, :]).all(), m

    # the same comparison in this process (a thread, the blocking form) with the worker's torch
    # threads: the same numbers, bit for bit (with other thread counts they differ by ~1e-6,
    # floating-point summation order)
    threads = torch.get_num_threads()
    torch.set_num_threads(handle.runner.threads)
    try:
        same = AnalysisLogicCore().compareModels(node, MODELS, SEED, restarts=2, config=config(20), show=False,
                                                 process=False)
    finally:
        torch.set_num_threads(threads)
    assert same.models == comp.models and np.array_equal(same.iterations, comp.iterations)
    for m, (raw, base) in _arrays(same).items():
        np.testing.assert_array_equal(comp.raw[m], raw, err_msg=m)
        np.testing.assert_array_equal(comp.base[m], base, err_msg=m)
    assert comp.metadata["random_seeds"] == same.metadata["random_seeds"]


@pytest.mark.slow
def test_cancelling_a_comparison_in_a_worker_process_under_the_loop(node):
    logic = AnalysisLogicCore()
    handle = logic.compareModels(node, MODELS, SEED, restarts=2, config=config(100000), waitForCompletion=False)
    figures = run_through_loop(handle, cancel_after=3, timeout_s=240)
    # cancelled before any model had finished a run: compare_models' error, status cancelled
    assert handle.status == "cancelled", handle.error
    assert "cancelled before any run finished" in str(handle.error)
    assert figures.cancel_latency_s is not None and figures.cancel_latency_s < 2.0 + 5.0  # loose: a shared machine
    assert handle.runner.process.poll() is not None and not logic.isRunning
    assert logic.comparisonNodes is None
    with pytest.raises(Exception, match="cancelled before any run finished"):
        handle.wait()


@pytest.mark.slow
def test_a_killed_comparison_worker_gives_a_clear_message(node):
    messages = []
    logic = AnalysisLogicCore()
    handle = logic.compareModels(node, MODELS, SEED, restarts=2, config=config(100000), waitForCompletion=False,
                                 logCallback=messages.append)
    end = time.monotonic() + 120
    while handle.lastProgress is None and time.monotonic() < end:
        handle.processEvents()
        time.sleep(0.05)
    assert handle.lastProgress is not None
    handle.runner.process.kill()  # as the system's out-of-memory killer would
    handle.runner.process.wait(30)
    while handle.processEvents():
        time.sleep(0.05)
    assert handle.status == "fault"
    assert isinstance(handle.error, WorkerProcessError)
    assert "comparison process ended without a result (killed" in str(handle.error)
    assert any("The comparison failed" in m for m in messages)
    with pytest.raises(WorkerProcessError):
        handle.wait()


def test_closing_the_scene_ends_the_comparison_worker(node, mrml_scene):
    logic = AnalysisLogicCore()
    handle = logic.compareModels(node, MODELS, SEED, restarts=2, config=config(100000), waitForCompletion=False)
    process = handle.runner.process
    mrml_scene.Clear(0)
    assert handle.status == "cancelled" and not logic.isRunning
    process.wait(10)  # terminated at once
    assert handle.wait() is None and handle.nodes is None
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLPlotChartNode") is None


def test_a_comparison_process_needs_model_paths(node):
    from DeepDreamAnalysisLib.errors import ConfigError
    from DeepDreamAnalysisLib.models import load_model

    logic = AnalysisLogicCore()
    with pytest.raises(ConfigError, match="loads each model from its file"):
        logic.compareModels(node, {"demo": load_model(DEMO), "ct2d": MODELS["ct2d"]}, SEED, config=config(2),
                            waitForCompletion=False, process=True)
    assert not logic.isRunning
