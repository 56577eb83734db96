"""Shared helpers of the native (torch) features: grey-level discretisation as pyradiomics does it,
and the neighbour look-up that the texture matrices share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def bin_edges(values: torch.Tensor, bin_width: float) -> np.ndarray:
    """pyradiomics' ``getBinEdges`` for a fixed bin width (float64 numpy array).

    Edges start at ``min - (min % binWidth)`` (i.e. ``floor(min / binWidth) * binWidth``) and run in
    steps of ``binWidth`` up to ``max + 2 * binWidth`` (exclusive), computed in the dtype of the
    image exactly as numpy does it in pyradiomics; a flat region gets the edges ``[e - .5, e + .5]``.
    """
    np_dtype = np.float64 if values.dtype == torch.float64 else np.float32
    lo_hi = torch.aminmax(values)
    lo = np_dtype(lo_hi.min.item())
    hi = np_dtype(lo_hi.max.item())
    low_bound = lo - (lo % bin_width)
    high_bound = hi + 2 * bin_width
    edges = np.arange(low_bound, high_bound, bin_width)
    if len(edges) == 1:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return np.asarray(edges, dtype=np.float64)


def discretize(values: torch.Tensor, bin_width: float) -> torch.Tensor:
    """Grey levels 1, 2, ... of ``values`` (1-D, the voxels inside the mask) as ``numpy.digitize``
    with pyradiomics' bin edges: level ``i`` holds ``edges[i-1] <= x < edges[i]`` (int64 tensor)."""
    edges = torch.as_tensor(bin_edges(values, bin_width), dtype=torch.float64, device=values.device)
    return torch.bucketize(values.to(torch.float64), edges, right=True)


EPS = float(np.spacing(1))
"""numpy.spacing(1), the epsilon pyradiomics adds inside logarithms."""


@dataclass
class Levels:
    """The discretised region, prepared once for all texture matrices.

    ``grid``: int32 [k+2, j+2, i+2], the grey-level *rank* (1..N_present) of every mask voxel of the
    bounding box padded by one voxel, 0 elsewhere, flattened. ``mask``: bool [k, j, i] the
    region. ``rank``: int64 [N_p] the ranks of the mask voxels, in the same order as the
    intensities ``image[mask]``. ``present``: float64 [N_present] the grey levels (1, 2, ...) that
    occur, ascending (rank r is level ``present[r - 1]``). ``shape``: the padded box shape.
    """

    grid: torch.Tensor
    mask: torch.Tensor
    rank: torch.Tensor
    present: torch.Tensor
    shape: tuple[int, int, int]

    @classmethod
    def build(cls, mask: torch.Tensor, level: torch.Tensor, hist: torch.Tensor) -> "Levels":
        """``mask`` bool [k, j, i] (the bounding box), ``level`` int64 [N_p] the grey level of each
        mask voxel (``mask`` order), ``hist`` = ``bincount(level)``."""
        dev = mask.device
        occurs = hist > 0
        occurs[0] = False
        to_rank = torch.cumsum(occurs, 0) * occurs
        rank = to_rank[level]
        present = torch.nonzero(occurs).squeeze(1).to(torch.float64)
        D, H, W = (s + 2 for s in mask.shape)
        grid = torch.zeros((D, H, W), dtype=torch.int32, device=dev)
        grid[1:-1, 1:-1, 1:-1][mask] = rank.to(torch.int32)
        return cls(grid.reshape(-1), mask, rank, present, (D, H, W))

    def _box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded grid [D, H, W], its centre view [D-2, H-2, W-2]) in the smallest int type."""
        D, H, W = self.shape
        g = self.grid.reshape(D, H, W)
        if self.present.numel() < 32767:
            g = g.to(torch.int16)
        return g, g[1:-1, 1:-1, 1:-1]

    def _shifted(self, g: torch.Tensor, o: tuple[int, int, int]) -> torch.Tensor:
        D, H, W = self.shape
        dz, dy, dx = o
        return g[1 + dz:D - 1 + dz, 1 + dy:H - 1 + dy, 1 + dx:W - 1 + dx]

    def cooccurrences(self, offsets: list[tuple[int, int, int]]) -> torch.Tensor:
        """int64 [len(offsets), N+1, N+1] (N = number of levels present): entry [k, a, b] counts the
        voxels of rank ``a`` whose neighbour at ``offsets[k]`` has rank ``b`` (rank 0: outside)."""
        g, c = self._box()
        n1 = self.present.numel() + 1
        row = c.to(torch.int32) * n1
        return torch.stack([torch.bincount((row + self._shifted(g, o)).reshape(-1), minlength=n1 * n1)
                            for o in offsets]).reshape(len(offsets), n1, n1)

    def same_level_neighbours(self, offsets: list[tuple[int, int, int]]) -> torch.Tensor:
        """int64 [N_p]: for each mask voxel, how many of its neighbours at ``offsets`` have its grey
        level (slices of the padded box: no index arrays; uint8 counts, so at most 255 offsets)."""
        g, c = self._box()
        same = torch.zeros(c.shape, dtype=torch.uint8, device=g.device)
        for o in offsets:
            same += self._shifted(g, o) == c
        return same[self.mask].long()
