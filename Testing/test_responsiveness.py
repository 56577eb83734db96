"""While an analysis with features runs in the worker thread, the main thread stays responsive.

A main-thread ticker asks to run every 50 ms, the way Slicer's Qt timer does, and at each tick
drains the runner into real MRML nodes (scene.py), as the panel does. The worker runs a 3D tiny
network with the paper's native features at every iteration. No tick may start more than 200 ms
late. The figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import time

import numpy as np

from slicer_fixtures import mrml_scene, slicer  # noqa: F401 - fixture
from tiny_models import liver_like, tiny_model

from DeepDreamAnalysisLib import scene
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig, paper_features
from DeepDreamAnalysisLib.runner import AnalysisRunner
from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore, RunHandle, preload_engine

TICK_S = 0.050
LIMIT_S = 0.200


def test_main_thread_ticks_stay_on_time_while_the_worker_runs(mrml_scene):
    node = slicer.util.addVolumeFromArray(liver_like((24, 40, 40)), name="input")
    node.SetSpacing(0.8, 0.8, 2.5)
    volume = scene.volume_from_node(node)
    model = tiny_model(3, roi=[12, 16, 16])
    config = AnalysisConfig(dream=DreamConfig(iterations=100000, step=400.0, device="cpu"),
                            features=FeatureConfig(names=paper_features(3), backend="native"), snapshot_every=2)
    seed = (20, 20, 12)
    crop = AnalysisLogicCore.cropFor(volume, seed, model.card, config)
    updater = scene.SceneUpdater(node, crop, config.features.names, None, total_iterations=None,
                                 options=scene.SceneOptions(record_every=4))
    preload_engine()  # as the Logic does before it starts the worker
    handle = RunHandle(AnalysisRunner(volume, seed, model, config), updater)
    handle.runner.start()
    lateness, drain_times = [], []
    start = time.perf_counter()
    tick = 0
    try:
        while time.perf_counter() - start < 4.0:
            tick += 1
            due = start + tick * TICK_S
            time.sleep(max(0.0, due - time.perf_counter()))
            lateness.append(time.perf_counter() - due)
            t0 = time.perf_counter()
            assert handle.processEvents(), handle.error
            drain_times.append(time.perf_counter() - t0)
    finally:
        handle.cancel()
        handle.wait(timeout=60, interval=0.05)
    iterations = len(handle.result.steps)
    late = np.array(lateness) * 1000
    drains = np.array(drain_times) * 1000
    print(f"\nresponsiveness: {len(late)} ticks of {TICK_S * 1000:.0f} ms while the worker ran {iterations} "
          f"iterations with {len(config.features.names)} features; tick lateness median {np.median(late):.1f} ms, "
          f"95th percentile {np.percentile(late, 95):.1f} ms, max {late.max():.1f} ms; drain into MRML median "
          f"{np.median(drains):.1f} ms, max {drains.max():.1f} ms")
    assert iterations >= 3, "the worker made no progress while the ticker ran"
    assert handle.nodes.table.GetNumberOfRows() == iterations
    assert late.max() < LIMIT_S * 1000, f"a main-thread tick waited {late.max():.0f} ms (limit {LIMIT_S * 1000:.0f})"
