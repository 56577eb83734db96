"""Shape features, as pyradiomics' ``RadiomicsShape`` (3D) and ``RadiomicsShape2D`` (force2D).

Units: mm, mm^2, mm^3. ``V`` is the marching-cubes mesh volume and ``A`` its surface area (vertices
at the midpoints of cube edges, on the mask padded by one voxel; see ``native_shape_tables``),
``N_v`` the number of mask voxels, ``lambda_major >= lambda_minor >= lambda_least`` the eigenvalues
of the covariance of the voxel centres (mm, normalised by ``N_v``). Diameters are the largest
distance between two mesh vertices, for the 2D diameters restricted to pairs in the same axial
slice / coronal column / sagittal row.
In 2D, ``P`` is the marching-squares perimeter and ``A`` the area it encloses.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .native_shape_tables import tables

FORMULAS_3D = {
    "MeshVolume": "V = sum over triangles of a . (b x c) / 6 (marching cubes)",
    "VoxelVolume": "N_v * V_voxel",
    "SurfaceArea": "A = sum over triangles of |(b - a) x (c - a)| / 2",
    "SurfaceVolumeRatio": "A / V",
    "Sphericity": "(36 pi V^2)^(1/3) / A",
    "Compactness1": "V / (sqrt(pi) A^(3/2))",
    "Compactness2": "36 pi V^2 / A^3",
    "SphericalDisproportion": "A / (36 pi V^2)^(1/3)",
    "Maximum3DDiameter": "max ||p - q|| over mesh vertices p, q",
    "Maximum2DDiameterSlice": "max ||p - q|| with p, q in the same axial slice",
    "Maximum2DDiameterColumn": "max ||p - q|| with p, q in the same coronal plane (same j)",
    "Maximum2DDiameterRow": "max ||p - q|| with p, q in the same sagittal plane (same i)",
    "MajorAxisLength": "4 sqrt(lambda_major)",
    "MinorAxisLength": "4 sqrt(lambda_minor)",
    "LeastAxisLength": "4 sqrt(lambda_least)",
    "Elongation": "sqrt(lambda_minor / lambda_major)",
    "Flatness": "sqrt(lambda_least / lambda_major)",
}
FORMULAS_2D = {
    "MeshSurface": "A = sum over segments of (a x b) / 2 (marching squares)",
    "PixelSurface": "N_v * area of one pixel",
    "Perimeter": "P = sum of segment lengths (marching squares)",
    "PerimeterSurfaceRatio": "P / A",
    "Sphericity": "2 sqrt(pi A) / P",
    "SphericalDisproportion": "P / (2 sqrt(pi A))",
    "MaximumDiameter": "max ||p - q|| over marching-squares vertices p, q",
    "MajorAxisLength": "4 sqrt(lambda_major)",
    "MinorAxisLength": "4 sqrt(lambda_minor)",
    "Elongation": "sqrt(lambda_minor / lambda_major)",
}
NAMES_3D = frozenset(f"shape_{k}" for k in FORMULAS_3D)
NAMES_2D = frozenset(f"shape2D_{k}" for k in FORMULAS_2D)

_TABLE_CACHE: dict = {}


def _tables(device):
    key = str(device)
    if key not in _TABLE_CACHE:
        classes, area, v0, n = tables()
        f64 = dict(dtype=torch.float64, device=device)
        _TABLE_CACHE[key] = (torch.tensor(classes, **f64), torch.tensor(area, **f64),
                             torch.tensor(v0, **f64), torch.tensor(n, **f64))
    return _TABLE_CACHE[key]


def mesh_3d(mask: torch.Tensor, spacing_zyx: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(surface area mm^2, mesh volume mm^3) of the bool mask [k, j, i], as pyradiomics computes them."""
    classes, area_counts, v0, n = _tables(mask.device)
    m = torch.nn.functional.pad(mask.to(torch.uint8), (1, 1, 1, 1, 1, 1))
    D, H, W = (s - 1 for s in m.shape)
    cfg = torch.zeros((D, H, W), dtype=torch.uint8, device=mask.device)
    for bit, (z, y, x) in enumerate((z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)):
        cfg |= m[z:z + D, y:y + H, x:x + W] << bit
    flat = cfg.reshape(-1)
    counts = torch.bincount(flat, minlength=256).to(torch.float64)
    sp = torch.tensor(spacing_zyx, dtype=torch.float64, device=mask.device)
    det = float(np.prod(spacing_zyx))
    tri = 0.5 * det * torch.sqrt((classes / sp ** 2).sum(1))  # area of one triangle of each class
    area = counts @ (area_counts @ tri)
    # volume: sum over cubes of V0[c] + o . N[c] (o = cube offset in voxels, padded frame)
    nz = torch.nonzero((flat != 0) & (flat != 255)).squeeze(1)
    c = flat[nz].long()
    o = torch.stack((nz // (H * W), (nz // W) % H, nz % W), 1).to(torch.float64)
    vol = det / 6.0 * ((counts * v0).sum() + (o * n[c]).sum())
    return area, vol


def _square_tables(device):
    """Marching squares on [y, x] with corner bits 1 (0,0), 2 (0,1), 4 (1,0), 8 (1,1):
    per configuration the inside area of the unit square and the perimeter segment counts
    (corner cuts of vector (1/2, 1/2), straight cuts of length s_x, of length s_y)."""
    key = ("sq", str(device))
    if key not in _TABLE_CACHE:
        area = np.zeros(16)
        seg = np.zeros((16, 3))
        for c in range(16):
            a, b, cc, d = (c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1, (c >> 3) & 1
            k = a + b + cc + d
            if k == 1:
                area[c], seg[c] = 1 / 8, (1, 0, 0)
            elif k == 3:
                area[c], seg[c] = 7 / 8, (1, 0, 0)
            elif k == 4:
                area[c] = 1.0
            elif k == 2:
                if c in (0b0011, 0b1100):  # same row: the boundary runs along x, crossing the square in x
                    area[c], seg[c] = 0.5, (0, 1, 0)
                elif c in (0b0101, 0b1010):  # same column: the boundary crosses in y
                    area[c], seg[c] = 0.5, (0, 0, 1)
                else:  # diagonal (saddle): two separate corners, as pyradiomics' table does
                    area[c], seg[c] = 0.25, (2, 0, 0)
        f64 = dict(dtype=torch.float64, device=device)
        _TABLE_CACHE[key] = (torch.tensor(area, **f64), torch.tensor(seg, **f64))
    return _TABLE_CACHE[key]


def mesh_2d(mask: torch.Tensor, spacing_yx: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(perimeter mm, enclosed area mm^2) of the bool mask [j, i] by marching squares."""
    area_t, seg_t = _square_tables(mask.device)
    m = torch.nn.functional.pad(mask.to(torch.int64), (1, 1, 1, 1))
    H, W = (s - 1 for s in m.shape)
    cfg = m[:H, :W] | (m[:H, 1:] << 1) | (m[1:, :W] << 2) | (m[1:, 1:] << 3)
    counts = torch.bincount(cfg.reshape(-1), minlength=16).to(torch.float64)
    sy, sx = spacing_yx
    lengths = torch.tensor([0.5 * math.hypot(sy, sx), sx, sy], dtype=torch.float64, device=mask.device)
    perimeter = counts @ (seg_t @ lengths)
    area = (counts @ area_t) * sy * sx
    return perimeter, area


def _extreme(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Voxels of the mask with a neighbour outside it along ``axis`` (bool, same shape)."""
    pad = [0, 0] * mask.dim()
    pad[2 * (mask.dim() - 1 - axis)] = 1
    pad[2 * (mask.dim() - 1 - axis) + 1] = 1
    m = torch.nn.functional.pad(mask, pad)
    n = mask.shape[axis]
    before = m.narrow(axis, 0, n)
    after = m.narrow(axis, 2, n)
    return mask & ~(before & after)


_PAIR_CHUNK = 1 << 21
"""Most point pairs whose distances one step of a maximum-distance search holds in memory."""


def _pairs_max_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest squared distance between a row of ``a`` [n, d] and a row of ``b`` [m, d] (chunked)."""
    best = torch.zeros((), dtype=a.dtype, device=a.device)
    nb = (b * b).sum(1)
    step = max(1, _PAIR_CHUNK // max(1, b.shape[0]))
    for s in range(0, a.shape[0], step):
        x = a[s:s + step]
        # |x|^2 + |y|^2 - 2 x.y on centred float64 coordinates (mm): rounding ~1e-12 mm^2
        d2 = torch.addmm(nb[None, :], x, b.T, alpha=-2.0).add_((x * x).sum(1)[:, None])
        best = torch.maximum(best, d2.max())
    return best


_DIR_CACHE: dict = {}


def _directions(dims: int, k: int, device) -> tuple[torch.Tensor, float]:
    """Unit vectors along the integer vectors ``v`` with ``max |v_i| = k`` (one of each +/- pair),
    float64 [m, dims], and ``cos(delta)``: every unit vector is within the angle
    ``delta = asin(sqrt(dims - 1) / (2 k))`` of one of them or of its opposite (scale it so that its
    largest component is +/-k and round the others: the error is at most sqrt(dims - 1) / 2, the
    rounded vector is at least k long)."""
    key = (dims, k, str(device))
    if key not in _DIR_CACHE:
        vs = [v for v in itertools.product(range(-k, k + 1), repeat=dims)
              if max(abs(c) for c in v) == k and v > (0,) * dims]
        u = torch.tensor(vs, dtype=torch.float64, device=device)
        u = u / u.norm(dim=1, keepdim=True)
        _DIR_CACHE[key] = (u, math.cos(math.asin(math.sqrt(dims - 1) / (2 * k))))
    return _DIR_CACHE[key]


def _max_dist_sq(points: torch.Tensor, small: int = 256) -> torch.Tensor:
    """Largest squared distance between two rows of ``points`` [n, d] (float64, mm).

    Up to ``small`` points: all pairs. Above: only pairs that can be the longest. If ``p, q`` are
    the farthest pair (``D = |p - q| >= L``, ``L`` any pair's distance) and ``u`` is a direction
    within ``delta`` of ``(p - q) / D`` (see :func:`_directions`), then ``(p - q) . u >= L cos(delta)``,
    so ``p . u >= min(x . u) + L cos(delta)`` and ``q . u <= max(x . u) - L cos(delta)``: ``p`` and ``q``
    lie in the two thin caps of the point set along ``u``. The answer is the largest distance
    between the caps of one direction, over all directions (exact: no pair is left out that could
    be longer than ``L``).
    """
    n = points.shape[0]
    if n < 2:
        return torch.zeros((), dtype=torch.float64, device=points.device)
    x = points - points.mean(0)
    if n <= small:
        return _pairs_max_sq(x, x)
    u, cos_delta = _directions(x.shape[1], 4 if x.shape[1] == 3 else 8, x.device)
    proj = u @ x.T  # [m, n]
    hi, ihi = proj.max(1)
    lo, ilo = proj.min(1)
    lower = ((x[ihi] - x[ilo]) ** 2).sum(1).max()  # L^2: a pair's squared distance
    c = torch.sqrt(lower) * cos_delta * (1 - 1e-9)
    act = torch.nonzero(hi - lo >= c).squeeze(1)
    proj = proj[act]  # [a, n]
    top_thr = (lo[act] + c)[:, None]
    bot_thr = (hi[act] - c)[:, None]
    n_top = int((proj >= top_thr).sum(1).max())
    n_bot = int((proj <= bot_thr).sum(1).max())
    if act.numel() * n_top * n_bot >= n * n // 2:  # caps too wide to help: all pairs
        return _pairs_max_sq(x, x)
    top = torch.topk(proj, n_top, dim=1)
    bot = torch.topk(proj, n_bot, dim=1, largest=False)
    # out-of-cap slots get a copy of the cap's first point (distance 0 to it, harmless for a maximum)
    ti = torch.where(top.values >= top_thr, top.indices, top.indices[:, :1])
    bi = torch.where(bot.values <= bot_thr, bot.indices, bot.indices[:, :1])
    best = lower
    step = max(1, _PAIR_CHUNK // (n_top * n_bot))
    for s in range(0, act.numel(), step):
        best = torch.maximum(best, _batched_max_sq(x[ti[s:s + step]], x[bi[s:s + step]]))
    return best


def _batched_max_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest squared distance between a row of ``a[g]`` [L, d] and a row of ``b[g]`` [M, d], over
    the batch ``g`` (float64; rows are re-centred on ``a[g, 0]`` first to keep the rounding small)."""
    o = a[:, :1]
    a = a - o
    b = b - o
    na = (a * a).sum(2)
    nb = (b * b).sum(2)
    return torch.baddbmm(na[:, :, None] + nb[:, None, :], a, b.transpose(1, 2), alpha=-2.0).max()


def _grouped_max_dist_sq(points: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Largest squared distance between two rows of ``points`` [n, d] (mm) with equal ``groups``.

    Each group is first cut down to the points of its thin caps along the directions of
    :func:`_directions` (the argument of :func:`_max_dist_sq`, with the lower bound ``L`` = the
    group's largest width along those directions, itself at most its diameter), then all pairs of
    what is left are compared, group by group.
    """
    zero = torch.zeros((), dtype=torch.float64, device=points.device)
    if points.shape[0] < 2:
        return zero
    _, gid = torch.unique(groups, return_inverse=True)
    G = int(gid.max()) + 1
    u, cos_delta = _directions(points.shape[1], 4 if points.shape[1] == 3 else 8, points.device)
    proj = u @ points.T  # [m, n]
    idx = gid[None, :].expand_as(proj)
    full = proj.new_full((u.shape[0], G), float("inf"))
    lo = full.scatter_reduce(1, idx, proj, "amin")
    hi = (-full).scatter_reduce(1, idx, proj, "amax")
    c = (hi - lo).amax(0) * cos_delta * (1 - 1e-9)  # [G]
    keep = ((proj >= (lo + c)[:, gid]) | (proj <= (hi - c)[:, gid])).any(0)
    points, groups = points[keep], groups[keep]
    order = torch.argsort(groups)
    g = groups[order]
    p = points[order]
    uniq, counts = torch.unique_consecutive(g, return_counts=True)
    L = int(counts.max())
    if L < 2:
        return zero
    G = uniq.numel()
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(p.shape[0], device=p.device) - torch.repeat_interleave(starts, counts)
    gi = torch.repeat_interleave(torch.arange(G, device=p.device), counts)
    # pad each group with copies of its first point (distance 0 to it, harmless for a maximum)
    idx = starts[:, None].expand(G, L).clone()
    idx[gi, rank] = torch.arange(p.shape[0], device=p.device)
    padded = p[idx]  # [G, L, d]
    best = zero
    step = max(1, _PAIR_CHUNK // (L * L))
    for s in range(0, G, step):
        best = torch.maximum(best, _batched_max_sq(padded[s:s + step], padded[s:s + step]))
    return best


def _extreme_dirs(grid: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Points of ``grid`` that are not the midpoint of two grid points along any lattice direction
    (steps in {-1, 0, 1}) that moves only along ``axes``."""
    dims = grid.dim()
    p = torch.nn.functional.pad(grid, [1, 1] * dims)
    keep = grid.clone()
    for o in itertools.product((-1, 0, 1), repeat=dims):
        if o <= (0,) * dims or any(o[d] != 0 and d not in axes for d in range(dims)):
            continue
        fwd = p[tuple(slice(1 + k, 1 + k + n) for k, n in zip(o, grid.shape))]
        bwd = p[tuple(slice(1 - k, 1 - k + n) for k, n in zip(o, grid.shape))]
        keep &= ~(fwd & bwd)
    return keep


def _vertices(mask: torch.Tensor, prune_axes: tuple[int, ...]) -> torch.Tensor:
    """Mesh vertices (midpoints between a mask voxel and a face-neighbour outside it), in voxel index
    units [n, dims], keeping only possible convex-hull vertices: a vertex whose two neighbours of
    the same kind along one of ``prune_axes`` are vertices too is their midpoint, so it can never end
    a longest chord (within a plane perpendicular to the other axes)."""
    pts = []
    dims = mask.dim()
    for d in range(dims):
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - d)] = 1
        pad[2 * (dims - 1 - d) + 1] = 1
        m = torch.nn.functional.pad(mask, pad)
        n = m.shape[d]
        faces = m.narrow(d, 0, n - 1) ^ m.narrow(d, 1, n - 1)  # index k: between voxel k-1 and k
        sel = faces & _extreme_dirs(faces, prune_axes)
        idx = torch.nonzero(sel).to(torch.float64)
        idx[:, d] -= 0.5
        pts.append(idx)
    return torch.cat(pts)


def diameters_3d(mask: torch.Tensor, spacing_zyx, need=None) -> dict[str, torch.Tensor]:
    """Maximum 3D diameter and 2D diameters (slice, column, row), mm: the largest distance between
    two vertices of the marching-cubes mesh (within one axial slice / coronal / sagittal plane)."""
    sp = torch.tensor(spacing_zyx, dtype=torch.float64, device=mask.device)
    out = {}
    if need is None or "Maximum3DDiameter" in need:
        out["Maximum3DDiameter"] = torch.sqrt(_max_dist_sq(_vertices(mask, (0, 1, 2)) * sp))
    for name, axis, prune in (("Slice", 0, (1, 2)), ("Column", 1, (0, 2)), ("Row", 2, (0, 1))):
        if need is not None and "Maximum2DDiameter" + name not in need:
            continue
        v = _vertices(mask, prune)
        in_plane = [a for a in range(3) if a != axis]
        groups = torch.round(v[:, axis] * 2).long()
        out["Maximum2DDiameter" + name] = torch.sqrt(_grouped_max_dist_sq((v * sp)[:, in_plane], groups))
    return out


def _eigen(mask: torch.Tensor, spacing) -> torch.Tensor:
    """Eigenvalues (ascending) of the covariance of voxel centres (mm^2), pyradiomics' convention
    (normalised by N_v). The moments come from the mask's projections on each axis pair: integer
    sums, exact in float64, so no per-voxel coordinate list is built."""
    dims = mask.dim()
    dev = mask.device
    n = mask.sum(dtype=torch.float64)
    ax = [torch.arange(s, dtype=torch.float64, device=dev) * float(h) for s, h in zip(mask.shape, spacing)]
    m1 = torch.empty(dims, dtype=torch.float64, device=dev)
    m2 = torch.empty((dims, dims), dtype=torch.float64, device=dev)
    if dims == 2:
        w = mask.to(torch.float64)
        pairs = {(0, 1): w}
    else:
        pairs = {(a, b): mask.sum(dim=3 - a - b, dtype=torch.float64) for a, b in ((0, 1), (0, 2), (1, 2))}
    for (a, b), w in pairs.items():
        m2[a, b] = m2[b, a] = ax[a] @ w @ ax[b]
        for k, v in ((a, w.sum(1)), (b, w.sum(0))):
            m1[k] = ax[k] @ v
            m2[k, k] = (ax[k] * ax[k]) @ v
    mean = m1 / n
    cov = m2 / n - mean[:, None] * mean[None, :]
    ev = torch.linalg.eigvalsh(cov)
    ev = torch.where((ev < 0) & (ev > -1e-10), torch.zeros_like(ev), ev)
    return torch.sort(ev).values


def _sqrt_or_nan(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v < 0, torch.full_like(v, float("nan")), torch.sqrt(v.clamp(min=0)))


def compute_3d(mask: torch.Tensor, spacing_zyx, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Shape features of the bool mask [k, j, i] with voxel spacing (z, y, x) mm."""
    need = {w.split("_", 1)[1] for w in wanted}
    out: dict[str, torch.Tensor] = {}
    if need & {"MeshVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity", "Compactness1",
               "Compactness2", "SphericalDisproportion"}:
        A, V = mesh_3d(mask, spacing_zyx)
        out.update(MeshVolume=V, SurfaceArea=A, SurfaceVolumeRatio=A / V,
                   Sphericity=(36 * math.pi * V ** 2) ** (1 / 3) / A,
                   Compactness1=V / (A ** 1.5 * math.sqrt(math.pi)),
                   Compactness2=36 * math.pi * V ** 2 / A ** 3,
                   SphericalDisproportion=A / (36 * math.pi * V ** 2) ** (1 / 3))
    out["VoxelVolume"] = mask.sum().to(torch.float64) * float(np.prod(spacing_zyx))
    if any(k.startswith("Maximum") for k in need):
        out.update(diameters_3d(mask, spacing_zyx, need))
    if need & {"MajorAxisLength", "MinorAxisLength", "LeastAxisLength", "Elongation", "Flatness"}:
        ev = _eigen(mask, spacing_zyx)
        out.update(MajorAxisLength=_sqrt_or_nan(ev[2]) * 4, MinorAxisLength=_sqrt_or_nan(ev[1]) * 4,
                   LeastAxisLength=_sqrt_or_nan(ev[0]) * 4, Elongation=_sqrt_or_nan(ev[1] / ev[2]),
                   Flatness=_sqrt_or_nan(ev[0] / ev[2]))
    return {f"shape_{k}": v for k, v in out.items() if f"shape_{k}" in wanted}


def compute_2d(mask2d: torch.Tensor, spacing_yx, wanted: set[str]) -> dict[str, torch.Tensor]:
    """shape2D features of the bool mask [j, i] with pixel spacing (y, x) mm."""
    need = {w.split("_", 1)[1] for w in wanted}
    out: dict[str, torch.Tensor] = {}
    P, A = mesh_2d(mask2d, spacing_yx)
    out.update(MeshSurface=A, Perimeter=P, PerimeterSurfaceRatio=P / A,
               Sphericity=2 * torch.sqrt(math.pi * A) / P, SphericalDisproportion=P / (2 * torch.sqrt(math.pi * A)))
    out["PixelSurface"] = mask2d.sum().to(torch.float64) * spacing_yx[0] * spacing_yx[1]
    if "MaximumDiameter" in need:
        p = _vertices(mask2d, (0, 1)) * torch.tensor(spacing_yx, dtype=torch.float64, device=mask2d.device)
        out["MaximumDiameter"] = torch.sqrt(_max_dist_sq(p))
    if need & {"MajorAxisLength", "MinorAxisLength", "Elongation"}:
        ev = _eigen(mask2d, spacing_yx)
        out.update(MajorAxisLength=_sqrt_or_nan(ev[1]) * 4, MinorAxisLength=_sqrt_or_nan(ev[0]) * 4,
                   Elongation=_sqrt_or_nan(ev[0] / ev[1]))
    return {f"shape2D_{k}": v for k, v in out.items() if f"shape2D_{k}" in wanted}
