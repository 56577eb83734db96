"""The panel's run, drained from a main loop that holds the GIL as Slicer's does.

``slicer_main_loop.run_through_loop`` idles in C code holding the GIL and drains every 150 ms, the
way Slicer's Qt event loop and the module's timer behave (a loop that waits with ``time.sleep``
releases the GIL and hides the problem). The panel's run goes through a worker process
(``process=True``), so it keeps its pace; a worker *thread* crawls under such a loop (``make bench``
prints both, ``slicer_gil``). The bounds here are loose sanity checks on a shared CI machine; the
targets (>= 0.9x the headless rate, drains <= 200 ms, cancel within one iteration + 2 s) are
checked by the benchmark.
"""

from __future__ import annotations

import time

import pytest
import torch

from slicer_fixtures import mrml_scene, slicer  # noqa: F401 - fixture
from slicer_main_loop import WARMUP_ITERATIONS, headless_rate, run_through_loop
from tiny_models import liver_like, tiny_card, tiny_net

from DeepDreamAnalysisLib import scene
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig, paper_features
from DeepDreamAnalysisLib.models import load_model
from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore

SEED = (20, 20, 12)


@pytest.fixture
def case(mrml_scene, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny_net(3)), str(path))
    tiny_card(3, roi=[12, 16, 16]).save(tmp_path / "tiny.pt.card.json")
    node = slicer.util.addVolumeFromArray(liver_like((24, 40, 40)), name="input")
    node.SetSpacing(0.8, 0.8, 2.5)
    return node, path


def config(iterations: int) -> AnalysisConfig:
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, step=400.0, device="cpu"),
                          features=FeatureConfig(names=paper_features(3), backend="native"), snapshot_every=2)


@pytest.mark.slow
def test_the_panels_run_keeps_its_pace_under_a_main_loop_that_holds_the_gil(case):
    node, path = case
    handle = AnalysisLogicCore().run(node, path, SEED, config=config(40), waitForCompletion=False, process=True)
    figures = run_through_loop(handle)
    reference = headless_rate(scene.volume_from_node(node), SEED, load_model(path), config(40))
    ratio = figures.rate / reference
    print(f"\nGIL-holding loop: {figures.rate:.1f} it/s vs {reference:.1f} headless (ratio {ratio:.2f}); "
          f"longest drain {1000 * figures.max_drain_s:.0f} ms; worker start-up {figures.startup_s:.1f} s")
    assert handle.status == "completed", handle.error
    assert handle.nodes.table.GetNumberOfRows() == 40
    assert handle.nodes.metadata.GetAttribute("DeepDreamAnalysis.Status") == "completed"
    # loose (a worker thread reaches ~0.05 here; the benchmark checks the 0.9 target)
    assert ratio > 0.25, f"the run went at {ratio:.2f}x its headless rate under the GIL-holding loop"
    assert figures.max_drain_s < 1.0, f"a drain kept the main thread {figures.max_drain_s:.2f} s"


@pytest.mark.slow
def test_cancel_under_the_loop_ends_the_worker_within_an_iteration_and_the_grace(case):
    node, path = case
    handle = AnalysisLogicCore().run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    # cancelled once a few iterations past the warm-up were received: the iteration time the bound
    # uses is measured on them (a loaded machine's drain can see exactly the 5th, and one after it)
    figures = run_through_loop(handle, cancel_after=WARMUP_ITERATIONS + 3)
    assert handle.status == "cancelled"
    assert figures.cancel_latency_s < figures.iteration_s + 2.0 + 5.0  # loose: a shared CI machine
    assert handle.runner.process.poll() is not None, "the worker process is still there"
    rows = handle.nodes.table.GetNumberOfRows()
    assert rows >= 5 and rows == len(handle.result.steps)
    assert handle.runner.folder is None  # its temporary files are gone


@pytest.mark.slow
def test_a_killed_worker_gives_a_clear_message_and_keeps_what_was_received(case):
    node, path = case
    messages = []
    handle = AnalysisLogicCore().run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True,
                                     logCallback=messages.append)
    end = time.monotonic() + 120
    while (handle.lastProgress is None or handle.lastProgress.step.iteration < 3) and time.monotonic() < end:
        handle.processEvents()
        time.sleep(0.05)
    received = handle.lastProgress.step.iteration + 1
    handle.runner.process.kill()  # as the system's out-of-memory killer would
    handle.runner.process.wait(30)
    while handle.processEvents():
        time.sleep(0.05)
    assert handle.status == "fault"
    assert "killed" in str(handle.error) and "kept" in str(handle.error)
    assert any("ended without a result" in m for m in messages)
    assert handle.nodes.table.GetNumberOfRows() >= received
    assert handle.nodes.metadata.GetAttribute("DeepDreamAnalysis.Status") == "fault"


def test_closing_the_scene_ends_the_worker_process(case, mrml_scene):
    node, path = case
    logic = AnalysisLogicCore()
    handle = logic.run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    process = handle.runner.process
    mrml_scene.Clear(0)
    assert handle.status == "cancelled" and not logic.isRunning
    process.wait(10)  # terminated at once, without waiting for an iteration
    assert process.returncode is not None
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLTableNode") is None


def test_a_run_left_by_a_module_reload_is_no_longer_tagged_running(case):
    node, path = case
    logic = AnalysisLogicCore()
    handle = logic.run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    logic.abandon(timeout=0)
    handle.runner.process.wait(10)
    assert handle.nodes.table.GetAttribute("DeepDreamAnalysis.Status") == "cancelled"
    assert not logic.isRunning


def test_the_worker_stops_by_itself_when_slicer_goes_away(case):
    """Slicer killed or crashed: the worker's stdin closes, it cancels and ends (no orphan process)."""
    node, path = case
    handle = AnalysisLogicCore().run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    process = handle.runner.process
    process.stdin.close()  # what the operating system does when the parent dies
    process.wait(120)
    assert process.returncode == 0  # it wrote its (cancelled) outcome and left
    while handle.processEvents():
        time.sleep(0.05)
    assert handle.status == "cancelled"


def test_the_worker_leaves_no_temporary_files(case):
    node, path = case
    logic = AnalysisLogicCore()
    handle = logic.run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    folder = handle.runner.folder
    assert (folder / "job.pkl").is_file()
    logic.abandon(timeout=0)
    assert not folder.exists()


def test_the_worker_leaves_one_core_to_slicer(case):
    """Two cores: one torch thread for the worker (torch's default of one per core is 20-100x slower as
    soon as anything else wants a core); one core never gets zero threads."""
    from DeepDreamAnalysisLib.process_runner import worker_threads

    assert [worker_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    node, path = case
    logic = AnalysisLogicCore()
    handle = logic.run(node, path, SEED, config=config(100000), waitForCompletion=False, process=True)
    import pickle

    job = pickle.loads((handle.runner.folder / "job.pkl").read_bytes())
    logic.abandon(timeout=0)
    assert job["torch_threads"] == worker_threads() == handle.runner.threads


def test_a_run_with_an_automatic_step_starts_and_says_so(case):
    """The demo card's method (robust+spectral) has no fixed step: the start message says 'auto'
    instead of failing after the worker was started."""
    node, path = case
    messages = []
    cfg = AnalysisConfig(dream=DreamConfig(iterations=3, method="robust", device="cpu"),
                         features=FeatureConfig(names=paper_features(3), backend="native"))
    assert cfg.dream.step is None
    result = AnalysisLogicCore().run(node, path, SEED, config=cfg, logCallback=messages.append)
    assert result.status == "completed" and len(result.steps) == 3
    assert any("method robust, step auto" in m for m in messages), messages


def test_the_workers_snapshot_files_are_bounded_and_read_back(tmp_path):
    """The worker writes a snapshot as one pickle file (half an .npz's cost); undrained ones beyond
    MAX_UNREAD_SNAPSHOTS go; the parent reads a frame's snapshot back as it was."""
    import numpy as np

    from DeepDreamAnalysisLib.process_runner import ProcessRunner
    from DeepDreamAnalysisLib.result import Progress, Snapshot, Step
    from DeepDreamAnalysisLib.worker import MAX_UNREAD_SNAPSHOTS, _Writer

    writer = _Writer(tmp_path)
    rng = np.random.default_rng(0)
    for it in range(0, 200, 5):
        snap = Snapshot(it, rng.normal(size=(1, 8, 8)).astype(np.float32), rng.random((1, 8, 8)).astype(np.float32),
                        rng.random((1, 8, 8)) > 0.5)
        writer(Progress(Step(it, 0.0, 0.5, 3, {"f": 1.0}), snap, 200, 0.1 * it, 1.0))
    writer.stream.close()
    files = sorted(tmp_path.glob("snap-*"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(files) == MAX_UNREAD_SNAPSHOTS and files[-1].name == "snap-195.pkl"
    back = ProcessRunner._load_snapshot(files[-1])
    assert back.iteration == 195 and np.array_equal(back.image, snap.image) and np.array_equal(back.mask, snap.mask)
    assert ProcessRunner._load_snapshot(tmp_path / "snap-0.pkl") is None  # deleted: no snapshot, no error


@pytest.mark.slow
def test_a_drain_after_a_long_stall_is_bounded_and_the_backlog_follows(case, monkeypatch):
    """Slicer's main thread busy for a long time (a modal dialog): the next drain takes at most
    MAX_FRAMES_PER_POLL reports, the rest come over the next ticks, and every row arrives."""
    from DeepDreamAnalysisLib import process_runner

    monkeypatch.setattr(process_runner, "MAX_FRAMES_PER_POLL", 7)
    monkeypatch.setattr(process_runner.ProcessRunner.poll, "__defaults__", (7,))
    node, path = case
    handle = AnalysisLogicCore().run(node, path, SEED, config=config(20), waitForCompletion=False, process=True)
    handle.runner.join(120)  # nobody drains meanwhile
    drains = 0
    while handle.processEvents():
        drains += 1
        assert handle.runner.backlog <= 20 - 7 * drains
    assert drains == 2  # 7 + 7 over two ticks, then the last 6 and the end
    assert handle.status == "completed" and handle.nodes.table.GetNumberOfRows() == 20
