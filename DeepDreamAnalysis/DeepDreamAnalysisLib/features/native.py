"""Native (torch) radiomics features: pyradiomics' names, settings and values, on the tensor's device.

Entry point of the ``native_*`` modules: :data:`NATIVE_FEATURES` lists what exists natively and
:func:`compute_native` computes it. The implementation follows pyradiomics 3.0.1 (binWidth
discretisation anchored at ``floor(min / binWidth) * binWidth``, symmetric GLCM at distance 1 over
13 directions (4 in-plane with force2D) averaged over directions, GLDM with alpha 0, marching-cubes
mesh as pyradiomics' C code builds it). Formulas: the ``FORMULAS`` tables of each module and
``docs/native-features.md``. Everything runs in torch ops (no loop over voxels), so it releases the
GIL and runs on the GPU when the tensors are there; small regions on the CPU (the usual lesion of a
dream) go through the same formulas in numpy (``native_small``), whose per-operation cost is a
fraction of torch's. GLRLM and GLSZM have no torch version: its names (:data:`NUMPY_ONLY_FEATURES`) are always
computed by ``native_small`` on a CPU copy of the crop, whatever the size, device or ``impl``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import native_firstorder, native_shape, native_small, native_texture
from .native_common import Levels, discretize

NUMPY_ONLY_FEATURES: frozenset[str] = native_small.GLRLM_NAMES | native_small.GLSZM_NAMES
"""Features with no torch version: computed by ``native_small`` (numpy, on the CPU) for every region
size, device and ``impl`` (tensors on a GPU are copied to the CPU for them)."""
NATIVE_FEATURES_3D: frozenset[str] = (native_firstorder.NAMES | native_shape.NAMES_3D
                                      | native_texture.GLCM_NAMES | native_texture.GLDM_NAMES
                                      | NUMPY_ONLY_FEATURES)
NATIVE_FEATURES_2D: frozenset[str] = (native_firstorder.NAMES | native_shape.NAMES_2D
                                      | native_texture.GLCM_NAMES | native_texture.GLDM_NAMES
                                      | NUMPY_ONLY_FEATURES)
NATIVE_FEATURES: frozenset[str] = NATIVE_FEATURES_3D | NATIVE_FEATURES_2D
"""Every feature name (pyradiomics' ``class_Feature``) that :func:`compute_native` can compute."""
TEXTURE_CLASSES = {"glcm_": native_texture.glcm, "gldm_": native_texture.gldm}
TEXTURE_PREFIXES = tuple(TEXTURE_CLASSES)


@dataclass(frozen=True)
class _Plan:
    """What one call computes, by group: full names for the torch path, short names (without the
    class prefix) for the numpy path; ``levels``: the grey levels are needed."""

    names: tuple[str, ...]
    firstorder_full: frozenset
    shape3d_full: frozenset
    shape2d_full: frozenset
    texture_full: frozenset
    firstorder: frozenset
    shape3d: frozenset
    shape2d: frozenset
    glcm: frozenset
    gldm: frozenset
    levels: bool
    glrlm: frozenset = frozenset()
    glszm: frozenset = frozenset()
    numpy_only_full: frozenset = frozenset()


@functools.lru_cache(maxsize=256)
def _plan(names: tuple[str, ...], force2d: bool) -> _Plan:
    unknown = sorted(set(names) - (NATIVE_FEATURES_2D if force2d else NATIVE_FEATURES_3D))
    if unknown:
        kind = "2D (force2d=True)" if force2d else "3D"
        raise ValueError(f"No native {kind} implementation of {', '.join(unknown)}; "
                         f"use the pyradiomics backend for these, or choose from NATIVE_FEATURES.")

    def group(prefix):
        full = frozenset(n for n in names if n.startswith(prefix))
        return full, frozenset(n[len(prefix):] for n in full)

    fo_full, fo = group("firstorder_")
    sh3_full, sh3 = group("shape_")
    sh2_full, sh2 = group("shape2D_")
    glcm_full, glcm = group("glcm_")
    gldm_full, gldm = group("gldm_")
    glrlm_full, glrlm = group("glrlm_")
    glszm_full, glszm = group("glszm_")
    levels = bool(glcm or gldm or glrlm or glszm or fo & {"Entropy", "Uniformity"})
    return _Plan(names, fo_full, sh3_full, sh2_full, glcm_full | gldm_full, fo, sh3, sh2, glcm, gldm, levels,
                 glrlm=glrlm, glszm=glszm, numpy_only_full=glrlm_full | glszm_full)


def _as_tensor(a, dtype=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach() if dtype is None else a.detach().to(dtype)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)


def _on_cpu(a) -> bool:
    return not isinstance(a, torch.Tensor) or a.device.type == "cpu"


def _as_numpy_image(a) -> np.ndarray:
    """float32/float64 numpy view or copy of a CPU image (other dtypes as float32, which is what
    the torch path's binning uses for them)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.to(torch.float32)
        return a.cpu().numpy()
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _as_numpy_mask(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a if a.dtype == np.bool_ else a.astype(bool)


def _bbox(m: np.ndarray) -> tuple[slice, ...]:
    """Slices of the bounding box of the non-empty bool mask [k, j, i]."""
    kj = m.any(2)
    out = []
    for hit in (kj.any(1), kj.any(0), m.any(1).any(0)):
        idx = np.flatnonzero(hit)
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def compute_native(image, mask, spacing, names, bin_width: float = 25.0, force2d: bool = False,
                   impl: str = "auto") -> dict[str, float]:
    """Features of ``image`` inside ``mask``, named and valued as pyradiomics does.

    image: float [k, j, i] (torch tensor on any device, or numpy), image units (HU for CT); float32
      and float64 are kept as they are (pyradiomics discretises in the image's own precision).
    mask: bool, same shape. spacing: voxel size (i, j, k) in mm.
    names: pyradiomics names (``firstorder_Entropy``, ``shape_Sphericity``, ``shape2D_Elongation``,
      ``glcm_Contrast``, ...), all in :data:`NATIVE_FEATURES` (else ValueError naming them).
    bin_width: pyradiomics' binWidth (image units) for entropy, uniformity and textures.
    force2d: the arrays are [1, j, i]; shape features are shape2D and texture matrices in-plane only
      (pyradiomics' force2D with force2Ddimension 0).
    impl: ``auto`` (numpy for CPU arrays whose mask's bounding box holds at most
      ``native_small.SMALL_BOX_VOXELS`` voxels, where it is several times faster; torch otherwise),
      ``torch`` or ``numpy`` to force one (the values agree to rounding).

    Returns ``{name: float}``; every value is NaN when the mask has fewer than 2 voxels (pyradiomics
    refuses single-voxel masks). The arrays are cropped to the mask's bounding box first.
    """
    if impl not in ("auto", "torch", "numpy"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'numpy', got {impl!r}.")
    plan = _plan(tuple(names), bool(force2d))
    if impl == "numpy" or (impl == "auto" and _on_cpu(image) and _on_cpu(mask)):
        img = _as_numpy_image(image)
        msk = _as_numpy_mask(mask)
        if img.shape != msk.shape or img.ndim != 3:
            raise ValueError(f"image and mask must be [k, j, i] arrays of the same shape, got {tuple(img.shape)} and {tuple(msk.shape)}.")
        if force2d and img.shape[0] != 1:
            raise ValueError(f"force2d needs arrays of shape [1, j, i], got {tuple(img.shape)}.")
        if not plan.names or np.count_nonzero(msk) < 2:
            return {n: float("nan") for n in plan.names}
        box = _bbox(msk)
        img, msk = img[box], msk[box]
        if impl == "numpy" or msk.size <= native_small.SMALL_BOX_VOXELS:
            out = native_small.compute(img, msk, spacing, plan, bin_width, bool(force2d))
            return {n: float(out[n]) for n in plan.names}
        image, mask = torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(msk))
    return _compute_torch(image, mask, spacing, plan, bin_width, force2d)


def _compute_torch(image, mask, spacing, plan: _Plan, bin_width: float, force2d: bool) -> dict[str, float]:
    """The torch implementation of :func:`compute_native` (any device)."""
    names = list(plan.names)
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
    values = img[msk]
    out: dict[str, torch.Tensor] = {}
    tex = set(plan.texture_full)
    fo = set(plan.firstorder_full)
    hist = None
    if plan.levels:
        level = discretize(values, bin_width)  # computed once, shared by entropy and the textures
        hist = torch.bincount(level)
    if fo:
        out.update(native_firstorder.compute(values, fo, bin_width, sx * sy * sz, hist))
    if plan.shape3d_full:
        out.update(native_shape.compute_3d(msk, (sz, sy, sx), set(plan.shape3d_full)))
    if plan.shape2d_full:
        out.update(native_shape.compute_2d(msk[0], (sy, sx), set(plan.shape2d_full)))
    if tex:
        lv = Levels.build(msk, level, hist)
        for prefix, fn in TEXTURE_CLASSES.items():
            sel = {n for n in tex if n.startswith(prefix)}
            if sel:
                out.update(fn(lv, force2d, sel))
    if plan.numpy_only_full:  # no torch version: numpy on the CPU copy of the crop
        only = _Plan(tuple(sorted(plan.numpy_only_full)), frozenset(), frozenset(), frozenset(), frozenset(),
                     frozenset(), frozenset(), frozenset(), frozenset(), frozenset(), True,
                     glrlm=plan.glrlm, glszm=plan.glszm, numpy_only_full=plan.numpy_only_full)
        np_img = img.cpu().numpy() if img.dtype in (torch.float32, torch.float64) else img.float().cpu().numpy()
        out.update(native_small.compute(np_img, msk.cpu().numpy(), spacing, only, bin_width, bool(force2d)))
    for n in names:
        v = out.get(n)
        if v is not None:
            result[n] = float(v)
    return result
