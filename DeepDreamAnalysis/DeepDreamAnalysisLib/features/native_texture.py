"""Texture features: GLCM and GLDM as pyradiomics computes them (symmetric GLCM, distance 1,
13 directions in 3D or the 4 in-plane ones with force2D, features averaged over directions; GLDM
with alpha 0 and the 26 (3D) or 8 (2D) neighbours).

Notation (pyradiomics'): ``g`` the discretised image (levels 1..N_g, pyradiomics' fixed bin width),
``P(i, j)`` the normalised co-occurrence matrix of one direction over the grey levels present in the
mask, ``p_x(i) = sum_j P``, ``p_y(j) = sum_i P``, ``mu_x = sum i P``, ``mu_y = sum j P``,
``p_{x+y}(k)`` / ``p_{x-y}(k)`` the sums of ``P`` over ``i + j = k`` / ``|i - j| = k``,
``HXY = -sum P log2(P + eps)``. GLDM: ``P(i, j)`` counts voxels of level ``i`` with dependence ``j``
(1 + number of neighbours with the same level), ``N_z`` the number of voxels,
``p_g(i) = sum_j P``, ``p_d(j) = sum_i P``.
"""

from __future__ import annotations

import torch

from .native_common import EPS

GLCM_FORMULAS = {
    "Autocorrelation": "sum i j P(i,j)",
    "JointAverage": "mu_x = sum i P(i,j)",
    "ClusterProminence": "sum (i + j - mu_x - mu_y)^4 P",
    "ClusterShade": "sum (i + j - mu_x - mu_y)^3 P",
    "ClusterTendency": "sum (i + j - mu_x - mu_y)^2 P",
    "Contrast": "sum (i - j)^2 P",
    "Correlation": "(sum i j P - mu_x mu_y) / (sigma_x sigma_y + eps) (1 when sigma_x sigma_y = 0)",
    "DifferenceAverage": "sum_k k p_{x-y}(k)",
    "DifferenceEntropy": "-sum_k p_{x-y}(k) log2(p_{x-y}(k) + eps)",
    "DifferenceVariance": "sum_k (k - DA)^2 p_{x-y}(k)",
    "JointEnergy": "sum P^2",
    "JointEntropy": "HXY",
    "Imc1": "(HXY - HXY1) / max(HX, HY), HXY1 = -sum P log2(p_x p_y + eps) (0 when max = 0)",
    "Imc2": "sqrt(1 - exp(-2 (HXY2 - HXY))), HXY2 = -sum p_x p_y log2(p_x p_y + eps)",
    "Idm": "sum_k p_{x-y}(k) / (1 + k^2)",
    "MCC": "sqrt(second largest eigenvalue of Q), Q(i,j) = sum_k P(i,k) P(j,k) / (p_x(i) p_y(k))",
    "Idmn": "sum_k p_{x-y}(k) / (1 + k^2 / N_g^2)",
    "Id": "sum_k p_{x-y}(k) / (1 + k)",
    "Idn": "sum_k p_{x-y}(k) / (1 + k / N_g)",
    "InverseVariance": "sum_{k>0} p_{x-y}(k) / k^2",
    "MaximumProbability": "max P",
    "SumAverage": "sum_k k p_{x+y}(k)",
    "SumEntropy": "-sum_k p_{x+y}(k) log2(p_{x+y}(k) + eps)",
    "SumSquares": "sum (i - mu_x)^2 P",
}
GLDM_FORMULAS = {
    "SmallDependenceEmphasis": "sum_j p_d(j) / j^2 / N_z",
    "LargeDependenceEmphasis": "sum_j p_d(j) j^2 / N_z",
    "GrayLevelNonUniformity": "sum_i p_g(i)^2 / N_z",
    "DependenceNonUniformity": "sum_j p_d(j)^2 / N_z",
    "DependenceNonUniformityNormalized": "sum_j p_d(j)^2 / N_z^2",
    "GrayLevelVariance": "sum_i p(i) (i - mu)^2, p = p_g / N_z, mu = sum i p(i)",
    "DependenceVariance": "sum_j p(j) (j - mu)^2, p = p_d / N_z, mu = sum j p(j)",
    "DependenceEntropy": "-sum P/N_z log2(P/N_z + eps)",
    "LowGrayLevelEmphasis": "sum_i p_g(i) / i^2 / N_z",
    "HighGrayLevelEmphasis": "sum_i p_g(i) i^2 / N_z",
    "SmallDependenceLowGrayLevelEmphasis": "sum P / (i^2 j^2) / N_z",
    "SmallDependenceHighGrayLevelEmphasis": "sum P i^2 / j^2 / N_z",
    "LargeDependenceLowGrayLevelEmphasis": "sum P j^2 / i^2 / N_z",
    "LargeDependenceHighGrayLevelEmphasis": "sum P i^2 j^2 / N_z",
}
GLCM_NAMES = frozenset(f"glcm_{k}" for k in GLCM_FORMULAS)
GLDM_NAMES = frozenset(f"gldm_{k}" for k in GLDM_FORMULAS)


def offsets(force2d: bool, bidirectional: bool) -> list[tuple[int, int, int]]:
    """Neighbour offsets (dz, dy, dx) at distance 1; one of each +/- pair unless bidirectional."""
    out = []
    for dz in ((0,) if force2d else (-1, 0, 1)):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                o = (dz, dy, dx)
                if o == (0, 0, 0):
                    continue
                if not bidirectional and o < (0, 0, 0):
                    continue
                out.append(o)
    return out


def _shifted(padded: torch.Tensor, o) -> torch.Tensor:
    D, H, W = (s - 2 for s in padded.shape)
    dz, dy, dx = o
    return padded[1 + dz:1 + dz + D, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]


def glcm(levels: torch.Tensor, present: torch.Tensor, force2d: bool, wanted: set[str]) -> dict[str, torch.Tensor]:
    """GLCM features of ``levels`` (int64 [k, j, i], 0 outside the mask, 1..N_g inside);
    ``present`` the sorted grey levels that occur in the mask."""
    dev = levels.device
    ng = int(present.max())
    n1 = ng + 1
    pad = torch.nn.functional.pad(levels, (1, 1, 1, 1, 1, 1))
    a = levels
    offs = offsets(force2d, bidirectional=False)
    idx = []
    for k, o in enumerate(offs):
        b = _shifted(pad, o)
        ok = (a > 0) & (b > 0)
        idx.append(k * n1 * n1 + a[ok] * n1 + b[ok])
    counts = torch.bincount(torch.cat(idx), minlength=len(offs) * n1 * n1).to(torch.float64)
    P = counts.reshape(len(offs), n1, n1)[:, present][:, :, present]
    P = P + P.transpose(1, 2)
    s = P.sum((1, 2))
    if P.shape[0] > 1:
        keep = s > 0
        P, s = P[keep], s[keep]
    s = torch.where(s == 0, torch.full_like(s, float("nan")), s)
    P = P / s[:, None, None]
    iv = present.to(torch.float64)
    i = iv[None, :, None]
    j = iv[None, None, :]
    px = P.sum(2)  # [A, n]
    py = P.sum(1)
    ux = (i * P).sum((1, 2))
    uy = (j * P).sum((1, 2))
    ii = iv[:, None].expand(-1, iv.numel())
    jj = iv[None, :].expand(iv.numel(), -1)
    sum_idx = (ii + jj - 2).long().reshape(-1)
    diff_idx = (ii - jj).abs().long().reshape(-1)
    A = P.shape[0]
    flatP = P.reshape(A, -1)
    pxy_add = torch.zeros((A, 2 * ng - 1), dtype=torch.float64, device=dev).index_add_(1, sum_idx, flatP)
    pxy_sub = torch.zeros((A, ng), dtype=torch.float64, device=dev).index_add_(1, diff_idx, flatP)
    k_sum = torch.arange(2, 2 * ng + 1, dtype=torch.float64, device=dev)
    k_diff = torch.arange(0, ng, dtype=torch.float64, device=dev)
    hxy = -(P * torch.log2(P + EPS)).sum((1, 2))
    need = {w.split("_", 1)[1] for w in wanted}
    r: dict[str, torch.Tensor] = {}
    u = (i + j) - ux[:, None, None] - uy[:, None, None]
    r["Autocorrelation"] = (P * i * j).sum((1, 2))
    r["JointAverage"] = ux
    r["ClusterProminence"] = (P * u ** 4).sum((1, 2))
    r["ClusterShade"] = (P * u ** 3).sum((1, 2))
    r["ClusterTendency"] = (P * u ** 2).sum((1, 2))
    r["Contrast"] = (P * (i - j) ** 2).sum((1, 2))
    sigx = torch.sqrt((P * (i - ux[:, None, None]) ** 2).sum((1, 2)))
    sigy = torch.sqrt((P * (j - uy[:, None, None]) ** 2).sum((1, 2)))
    corm = (P * (i - ux[:, None, None]) * (j - uy[:, None, None])).sum((1, 2))
    corr = corm / (sigx * sigy + EPS)
    r["Correlation"] = torch.where(sigx * sigy == 0, torch.ones_like(corr), corr)
    da = (k_diff * pxy_sub).sum(1)
    r["DifferenceAverage"] = da
    r["DifferenceEntropy"] = -(pxy_sub * torch.log2(pxy_sub + EPS)).sum(1)
    r["DifferenceVariance"] = (pxy_sub * (k_diff - da[:, None]) ** 2).sum(1)
    r["JointEnergy"] = (P ** 2).sum((1, 2))
    r["JointEntropy"] = hxy
    if need & {"Imc1", "Imc2"}:
        hx = -(px * torch.log2(px + EPS)).sum(1)
        hy = -(py * torch.log2(py + EPS)).sum(1)
        pxpy = px[:, :, None] * py[:, None, :]
        hxy1 = -(P * torch.log2(pxpy + EPS)).sum((1, 2))
        div = torch.fmax(hx, hy)
        imc1 = (hxy - hxy1) / torch.where(div == 0, torch.ones_like(div), div)
        r["Imc1"] = torch.where(div == 0, torch.zeros_like(imc1), imc1)
        hxy2 = -(pxpy * torch.log2(pxpy + EPS)).sum((1, 2))
        imc2 = torch.sqrt(1 - torch.exp(-2 * (hxy2 - hxy)))
        r["Imc2"] = torch.where(hxy2 == hxy, torch.zeros_like(imc2), imc2)
    r["Idm"] = (pxy_sub / (1 + k_diff ** 2)).sum(1)
    r["Idmn"] = (pxy_sub / (1 + k_diff ** 2 / ng ** 2)).sum(1)
    r["Id"] = (pxy_sub / (1 + k_diff)).sum(1)
    r["Idn"] = (pxy_sub / (1 + k_diff / ng)).sum(1)
    r["InverseVariance"] = (pxy_sub[:, 1:] / k_diff[1:] ** 2).sum(1)
    r["MaximumProbability"] = P.amax((1, 2))
    r["SumAverage"] = (k_sum * pxy_add).sum(1)
    r["SumEntropy"] = -(pxy_add * torch.log2(pxy_add + EPS)).sum(1)
    r["SumSquares"] = (P * (i - ux[:, None, None]) ** 2).sum((1, 2))
    out = {f"glcm_{k}": torch.nanmean(v) for k, v in r.items() if f"glcm_{k}" in wanted}
    if "MCC" in need:
        if P.shape[1] < 2:
            out["glcm_MCC"] = torch.tensor(1.0, dtype=torch.float64, device=dev)
        else:
            Q = (P[:, :, None, :] * P[:, None, :, :] / (px[:, :, None, None] * py[:, None, None, :] + EPS)).sum(3)
            ev = torch.linalg.eigvals(Q.cpu())
            re = ev.real
            order = torch.argsort(re, dim=1, stable=True)
            second = torch.gather(ev, 1, order[:, -2:-1]).squeeze(1)
            out["glcm_MCC"] = torch.nanmean(torch.sqrt(second).real).to(dev)
    return out


def gldm(levels: torch.Tensor, present: torch.Tensor, force2d: bool, wanted: set[str]) -> dict[str, torch.Tensor]:
    """GLDM features (alpha 0, distance 1) of ``levels`` (int64 [k, j, i], 0 outside the mask)."""
    dev = levels.device
    pad = torch.nn.functional.pad(levels, (1, 1, 1, 1, 1, 1))
    offs = offsets(force2d, bidirectional=True)
    dep = torch.ones_like(levels)
    for o in offs:
        dep += (_shifted(pad, o) == levels).long()
    inside = levels > 0
    ndep = len(offs) + 2
    ng = int(present.max())
    counts = torch.bincount(levels[inside] * ndep + dep[inside], minlength=(ng + 1) * ndep).to(torch.float64)
    P = counts.reshape(ng + 1, ndep)[present]
    pd = P.sum(0)
    keep = pd > 0
    P = P[:, keep]
    pd = pd[keep]
    jv = torch.arange(ndep, dtype=torch.float64, device=dev)[keep]
    pg = P.sum(1)
    iv = present.to(torch.float64)
    nz = pd.sum()
    i = iv[:, None]
    j = jv[None, :]
    r: dict[str, torch.Tensor] = {}
    r["SmallDependenceEmphasis"] = (pd / jv ** 2).sum() / nz
    r["LargeDependenceEmphasis"] = (pd * jv ** 2).sum() / nz
    r["GrayLevelNonUniformity"] = (pg ** 2).sum() / nz
    r["DependenceNonUniformity"] = (pd ** 2).sum() / nz
    r["DependenceNonUniformityNormalized"] = (pd ** 2).sum() / nz ** 2
    pgn = pg / nz
    r["GrayLevelVariance"] = (pgn * (iv - (pgn * iv).sum()) ** 2).sum()
    pdn = pd / nz
    r["DependenceVariance"] = (pdn * (jv - (pdn * jv).sum()) ** 2).sum()
    pn = P / nz
    r["DependenceEntropy"] = -(pn * torch.log2(pn + EPS)).sum()
    r["LowGrayLevelEmphasis"] = (pg / iv ** 2).sum() / nz
    r["HighGrayLevelEmphasis"] = (pg * iv ** 2).sum() / nz
    r["SmallDependenceLowGrayLevelEmphasis"] = (P / (i ** 2 * j ** 2)).sum() / nz
    r["SmallDependenceHighGrayLevelEmphasis"] = (P * i ** 2 / j ** 2).sum() / nz
    r["LargeDependenceLowGrayLevelEmphasis"] = (P * j ** 2 / i ** 2).sum() / nz
    r["LargeDependenceHighGrayLevelEmphasis"] = (P * i ** 2 * j ** 2).sum() / nz
    return {f"gldm_{k}": v for k, v in r.items() if f"gldm_{k}" in wanted}
