"""compare_models / write_comparison / `deepdream-analysis compare` end to end on tiny real networks."""

import csv
import json
import math
import struct
import threading

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib import cli
from DeepDreamAnalysisLib.analysis import run_analysis
from DeepDreamAnalysisLib.compare import compare_models, write_comparison
from DeepDreamAnalysisLib.config import AnalysisConfig, DreamConfig, FeatureConfig
from DeepDreamAnalysisLib.errors import ConfigError, DeepDreamError, ModelError
from DeepDreamAnalysisLib.volume import Volume

from tiny_models import TinyModel, liver_like, tiny_card, tiny_net

FEATURES = ("firstorder_RootMeanSquared", "firstorder_Mean", "shape2D_PixelSurface")
SEED = (24, 20, 0)
ITER = 14


def blob_net(sigma: float, gain: float = 20.0, start_logit: float = -3.0, level: float = 0.6) -> torch.nn.Module:
    """A linear "dark blob" detector: tumour logit = start_logit - gain * (Gaussian(sigma) * (x' - level)),
    x' the windowed input. Ascent digs a Gaussian dip at the seed and the mask grows over iterations
    (a wider sigma gives a wider lesion); tiny_net's tanh saturates before making one."""
    r = int(math.ceil(2.5 * sigma))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (ax[:, None] ** 2 + ax[None, :] ** 2) / sigma ** 2)
    conv = torch.nn.Conv2d(1, 2, 2 * r + 1, padding=r, padding_mode="replicate")
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = -gain * g / g.sum()
        conv.bias[1] = start_logit + gain * level
    net = torch.nn.Sequential(conv).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _config(start="image", iterations=ITER):
    return AnalysisConfig(dream=DreamConfig(iterations=iterations, step=15.0, normalize_gradient=True, start=start),
                          features=FeatureConfig(names=FEATURES, backend="native"), snapshot_every=5)


def _models():
    return {"net_a": TinyModel(blob_net(1.5), tiny_card(2)), "net_b": TinyModel(blob_net(3.0), tiny_card(2))}


@pytest.fixture(scope="module")
def volume():
    return Volume(liver_like((1, 40, 48)), spacing=(0.8, 0.8, 2.5))


@pytest.fixture(scope="module")
def comparison(volume):
    return compare_models(volume, SEED, _models(), _config(), restarts=2, restart_noise_std=10.0)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_model_runs_every_restart_on_one_iteration_axis(comparison):
    assert comparison.models == ["net_a", "net_b"]
    assert comparison.restarts == 2
    assert comparison.features == FEATURES
    assert list(comparison.iterations) == list(range(ITER))
    for m in comparison.models:
        assert comparison.raw[m].shape == (2, ITER, len(FEATURES))
        assert [r.status for r in comparison.results[m]] == ["completed", "completed"]
    assert comparison.metadata["random_seeds"] == [0, 1]
    assert comparison.metadata["restart_noise_std"] == 10.0
    assert not comparison.normalised


def test_restart_zero_is_the_plain_run_and_restart_one_is_perturbed(volume, comparison):
    plain = run_analysis(volume, SEED, _models()["net_b"], _config())
    np.testing.assert_array_equal(comparison.values("net_b", "probability")[0], plain.column("probability"))
    np.testing.assert_array_equal(comparison.values("net_b", "firstorder_Mean")[0], plain.column("firstorder_Mean"))
    first = [r.snapshots[0].image for r in comparison.results["net_b"]]
    diff = first[1] - first[0]
    assert 7.0 < diff.std() < 13.0  # the 10 HU restart noise, inside the crop only
    # both models saw the same perturbed start in restart 1
    np.testing.assert_array_equal(comparison.results["net_a"][1].snapshots[0].image, first[1])


def test_mean_and_spread_are_those_of_the_restarts(comparison):
    for m in comparison.models:
        for f in FEATURES + ("probability",):
            runs = np.array([r.column(f) for r in comparison.results[m]])
            both = np.isfinite(runs).all(axis=0)
            assert both.any(), f"{m} {f}: no iteration where both restarts have a value"
            np.testing.assert_allclose(comparison.mean(m, f)[both], runs[:, both].mean(axis=0))
            np.testing.assert_allclose(comparison.std(m, f)[both], np.abs(runs[0, both] - runs[1, both]) / 2)
            np.testing.assert_allclose(comparison.min(m, f)[both], runs[:, both].min(axis=0))
            np.testing.assert_allclose(comparison.max(m, f)[both], runs[:, both].max(axis=0))
            one = np.isfinite(runs).sum(axis=0) == 1
            if one.any():  # only one restart has a lesion there: its value, zero spread
                np.testing.assert_allclose(comparison.mean(m, f)[one], np.nanmax(runs[:, one], axis=0))
                assert (comparison.std(m, f)[one] == 0).all()
    # the two networks really differ
    assert not np.allclose(comparison.mean("net_a", "probability"), comparison.mean("net_b", "probability"))


def test_written_files(comparison, tmp_path):
    paths = write_comparison(comparison, tmp_path / "out")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert list(rows[0]) == ["model", "restart", "iteration", "feature", "value", "z"]
    assert len(rows) == 2 * 2 * ITER * (len(FEATURES) + 3)
    row = next(r for r in rows if r["model"] == "net_b" and r["restart"] == "1" and r["iteration"] == str(ITER - 1)
               and r["feature"] == "firstorder_Mean")
    assert float(row["value"]) == pytest.approx(comparison.results["net_b"][1].column("firstorder_Mean")[-1], rel=1e-6)
    assert row["z"] == ""  # no reference
    w, h = _png_size(paths["png"])
    assert w > 300 and h > 200
    sens = list(csv.DictReader(open(paths["sensitivity"])))
    assert len(sens) == 2 * 2 * len(FEATURES)
    assert {s["model"] for s in sens} == {"net_a", "net_b"}
    s = next(s for s in sens if s["model"] == "net_a" and s["restart"] == "0" and s["feature"] == "firstorder_Mean")
    curve = comparison.results["net_a"][0].column("firstorder_Mean")
    finite = curve[np.isfinite(curve)]
    assert float(s["start"]) == pytest.approx(finite[0], rel=1e-5)
    assert float(s["final"]) == pytest.approx(finite[-1], rel=1e-5)
    ranking = list(csv.DictReader(open(paths["ranking"])))
    assert [r["rank"] for r in ranking if r["model"] == "net_a"] == ["1", "2", "3"]
    meta = json.loads(paths["json"].read_text())
    assert meta["restarts_run"] == 2 and meta["models_order"] == ["net_a", "net_b"]
    assert "net_a" in paths["ranking_md"].read_text()


def test_noise_start_restarts_differ_without_restart_noise(volume):
    comp = compare_models(volume, SEED, {"a": _models()["net_a"]}, _config(start="noise", iterations=3),
                          restarts=2, restart_noise_std=0.0)
    starts = [r.snapshots[0].image for r in comp.results["a"]]
    assert not np.array_equal(starts[0], starts[1])
    assert comp.metadata["restart_noise_std"] is None


def test_image_start_without_restart_noise_runs_once(volume):
    comp = compare_models(volume, SEED, {"a": _models()["net_a"]}, _config(iterations=2), restarts=3,
                          restart_noise_std=0.0)
    assert comp.restarts == 1 and comp.metadata["restarts_requested"] == 3


def test_bad_input_is_refused(volume):
    with pytest.raises(ConfigError, match="at least one model"):
        compare_models(volume, SEED, {}, _config())
    with pytest.raises(ConfigError, match="restarts"):
        compare_models(volume, SEED, _models(), _config(), restarts=0)
    mixed = {"flat": _models()["net_a"], "deep": TinyModel(tiny_net(3), tiny_card(3))}
    with pytest.raises(ModelError, match="all be 2D or all 3D"):
        compare_models(Volume(liver_like((12, 40, 48))), (24, 20, 6), mixed, _config())


def test_cancel_before_start_raises(volume):
    stop = threading.Event()
    stop.set()
    with pytest.raises(DeepDreamError, match="cancelled"):
        compare_models(volume, SEED, _models(), _config(), cancel=stop)


def test_progress_names_model_and_restart(volume):
    seen = []
    compare_models(volume, SEED, _models(), _config(iterations=2), restarts=2,
                   on_progress=lambda p: seen.append((p.model, p.restart, p.run_index, p.total_runs, p.progress.step.iteration)))
    assert seen[0] == ("net_a", 0, 0, 4, 0)
    assert seen[-1] == ("net_b", 1, 3, 4, 1)
    assert len(seen) == 8


# ----------------------------------------------------------------------------- command line


def _save_torchscript(net, card, folder, name):
    path = folder / f"{name}.pt"
    torch.jit.script(net).save(str(path))
    (folder / f"{name}.card.json").write_text(json.dumps(card.to_dict()))
    return path


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, volume):
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("cli")
    a = _save_torchscript(blob_net(1.5), tiny_card(2), folder, "a")
    b = _save_torchscript(blob_net(3.0), tiny_card(2), folder, "b")
    img = sitk.GetImageFromArray(volume.array)
    img.SetSpacing(volume.spacing)
    image = folder / "ct.nii.gz"
    sitk.WriteImage(img, str(image))
    return folder, image, a, b


def test_cli_compare_end_to_end(cli_inputs, capsys):
    folder, image, a, b = cli_inputs
    out = folder / "out"
    rc = cli.main(["compare", "--image", str(image), "--seed", "24,20,0", "--model", f"first={a}",
                   "--model", f"second={b}", "--restarts", "2", "--iterations", "10", "--step", "15", "--normalize-gradient",
                   "--features", ",".join(FEATURES), "--feature-backend", "native", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "2 models x 2 restarts" in printed and "raw feature values" in printed
    for name in ("comparison.csv", "comparison.png", "sensitivity.csv", "ranking.csv", "ranking.md", "comparison.json"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert {r["model"] for r in rows} == {"first", "second"}
    assert len(rows) == 2 * 2 * 10 * (len(FEATURES) + 3)
    assert any(r["feature"] == "shape2D_PixelSurface" and r["value"] not in ("", "0") for r in rows)
    meta = json.loads((out / "comparison.json").read_text())
    assert meta["models"]["first"]["format"] == "torchscript"
    assert meta["configuration"]["dream"]["iterations"] == 10


def test_cli_compare_refuses_duplicate_names_and_stray_cards(cli_inputs, capsys):
    folder, image, a, b = cli_inputs
    base = ["compare", "--image", str(image), "--seed", "24,20,0", "--out", str(folder / "bad")]
    rc = cli.main(base + ["--model", f"x={a}", "--model", f"x={b}"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "Two models are named 'x'" in capsys.readouterr().err
    rc = cli.main(base + ["--model", f"x={a}", "--card", f"y={folder / 'a.card.json'}"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "no model named 'y'" in capsys.readouterr().err


def test_z_scores_against_reference_statistics(volume, tmp_path):
    from DeepDreamAnalysisLib.reference import ReferenceStats

    ref = ReferenceStats(mean={f: 50.0 for f in FEATURES}, std={f: 20.0 for f in FEATURES}, n={f: 10 for f in FEATURES})
    comp = compare_models(volume, SEED, _models(), _config(), ref, restarts=2)
    assert comp.normalised
    raw = comp.values("net_a", "firstorder_RootMeanSquared", "raw")
    np.testing.assert_allclose(comp.values("net_a", "firstorder_RootMeanSquared"), (raw - 50.0) / 20.0)
    z = (comp.values("net_b", "firstorder_Mean", "raw") - 50) / 20
    seen = np.isfinite(z).any(axis=0)
    np.testing.assert_allclose(comp.mean("net_b", "firstorder_Mean")[seen], np.nanmean(z[:, seen], axis=0))
    assert np.isnan(comp.mean("net_b", "firstorder_Mean")[~seen]).all()  # no lesion yet in any restart
    rows = {(r.model, r.feature): r for r in comp.ranking()}
    assert all(r.normalised and r.key == "score" for r in rows.values())
    paths = write_comparison(comp, tmp_path)
    row = next(r for r in csv.DictReader(open(paths["csv"])) if r["feature"] == "firstorder_Mean" and r["value"])
    assert float(row["z"]) == pytest.approx((float(row["value"]) - 50.0) / 20.0, rel=1e-5)


# ----------------------------------------------------------------------------- the reproduction's verdicts


def _reproduce_module():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("reproduce")


def test_mean_ci_is_the_student_t_interval_of_the_finite_values():
    R = _reproduce_module()
    c = R.mean_ci([1.0, 1.1, 0.9, 1.0, math.nan, None])
    sd = float(np.std([1.0, 1.1, 0.9, 1.0], ddof=1))
    assert c["n"] == 4 and c["mean"] == pytest.approx(1.0) and c["sd"] == pytest.approx(sd)
    assert c["hi"] - c["mean"] == pytest.approx(3.182 * sd / 2.0)  # t(0.975, 3 df) = 3.182
    one = R.mean_ci([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["lo"]) and R.mean_ci([])["n"] == 0


def test_unit_means_average_the_restarts_of_each_seed_point_and_skip_nan():
    R = _reproduce_module()
    runs = [{"network": "a", "seed_point": 0, "x": 1.0}, {"network": "a", "seed_point": 0, "x": 3.0},
            {"network": "a", "seed_point": 1, "x": math.nan}, {"network": "a", "seed_point": 2, "x": 5.0},
            {"network": "b", "seed_point": 0, "x": 100.0}]
    assert R.unit_means(runs, "x", network="a") == {0: 2.0, 2: 5.0}


def test_paired_verdict_holds_does_not_hold_or_is_inconclusive():
    R = _reproduce_module()
    b = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    a = {0: 11.0, 1: 21.1, 2: 30.9, 3: 41.0}  # one above b at every seed point, by about the same amount
    v = R.paired_verdict(a, b, ">")
    assert v["verdict"] == "holds" and v["diff_mean"] == pytest.approx(1.0) and v["diff_lo"] > 0 and v["n"] == 4
    assert R.paired_verdict(a, b, "<")["verdict"] == "does not hold"
    assert R.paired_verdict(b, a, "<")["verdict"] == "holds"
    mixed = {0: 11.0, 1: 19.0, 2: 31.0, 3: 39.0}  # +1, -1, +1, -1: the spread covers 0
    assert R.paired_verdict(mixed, b, ">")["verdict"] == "inconclusive (difference within spread)"
    assert R.paired_verdict({0: 5.0}, b, ">")["verdict"].startswith("not testable")
    # the differences are paired: a large spread between seed points does not hide a consistent difference
    assert R.paired_verdict({0: 101.0, 1: 2.0, 2: 51.0}, {0: 100.0, 1: 1.0, 2: 50.0}, ">")["verdict"] == "holds"


def _runs(values, start="noise", key="window_response_final"):
    """Per-run records: values[network] = list over seed points of the two restarts' values."""
    runs = []
    for net, per_point in values.items():
        for s, pair in enumerate(per_point):
            for r, v in enumerate(pair):
                runs.append({"network": net, "start": start, "seed_point": s, "restart": r, key: v})
    return runs


def test_section_31_verdict_groups_networks_by_dice_and_compares_relying_with_robust():
    R = _reproduce_module()
    dice = [{"p": p, "network": f"G_{p:g}", "dice_unmarked": d}
            for p, d in ((0.0, 0.60), (0.2, 0.55), (0.5, 0.40), (0.9, 0.05), (1.0, 0.0))]
    robust = [(50, 52), (40, 44), (55, 53), (45, 47)]
    high = [(150, 160), (120, 110), (170, 175), (140, 130)]
    values = {"G_0": robust, "G_0.2": robust, "G_0.5": high, "G_0.9": high, "G_1": high}
    runs = _runs(values) + _runs(values, "healthy")
    c = R.claim_31(dice, runs)
    assert c["not_relying"] == ["G_0", "G_0.2"] and c["intermediate"] == ["G_0.5"] and c["relying"] == ["G_0.9", "G_1"]
    v = c["by_start"]["noise"]["window_response"]
    assert v["verdict"] == "holds" and len(v["pairs"]) == 4  # 2 relying x 2 robust
    # no selectivity values at all: nothing to compare
    assert c["by_start"]["noise"]["window_selectivity"]["verdict"] == "not testable"
    # G_1 below the robust networks at every seed point: the claim fails
    values["G_1"] = [(20, 22), (10, 12), (30, 31), (25, 20)]
    assert R.claim_31(dice, _runs(values))["by_start"]["noise"]["window_response"]["verdict"] == "does not hold"
    # G_1 above at two seed points, below at two: within the spread
    values["G_1"] = [(150, 160), (10, 12), (170, 175), (25, 20)]
    v = R.claim_31(dice, _runs(values))["by_start"]["noise"]["window_response"]
    assert v["verdict"] == "inconclusive (difference within spread)"
    # an intermediate network's values do not enter the verdict
    values["G_1"], values["G_0.5"] = high, [(0, 0)] * 4
    assert R.claim_31(dice, _runs(values))["by_start"]["noise"]["window_response"]["verdict"] == "holds"


def test_combined_verdict_needs_every_comparison_to_hold():
    R = _reproduce_module()
    H, N, I = "holds", "does not hold", "inconclusive (difference within spread)"
    assert R.combine_verdicts([H, H]) == H
    assert R.combine_verdicts([H, I]) == I
    assert R.combine_verdicts([H, I, N]) == N
    assert R.combine_verdicts([]).startswith("not testable")


def test_seed_points_are_deterministic_deep_in_the_liver_and_spread_out():
    from DeepDreamAnalysisLib import lits
    from DeepDreamAnalysisLib.synthetic import distance_to_outside

    R = _reproduce_module()
    jj, ii = np.mgrid[0:128, 0:128]
    liver = ((ii - 60) / 45.0) ** 2 + ((jj - 64) / 35.0) ** 2 <= 1.0
    pts = R.seed_points(liver, 4)
    assert pts == R.seed_points(liver, 4) and len(pts) == 4
    assert pts[0] == lits.choose_seed(liver)
    depth = distance_to_outside(liver)
    assert all(depth[j, i] >= R.MIN_DEPTH for i, j in pts)
    gaps = [math.hypot(a[0] - b[0], a[1] - b[1]) for n, a in enumerate(pts) for b in pts[:n]]
    assert min(gaps) > 20  # far apart, not clustered at the deepest voxel


def test_with_training_seeds_the_unit_is_the_training_seed_not_the_seed_point():
    R = _reproduce_module()
    runs = []
    # network a is 1.0 above b at every seed point of training seed 0 and 1, but 1.0 below at training seed 2
    for t, delta in ((0, 1.0), (1, 1.0), (2, -1.0)):
        for s in range(4):
            for r in range(2):
                runs.append({"network": "a", "training_seed": t, "seed_point": s, "restart": r, "x": 10.0 * s + delta + r})
                runs.append({"network": "b", "training_seed": t, "seed_point": s, "restart": r, "x": 10.0 * s + r})
    ua, ub = R.unit_means(runs, "x", network="a"), R.unit_means(runs, "x", network="b")
    assert ua[(2, 3)] == pytest.approx(29.5) and len(ua) == 12  # (training seed, seed point) cells, restarts averaged
    units = R.statistical_units(ua)
    assert sorted(units) == [0, 1, 2] and units[0] == pytest.approx(16.5)  # mean over the 4 seed points
    v = R.paired_verdict(ua, ub, ">")
    # 12 cells, but 3 units (the training seeds): differences +1, +1, -1 -> mean 1/3, interval covers 0
    assert v["unit"] == "training seed" and v["n"] == 3 and v["cells"] == 12
    assert v["diff_mean"] == pytest.approx(1.0 / 3.0)
    assert v["verdict"] == "inconclusive (difference within spread)"
    # every training seed above (+1, +1, +1.1): holds over the 3 units
    for row in runs:
        if row["network"] == "a" and row["training_seed"] == 2:
            row["x"] += 2.1
    v = R.paired_verdict(R.unit_means(runs, "x", network="a"), R.unit_means(runs, "x", network="b"), ">")
    assert v["verdict"] == "holds" and v["n"] == 3
    assert R.unit_ci(runs, "x", network="b")["n"] == 3
