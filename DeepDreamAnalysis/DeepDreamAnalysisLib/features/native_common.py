"""Shared helpers of the native (torch) features: grey-level discretisation as pyradiomics does it."""

from __future__ import annotations

import numpy as np
import torch


def bin_edges(values: torch.Tensor, bin_width: float) -> np.ndarray:
    """pyradiomics' ``getBinEdges`` for a fixed bin width (float64 numpy array).

    Edges start at ``min - (min % binWidth)`` (i.e. ``floor(min / binWidth) * binWidth``) and run in
    steps of ``binWidth`` up to ``max + 2 * binWidth`` (exclusive), computed in the dtype of the
    image exactly as numpy does it in pyradiomics; a flat region gets the edges ``[e - .5, e + .5]``.
    """
    np_dtype = np.float64 if values.dtype == torch.float64 else np.float32
    lo = np_dtype(values.min().item())
    hi = np_dtype(values.max().item())
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
