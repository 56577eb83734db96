"""First-order (intensity) features, as pyradiomics' ``RadiomicsFirstOrder`` (voxelArrayShift 0).

``X`` are the ``N_p`` intensities inside the mask (image units), ``p(i)`` the fraction of them in
grey-level bin ``i`` (pyradiomics' fixed-bin-width discretisation, see ``native_common``),
``eps = numpy.spacing(1)``, ``V_voxel`` the volume of one voxel (mm^3). Percentiles interpolate
linearly (numpy's default).
"""

from __future__ import annotations

import math

import torch

from .native_common import EPS, discretize

FORMULAS = {
    "Energy": "sum(X^2)",
    "TotalEnergy": "V_voxel * sum(X^2)",
    "Entropy": "-sum_i p(i) log2(p(i) + eps)",
    "Minimum": "min(X)",
    "10Percentile": "10th percentile of X",
    "90Percentile": "90th percentile of X",
    "Maximum": "max(X)",
    "Mean": "mean(X)",
    "Median": "median(X)",
    "InterquartileRange": "P75(X) - P25(X)",
    "Range": "max(X) - min(X)",
    "MeanAbsoluteDeviation": "mean(|X - mean(X)|)",
    "RobustMeanAbsoluteDeviation": "mean(|X' - mean(X')|), X' = X within [P10, P90]",
    "RootMeanSquared": "sqrt(sum(X^2) / N_p)",
    "StandardDeviation": "sqrt(mean((X - mean(X))^2))",
    "Skewness": "m3 / m2^1.5, m_k = mean((X - mean(X))^k) (0 when m2 = 0)",
    "Kurtosis": "m4 / m2^2 (0 when m2 = 0)",
    "Variance": "mean((X - mean(X))^2)",
    "Uniformity": "sum_i p(i)^2",
}
NAMES = frozenset(f"firstorder_{k}" for k in FORMULAS)


def _percentile(sorted_x: torch.Tensor, q: float) -> torch.Tensor:
    n = sorted_x.numel()
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * frac


def compute(values: torch.Tensor, wanted: set[str], bin_width: float, voxel_volume: float,
            hist: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Features of the 1-D tensor ``values`` (the intensities inside the mask); returns 0-d float64 tensors.

    ``hist``: optional ``bincount`` of the grey levels of ``values`` (pyradiomics' binning with
    ``bin_width``), when the caller has it already. Only what ``wanted`` needs is computed.
    """
    need = {w.split("_", 1)[1] for w in wanted}
    x = values.to(torch.float64)
    n = x.numel()
    out: dict[str, torch.Tensor] = {}
    if need & {"Entropy", "Uniformity"}:
        counts = torch.bincount(discretize(values, bin_width)) if hist is None else hist
        p = counts[counts > 0].to(torch.float64) / n
        out["Entropy"] = -(p * torch.log2(p + EPS)).sum()
        out["Uniformity"] = (p * p).sum()
    if need & {"Energy", "TotalEnergy", "RootMeanSquared"}:
        energy = torch.dot(x, x)
        out["Energy"] = energy
        out["TotalEnergy"] = energy * voxel_volume
        out["RootMeanSquared"] = torch.sqrt(energy / n)
    if need & {"Minimum", "Maximum", "Range"}:
        mm = torch.aminmax(x)
        out["Minimum"], out["Maximum"] = mm.min, mm.max
        out["Range"] = mm.max - mm.min
    if need & {"Mean", "Variance", "StandardDeviation", "MeanAbsoluteDeviation", "Skewness", "Kurtosis"}:
        mean = x.mean()
        d = x - mean
        out["Mean"] = mean
        d2 = d * d
        m2 = d2.mean()
        out["Variance"] = m2
        out["StandardDeviation"] = torch.sqrt(m2)
        if "MeanAbsoluteDeviation" in need:
            out["MeanAbsoluteDeviation"] = d.abs().mean()
        if need & {"Skewness", "Kurtosis"}:
            m3 = (d2 * d).mean()
            m4 = (d2 * d2).mean()
            flat = m2 == 0
            safe = torch.where(flat, torch.ones_like(m2), m2)
            out["Skewness"] = torch.where(flat, torch.zeros_like(m3), m3 / safe ** 1.5)
            out["Kurtosis"] = torch.where(flat, torch.zeros_like(m4), m4 / safe ** 2)
    if need & {"10Percentile", "90Percentile", "Median", "InterquartileRange", "RobustMeanAbsoluteDeviation"}:
        s = torch.sort(x).values
        p10, p90 = _percentile(s, 10), _percentile(s, 90)
        out["10Percentile"], out["90Percentile"] = p10, p90
        out["Median"] = _percentile(s, 50)
        out["InterquartileRange"] = _percentile(s, 75) - _percentile(s, 25)
        if "RobustMeanAbsoluteDeviation" in need:
            r = x[(x >= p10) & (x <= p90)]
            out["RobustMeanAbsoluteDeviation"] = (r - r.mean()).abs().mean()
    return {f"firstorder_{k}": v for k, v in out.items() if f"firstorder_{k}" in wanted}
