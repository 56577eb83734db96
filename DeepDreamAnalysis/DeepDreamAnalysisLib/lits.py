"""LiTS volume 117: loading it, and "healthy" axial slices with the tumours inpainted away.

The data: LiTS training volume 117, downscaled to 128 x 128 x 128 voxels, in HU, with labels
0 background / 1 liver / 2 tumour, as shipped inside the PyPI package
``liver-ct-segmentation-package==1.6.0``. ``make data`` fetches it into ``data/lits117/``
(``img_117.mrc``, ``lab_117.mrc``). Licence: CC BY-NC-SA 4.0 (LiTS); never commit it.

Axis order: arrays are ``[k, j, i]``; axis 0 (k) is axial, so ``image[k]`` is an axial slice
``[j, i]``.

Spacing: the MRC files do not record the voxel spacing. We *assume* 1.6 mm in-plane (i, j) and
3.0 mm between slices (k), i.e. ``ASSUMED_SPACING = (1.6, 1.6, 3.0)`` in (i, j, k) order. Every
Volume and NIfTI file made here carries that assumed spacing.

Healthy slice: every axial slice of volume 117 holds tumours. :func:`inpaint_tumours` replaces the
dilated tumour voxels inside the liver by liver-like texture: the local mean of the surrounding
healthy liver (normalised convolution with a wide Gaussian) plus Gaussian noise, lightly smoothed
and scaled so that its standard deviation matches the robust standard deviation of the healthy
liver of that slice. The result is a slice with no lesion whose liver label covers the former
tumours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError
from .synthetic import binary_dilation, distance_to_outside, gaussian_filter as _gaussian
from .volume import Volume

ASSUMED_SPACING = (1.6, 1.6, 3.0)
"""Voxel spacing (i, j, k) in mm assumed for LiTS 117 (not recorded in the MRC files)."""

LIVER, TUMOUR = 1, 2

DEMO_SLICE = 44
"""Axial slice of the demo start image (in the held-out validation block of the demo training)."""

VALIDATION_BLOCK = range(38, 51)
"""Axial slices held out for validation in the demo training (scripts/training.py)."""

VALIDATION_GAP = 3
"""Slices on either side of the validation block that are used neither for training nor validation."""


def default_data_dir() -> Path:
    """``$DEEPDREAM_LITS_DIR`` if set, else ``data/lits117`` at the repository root."""
    env = os.environ.get("DEEPDREAM_LITS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data" / "lits117"


def load_lits117(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read LiTS volume 117: ``(image, labels)``, both ``[k, j, i]`` = 128^3.

    ``image`` is float32 HU; ``labels`` is uint8 with 0 background, 1 liver, 2 tumour.
    Raises :class:`ImageError` telling to run ``make data`` when the files are absent.
    """
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    img_path, lab_path = folder / "img_117.mrc", folder / "lab_117.mrc"
    missing = [p for p in (img_path, lab_path) if not p.is_file()]
    if missing:
        raise ImageError(
            f"LiTS volume 117 not found: {', '.join(str(p) for p in missing)} missing. Run `make data` "
            "in the repository (it fetches liver-ct-segmentation-package==1.6.0 from PyPI and copies "
            "img_117.mrc and lab_117.mrc into data/lits117/), or set DEEPDREAM_LITS_DIR to the folder "
            "that holds them."
        )
    try:
        import mrcfile
    except ImportError:
        raise ImageError("Reading LiTS 117 needs the mrcfile package: pip install mrcfile.") from None
    try:
        with mrcfile.open(img_path, permissive=True) as f:
            image = np.array(f.data, dtype=np.float32)
        with mrcfile.open(lab_path, permissive=True) as f:
            labels = np.array(f.data).astype(np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageError(f"Cannot read LiTS 117 from {folder} ({exc}). Delete data/lits117 and run `make data` again.") from None
    if image is None or image.shape != labels.shape or image.ndim != 3:
        raise ImageError(f"LiTS 117 in {folder} is damaged (shapes {image.shape} and {labels.shape}). Run `make data` again.")
    return image, labels


@dataclass
class HealthySlice:
    """One axial slice with its tumours inpainted away.

    ``image``: float32 ``[j, i]`` HU with no lesion; ``liver``: bool ``[j, i]``, the liver including
    the former tumours; ``inpainted``: bool ``[j, i]``, the voxels that were replaced; ``k``: the
    slice index in the volume; ``tumour``: bool ``[j, i]``, the original tumour label.
    """

    image: np.ndarray
    liver: np.ndarray
    inpainted: np.ndarray
    tumour: np.ndarray
    k: int


def inpaint_tumours(
    image2d: np.ndarray,
    labels2d: np.ndarray,
    rng: np.random.Generator,
    dilation: int = 3,
    smooth_sigma: float = 0.6,
    mean_sigma: float = 6.0,
    dark_hu: float | None = 25.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the tumours of one axial slice by healthy-liver-like texture.

    ``image2d`` float HU ``[j, i]``; ``labels2d`` 0/1/2 ``[j, i]``. The replaced region is the
    tumour label dilated by ``dilation`` voxels, restricted to liver or tumour. Its voxels get
    ``local_mean + s * smooth(noise)`` where ``local_mean`` is the Gaussian-weighted (``mean_sigma``
    voxels) mean of the healthy liver around them and ``s`` makes the smoothed noise's standard
    deviation equal to the robust standard deviation (1.4826 x MAD) of the healthy liver.

    Unlabelled dark spots count as tumours too (the labels miss some small lesions): with
    ``dark_hu`` set, liver voxels more than 3 voxels inside the liver whose Gaussian-smoothed
    (sigma 1.5 voxels) intensity is more than ``dark_hu`` HU below the liver median are added to
    the tumour label before dilation. Returns ``(healthy_image, replaced_mask)``.
    """
    tumour = labels2d == TUMOUR
    organ = (labels2d == LIVER) | tumour
    if dark_hu is not None and organ.any():
        median0 = float(np.median(image2d[organ & ~tumour])) if (organ & ~tumour).any() else float(np.median(image2d[organ]))
        dark = (_gaussian(image2d, 1.5) < median0 - dark_hu) & (distance_to_outside(organ) > 3)
        tumour = tumour | dark
    region = binary_dilation(tumour, iterations=dilation) & organ if dilation > 0 else tumour.copy()
    healthy = organ & ~region
    out = np.array(image2d, dtype=np.float32, copy=True)
    if not region.any():
        return out, region
    if healthy.sum() < 50:
        raise ImageError("This slice has too little healthy liver to inpaint its tumours; pick another slice.")
    values = image2d[healthy]
    median = float(np.median(values))
    robust_std = float(1.4826 * np.median(np.abs(values - median)))
    # normalised convolution: the local mean of healthy liver, extended into the tumours
    weight = _gaussian(healthy, mean_sigma)
    local = _gaussian(np.where(healthy, image2d, 0.0), mean_sigma)
    local_mean = np.where(weight > 1e-3, local / np.maximum(weight, 1e-12), median)
    # where the healthy neighbourhood is thin (a tumour wider than a few sigma), fall back to the median
    local_mean = np.where(weight > 0.05, local_mean, median)
    noise = _gaussian(rng.standard_normal(image2d.shape), smooth_sigma)
    noise = noise / noise.std() * robust_std
    out[region] = (local_mean + noise)[region].astype(np.float32)
    return out, region


def healthy_slice(
    image: np.ndarray, labels: np.ndarray, k: int, seed: int = 0, dilation: int = 3
) -> HealthySlice:
    """Axial slice ``k`` of ``image``/``labels`` (``[k, j, i]``) with its tumours inpainted.

    Deterministic for a given ``seed`` (the noise generator is ``np.random.default_rng((seed, k))``).
    """
    if not 0 <= k < image.shape[0]:
        raise ImageError(f"Slice {k} is outside the volume (0..{image.shape[0] - 1}).")
    rng = np.random.default_rng((seed, k))
    lab = labels[k]
    img, region = inpaint_tumours(image[k], lab, rng, dilation=dilation)
    liver = (lab == LIVER) | (lab == TUMOUR)
    return HealthySlice(image=img, liver=liver, inpainted=region, tumour=lab == TUMOUR, k=k)


def slice_volume(image2d: np.ndarray, k: int = 0) -> Volume:
    """A one-slice :class:`Volume` (``[1, j, i]``) with the assumed spacing (1.6, 1.6, 3.0) mm.

    The origin puts the slice at its physical height ``k * 3.0`` mm, so that it lines up with
    the full volume read with the same assumed spacing.
    """
    return Volume(np.asarray(image2d, np.float32)[np.newaxis], spacing=ASSUMED_SPACING, origin=(0.0, 0.0, k * ASSUMED_SPACING[2]))


def choose_seed(liver: np.ndarray, avoid: np.ndarray | None = None, border: int = 16) -> tuple[int, int]:
    """A seed ``(i, j)`` deep inside ``liver`` (bool ``[j, i]``), away from the image border.

    Picks the liver voxel farthest (Euclidean) from the liver boundary, among the voxels not in
    ``avoid`` and at least ``border`` voxels from the image edge. Ties go to the smallest (j, i), so
    the choice is deterministic.
    """
    dist = distance_to_outside(liver)
    if avoid is not None:
        dist[avoid] = 0
    dist[:border, :] = 0
    dist[-border:, :] = 0
    dist[:, :border] = 0
    dist[:, -border:] = 0
    if dist.max() <= 0:
        raise ImageError("No liver voxel far enough from the image border to place a seed.")
    j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(i), int(j)


def demo_case(data_dir: str | os.PathLike | None = None, k: int = DEMO_SLICE) -> tuple[Volume, tuple[int, int, int]]:
    """The demo's start image and seed: ``(Volume [1, j, i] HU, seed (i, j, 0))``.

    The image is axial slice ``k`` (default 44, in the demo network's held-out validation block)
    of LiTS 117 with its tumours inpainted (:func:`healthy_slice`, noise seed 0), as a one-slice
    Volume with the *assumed* spacing (1.6, 1.6, 3.0) mm. The seed is the liver voxel farthest from
    the liver boundary, at least 16 voxels from the image border
    (:func:`choose_seed`); on slice 44 it falls inside an inpainted former tumour, which the demo
    network sees as healthy liver (probability about 1e-5). Deterministic.
    """
    image, labels = load_lits117(data_dir)
    hs = healthy_slice(image, labels, k)
    i, j = choose_seed(hs.liver)
    return slice_volume(hs.image, k), (i, j, 0)


def save_volume_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` as NIfTI (``.nii`` or ``.nii.gz``) atomically; returns the path."""
    import SimpleITK as sitk

    from .atomic import atomic_path
    from .volume import volume_to_sitk

    target = Path(path)
    with atomic_path(target) as tmp:
        sitk.WriteImage(volume_to_sitk(volume), str(tmp))
    return target


def save_demo_case(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> tuple[Path, tuple[int, int, int]]:
    """Write the demo's healthy slice as NIfTI (assumed spacing 1.6, 1.6, 3.0 mm); returns (path, seed)."""
    volume, seed = demo_case(data_dir)
    return save_volume_nifti(volume, path), seed
