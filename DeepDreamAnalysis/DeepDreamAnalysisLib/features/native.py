"""Native (torch) radiomics features: pyradiomics' names, settings and values, on the tensor's device.

Entry point of the ``native_*`` modules: :data:`NATIVE_FEATURES` lists what exists natively and
:func:`compute_native` computes it. The implementation follows pyradiomics 3.0.1 (binWidth
discretisation anchored at ``floor(min / binWidth) * binWidth``, symmetric GLCM at distance 1 over
13 directions (4 in-plane with force2D) averaged over directions, GLDM with alpha 0, marching-cubes
mesh as pyradiomics' C code builds it). Formulas: the ``FORMULAS`` tables of each module and
``docs/native-features.md``. Everything runs in torch ops (no loop over voxels), so it releases the
GIL and runs on the GPU when the tensors are there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import native_firstorder, native_shape, native_texture
from .native_common import Levels, discretize

NATIVE_FEATURES_3D: frozenset[str] = (native_firstorder.NAMES | native_shape.NAMES_3D
                                      | native_texture.GLCM_NAMES | native_texture.GLDM_NAMES)
NATIVE_FEATURES_2D: frozenset[str] = (native_firstorder.NAMES | native_shape.NAMES_2D
                                      | native_texture.GLCM_NAMES | native_texture.GLDM_NAMES)
NATIVE_FEATURES: frozenset[str] = NATIVE_FEATURES_3D | NATIVE_FEATURES_2D
"""Every feature name (pyradiomics' ``class_Feature``) that :func:`compute_native` can compute."""
TEXTURE_CLASSES = {"glcm_": native_texture.glcm, "gldm_": native_texture.gldm}
TEXTURE_PREFIXES = tuple(TEXTURE_CLASSES)


def _as_tensor(a, dtype=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach() if dtype is None else a.detach().to(dtype)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)


def compute_native(image, mask, spacing, names, bin_width: float = 25.0, force2d: bool = False) -> dict[str, float]:
    """Features of ``image`` inside ``mask``, named and valued as pyradiomics does.

    image: float [k, j, i] (torch tensor on any device, or numpy), image units (HU for CT); float32
      and float64 are kept as they are (pyradiomics discretises in the image's own precision).
    mask: bool, same shape. spacing: voxel size (i, j, k) in mm.
    names: pyradiomics names (``firstorder_Entropy``, ``shape_Sphericity``, ``shape2D_Elongation``,
      ``glcm_Contrast``, ...), all in :data:`NATIVE_FEATURES` (else ValueError naming them).
    bin_width: pyradiomics' binWidth (image units) for entropy, uniformity and textures.
    force2d: the arrays are [1, j, i]; shape features are shape2D and texture matrices in-plane only
      (pyradiomics' force2D with force2Ddimension 0).

    Returns ``{name: float}``; every value is NaN when the mask has fewer than 2 voxels (pyradiomics
    refuses single-voxel masks). The arrays are cropped to the mask's bounding box first.
    """
    names = list(names)
    unknown = sorted(set(names) - (NATIVE_FEATURES_2D if force2d else NATIVE_FEATURES_3D))
    if unknown:
        kind = "2D (force2d=True)" if force2d else "3D"
        raise ValueError(f"No native {kind} implementation of {', '.join(unknown)}; "
                         f"use the pyradiomics backend for these, or choose from NATIVE_FEATURES.")
    result = {n: float("nan") for n in names}
    img = _as_tensor(image)
    if not img.is_floating_point():
        img = img.to(torch.float32)
    msk = _as_tensor(mask).to(device=img.device, dtype=torch.bool)
    if img.shape != msk.shape or img.dim() != 3:
        raise ValueError(f"image and mask must be [k, j, i] arrays of the same shape, got {tuple(img.shape)} and {tuple(msk.shape)}.")
    if force2d and img.shape[0] != 1:
        raise ValueError(f"force2d needs arrays of shape [1, j, i], got {tuple(img.shape)}.")
    if int(msk.sum()) < 2 or not names:
        return result
    # crop to the bounding box
    nz = torch.nonzero(msk)
    lo = nz.min(0).values.tolist()
    hi = (nz.max(0).values + 1).tolist()
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    img, msk = img[sl], msk[sl]
    sx, sy, sz = (float(s) for s in spacing)
    wanted = set(names)
    values = img[msk]
    out: dict[str, torch.Tensor] = {}
    tex = {n for n in wanted if n.startswith(TEXTURE_PREFIXES)}
    fo = {n for n in wanted if n.startswith("firstorder_")}
    hist = None
    if tex or fo & {"firstorder_Entropy", "firstorder_Uniformity"}:
        level = discretize(values, bin_width)  # computed once, shared by entropy and the textures
        hist = torch.bincount(level)
    if fo:
        out.update(native_firstorder.compute(values, fo, bin_width, sx * sy * sz, hist))
    sh3 = {n for n in wanted if n.startswith("shape_")}
    if sh3:
        out.update(native_shape.compute_3d(msk, (sz, sy, sx), sh3))
    sh2 = {n for n in wanted if n.startswith("shape2D_")}
    if sh2:
        out.update(native_shape.compute_2d(msk[0], (sy, sx), sh2))
    if tex:
        lv = Levels.build(msk, level, hist)
        for prefix, fn in TEXTURE_CLASSES.items():
            sel = {n for n in tex if n.startswith(prefix)}
            if sel:
                out.update(fn(lv, force2d, sel))
    for n in names:
        v = out.get(n)
        if v is not None:
            v = float(v)
            result[n] = v if math.isfinite(v) or math.isnan(v) else v
    return result
