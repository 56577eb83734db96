"""Sensitivity summary of DeepDream curves: how strongly and how fast a feature moved toward,
into or past the normal range (docs/sensitivity.md holds the definitions with examples).

A curve is one feature's values along the dream, ``z[t]`` at recorded iterations ``t`` (z-scores
against a reference set, so the normal range is the band ``[-1, 1]``). NaN entries (no mask yet,
or features not computed at that iteration) are skipped. With ``z0`` the first finite value (at
iteration ``t0``, when the dreamed lesion appears) and ``zT`` the last:

- ``side = sign(z0)`` if ``|z0| > 1`` else 0 (the start lies above, below or inside the band);
- ``distance0 = max(|z0| - 1, 0)``: distance of the start to the band, in standard deviations;
- ``toward(t) = side * (z0 - z(t))``: movement toward the band (and beyond it), in standard deviations;
  inside the band (``side == 0``) ``toward(t) = |z0| - |z(t)|`` (movement toward the band's centre);
- ``fraction_covered = toward(T) / distance0`` (NaN when the start is inside the band): 1 means
  the curve ended on the band's near edge, 1 + 2/distance0 on its far edge, negative values mean
  it moved away;
- ``entered_at``: the first iteration with ``|z| <= 1`` (``t0`` when it starts inside; NaN if never);
- ``overshoot``: True when some ``z(t)`` lies beyond the band on the far side (``side * z(t) < -1``),
  or, for a start inside the band, when the curve left the band (``|z(t)| > 1``) and ended outside it;
  ``overshoot_at``: the first such iteration (NaN otherwise);
- ``score``: ``mean over the recorded finite points after t0 of toward(t) / max(distance0, 1)`` —
  the normalised area under the progress curve. Signed (positive = toward the band), it is large
  when the feature moved far *and* early: a curve that jumps to the band at once scores 1, one that
  gets there linearly at the last iteration scores about 0.5, one that never moves scores 0.

Without a reference (raw values, no band) only ``start``, ``final``, ``change = final - start`` and
``relative_change = change / |start|`` are defined; the band columns are NaN and the ranking uses
``|relative_change|``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Sequence

import numpy as np

BAND = (-1.0, 1.0)


@dataclass(frozen=True)
class FeatureSensitivity:
    """The sensitivity numbers of one feature in one run (definitions in the module docstring).

    Iterations are the dream's iteration numbers (0 = the start image); values are z-scores when
    ``normalised`` is True, raw feature values otherwise.
    """

    feature: str
    normalised: bool
    start_iteration: float
    start: float
    final: float
    change: float
    relative_change: float
    distance0: float
    side: int
    fraction_covered: float
    entered_at: float
    overshoot: bool
    overshoot_at: float
    final_in_band: bool
    score: float

    def to_row(self) -> dict:
        return asdict(self)


FIELDS = tuple(f.name for f in fields(FeatureSensitivity))
NAN = math.nan


def feature_sensitivity(iterations: Sequence[float], values: Sequence[float], feature: str = "",
                        normalised: bool = True) -> FeatureSensitivity:
    """The sensitivity numbers of one curve: ``values[n]`` at ``iterations[n]`` (same length).

    ``normalised``: the values are z-scores (band [-1, 1]); False: raw values (band columns NaN).
    A curve with no finite value gives NaN everywhere (the dream never made a lesion).
    """
    it = np.asarray(iterations, dtype=float)
    v = np.asarray(values, dtype=float)
    if it.shape != v.shape:
        raise ValueError(f"iterations and values differ in length ({it.shape} vs {v.shape}).")
    ok = np.isfinite(v) & np.isfinite(it)
    if not ok.any():
        return FeatureSensitivity(feature, normalised, NAN, NAN, NAN, NAN, NAN, NAN, 0, NAN, NAN, False, NAN, False, NAN)
    order = np.argsort(it[ok], kind="stable")
    t, z = it[ok][order], v[ok][order]
    t0, z0, zT = float(t[0]), float(z[0]), float(z[-1])
    change = zT - z0
    relative = change / abs(z0) if z0 != 0 else (0.0 if change == 0 else math.copysign(math.inf, change))
    if not normalised:
        return FeatureSensitivity(feature, False, t0, z0, zT, change, relative, NAN, 0, NAN, NAN, False, NAN, False, NAN)
    lo, hi = BAND
    inside = (z >= lo) & (z <= hi)
    side = 0 if lo <= z0 <= hi else (1 if z0 > hi else -1)
    distance0 = max(abs(z0) - hi, 0.0)
    toward = side * (z0 - z) if side != 0 else abs(z0) - np.abs(z)
    fraction = float(toward[-1] / distance0) if side != 0 and distance0 > 0 else NAN
    entered = float(t[np.argmax(inside)]) if inside.any() else NAN
    if side != 0:
        past = side * z < -hi
    else:
        past = ~inside if not inside[-1] else np.zeros_like(inside)
    overshoot = bool(past.any())
    overshoot_at = float(t[np.argmax(past)]) if overshoot else NAN
    score = float(np.mean(toward[1:]) / max(distance0, 1.0)) if len(z) > 1 else 0.0
    return FeatureSensitivity(feature, True, t0, z0, zT, change, relative, distance0, side, fraction, entered,
                              overshoot, overshoot_at, bool(inside[-1]), score)


def result_sensitivity(result) -> list[FeatureSensitivity]:
    """One :class:`FeatureSensitivity` per feature of an :class:`~.result.AnalysisResult`
    (z-scores when it has reference statistics for that feature, raw values otherwise)."""
    its = result.iterations
    out = []
    for name in result.feature_names:
        z = result.zscores(name) if result.normalised else None
        if z is not None and np.isfinite(z).any():
            out.append(feature_sensitivity(its, z, name, True))
        else:
            out.append(feature_sensitivity(its, result.column(name), name, False))
    return out


def ranking_key(s: FeatureSensitivity) -> float:
    """The number features are ranked by: ``score`` (z-scores) or ``|relative_change|`` (raw)."""
    return s.score if s.normalised else abs(s.relative_change)


@dataclass(frozen=True)
class RankedFeature:
    """One row of a network's ranking: mean and spread of the ranking number over its runs."""

    model: str
    rank: int
    feature: str
    normalised: bool
    key: str
    mean: float
    std: float
    runs: int
    entered_fraction: float
    """Fraction of the runs in which the curve entered the band."""
    overshoot_fraction: float
    mean_entered_at: float
    mean_final: float


def rank_features(per_model: dict[str, Iterable[FeatureSensitivity]]) -> list[RankedFeature]:
    """The features of each model ranked by :func:`ranking_key` averaged over its runs,
    most sensitive first (NaN last). ``per_model``: model name -> the sensitivities of all its runs."""
    rows: list[RankedFeature] = []
    for model, sens in per_model.items():
        by_feature: dict[str, list[FeatureSensitivity]] = {}
        for s in sens:
            by_feature.setdefault(s.feature, []).append(s)
        entries = []
        for feature, ss in by_feature.items():
            keys = np.array([ranking_key(s) for s in ss], dtype=float)  # NaN: a run without a lesion
            finite = keys[np.isfinite(keys)]
            mean = float(finite.mean()) if finite.size else NAN
            std = float(finite.std()) if finite.size else NAN
            normalised = all(s.normalised for s in ss)
            entered = [s for s in ss if math.isfinite(s.entered_at)]
            entries.append(dict(
                feature=feature, normalised=normalised, key="score" if normalised else "|relative_change|",
                mean=mean, std=std, runs=len(ss),
                entered_fraction=len(entered) / len(ss) if normalised else NAN,
                overshoot_fraction=sum(s.overshoot for s in ss) / len(ss) if normalised else NAN,
                mean_entered_at=float(np.mean([s.entered_at for s in entered])) if entered else NAN,
                mean_final=_nanmean([s.final for s in ss])))
        entries.sort(key=lambda e: (not math.isfinite(e["mean"]), -e["mean"] if math.isfinite(e["mean"]) else 0.0, e["feature"]))
        for n, e in enumerate(entries, 1):
            rows.append(RankedFeature(model=model, rank=n, **e))
    return rows


def _nanmean(values) -> float:
    a = np.asarray(list(values), dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else NAN


def write_sensitivity_csv(rows: Iterable[dict], path) -> None:
    """Write dict rows (same keys) as CSV atomically; floats with 6 significant digits, NaN as empty."""
    from ..atomic import write_text_atomic

    rows = list(rows)
    if not rows:
        write_text_atomic(path, "")
        return
    cols = list(rows[0].keys())
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_fmt(r[c]) for c in cols))
    write_text_atomic(path, "\n".join(lines) + "\n")


def ranking_markdown(rows: Sequence[RankedFeature]) -> str:
    """The ranking as a markdown table (one block per model)."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        out.append(f"**{model}**\n")
        out.append("| rank | feature | score (mean ± std) | entered band | overshoot | final |")
        out.append("|---:|---|---:|---:|---:|---:|")
        for r in (r for r in rows if r.model == model):
            out.append(f"| {r.rank} | {r.feature} | {_fmt(r.mean, 3)} ± {_fmt(r.std, 2)}"
                       f"{'' if r.normalised else ' (raw: abs. relative change)'} | {_pct(r.entered_fraction)} | "
                       f"{_pct(r.overshoot_fraction)} | {_fmt(r.mean_final, 3)} |")
        out.append("")
    return "\n".join(out)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.0f} %"


def _fmt(v, digits: int = 6) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return f"{float(v):.{digits}g}"
    return str(v)


__all__ = ["BAND", "FeatureSensitivity", "feature_sensitivity", "result_sensitivity", "RankedFeature",
           "rank_features", "ranking_key", "write_sensitivity_csv", "ranking_markdown"]
