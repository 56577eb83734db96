"""numpy fast path of the native features for small regions on the CPU.

Same features, settings and formulas as the torch modules (``native_firstorder``, ``native_shape``,
``native_texture``; see their ``FORMULAS`` tables), computed with numpy on the bounding-box crop.
On a lesion of a few hundred voxels the torch implementation spends nearly all its time in the
fixed cost of ~150 small torch operations (tens of microseconds each, with the GIL held for most
of it); numpy's per-operation cost is a few microseconds, so a call costs a fraction. Values agree
with the torch path to rounding (float64 throughout; ``Testing/test_native_features.py`` compares
every feature on both paths).

:func:`compute_native` (``native.py``) uses this path for CPU inputs whose bounding box holds at
most :data:`SMALL_BOX_VOXELS` voxels, torch otherwise. Arrays here are numpy: ``img`` float32 or
float64 ``[k, j, i]`` and ``msk`` bool, both already cropped to the mask's bounding box; spacing
(z, y, x) mm.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .native_common import EPS
from .native_shape_tables import tables

SMALL_BOX_VOXELS = 16384
"""Largest bounding box (voxels) computed by numpy: below it numpy is faster than torch on the CPU
(see docs/native-features.md, Speed)."""

_PAIRS_ALL = 384
"""Up to this many points the largest distance is taken over all pairs (one Gram matrix)."""

_CACHE: dict = {}


# ------------------------------------------------------------------------------------------------
# grey levels

def discretize(values: np.ndarray, bin_width: float) -> np.ndarray:
    """pyradiomics' fixed-bin-width grey levels (1, 2, ...) of the 1-D ``values`` (float32/64),
    as ``native_common.discretize``: edges in the image's own precision, ``numpy.digitize``."""
    np_dtype = np.float64 if values.dtype == np.float64 else np.float32
    lo = np_dtype(values.min())
    hi = np_dtype(values.max())
    low_bound = lo - (lo % bin_width)
    edges = np.arange(low_bound, hi + 2 * bin_width, bin_width)
    if len(edges) == 1:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return np.digitize(values.astype(np.float64), np.asarray(edges, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# first order

def _percentile(s: np.ndarray, q: float) -> float:
    n = s.size
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def firstorder(x: np.ndarray, need: set[str], voxel_volume: float, hist: np.ndarray | None) -> dict:
    """First-order features (short names) of the float64 intensities ``x``; ``hist`` = bincount of
    their grey levels (needed for Entropy and Uniformity)."""
    n = x.size
    out = {}
    if need & {"Entropy", "Uniformity"}:
        p = hist[hist > 0] / n
        out["Entropy"] = -(p * np.log2(p + EPS)).sum()
        out["Uniformity"] = (p * p).sum()
    if need & {"Energy", "TotalEnergy", "RootMeanSquared"}:
        energy = float(x @ x)
        out.update(Energy=energy, TotalEnergy=energy * voxel_volume, RootMeanSquared=math.sqrt(energy / n))
    if need & {"Minimum", "Maximum", "Range"}:
        lo, hi = x.min(), x.max()
        out.update(Minimum=lo, Maximum=hi, Range=hi - lo)
    if need & {"Mean", "Variance", "StandardDeviation", "MeanAbsoluteDeviation", "Skewness", "Kurtosis"}:
        mean = x.mean()
        d = x - mean
        d2 = d * d
        m2 = d2.mean()
        out.update(Mean=mean, Variance=m2, StandardDeviation=math.sqrt(m2))
        if "MeanAbsoluteDeviation" in need:
            out["MeanAbsoluteDeviation"] = np.abs(d).mean()
        if need & {"Skewness", "Kurtosis"}:
            m3 = (d2 * d).mean()
            m4 = (d2 * d2).mean()
            out["Skewness"] = 0.0 if m2 == 0 else m3 / m2 ** 1.5
            out["Kurtosis"] = 0.0 if m2 == 0 else m4 / m2 ** 2
    if need & {"10Percentile", "90Percentile", "Median", "InterquartileRange", "RobustMeanAbsoluteDeviation"}:
        s = np.sort(x)
        p10, p90 = _percentile(s, 10), _percentile(s, 90)
        out.update({"10Percentile": p10, "90Percentile": p90, "Median": _percentile(s, 50),
                    "InterquartileRange": _percentile(s, 75) - _percentile(s, 25)})
        if "RobustMeanAbsoluteDeviation" in need:
            r = x[(x >= p10) & (x <= p90)]
            out["RobustMeanAbsoluteDeviation"] = np.abs(r - r.mean()).mean() if r.size else math.nan
    return out


# ------------------------------------------------------------------------------------------------
# shape

def _square_tables():
    """Marching squares (corner bits 1 (0,0), 2 (0,1), 4 (1,0), 8 (1,1) on [y, x]): inside area of
    the unit square and perimeter segment counts (corner cuts, cuts across x, cuts across y), as
    ``native_shape._square_tables``."""
    if "sq" not in _CACHE:
        area = np.zeros(16)
        seg = np.zeros((16, 3))
        for c in range(16):
            k = bin(c).count("1")
            if k in (1, 3):
                area[c], seg[c] = k / 8 if k == 1 else 7 / 8, (1, 0, 0)
            elif k == 4:
                area[c] = 1.0
            elif k == 2:
                if c in (0b0011, 0b1100):
                    area[c], seg[c] = 0.5, (0, 1, 0)
                elif c in (0b0101, 0b1010):
                    area[c], seg[c] = 0.5, (0, 0, 1)
                else:
                    area[c], seg[c] = 0.25, (2, 0, 0)
        _CACHE["sq"] = (area, seg)
    return _CACHE["sq"]


def mesh_2d(m: np.ndarray, sy: float, sx: float) -> tuple[float, float]:
    """(perimeter mm, enclosed area mm^2) of the bool mask [j, i] by marching squares."""
    area_t, seg_t = _square_tables()
    p = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8)
    p[1:-1, 1:-1] = m
    cfg = p[:-1, :-1] | (p[:-1, 1:] << 1) | (p[1:, :-1] << 2) | (p[1:, 1:] << 3)
    counts = np.bincount(cfg.ravel(), minlength=16).astype(np.float64)
    lengths = np.array([0.5 * math.hypot(sy, sx), sx, sy])
    return float(counts @ (seg_t @ lengths)), float(counts @ area_t) * sy * sx


def _tables3d():
    if "cubes" not in _CACHE:
        _CACHE["cubes"] = tables()
    return _CACHE["cubes"]


def mesh_3d(m: np.ndarray, spacing_zyx) -> tuple[float, float]:
    """(surface area mm^2, mesh volume mm^3) of the bool mask [k, j, i], as ``native_shape.mesh_3d``."""
    classes, area_counts, v0, nrm = _tables3d()
    p = np.zeros(tuple(s + 2 for s in m.shape), np.uint8)
    p[1:-1, 1:-1, 1:-1] = m
    D, H, W = (s - 1 for s in p.shape)
    cfg = np.zeros((D, H, W), np.uint8)
    bit = 0
    for z in (0, 1):
        for y in (0, 1):
            for x in (0, 1):
                cfg |= p[z:z + D, y:y + H, x:x + W] << bit
                bit += 1
    counts = np.bincount(cfg.ravel(), minlength=256).astype(np.float64)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    det = float(np.prod(sp))
    tri = 0.5 * det * np.sqrt((classes / sp ** 2).sum(1))
    area = float(counts @ (area_counts @ tri))
    zz, yy, xx = np.nonzero((cfg != 0) & (cfg != 255))
    c = cfg[zz, yy, xx]
    nc = nrm[c]
    vol = det / 6.0 * (float(counts @ v0) + float(zz @ nc[:, 0] + yy @ nc[:, 1] + xx @ nc[:, 2]))
    return area, vol


def _prune_offsets(dims: int, axes: tuple[int, ...]):
    key = ("dirs", dims, axes)
    if key not in _CACHE:
        _CACHE[key] = [o for o in itertools.product((-1, 0, 1), repeat=dims)
                       if o > (0,) * dims and all(o[d] == 0 or d in axes for d in range(dims))]
    return _CACHE[key]


def _not_midpoints(grid: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Points of the bool ``grid`` that are not the midpoint of two grid points along a lattice
    direction (steps in {-1, 0, 1}) moving only along ``axes`` (``native_shape._extreme_dirs``)."""
    p = np.zeros(tuple(n + 2 for n in grid.shape), bool)
    p[(slice(1, -1),) * grid.ndim] = grid
    keep = grid.copy()
    shape = grid.shape
    for o in _prune_offsets(grid.ndim, axes):
        fwd = p[tuple(slice(1 + k, 1 + k + n) for k, n in zip(o, shape))]
        bwd = p[tuple(slice(1 - k, 1 - k + n) for k, n in zip(o, shape))]
        keep &= ~(fwd & bwd)
    return keep


def vertices(m: np.ndarray, prune_axes: tuple[int, ...], prune: bool | None = None) -> np.ndarray:
    """Mesh vertices (midpoints between a mask voxel and a face-neighbour outside it), voxel index
    units [n, dims] float64. ``prune``: keep only those that can end a longest chord within a plane
    perpendicular to the axes not in ``prune_axes`` (``native_shape._vertices``); by default only
    when there are more than a few hundred (the all-pairs search is cheaper below: the largest
    distance is the same either way, since a midpoint of two vertices is never farther from a
    point than both of them)."""
    dims = m.ndim
    p = np.zeros(tuple(n + 2 for n in m.shape), bool)
    p[(slice(1, -1),) * dims] = m
    faces = []
    for d in range(dims):
        lo = [slice(1, -1)] * dims
        hi = [slice(1, -1)] * dims
        lo[d], hi[d] = slice(0, -1), slice(1, None)
        faces.append(p[tuple(lo)] ^ p[tuple(hi)])  # index k along d: between voxel k-1 and k
    if prune is None:
        prune = sum(int(np.count_nonzero(f)) for f in faces) > _PAIRS_ALL
    pts = []
    for d, f in enumerate(faces):
        idx = np.argwhere(f & _not_midpoints(f, prune_axes) if prune else f).astype(np.float64)
        idx[:, d] -= 0.5
        pts.append(idx)
    return np.concatenate(pts)


def _directions(dims: int, k: int):
    """As ``native_shape._directions``: unit vectors of the integer vectors with ``max |v_i| = k``
    and the cosine of the largest angle to the nearest one."""
    key = ("u", dims, k)
    if key not in _CACHE:
        vs = [v for v in itertools.product(range(-k, k + 1), repeat=dims)
              if max(abs(c) for c in v) == k and v > (0,) * dims]
        u = np.array(vs, dtype=np.float64)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        _CACHE[key] = (u, math.cos(math.asin(math.sqrt(dims - 1) / (2 * k))))
    return _CACHE[key]


def _gram_max(a: np.ndarray, b: np.ndarray) -> float:
    """Largest squared distance between rows of ``a`` [..., n, d] and ``b`` [..., m, d] (re-centred on
    the first row of ``a`` to keep the rounding small)."""
    o = a[..., :1, :]
    a = a - o
    b = b - o
    na = (a * a).sum(-1)
    nb = (b * b).sum(-1)
    d2 = na[..., :, None] + nb[..., None, :] - 2.0 * (a @ np.swapaxes(b, -1, -2))
    return float(d2.max())


def max_dist_sq(x: np.ndarray) -> float:
    """Largest squared distance between two rows of ``x`` [n, d] (mm): all pairs for a few hundred
    points, else only the pairs between the two thin caps of each direction that can hold the
    farthest pair (the exact pruning of ``native_shape._max_dist_sq``)."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    if n <= _PAIRS_ALL:
        return _gram_max(x, x)
    x = x - x.mean(0)
    u, cos_delta = _directions(x.shape[1], 4 if x.shape[1] == 3 else 8)
    proj = u @ x.T
    ihi = proj.argmax(1)
    ilo = proj.argmin(1)
    rows = np.arange(proj.shape[0])
    hi, lo = proj[rows, ihi], proj[rows, ilo]
    lower = float(((x[ihi] - x[ilo]) ** 2).sum(1).max())
    c = math.sqrt(lower) * cos_delta * (1 - 1e-9)
    best = lower
    for a in np.flatnonzero(hi - lo >= c):
        top = x[proj[a] >= lo[a] + c]
        bot = x[proj[a] <= hi[a] - c]
        best = max(best, _gram_max(top, bot))
    return best


def grouped_max_dist_sq(points: np.ndarray, groups: np.ndarray) -> float:
    """Largest squared distance between two rows of ``points`` [n, d] with equal ``groups``
    (one all-pairs search per group; groups of a small region are small)."""
    if points.shape[0] < 2:
        return 0.0
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    p = points[order]
    cuts = np.flatnonzero(g[1:] != g[:-1]) + 1
    best = 0.0
    for part in np.split(p, cuts):
        if part.shape[0] > 1:
            best = max(best, max_dist_sq(part))
    return best


def _eigen(m: np.ndarray, spacing) -> np.ndarray:
    """Eigenvalues (ascending) of the covariance of the voxel centres (mm^2), normalised by N_v."""
    c = np.argwhere(m).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    c -= c.mean(0)
    cov = (c.T @ c) / c.shape[0]
    if cov.shape == (2, 2):  # closed form (a tenth of LAPACK's call overhead)
        a, b, d = float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])
        mid, r = 0.5 * (a + d), math.hypot(0.5 * (a - d), b)
        ev = np.array([mid - r, mid + r])
    else:
        ev = np.linalg.eigvalsh(cov)
    ev[(ev < 0) & (ev > -1e-10)] = 0.0
    return np.sort(ev)


def _sqrt_or_nan(v: float) -> float:
    return math.nan if not v >= 0 else math.sqrt(v)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a))


def shape_2d(m: np.ndarray, sy: float, sx: float, need: set[str]) -> dict:
    """shape2D features (short names) of the bool mask [j, i] with pixel spacing (y, x) mm."""
    out = {}
    if need & {"MeshSurface", "Perimeter", "PerimeterSurfaceRatio", "Sphericity", "SphericalDisproportion"}:
        P, A = mesh_2d(m, sy, sx)
        root = math.sqrt(math.pi * A)
        out.update(MeshSurface=A, Perimeter=P, PerimeterSurfaceRatio=_ratio(P, A),
                   Sphericity=_ratio(2 * root, P), SphericalDisproportion=_ratio(P, 2 * root))
    if "PixelSurface" in need:
        out["PixelSurface"] = float(np.count_nonzero(m)) * sy * sx
    if "MaximumDiameter" in need:
        out["MaximumDiameter"] = math.sqrt(max_dist_sq(vertices(m, (0, 1)) * np.array([sy, sx])))
    if need & {"MajorAxisLength", "MinorAxisLength", "Elongation"}:
        ev = _eigen(m, (sy, sx))
        out.update(MajorAxisLength=_sqrt_or_nan(ev[1]) * 4, MinorAxisLength=_sqrt_or_nan(ev[0]) * 4,
                   Elongation=_sqrt_or_nan(_ratio(ev[0], ev[1])))
    return out


def shape_3d(m: np.ndarray, spacing_zyx, need: set[str]) -> dict:
    """shape features (short names) of the bool mask [k, j, i] with voxel spacing (z, y, x) mm."""
    out = {}
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    if need & {"MeshVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity", "Compactness1",
               "Compactness2", "SphericalDisproportion"}:
        A, V = mesh_3d(m, spacing_zyx)
        s = (36 * math.pi * V ** 2) ** (1 / 3)
        out.update(MeshVolume=V, SurfaceArea=A, SurfaceVolumeRatio=_ratio(A, V), Sphericity=_ratio(s, A),
                   Compactness1=_ratio(V, A ** 1.5 * math.sqrt(math.pi)),
                   Compactness2=_ratio(36 * math.pi * V ** 2, A ** 3), SphericalDisproportion=_ratio(A, s))
    if "VoxelVolume" in need:
        out["VoxelVolume"] = float(np.count_nonzero(m)) * float(np.prod(sp))
    if "Maximum3DDiameter" in need:
        out["Maximum3DDiameter"] = math.sqrt(max_dist_sq(vertices(m, (0, 1, 2)) * sp))
    for name, axis, prune in (("Slice", 0, (1, 2)), ("Column", 1, (0, 2)), ("Row", 2, (0, 1))):
        if "Maximum2DDiameter" + name in need:
            v = vertices(m, prune)
            in_plane = [a for a in range(3) if a != axis]
            groups = np.round(v[:, axis] * 2).astype(np.int64)
            out["Maximum2DDiameter" + name] = math.sqrt(grouped_max_dist_sq((v * sp)[:, in_plane], groups))
    if need & {"MajorAxisLength", "MinorAxisLength", "LeastAxisLength", "Elongation", "Flatness"}:
        ev = _eigen(m, sp)
        out.update(MajorAxisLength=_sqrt_or_nan(ev[2]) * 4, MinorAxisLength=_sqrt_or_nan(ev[1]) * 4,
                   LeastAxisLength=_sqrt_or_nan(ev[0]) * 4, Elongation=_sqrt_or_nan(_ratio(ev[1], ev[2])),
                   Flatness=_sqrt_or_nan(_ratio(ev[0], ev[2])))
    return out


# ------------------------------------------------------------------------------------------------
# textures

def _offsets(force2d: bool, bidirectional: bool):
    key = ("off", force2d, bidirectional)
    if key not in _CACHE:
        _CACHE[key] = [o for o in itertools.product((0,) if force2d else (-1, 0, 1), (-1, 0, 1), (-1, 0, 1))
                       if o != (0, 0, 0) and (bidirectional or o > (0, 0, 0))]
    return _CACHE[key]


class Levels:
    """The discretised region: ``grid`` int [(k+2) (j+2) (i+2)] (flattened) the grey-level rank
    (1..N) of each mask voxel of the padded box (0 outside), ``at`` the flat positions of the mask
    voxels in it (``mask`` order), ``rank`` [N_p] their ranks, ``present`` float64 [N] the grey
    levels present (rank r is level ``present[r - 1]``)."""

    def __init__(self, m: np.ndarray, level: np.ndarray, hist: np.ndarray):
        occurs = hist > 0
        occurs[0] = False
        to_rank = np.cumsum(occurs) * occurs
        self.rank = to_rank[level]
        self.present = np.flatnonzero(occurs).astype(np.float64)
        shape = tuple(s + 2 for s in m.shape)
        padded = np.zeros(shape, bool)
        padded[1:-1, 1:-1, 1:-1] = m
        self.at = np.flatnonzero(padded)
        self.grid = np.zeros(padded.size, np.int64)
        self.grid[self.at] = self.rank
        self.strides = np.array([shape[1] * shape[2], shape[2], 1])

    def neighbours(self, offsets) -> np.ndarray:
        """int64 [len(offsets), N_p]: the rank of each mask voxel's neighbour at each offset."""
        return self.grid[self.at[None, :] + (np.asarray(offsets) @ self.strides)[:, None]]


def _nanmean(v: np.ndarray) -> float:
    """Mean over the directions, ignoring NaN (torch.nanmean); NaN when all are."""
    ok = v[~np.isnan(v)]
    return float(ok.mean()) if ok.size else math.nan


def glcm(lv: Levels, force2d: bool, need: set[str]) -> dict:
    """GLCM features (short names), as ``native_texture.glcm``: symmetric, distance 1, averaged
    over the directions that have co-occurrences."""
    offs = _offsets(force2d, False)
    n1 = lv.present.size + 1
    A = len(offs)
    # only mask voxels can start a pair (rank 0, outside, is dropped below)
    codes = (lv.rank * n1)[None, :] + lv.neighbours(offs) + (np.arange(A) * (n1 * n1))[:, None]
    counts = np.bincount(codes.ravel(), minlength=A * n1 * n1)
    P = counts.reshape(A, n1, n1)[:, 1:, 1:].astype(np.float64)
    P = P + P.transpose(0, 2, 1)
    s = P.sum((1, 2))
    keep = s > 0
    P, s = P[keep], s[keep]
    if P.shape[0] == 0:
        return {k: math.nan for k in need}
    P /= s[:, None, None]
    return {k: _nanmean(v) for k, v in _glcm_terms(P, lv.present, need).items()}


def _glcm_terms(P: np.ndarray, iv: np.ndarray, need: set[str]) -> dict:
    """Per-direction GLCM features ([A] arrays) of the normalised matrices ``P`` [A, n, n] over the
    grey levels ``iv`` [n] (formulas: ``native_texture.GLCM_FORMULAS``)."""
    ng = float(iv.max())
    i = iv[None, :, None]
    j = iv[None, None, :]
    c: dict = {}

    def q(name):
        if name not in c:
            c[name] = Q[name]()
        return c[name]

    def binned(idx, size):
        A = P.shape[0]
        codes = (np.arange(A) * size)[:, None] + idx.ravel()[None, :]
        return np.bincount(codes.ravel(), weights=P.reshape(-1), minlength=A * size).reshape(A, size)

    def ent(p, axes):
        return -(p * np.log2(p + EPS)).sum(axes)

    def s2(t):
        return t.sum((1, 2))

    def mcc():
        if P.shape[1] < 2:
            return np.ones(P.shape[0])
        px, py = q("px"), q("py")
        Qm = (P[:, :, None, :] * P[:, None, :, :] / (px[:, :, None, None] * py[:, None, None, :] + EPS)).sum(3)
        ev = np.linalg.eigvals(Qm)
        order = np.argsort(ev.real, axis=1, kind="stable")
        second = np.take_along_axis(ev, order[:, -2:-1], 1)[:, 0]
        return np.sqrt(second.astype(np.complex128)).real

    def imc1():
        hxy1 = -s2(P * np.log2(q("pxpy") + EPS))
        div = np.fmax(q("hx"), q("hy"))
        v = (q("hxy") - hxy1) / np.where(div == 0, 1.0, div)
        return np.where(div == 0, 0.0, v)

    def imc2():
        hxy2 = -s2(q("pxpy") * np.log2(q("pxpy") + EPS))
        v = np.sqrt(1 - np.exp(-2 * (hxy2 - q("hxy"))))
        return np.where(hxy2 == q("hxy"), 0.0, v)

    def corr():
        sig = q("sigx") * q("sigy")
        v = s2(P * q("di") * q("dj")) / (sig + EPS)
        return np.where(sig == 0, 1.0, v)

    Q = {
        "px": lambda: P.sum(2), "py": lambda: P.sum(1),
        "ux": lambda: q("px") @ iv, "uy": lambda: q("py") @ iv,
        "di": lambda: i - q("ux")[:, None, None], "dj": lambda: j - q("uy")[:, None, None],
        "u": lambda: q("di") + q("dj"),
        "pxy_sub": lambda: binned(np.abs(iv[:, None] - iv[None, :]).astype(np.int64), int(ng)),
        "pxy_add": lambda: binned((iv[:, None] + iv[None, :]).astype(np.int64) - 2, 2 * int(ng) - 1),
        "k_diff": lambda: np.arange(0, int(ng), dtype=np.float64),
        "k_sum": lambda: np.arange(2, 2 * int(ng) + 1, dtype=np.float64),
        "hxy": lambda: ent(P, (1, 2)), "hx": lambda: ent(q("px"), 1), "hy": lambda: ent(q("py"), 1),
        "pxpy": lambda: q("px")[:, :, None] * q("py")[:, None, :],
        "sigx": lambda: np.sqrt(s2(P * q("di") ** 2)), "sigy": lambda: np.sqrt(s2(P * q("dj") ** 2)),
        "Autocorrelation": lambda: s2(P * i * j),
        "JointAverage": lambda: q("ux"),
        "ClusterProminence": lambda: s2(P * q("u") ** 4),
        "ClusterShade": lambda: s2(P * q("u") ** 3),
        "ClusterTendency": lambda: s2(P * q("u") ** 2),
        "Contrast": lambda: s2(P * (i - j) ** 2),
        "Correlation": corr,
        "DifferenceAverage": lambda: q("pxy_sub") @ q("k_diff"),
        "DifferenceEntropy": lambda: ent(q("pxy_sub"), 1),
        "DifferenceVariance": lambda: (q("pxy_sub") * (q("k_diff") - q("DifferenceAverage")[:, None]) ** 2).sum(1),
        "JointEnergy": lambda: s2(P ** 2),
        "JointEntropy": lambda: q("hxy"),
        "Imc1": imc1,
        "Imc2": imc2,
        "Idm": lambda: (q("pxy_sub") / (1 + q("k_diff") ** 2)).sum(1),
        "Idmn": lambda: (q("pxy_sub") / (1 + q("k_diff") ** 2 / ng ** 2)).sum(1),
        "Id": lambda: (q("pxy_sub") / (1 + q("k_diff"))).sum(1),
        "Idn": lambda: (q("pxy_sub") / (1 + q("k_diff") / ng)).sum(1),
        "InverseVariance": lambda: (q("pxy_sub")[:, 1:] / q("k_diff")[1:] ** 2).sum(1),
        "MaximumProbability": lambda: P.max((1, 2)),
        "SumAverage": lambda: q("pxy_add") @ q("k_sum"),
        "SumEntropy": lambda: ent(q("pxy_add"), 1),
        "SumSquares": lambda: s2(P * q("di") ** 2),
        "MCC": mcc,
    }
    return {k: q(k) for k in need}


def gldm(lv: Levels, force2d: bool, need: set[str]) -> dict:
    """GLDM features (short names; alpha 0, distance 1), as ``native_texture.gldm``."""
    offs = _offsets(force2d, True)
    dep = 1 + np.count_nonzero(lv.neighbours(offs) == lv.rank[None, :], axis=0)
    ndep = len(offs) + 2
    n = lv.present.size
    P = np.bincount(lv.rank * ndep + dep, minlength=(n + 1) * ndep).reshape(n + 1, ndep)[1:].astype(np.float64)
    pd = P.sum(0)
    keep = pd > 0
    P = P[:, keep]
    pd = pd[keep]
    jv = np.arange(ndep, dtype=np.float64)[keep]
    pg = P.sum(1)
    iv = lv.present
    nz = pd.sum()
    i2 = (iv * iv)[:, None]
    j2 = (jv * jv)[None, :]

    def var(p, v):
        return float((p * (v - (p * v).sum()) ** 2).sum())

    f = {
        "SmallDependenceEmphasis": lambda: (pd / jv ** 2).sum() / nz,
        "LargeDependenceEmphasis": lambda: (pd @ jv ** 2) / nz,
        "GrayLevelNonUniformity": lambda: (pg @ pg) / nz,
        "DependenceNonUniformity": lambda: (pd @ pd) / nz,
        "DependenceNonUniformityNormalized": lambda: (pd @ pd) / nz ** 2,
        "GrayLevelVariance": lambda: var(pg / nz, iv),
        "DependenceVariance": lambda: var(pd / nz, jv),
        "DependenceEntropy": lambda: -((P / nz) * np.log2(P / nz + EPS)).sum(),
        "LowGrayLevelEmphasis": lambda: (pg / iv ** 2).sum() / nz,
        "HighGrayLevelEmphasis": lambda: (pg @ iv ** 2) / nz,
        "SmallDependenceLowGrayLevelEmphasis": lambda: (P / (i2 * j2)).sum() / nz,
        "SmallDependenceHighGrayLevelEmphasis": lambda: (P * i2 / j2).sum() / nz,
        "LargeDependenceLowGrayLevelEmphasis": lambda: (P * j2 / i2).sum() / nz,
        "LargeDependenceHighGrayLevelEmphasis": lambda: (P * i2 * j2).sum() / nz,
    }
    return {k: f[k]() for k in need}


# ------------------------------------------------------------------------------------------------
# run lengths and zones (numpy only: no torch version; ``native.compute_native`` routes these
# names here for every region size and device)

GLRLM_FORMULAS = {
    "ShortRunEmphasis": "sum_j p_r(j) / j^2 / N_r",
    "LongRunEmphasis": "sum_j p_r(j) j^2 / N_r",
    "GrayLevelNonUniformity": "sum_i p_g(i)^2 / N_r",
    "GrayLevelNonUniformityNormalized": "sum_i p_g(i)^2 / N_r^2",
    "RunLengthNonUniformity": "sum_j p_r(j)^2 / N_r",
    "RunLengthNonUniformityNormalized": "sum_j p_r(j)^2 / N_r^2",
    "RunPercentage": "N_r / N_p",
    "GrayLevelVariance": "sum_i p(i) (i - mu)^2, p = p_g / N_r, mu = sum i p(i)",
    "RunVariance": "sum_j p(j) (j - mu)^2, p = p_r / N_r, mu = sum j p(j)",
    "RunEntropy": "-sum P/N_r log2(P/N_r + eps)",
    "LowGrayLevelRunEmphasis": "sum_i p_g(i) / i^2 / N_r",
    "HighGrayLevelRunEmphasis": "sum_i p_g(i) i^2 / N_r",
    "ShortRunLowGrayLevelEmphasis": "sum P / (i^2 j^2) / N_r",
    "ShortRunHighGrayLevelEmphasis": "sum P i^2 / j^2 / N_r",
    "LongRunLowGrayLevelEmphasis": "sum P j^2 / i^2 / N_r",
    "LongRunHighGrayLevelEmphasis": "sum P i^2 j^2 / N_r",
}
"""GLRLM (pyradiomics): per direction ``P(i, j)`` counts the runs (maximal lines of consecutive mask
voxels with the same grey level along the direction) of level ``i`` and length ``j``; ``N_r`` the
number of runs, ``N_p`` the number of voxels, ``p_g(i) = sum_j P``, ``p_r(j) = sum_i P``; 13
directions in 3D, the 4 in-plane ones with force2D; each feature is averaged over directions."""
GLRLM_NAMES = frozenset(f"glrlm_{k}" for k in GLRLM_FORMULAS)


def run_lengths(lv: Levels, force2d: bool) -> np.ndarray:
    """float64 [A, N, L]: ``P[a, r - 1, l - 1]`` counts the runs of rank ``r`` and length ``l``
    along direction ``a`` (one of each +/- pair of the distance-1 offsets). Every run is followed
    from its first voxel (its predecessor has another rank, or is outside) one step at a time, all
    directions together; the padding (rank 0) ends every run."""
    offs = _offsets(force2d, False)
    step = np.asarray(offs) @ lv.strides  # [A] flat steps
    prev = lv.grid[lv.at[None, :] - step[:, None]]  # [A, N_p]
    a_idx, v_idx = np.nonzero(prev != lv.rank[None, :])
    pos = lv.at[v_idx]
    rank = lv.rank[v_idx]
    stp = step[a_idx]
    n1 = lv.present.size + 1
    code = a_idx * n1 + rank  # (direction, rank) of each run
    ends_code, ends_len = [], []
    length = 1
    while code.size:
        pos = pos + stp
        go = lv.grid[pos] == rank
        stop = ~go
        ends_code.append(code[stop])
        ends_len.append(np.full(int(np.count_nonzero(stop)), length))
        pos, rank, stp, code = pos[go], rank[go], stp[go], code[go]
        length += 1
    maxlen = length - 1
    codes = np.concatenate(ends_code) * maxlen + (np.concatenate(ends_len) - 1)
    P = np.bincount(codes, minlength=len(offs) * n1 * maxlen).reshape(len(offs), n1, maxlen)
    return P[:, 1:, :].astype(np.float64)


def glrlm(lv: Levels, force2d: bool, need: set[str]) -> dict:
    """GLRLM features (short names), as pyradiomics: per direction, then averaged over directions
    (NaN-ignoring; formulas: :data:`GLRLM_FORMULAS`)."""
    P = run_lengths(lv, force2d)
    nr = P.sum((1, 2))  # [A] runs per direction (> 0 for every direction of a non-empty mask)
    keep = nr > 0
    P, nr = P[keep], nr[keep]
    if P.shape[0] == 0:
        return {k: math.nan for k in need}
    pg = P.sum(2)  # [A, N]
    pr = P.sum(1)  # [A, L]
    iv = lv.present[None, :]
    jv = np.arange(1, P.shape[2] + 1, dtype=np.float64)[None, :]
    i2 = (lv.present ** 2)[None, :, None]
    j2 = (jv[0] ** 2)[None, None, :]
    n = nr[:, None]

    def var(p, v):
        mu = (p * v).sum(1, keepdims=True)
        return (p * (v - mu) ** 2).sum(1)

    f = {
        "ShortRunEmphasis": lambda: (pr / jv ** 2).sum(1) / nr,
        "LongRunEmphasis": lambda: (pr * jv ** 2).sum(1) / nr,
        "GrayLevelNonUniformity": lambda: (pg ** 2).sum(1) / nr,
        "GrayLevelNonUniformityNormalized": lambda: (pg ** 2).sum(1) / nr ** 2,
        "RunLengthNonUniformity": lambda: (pr ** 2).sum(1) / nr,
        "RunLengthNonUniformityNormalized": lambda: (pr ** 2).sum(1) / nr ** 2,
        "RunPercentage": lambda: nr / (pr * jv).sum(1),
        "GrayLevelVariance": lambda: var(pg / n, iv),
        "RunVariance": lambda: var(pr / n, jv),
        "RunEntropy": lambda: -((P / nr[:, None, None]) * np.log2(P / nr[:, None, None] + EPS)).sum((1, 2)),
        "LowGrayLevelRunEmphasis": lambda: (pg / iv ** 2).sum(1) / nr,
        "HighGrayLevelRunEmphasis": lambda: (pg * iv ** 2).sum(1) / nr,
        "ShortRunLowGrayLevelEmphasis": lambda: (P / (i2 * j2)).sum((1, 2)) / nr,
        "ShortRunHighGrayLevelEmphasis": lambda: (P * i2 / j2).sum((1, 2)) / nr,
        "LongRunLowGrayLevelEmphasis": lambda: (P * j2 / i2).sum((1, 2)) / nr,
        "LongRunHighGrayLevelEmphasis": lambda: (P * i2 * j2).sum((1, 2)) / nr,
    }
    return {k: _nanmean(f[k]()) for k in need}


GLSZM_FORMULAS = {
    "SmallAreaEmphasis": "sum_j p_s(j) / j^2 / N_z",
    "LargeAreaEmphasis": "sum_j p_s(j) j^2 / N_z",
    "GrayLevelNonUniformity": "sum_i p_g(i)^2 / N_z",
    "GrayLevelNonUniformityNormalized": "sum_i p_g(i)^2 / N_z^2",
    "SizeZoneNonUniformity": "sum_j p_s(j)^2 / N_z",
    "SizeZoneNonUniformityNormalized": "sum_j p_s(j)^2 / N_z^2",
    "ZonePercentage": "N_z / N_p",
    "GrayLevelVariance": "sum_i p(i) (i - mu)^2, p = p_g / N_z, mu = sum i p(i)",
    "ZoneVariance": "sum_j p(j) (j - mu)^2, p = p_s / N_z, mu = sum j p(j)",
    "ZoneEntropy": "-sum P/N_z log2(P/N_z + eps)",
    "LowGrayLevelZoneEmphasis": "sum_i p_g(i) / i^2 / N_z",
    "HighGrayLevelZoneEmphasis": "sum_i p_g(i) i^2 / N_z",
    "SmallAreaLowGrayLevelEmphasis": "sum P / (i^2 j^2) / N_z",
    "SmallAreaHighGrayLevelEmphasis": "sum P i^2 / j^2 / N_z",
    "LargeAreaLowGrayLevelEmphasis": "sum P j^2 / i^2 / N_z",
    "LargeAreaHighGrayLevelEmphasis": "sum P i^2 j^2 / N_z",
}
"""GLSZM (pyradiomics): ``P(i, j)`` counts the zones (connected groups of mask voxels with the same
grey level: 26-connected in 3D, 8-connected in-plane with force2D) of level ``i`` and ``j`` voxels;
``N_z`` the number of zones, ``N_p`` the number of voxels, ``p_g(i) = sum_j P``,
``p_s(j) = sum_i P``. No directions: one matrix."""
GLSZM_NAMES = frozenset(f"glszm_{k}" for k in GLSZM_FORMULAS)


def zone_labels(lv: Levels, force2d: bool) -> np.ndarray:
    """int64 [N_p]: for each mask voxel (``mask`` order) the smallest index of a voxel of its zone
    (same grey level, connected through the 26 neighbours, 8 in-plane with force2D). Minimum-label
    propagation with hooking of the representatives and pointer jumping (a few passes)."""
    offs = _offsets(force2d, True)
    n = lv.rank.size
    index = np.full(lv.grid.size, n, np.int64)  # n: not a mask voxel
    index[lv.at] = np.arange(n)
    nb = index[lv.at[None, :] + (np.asarray(offs) @ lv.strides)[:, None]]  # [A, N_p]
    nb = np.where(lv.grid[lv.at[None, :] + (np.asarray(offs) @ lv.strides)[:, None]] == lv.rank[None, :], nb, n)
    # keep only the directions and voxels that have a same-zone neighbour
    has = (nb < n).any(0)
    src = np.flatnonzero(has)
    nb = nb[:, src]
    label = np.arange(n + 1)  # label[n] = n: the sentinel for "no neighbour"
    while True:
        m = np.minimum(label[src], label[nb].min(0))
        changed = m < label[src]
        if not changed.any():
            break
        np.minimum.at(label, label[src], m)  # hook each representative to the smaller label
        label[src] = np.minimum(label[src], m)
        while True:  # pointer jumping to the fixpoint
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
    return label[:n]


def glszm(lv: Levels, force2d: bool, need: set[str]) -> dict:
    """GLSZM features (short names), as pyradiomics (formulas: :data:`GLSZM_FORMULAS`)."""
    label = zone_labels(lv, force2d)
    roots, sizes = np.unique(label, return_counts=True)
    zone_rank = lv.rank[roots]
    jv, jidx = np.unique(sizes, return_inverse=True)  # zone sizes present (empty sizes add nothing)
    ns = jv.size
    P = np.bincount(zone_rank * ns + jidx.ravel(), minlength=(lv.present.size + 1) * ns)
    P = P.reshape(-1, ns)[1:].astype(np.float64)
    jv = jv.astype(np.float64)
    iv = lv.present
    nz = float(roots.size)
    npx = float(lv.rank.size)
    pg = P.sum(1)
    ps = P.sum(0)
    i2 = (iv * iv)[:, None]
    j2 = (jv * jv)[None, :]

    def var(p, v):
        return float((p * (v - (p * v).sum()) ** 2).sum())

    f = {
        "SmallAreaEmphasis": lambda: (ps / jv ** 2).sum() / nz,
        "LargeAreaEmphasis": lambda: (ps @ jv ** 2) / nz,
        "GrayLevelNonUniformity": lambda: (pg @ pg) / nz,
        "GrayLevelNonUniformityNormalized": lambda: (pg @ pg) / nz ** 2,
        "SizeZoneNonUniformity": lambda: (ps @ ps) / nz,
        "SizeZoneNonUniformityNormalized": lambda: (ps @ ps) / nz ** 2,
        "ZonePercentage": lambda: nz / npx,
        "GrayLevelVariance": lambda: var(pg / nz, iv),
        "ZoneVariance": lambda: var(ps / nz, jv),
        "ZoneEntropy": lambda: -((P / nz) * np.log2(P / nz + EPS)).sum(),
        "LowGrayLevelZoneEmphasis": lambda: (pg / iv ** 2).sum() / nz,
        "HighGrayLevelZoneEmphasis": lambda: (pg @ iv ** 2) / nz,
        "SmallAreaLowGrayLevelEmphasis": lambda: (P / (i2 * j2)).sum() / nz,
        "SmallAreaHighGrayLevelEmphasis": lambda: (P * i2 / j2).sum() / nz,
        "LargeAreaLowGrayLevelEmphasis": lambda: (P * j2 / i2).sum() / nz,
        "LargeAreaHighGrayLevelEmphasis": lambda: (P * i2 * j2).sum() / nz,
    }
    return {k: float(f[k]()) for k in need}


# ------------------------------------------------------------------------------------------------
# entry point

def compute(img: np.ndarray, msk: np.ndarray, spacing_xyz, plan, bin_width: float, force2d: bool) -> dict:
    """The features of ``plan`` (see ``native._Plan``) of the cropped numpy arrays; values are floats."""
    sx, sy, sz = spacing_xyz
    out: dict = {}
    values = img[msk]
    with np.errstate(all="ignore"):
        hist = level = None
        if plan.levels:
            level = discretize(values, bin_width)
            hist = np.bincount(level)
        if plan.firstorder:
            fo = firstorder(values.astype(np.float64), plan.firstorder, sx * sy * sz, hist)
            out.update({"firstorder_" + k: v for k, v in fo.items()})
        if plan.shape3d:
            out.update({"shape_" + k: v for k, v in shape_3d(msk, (sz, sy, sx), plan.shape3d).items()})
        if plan.shape2d:
            out.update({"shape2D_" + k: v for k, v in shape_2d(msk[0], sy, sx, plan.shape2d).items()})
        if plan.glcm or plan.gldm or plan.glrlm or plan.glszm:
            lv = Levels(msk, level, hist)
            if plan.glszm:
                out.update({"glszm_" + k: v for k, v in glszm(lv, force2d, plan.glszm).items()})
            if plan.glrlm:
                out.update({"glrlm_" + k: v for k, v in glrlm(lv, force2d, plan.glrlm).items()})
            if plan.glcm:
                out.update({"glcm_" + k: v for k, v in glcm(lv, force2d, plan.glcm).items()})
            if plan.gldm:
                out.update({"gldm_" + k: v for k, v in gldm(lv, force2d, plan.gldm).items()})
    return out
