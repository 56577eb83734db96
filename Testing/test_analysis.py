"""run_analysis and AnalysisRunner end to end on a tiny real network, with real features."""

import math
import threading
import time

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import ImageError, ModelError, SeedError
from DeepDreamAnalysisLib.runner import AnalysisRunner
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, liver_like, tiny_card, tiny_model, tiny_net

FEATURES = ("firstorder_RootMeanSquared", "firstorder_Entropy")


def _config(iterations=12, names=FEATURES, backend="auto", **dream):
    dream.setdefault("step", 400.0)
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, **dream),
                          features=FeatureConfig(names=names, backend=backend), snapshot_every=5)


@pytest.fixture
def volume():
    return Volume(liver_like((3, 40, 48)), spacing=(0.8, 0.8, 2.5), origin=(10.0, -20.0, 5.0))


def test_result_has_curves_snapshots_and_metadata(volume):
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), _config())
    assert result.status == "completed"
    assert [s.iteration for s in result.steps] == list(range(12))
    assert [s.iteration for s in result.snapshots] == [0, 5, 10, 11]
    snap = result.snapshots[-1]
    assert snap.image.shape == snap.probability.shape == snap.mask.shape == (1, 24, 24)
    assert result.crop.start == (1, 8, 12) and result.crop.size == (1, 24, 24)
    table = result.table()
    assert set(table) >= {"iteration", "objective", "probability", "mask_voxels", *FEATURES}
    objective = table["objective"]
    assert objective[-1] > objective[0]
    md = result.metadata
    assert md["input"]["seed_ijk"] == [24, 20, 1]
    assert md["model"]["sha256"] == "0" * 64
    assert md["configuration"]["dream"]["iterations"] == 12
    assert md["versions"]["torch"] == torch.__version__
    assert md["normalised"] is False and "raw feature values" in md["note"]
    assert md["timings_s"]["total"] > 0


def test_features_are_nan_without_a_mask_and_match_the_mask_otherwise(volume):
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=25))
    for step, rms in zip(result.steps, result.column("firstorder_RootMeanSquared")):
        if step.mask_voxels < 2:
            assert math.isnan(rms)
    last = result.snapshots[-1]
    assert last.mask.sum() == result.steps[-1].mask_voxels
    if last.mask.sum() >= 2:
        expected = math.sqrt(float(np.mean(last.image[last.mask].astype(np.float64) ** 2)))
        assert result.steps[-1].features["firstorder_RootMeanSquared"] == pytest.approx(expected, rel=1e-4)


def test_mask_is_the_seed_component_of_the_probability(volume):
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=15))
    snap = result.snapshots[-1]
    seed = (0, 12, 12)
    if snap.probability[seed] > 0.5:
        assert snap.mask[seed]
    assert not (snap.mask & (snap.probability <= 0.5)).any()


def test_pyradiomics_features_arrive_from_the_worker_process(volume):
    pytest.importorskip("radiomics")
    fast = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=8, backend="native"))
    slow = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=8, backend="pyradiomics"))
    a = fast.column("firstorder_Entropy")
    b = slow.column("firstorder_Entropy")
    np.testing.assert_allclose(a, b, rtol=1e-4, equal_nan=True)


def test_cancel_stops_within_one_iteration_and_keeps_the_partial_result(volume):
    cancel = threading.Event()

    def on_progress(p):
        if p.step.iteration == 3:
            cancel.set()

    result = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=200), on_progress=on_progress,
                          cancel=cancel)
    assert result.status == "cancelled"
    assert len(result.steps) == 4
    assert result.snapshots[-1].iteration == 3
    assert result.metadata["status"] == "cancelled"


def test_a_fault_keeps_the_iterations_before_it(volume):
    class NanAfter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_net(2)
            self.calls = 0

        def forward(self, x):  # counts the forwards of the transformed copies with gradient (the default has 4)
            self.calls += bool(x.requires_grad) and x.shape[0] > 1
            out = self.inner(x)
            return out * float("nan") if self.calls > 5 else out

    model = TinyModel(NanAfter(), tiny_card(2))
    result = run_analysis(volume, (24, 20, 1), model, _config(iterations=20))
    assert result.status == "fault"
    assert len(result.steps) == 5
    assert "iteration 5" in result.metadata["fault"]


@pytest.mark.parametrize("seed", [(48, 20, 1), (-1, 0, 0), (0, 0, 3)])
def test_seed_outside_the_volume_is_refused(volume, seed):
    with pytest.raises(SeedError, match="outside the volume"):
        run_analysis(volume, seed, tiny_model(2), _config())


def test_nan_voxels_are_refused(volume):
    volume.array[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN or infinite"):
        run_analysis(volume, (24, 20, 1), tiny_model(2), _config())


def test_3d_model_on_a_single_slice_is_refused():
    flat = Volume(liver_like((1, 40, 48)))
    with pytest.raises(ModelError, match="single slice"):
        run_analysis(flat, (24, 20, 0), tiny_model(3), _config())


def test_multichannel_model_is_refused(volume):
    model = TinyModel(tiny_net(2), tiny_card(2, in_channels=3))
    with pytest.raises(ModelError, match="3 input channels"):
        run_analysis(volume, (24, 20, 1), model, _config())


def test_3d_model_runs_on_a_crop(volume):
    vol = Volume(liver_like((20, 30, 30)))
    result = run_analysis(vol, (15, 15, 10), tiny_model(3), _config(iterations=4, names=("firstorder_Mean",)))
    assert result.snapshots[-1].image.shape == (12, 12, 12)
    assert result.crop.start == (4, 9, 9)


def test_runner_reports_progress_from_its_thread_and_cancels(volume):
    runner = AnalysisRunner(volume, (24, 20, 1), tiny_model(2), _config(iterations=100000), queue_size=2).start()
    seen = []
    deadline = time.monotonic() + 20
    while len(seen) < 10 and time.monotonic() < deadline:
        seen += runner.poll()
        time.sleep(0.01)
    assert runner.is_running
    runner.cancel()
    assert runner.join(timeout=10)
    seen += runner.poll()
    result = runner.wait()
    assert result.status == "cancelled"
    assert [p.step.iteration for p in seen] == list(range(len(result.steps)))


def test_runner_keeps_only_the_newest_snapshots(volume):
    runner = AnalysisRunner(volume, (24, 20, 1), tiny_model(2), _config(iterations=30), queue_size=2).start()
    result = runner.wait()
    pending = runner.poll()
    with_snapshots = [p.snapshot.iteration for p in pending if p.snapshot is not None]
    assert with_snapshots == [25, 29]
    assert len(pending) == len(result.steps) == 30


def test_runner_hands_errors_to_the_caller(volume):
    runner = AnalysisRunner(volume, (99, 20, 1), tiny_model(2), _config()).start()
    runner.join(10)
    with pytest.raises(SeedError):
        runner.wait()


def test_an_empty_feature_selection_dreams_without_features(volume):
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=5, names=()))
    assert result.feature_names == ()
    assert result.columns() == ["iteration", "objective", "probability", "mask_voxels"]
    assert len(result.steps) == 5
    timings = result.metadata["timings_s"]
    assert timings["setup"] <= timings["total"] and timings["per_iteration"] > 0


def _stats(dims, bin_width=25.0):
    from DeepDreamAnalysisLib.reference import ReferenceStats

    return ReferenceStats({n: 100.0 for n in FEATURES}, {n: 10.0 for n in FEATURES}, {n: 20 for n in FEATURES},
                          settings={"spatial_dims": dims, "bin_width": bin_width})


def test_reference_of_another_dimensionality_or_bin_width_is_refused(volume):
    from DeepDreamAnalysisLib.errors import ReferenceStatsError

    with pytest.raises(ReferenceStatsError, match="--dims 2"):
        run_analysis(volume, (24, 20, 1), tiny_model(2), _config(), reference=_stats(3))
    with pytest.raises(ReferenceStatsError, match="bin width of 10"):
        run_analysis(volume, (24, 20, 1), tiny_model(2), _config(), reference=_stats(2, bin_width=10.0))
    assert run_analysis(volume, (24, 20, 1), tiny_model(2), _config(iterations=2), reference=_stats(2)).normalised


def test_spacing_far_from_the_cards_and_non_axial_slices_are_warned(volume):
    model = tiny_model(2, spacing=[1.6, 1.6, 3.0])
    result = run_analysis(volume, (24, 20, 1), model, _config(iterations=2))
    assert any("Resample" in w for w in result.metadata["warnings"])
    sagittal = Volume(volume.array, spacing=(0.8, 0.8, 2.5), direction=[[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    result = run_analysis(sagittal, (24, 20, 1), tiny_model(2), _config(iterations=2))
    assert any("not axial" in w for w in result.metadata["warnings"])


def test_probability_stop_keeps_the_last_state(volume):
    cfg = _config(iterations=500)
    cfg.dream.stop_probability, cfg.dream.stop_patience = 0.5, 3
    cfg.snapshot_every = 100
    result = run_analysis(volume, (24, 20, 1), tiny_model(2), cfg)
    assert result.status == "stopped" and len(result.steps) < 500
    assert result.snapshots[-1].iteration == result.steps[-1].iteration
    assert not math.isnan(result.steps[-1].features["firstorder_Entropy"])
