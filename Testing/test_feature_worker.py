"""The pyradiomics worker process failing: values are computed inline and the failure is recorded.

Each test makes a real spawned worker fail (its initializer raises in the child, its executable
does not exist, or the call raises in the child); nothing here fakes the process pool.
"""

import logging
import math

import numpy as np
import pytest

from DeepDreamAnalysisLib import feature_worker
from DeepDreamAnalysisLib.config import FeatureConfig
from DeepDreamAnalysisLib.feature_worker import FeatureComputer
from DeepDreamAnalysisLib.result import Step

pytest.importorskip("radiomics")

NAMES = ("firstorder_Entropy", "glcm_Contrast")
SPACING = (0.8, 0.8, 2.5)


def _crash_in_child(*args):
    """Stands in for a child that dies while starting (e.g. re-running an unguarded script)."""
    raise RuntimeError("worker initializer crashed")


def _raise_in_child(image, mask, spacing):
    raise ValueError("pyradiomics exploded on this region")


def _computer():
    from DeepDreamAnalysisLib.features import build_feature_set

    config = FeatureConfig(names=NAMES, backend="pyradiomics")
    fs = build_feature_set(config, 3)
    return FeatureComputer(fs, config, 3, SPACING), fs


def _pairs(n=3):
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        image = rng.normal(100.0, 30.0, (3, 20, 20)).astype(np.float32)
        mask = np.zeros((3, 20, 20), bool)
        mask[1, 5:10 + t, 6:12] = True
        out.append((image, mask))
    return out


def _expected(fs, image, mask):
    box = feature_worker.bounding_box(mask, pad=2)
    return fs.compute(image[box], mask[box], SPACING)


def _run(computer, pairs):
    steps = []
    for it, (image, mask) in enumerate(pairs):
        step = Step(it, 0.0, 0.5, int(mask.sum()), {})
        computer.submit(step, image, mask)
        computer.collect()
        steps.append(step)
    computer.finish(wait=True)
    return steps


def test_a_broken_worker_pool_falls_back_inline_and_names_the_cause(monkeypatch, caplog):
    monkeypatch.setattr(feature_worker, "_init_worker", _crash_in_child)
    computer, fs = _computer()
    pairs = _pairs()
    with caplog.at_level(logging.WARNING, logger="DeepDreamAnalysisLib.feature_worker"):
        steps = _run(computer, pairs)
    for step, (image, mask) in zip(steps, pairs):
        expected = _expected(fs, image, mask)
        assert all(math.isfinite(expected[n]) for n in NAMES)
        for n in NAMES:
            assert step.features[n] == pytest.approx(expected[n], rel=1e-9)
    assert computer.inline
    assert set(computer.failures) == set(NAMES)
    assert all("BrokenProcessPool" in v for v in computer.failures.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "could not start" in warnings[0] and "inline" in warnings[0]
    assert "if __name__ == '__main__':" in warnings[0]


def test_a_worker_that_cannot_start_falls_back_inline(monkeypatch, caplog):
    monkeypatch.setattr(feature_worker, "worker_python", lambda: "/nonexistent/python-for-the-worker")
    computer, fs = _computer()
    pairs = _pairs(2)
    with caplog.at_level(logging.WARNING, logger="DeepDreamAnalysisLib.feature_worker"):
        steps = _run(computer, pairs)
    for step, (image, mask) in zip(steps, pairs):
        expected = _expected(fs, image, mask)
        for n in NAMES:
            assert step.features[n] == pytest.approx(expected[n], rel=1e-9)
    assert set(computer.failures) == set(NAMES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not start" in warnings[0], warnings
    assert "/nonexistent/python-for-the-worker" in warnings[0]


def test_a_call_failing_in_the_worker_is_nan_and_recorded_once(monkeypatch, caplog):
    monkeypatch.setattr(feature_worker, "_compute_in_worker", _raise_in_child)
    computer, _ = _computer()
    with caplog.at_level(logging.WARNING, logger="DeepDreamAnalysisLib.feature_worker"):
        steps = _run(computer, _pairs(2))
    assert all(math.isnan(s.features[n]) for s in steps for n in NAMES)
    assert not computer.inline
    assert computer.failures == {n: "ValueError: pyradiomics exploded on this region" for n in NAMES}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ValueError" in warnings[0], warnings
