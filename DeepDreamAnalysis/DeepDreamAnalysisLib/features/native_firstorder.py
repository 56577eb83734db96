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


def compute(values: torch.Tensor, wanted: set[str], bin_width: float, voxel_volume: float) -> dict[str, torch.Tensor]:
    """Features of the 1-D tensor ``values`` (the intensities inside the mask); returns 0-d float64 tensors."""
    x = values.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    n = x.numel()
    need = {w.split("_", 1)[1] for w in wanted}
    mean = x.mean()
    d = x - mean
    if need & {"Entropy", "Uniformity"}:
        g = discretize(values, bin_width)
        counts = torch.bincount(g)
        p = counts[counts > 0].to(torch.float64) / n
        out["Entropy"] = -(p * torch.log2(p + EPS)).sum()
        out["Uniformity"] = (p * p).sum()
    energy = (x * x).sum()
    out["Energy"] = energy
    out["TotalEnergy"] = energy * voxel_volume
    out["RootMeanSquared"] = torch.sqrt(energy / n)
    out["Minimum"] = x.min()
    out["Maximum"] = x.max()
    out["Range"] = out["Maximum"] - out["Minimum"]
    out["Mean"] = mean
    m2 = (d * d).mean()
    out["Variance"] = m2
    out["StandardDeviation"] = torch.sqrt(m2)
    out["MeanAbsoluteDeviation"] = d.abs().mean()
    if need & {"Skewness", "Kurtosis"}:
        m3 = (d ** 3).mean()
        m4 = (d ** 4).mean()
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
        r = x[(x >= p10) & (x <= p90)]
        out["RobustMeanAbsoluteDeviation"] = (r - r.mean()).abs().mean()
    return {f"firstorder_{k}": v for k, v in out.items() if f"firstorder_{k}" in wanted}
