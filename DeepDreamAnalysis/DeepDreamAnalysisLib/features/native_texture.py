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

from .native_common import EPS, Levels

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


class _GlcmTerms:
    """Per-direction GLCM features, each computed on first use (``P`` [A, n, n], normalised)."""

    def __init__(self, P: torch.Tensor, iv: torch.Tensor):
        self.P, self.iv = P, iv
        self.ng = float(iv.max())
        self.i = iv[None, :, None]
        self.j = iv[None, None, :]
        self._cache: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        cache = self.__dict__["_cache"]
        if name not in cache:
            cache[name] = getattr(type(self), "q_" + name)(self)
        return cache[name]

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.sum((1, 2))

    # intermediate quantities
    def q_px(self): return self.P.sum(2)
    def q_py(self): return self.P.sum(1)
    def q_ux(self): return self.px @ self.iv
    def q_uy(self): return self.py @ self.iv
    def q_di(self): return self.i - self.ux[:, None, None]
    def q_dj(self): return self.j - self.uy[:, None, None]
    def q_u(self): return self.di + self.dj

    def _binned(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        A = self.P.shape[0]
        return torch.zeros((A, size), dtype=self.P.dtype, device=self.P.device).index_add_(
            1, idx.reshape(-1), self.P.reshape(A, -1))

    def q_pxy_sub(self):
        ng = int(self.ng)
        d = (self.iv[:, None] - self.iv[None, :]).abs().long()
        return self._binned(d, ng)

    def q_pxy_add(self):
        ng = int(self.ng)
        k = (self.iv[:, None] + self.iv[None, :]).long() - 2
        return self._binned(k, 2 * ng - 1)

    def q_k_diff(self): return torch.arange(0, int(self.ng), dtype=torch.float64, device=self.P.device)
    def q_k_sum(self): return torch.arange(2, 2 * int(self.ng) + 1, dtype=torch.float64, device=self.P.device)
    def q_hxy(self): return -self._sum(self.P * torch.log2(self.P + EPS))
    def q_hx(self): return -(self.px * torch.log2(self.px + EPS)).sum(1)
    def q_hy(self): return -(self.py * torch.log2(self.py + EPS)).sum(1)
    def q_pxpy(self): return self.px[:, :, None] * self.py[:, None, :]
    def q_sigx(self): return torch.sqrt(self._sum(self.P * self.di ** 2))
    def q_sigy(self): return torch.sqrt(self._sum(self.P * self.dj ** 2))

    # features (per direction)
    def q_Autocorrelation(self): return self._sum(self.P * self.i * self.j)
    def q_JointAverage(self): return self.ux
    def q_ClusterProminence(self): return self._sum(self.P * self.u ** 4)
    def q_ClusterShade(self): return self._sum(self.P * self.u ** 3)
    def q_ClusterTendency(self): return self._sum(self.P * self.u ** 2)
    def q_Contrast(self): return self._sum(self.P * (self.i - self.j) ** 2)

    def q_Correlation(self):
        corm = self._sum(self.P * self.di * self.dj)
        corr = corm / (self.sigx * self.sigy + EPS)
        return torch.where(self.sigx * self.sigy == 0, torch.ones_like(corr), corr)

    def q_DifferenceAverage(self): return (self.k_diff * self.pxy_sub).sum(1)
    def q_DifferenceEntropy(self): return -(self.pxy_sub * torch.log2(self.pxy_sub + EPS)).sum(1)

    def q_DifferenceVariance(self):
        return (self.pxy_sub * (self.k_diff - self.DifferenceAverage[:, None]) ** 2).sum(1)

    def q_JointEnergy(self): return self._sum(self.P ** 2)
    def q_JointEntropy(self): return self.hxy

    def q_Imc1(self):
        hxy1 = -self._sum(self.P * torch.log2(self.pxpy + EPS))
        div = torch.fmax(self.hx, self.hy)
        imc1 = (self.hxy - hxy1) / torch.where(div == 0, torch.ones_like(div), div)
        return torch.where(div == 0, torch.zeros_like(imc1), imc1)

    def q_Imc2(self):
        hxy2 = -self._sum(self.pxpy * torch.log2(self.pxpy + EPS))
        imc2 = torch.sqrt(1 - torch.exp(-2 * (hxy2 - self.hxy)))
        return torch.where(hxy2 == self.hxy, torch.zeros_like(imc2), imc2)

    def q_Idm(self): return (self.pxy_sub / (1 + self.k_diff ** 2)).sum(1)
    def q_Idmn(self): return (self.pxy_sub / (1 + self.k_diff ** 2 / self.ng ** 2)).sum(1)
    def q_Id(self): return (self.pxy_sub / (1 + self.k_diff)).sum(1)
    def q_Idn(self): return (self.pxy_sub / (1 + self.k_diff / self.ng)).sum(1)
    def q_InverseVariance(self): return (self.pxy_sub[:, 1:] / self.k_diff[1:] ** 2).sum(1)
    def q_MaximumProbability(self): return self.P.amax((1, 2))
    def q_SumAverage(self): return (self.k_sum * self.pxy_add).sum(1)
    def q_SumEntropy(self): return -(self.pxy_add * torch.log2(self.pxy_add + EPS)).sum(1)
    def q_SumSquares(self): return self._sum(self.P * self.di ** 2)

    def q_MCC(self):
        P, px, py = self.P, self.px, self.py
        if P.shape[1] < 2:
            return torch.ones(P.shape[0], dtype=torch.float64, device=P.device)
        Q = (P[:, :, None, :] * P[:, None, :, :] / (px[:, :, None, None] * py[:, None, None, :] + EPS)).sum(3)
        ev = torch.linalg.eigvals(Q.cpu())
        order = torch.argsort(ev.real, dim=1, stable=True)
        second = torch.gather(ev, 1, order[:, -2:-1]).squeeze(1)
        return torch.sqrt(second).real.to(P.device)


def glcm(lv: Levels, force2d: bool, wanted: set[str]) -> dict[str, torch.Tensor]:
    """GLCM features of the discretised region ``lv`` (see ``native_common.Levels``): the
    co-occurrence counts of every direction by ``bincount`` over slices of the padded box."""
    offs = offsets(force2d, bidirectional=False)
    A = len(offs)
    n1 = lv.present.numel() + 1
    counts = lv.cooccurrences(offs).to(torch.float64)
    P = counts.reshape(A, n1, n1)[:, 1:, 1:]
    P = P + P.transpose(1, 2)
    s = P.sum((1, 2))
    if A > 1:
        keep = s > 0
        P, s = P[keep], s[keep]
    if P.shape[0] == 0:  # no two mask voxels are neighbours: every GLCM feature is undefined
        return {w: torch.tensor(float("nan"), dtype=torch.float64) for w in wanted}
    s = torch.where(s == 0, torch.full_like(s, float("nan")), s)
    terms = _GlcmTerms(P / s[:, None, None], lv.present)
    out = {}
    for w in wanted:
        out[w] = torch.nanmean(getattr(terms, w.split("_", 1)[1]))
    return out


def gldm(lv: Levels, force2d: bool, wanted: set[str]) -> dict[str, torch.Tensor]:
    """GLDM features (alpha 0, distance 1) of the discretised region ``lv``."""
    dev = lv.rank.device
    offs = offsets(force2d, bidirectional=True)
    a = lv.rank
    dep = 1 + lv.same_level_neighbours(offs)
    ndep = len(offs) + 2
    n = lv.present.numel()
    counts = torch.bincount(a * ndep + dep, minlength=(n + 1) * ndep).to(torch.float64)
    P = counts.reshape(n + 1, ndep)[1:]
    pd = P.sum(0)
    keep = pd > 0
    P = P[:, keep]
    pd = pd[keep]
    jv = torch.arange(ndep, dtype=torch.float64, device=dev)[keep]
    pg = P.sum(1)
    iv = lv.present
    nz = pd.sum()
    i = iv[:, None]
    j = jv[None, :]
    need = {w.split("_", 1)[1] for w in wanted}
    f = {
        "SmallDependenceEmphasis": lambda: (pd / jv ** 2).sum() / nz,
        "LargeDependenceEmphasis": lambda: (pd * jv ** 2).sum() / nz,
        "GrayLevelNonUniformity": lambda: (pg ** 2).sum() / nz,
        "DependenceNonUniformity": lambda: (pd ** 2).sum() / nz,
        "DependenceNonUniformityNormalized": lambda: (pd ** 2).sum() / nz ** 2,
        "GrayLevelVariance": lambda: _variance(pg / nz, iv),
        "DependenceVariance": lambda: _variance(pd / nz, jv),
        "DependenceEntropy": lambda: -((P / nz) * torch.log2(P / nz + EPS)).sum(),
        "LowGrayLevelEmphasis": lambda: (pg / iv ** 2).sum() / nz,
        "HighGrayLevelEmphasis": lambda: (pg * iv ** 2).sum() / nz,
        "SmallDependenceLowGrayLevelEmphasis": lambda: (P / (i ** 2 * j ** 2)).sum() / nz,
        "SmallDependenceHighGrayLevelEmphasis": lambda: (P * i ** 2 / j ** 2).sum() / nz,
        "LargeDependenceLowGrayLevelEmphasis": lambda: (P * j ** 2 / i ** 2).sum() / nz,
        "LargeDependenceHighGrayLevelEmphasis": lambda: (P * i ** 2 * j ** 2).sum() / nz,
    }
    return {f"gldm_{k}": f[k]() for k in need}


def _variance(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum p (v - mu)^2 with mu = sum p v (p a normalised histogram over values v)."""
    return (p * (v - (p * v).sum()) ** 2).sum()
