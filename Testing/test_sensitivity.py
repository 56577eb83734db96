"""Sensitivity summary on hand-made curves: entering the band, overshoot, never moving, ranking."""

import math

import numpy as np
import pytest

from DeepDreamAnalysisLib.sensitivity import (
    feature_sensitivity, rank_features, ranking_markdown, write_sensitivity_csv,
)

ITS = np.arange(11)


def test_curve_entering_the_band_from_below():
    z = np.array([-5, -4, -3, -2, -1.5, -0.8, -0.5, -0.5, -0.5, -0.5, -0.5])
    s = feature_sensitivity(ITS, z, "f")
    assert s.start == -5 and s.final == -0.5 and s.side == -1
    assert s.distance0 == pytest.approx(4.0)
    assert s.entered_at == 5
    assert s.final_in_band and not s.overshoot and math.isnan(s.overshoot_at)
    assert s.fraction_covered == pytest.approx(4.5 / 4.0)
    # score: mean over t >= 1 of (z - z0) / 4
    assert s.score == pytest.approx(np.mean(z[1:] + 5) / 4.0)


def test_fast_curve_scores_higher_than_slow_curve_with_the_same_end():
    fast = np.array([-5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], float)
    slow = np.linspace(-5, 0, 11)
    sf, ss = feature_sensitivity(ITS, fast), feature_sensitivity(ITS, slow)
    assert sf.final == ss.final == 0
    assert sf.fraction_covered == ss.fraction_covered == pytest.approx(5 / 4)
    assert sf.score == pytest.approx(5 / 4)
    assert ss.score == pytest.approx(np.mean(np.linspace(0.5, 5, 10)) / 4)
    assert sf.score > ss.score
    assert sf.entered_at == 1 and ss.entered_at == 8  # linspace reaches -1.0 at index 8


def test_overshoot_from_above_past_the_far_side():
    z = np.array([3, 2, 1, 0, -1, -2, -3, -3, -3, -3, -3], float)
    s = feature_sensitivity(ITS, z)
    assert s.side == 1 and s.entered_at == 2
    assert s.overshoot and s.overshoot_at == 5
    assert not s.final_in_band
    assert s.fraction_covered == pytest.approx(6 / 2)


def test_start_inside_the_band_and_leaving_it_is_an_overshoot():
    z = np.array([0.2, 0.5, 1.5, 3, 4, 5, 6, 7, 8, 9, 10], float)
    s = feature_sensitivity(ITS, z)
    assert s.side == 0 and s.distance0 == 0 and math.isnan(s.fraction_covered)
    assert s.entered_at == 0
    assert s.overshoot and s.overshoot_at == 2
    assert s.score < 0  # moved away from the band's centre


def test_curve_that_never_moves():
    z = np.full(11, -4.0)
    s = feature_sensitivity(ITS, z)
    assert s.change == 0 and s.score == 0 and s.fraction_covered == 0
    assert math.isnan(s.entered_at) and not s.overshoot and not s.final_in_band


def test_moving_away_is_negative():
    s = feature_sensitivity(ITS, np.linspace(-2, -6, 11))
    assert s.score < 0 and s.fraction_covered == pytest.approx(-4.0)
    assert math.isnan(s.entered_at)


def test_nan_before_the_lesion_appears_is_skipped():
    z = np.array([np.nan, np.nan, np.nan, -3, -2, -1, -1, np.nan, -0.5, -0.5, -0.5])
    s = feature_sensitivity(ITS, z)
    assert s.start_iteration == 3 and s.start == -3
    assert s.entered_at == 5 and s.final == -0.5


def test_all_nan_curve_gives_nan_not_an_error():
    s = feature_sensitivity(ITS, np.full(11, np.nan))
    assert math.isnan(s.start) and math.isnan(s.score) and not s.overshoot


def test_raw_values_have_no_band_numbers():
    s = feature_sensitivity(ITS, np.linspace(100, 50, 11), normalised=False)
    assert s.change == -50 and s.relative_change == pytest.approx(-0.5)
    assert math.isnan(s.score) and math.isnan(s.entered_at) and math.isnan(s.fraction_covered)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        feature_sensitivity([0, 1], [1.0, 2.0, 3.0])


def test_ranking_orders_features_by_mean_score_per_model(tmp_path):
    fast = feature_sensitivity(ITS, np.r_[-5, np.zeros(10)], "fast")
    slow = feature_sensitivity(ITS, np.linspace(-5, 0, 11), "slow")
    still = feature_sensitivity(ITS, np.full(11, -4.0), "still")
    away = feature_sensitivity(ITS, np.linspace(-2, -6, 11), "away")
    empty = feature_sensitivity(ITS, np.full(11, np.nan), "empty")
    rows = rank_features({"A": [still, away, slow, fast, empty], "B": [away, still]})
    a = [r for r in rows if r.model == "A"]
    assert [r.feature for r in a] == ["fast", "slow", "still", "away", "empty"]
    assert [r.rank for r in a] == [1, 2, 3, 4, 5]
    assert a[0].entered_fraction == 1.0 and a[2].entered_fraction == 0.0
    assert [r.feature for r in rows if r.model == "B"] == ["still", "away"]
    md = ranking_markdown(rows)
    assert "| 1 | fast |" in md and "**B**" in md
    write_sensitivity_csv([{"model": r.model, "feature": r.feature, "mean": r.mean} for r in rows], tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "model,feature,mean" and lines[1].startswith("A,fast,1.25")
    assert lines[5] == "A,empty,"  # NaN written as an empty cell


def test_ranking_averages_restarts():
    r1 = feature_sensitivity(ITS, np.r_[-5, np.zeros(10)], "f")
    r2 = feature_sensitivity(ITS, np.full(11, -5.0), "f")
    (row,) = rank_features({"A": [r1, r2]})
    assert row.runs == 2
    assert row.mean == pytest.approx((1.25 + 0.0) / 2)
    assert row.std == pytest.approx(0.625)
    assert row.entered_fraction == 0.5


def test_a_run_without_a_lesion_keeps_the_feature_normalised():
    r1 = feature_sensitivity(ITS, np.r_[-5, np.zeros(10)], "f")
    r2 = feature_sensitivity(ITS, np.full(11, np.nan), "f")  # z-scores, but this run made no lesion
    (row,) = rank_features({"A": [r1, r2]})
    assert row.normalised and row.key == "score"
    assert row.mean == pytest.approx(1.25) and row.runs == 2 and row.entered_fraction == 0.5
