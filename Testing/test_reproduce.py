"""The reproduction's statistics with training seeds and dream methods (scripts/reproduce.py)."""

import importlib
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _reproduce():
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("reproduce")


def _runs(values, method="paper", start="healthy", key="window_response_final"):
    """values[network][training_seed][seed_point] -> one run record each (one restart)."""
    return [{"method": method, "network": net, "training_seed": t, "start": start, "seed_point": s, "restart": 0,
             key: v}
            for net, per_seed in values.items() for t, per_point in enumerate(per_seed) for s, v in enumerate(per_point)]


def test_with_training_seeds_the_cells_are_pairs_and_the_unit_is_the_training_seed():
    R = _reproduce()
    runs = _runs({"a": [[1.0, 3.0], [5.0, math.nan]]})
    cells = R.unit_means(runs, "window_response_final", network="a")
    assert cells == {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0}
    assert R.statistical_units(cells) == {0: 2.0, 1: 5.0}  # per training seed, the mean over its seed points
    c = R.unit_ci(runs, "window_response_final", network="a")
    assert c["n"] == 2 and c["mean"] == pytest.approx(3.5)


def test_training_variance_enters_the_verdict():
    R = _reproduce()
    b = {(t, s): 10.0 for t in range(3) for s in range(8)}
    # a above b by 1 at every seed point of every training seed: holds, n = 3 training seeds (not 24 cells)
    a = {(t, s): 11.0 + 0.01 * s for t in range(3) for s in range(8)}
    v = R.paired_verdict(a, b, ">")
    assert v["verdict"] == "holds" and v["n"] == 3 and v["cells"] == 24 and v["unit"] == "training seed"
    # one training far above, two slightly below: over the 24 cells the mean difference is positive and its
    # pseudo-replicated interval would exclude 0, but over the 3 trainings it is within the spread
    a = {(t, s): (40.0 if t == 0 else 9.5) + 0.01 * s for t in range(3) for s in range(8)}
    pooled = R.mean_ci([a[k] - b[k] for k in a])
    assert pooled["lo"] > 0  # what (training seed x seed point) units would have called "holds"
    assert R.paired_verdict(a, b, ">")["verdict"] == "inconclusive (difference within spread)"
    # every training below: does not hold
    a = {(t, s): 9.0 - 0.1 * t for t in range(3) for s in range(8)}
    assert R.paired_verdict(a, b, ">")["verdict"] == "does not hold"
    # one training seed in common: not testable
    assert R.paired_verdict({(0, 0): 5.0}, b, ">")["verdict"].startswith("not testable (1 training seed")


def test_section_31_verdict_per_method_with_training_seeds():
    R = _reproduce()
    dice = [{"p": p, "network": f"G_{p:g}", "training_seed": t, "dice_unmarked": d + 0.01 * t}
            for p, d in ((0.0, 0.60), (0.2, 0.55), (0.5, 0.40), (0.9, 0.05), (1.0, 0.0)) for t in range(3)]
    robust = [[50.0, 40.0, 55.0, 45.0], [52.0, 44.0, 53.0, 47.0], [49.0, 42.0, 51.0, 46.0]]
    high = [[150.0, 120.0, 170.0, 140.0], [160.0, 110.0, 175.0, 130.0], [155.0, 115.0, 165.0, 135.0]]
    # paper: the relying networks dream more of the marking; default: one training of G_1 dreams less
    low_once = [high[0], [20.0, 10.0, 30.0, 25.0], high[2]]
    runs = _runs({"G_0": robust, "G_0.2": robust, "G_0.5": high, "G_0.9": high, "G_1": high}, "paper") \
        + _runs({"G_0": robust, "G_0.2": robust, "G_0.5": high, "G_0.9": high, "G_1": low_once}, "default")
    paper = R.claim_31(dice, runs, method="paper")
    assert paper["relying"] == ["G_0.9", "G_1"] and paper["not_relying"] == ["G_0", "G_0.2"]
    assert paper["dice_unmarked"]["G_0"] == pytest.approx(0.61)  # mean over the three trainings
    v = paper["by_start"]["healthy"]["window_response"]
    assert v["verdict"] == "holds" and all(p["n"] == 3 for p in v["pairs"])
    assert "noise" not in paper["by_start"]  # no noise-start runs: no noise verdict
    default = R.claim_31(dice, runs, method="default")
    assert default["by_start"]["healthy"]["window_response"]["verdict"] == "inconclusive (difference within spread)"


def test_method_quality_counts_reached_clean_and_flags_per_method():
    R = _reproduce()
    runs = [{"method": "paper", "start": "healthy", "reached": True, "clean": False, "checkerboard": 0.8,
             "component_share": 0.01, "touches_border": False, "flags": "checkerboard"},
            {"method": "paper", "start": "healthy", "reached": False, "clean": False, "checkerboard": 0.6,
             "component_share": 0.0, "touches_border": False, "flags": "checkerboard no_dream"},
            {"method": "default", "start": "healthy", "reached": True, "clean": True, "checkerboard": 0.1,
             "component_share": 0.02, "touches_border": False, "flags": ""}]
    rows = {r["method"]: r for r in R.method_quality(runs, ("paper", "default"))}
    assert rows["paper"]["reached"] == 1 and rows["paper"]["clean"] == 0 and rows["paper"]["runs"] == 2
    assert rows["paper"]["checkerboard_mean"] == pytest.approx(0.7)
    assert rows["paper"]["flags"] == "checkerboard 2, no_dream 1"
    assert rows["default"]["clean"] == 1 and rows["default"]["flags"] == "none"
    assert "| `default` | healthy | 1/1 | 1/1 | 0.10 |" in R._quality_md(R.method_quality(runs, ("default",)))


def test_unknown_method_or_zero_training_seeds_is_refused_with_the_choices(capsys):
    R = _reproduce()
    with pytest.raises(SystemExit) as e:
        R.main(["--methods", "paper,magic"])
    assert e.value.code == 2 and "choose from paper, default" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        R.main(["--training-seeds", "0"])
    assert e.value.code == 2 and "--training-seeds must be positive" in capsys.readouterr().err


def test_a_training_that_did_not_learn_is_retrained_with_a_new_seed_and_recorded(tmp_path):
    """The rule of replace_failed_trainings on real (one-epoch) trainings of a G_1 network."""
    from DeepDreamAnalysisLib import lits

    try:
        volume = lits.load_lits117()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the demo CT is part of `make test`'s set-up: {exc}")
    R = _reproduce()
    training = R.training
    train_k, val_k = training.split_indices(volume[0].shape[0])
    train_h = training.lits_slices(train_k[:6], "healthy", volume=volume)
    val_h = training.lits_slices(val_k[:3], "healthy", volume=volume)
    settings = R.Settings(epochs=1, training_seeds=2, seed=0)
    job = [j for j in R.jobs_31(settings, train_h, val_h, "thin") if j.name == "G_1_t1"]
    trained = R.train_all(tmp_path, settings, job)
    first = trained["G_1_t1"][0]

    assert R.replace_failed_trainings(tmp_path, settings, job, trained, min_dice=0.0) == []  # learned: kept
    assert trained["G_1_t1"][0] is first

    records = R.replace_failed_trainings(tmp_path, settings, job, trained, min_dice=1.01, max_replacements=2)
    (rec,) = records
    assert rec["failed"] == "G_1_t1" and rec["training_seed"] == 1 and rec["network"] == "G_1"
    assert [a["model"] for a in rec["attempts"]] == ["G_1_t1_retrain1", "G_1_t1_retrain2"]
    assert [a["seed"] for a in rec["attempts"]] == [101, 201]
    assert rec["learned"] is False and rec["replacement"] == "G_1_t1_retrain2"
    assert (tmp_path / "models" / "G_1_t1_retrain2" / "G_1_t1_retrain2.pt").is_file()
    model, tlog = trained["G_1_t1"]  # the slot now holds the last attempt
    assert model is not first and tlog["replaces"] == "G_1_t1" and tlog["name"] == "G_1_t1_retrain2"
    md = R._results_md({"settings": {"methods": []}, "commit": "x", "slice": 44, "seed_points_ij": [],
                        "total_s": 60, "replaced_trainings": records})
    assert "G_1_t1 (seed 1, own Dice" in md and "G_1_t1_retrain2 (seed 201" in md and "still did not learn" in md


@pytest.mark.slow
def test_sigterm_during_training_ends_the_training_processes_and_keeps_the_trained_networks(tmp_path):
    """`make reproduce` stopped from outside (timeout, kill, a scheduler): the training processes end
    with it, the networks already trained are kept, and the same command with --reuse goes on from them."""
    from process_tree import descendants, stop_and_expect_nothing_left

    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "--quick", "--out", str(out), "--workers", "2"]

    def start(extra, log):
        with open(log, "w") as fh:  # a file, not a pipe: a process left behind could hold a pipe open
            return subprocess.Popen(cmd + extra, stdout=fh, stderr=subprocess.STDOUT)

    def stop(proc, log, ready):
        def workers():
            return {p: c for p, c in descendants(proc.pid).items() if "spawn_main" in c}

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (ready() and len(workers()) == 2):
            time.sleep(0.2)
        started = descendants(proc.pid)
        assert len(workers()) == 2, log.read_text()  # the 2 training processes
        stop_and_expect_nothing_left(proc, signal.SIGTERM, started, "reproduce.py", log.read_text)
        text = log.read_text()
        assert "stopped (SIGTERM)" in text and "--reuse" in text and "Traceback" not in text, text

    def trained():
        return sorted(p.parent.name for p in (out / "models").glob("*/training_log.json"))

    log = tmp_path / "first.txt"
    stop(start([], log), log, lambda: len(trained()) >= 1)
    kept = trained()
    assert kept and all((out / "models" / n / f"{n}.pt").is_file() for n in kept)
    total = int(re.search(r"Training (\d+) networks", log.read_text()).group(1))
    assert len(kept) < total

    log = tmp_path / "again.txt"
    stop(start(["--reuse"], log), log, lambda: "networks (2 at a time)" in log.read_text())
    assert f"Training {total - len(kept)} networks" in log.read_text()  # the kept ones are not trained again
