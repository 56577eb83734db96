"""A scalar image with its geometry, and reading/writing it with SimpleITK.

Axis order: ``Volume.array`` is indexed ``[k, j, i]`` (slowest to fastest), as SimpleITK's
``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return it. ``spacing`` and ``origin`` are in
``(i, j, k)`` order, millimetres, as SimpleITK and Slicer report them. ``direction`` is the 3x3
matrix whose columns are the i, j, k axis directions in LPS (SimpleITK's convention); the Slicer
bridge converts to RAS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageError, SeedError


@dataclass
class Volume:
    """A 3D scalar image. ``array`` is float32 ``[k, j, i]`` in the image's own units (HU for CT)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        if arr.ndim != 3:
            raise ImageError(
                f"Expected a 2D or 3D scalar image, got an array of shape {arr.shape}. "
                "Give a single-component volume (not a 4D series or a vector image)."
            )
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ImageError(f"Image voxels must be real numbers, got dtype {arr.dtype}.")
        self.array = arr.astype(np.float32, copy=False)
        try:
            spacing = tuple(float(s) for s in self.spacing)
        except (TypeError, ValueError):
            spacing = ()
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ImageError(f"Voxel spacing must be three positive numbers (mm, i j k), got {self.spacing!r}.")
        self.spacing = spacing
        try:
            self.origin = tuple(float(o) for o in self.origin)
            self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        except (TypeError, ValueError):
            raise ImageError(
                f"The image origin must be three numbers and its direction a 3x3 matrix, got {self.origin!r} "
                f"and {self.direction!r}."
            ) from None
        if len(self.origin) != 3 or not np.isfinite(self.origin).all() or not np.isfinite(self.direction).all():
            raise ImageError(f"The image origin and direction must be finite numbers, got {self.origin!r}.")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size along (i, j, k)."""
        k, j, i = self.array.shape
        return (i, j, k)

    def check_seed(self, seed_ijk) -> tuple[int, int, int]:
        """Round ``seed_ijk`` (i, j, k) to integers and check it lies inside the volume."""
        try:
            seed = tuple(int(round(float(v))) for v in seed_ijk)
        except (TypeError, ValueError, OverflowError):
            raise SeedError(f"The seed must be three finite numbers i,j,k; got {seed_ijk!r}.") from None
        if len(seed) != 3:
            raise SeedError(f"The seed must be three numbers i,j,k; got {seed_ijk!r}.")
        size = self.shape_ijk
        if any(s < 0 or s >= n for s, n in zip(seed, size)):
            raise SeedError(
                f"Seed (i,j,k)={seed} is outside the volume, whose voxel indices run from (0,0,0) "
                f"to {tuple(n - 1 for n in size)}. Pick a seed inside the image."
            )
        return seed  # type: ignore[return-value]

    def check_finite(self) -> None:
        """Raise if the image holds NaN or infinite voxels."""
        bad = ~np.isfinite(self.array)
        if bad.any():
            raise ImageError(
                f"The image holds {int(bad.sum())} NaN or infinite voxels. Replace them (for example "
                "with the background value) before running the analysis."
            )

    def index_to_physical(self, ijk) -> np.ndarray:
        """Physical (LPS, mm) position of continuous index ``ijk``."""
        return np.asarray(self.origin) + self.direction @ (np.asarray(ijk, float) * np.asarray(self.spacing))


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a scalar image (NIfTI, NRRD, MHA, a DICOM folder...) into a :class:`Volume`."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise ImageError(f"Image file not found: {p}. Check the path.")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(p))
            if not files:
                raise ImageError(f"{p} is a folder without a DICOM series. Give an image file or a DICOM folder.")
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(p))
    except ImageError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ImageError(
            f"Cannot read {p} as an image ({first[:200]}). Give a NIfTI (.nii/.nii.gz), NRRD, MHA "
            "file or a DICOM folder."
        ) from None
    return volume_from_sitk(img, source=str(p))


def volume_from_sitk(img, source: str = "image") -> Volume:
    """Convert a SimpleITK image to a :class:`Volume` (2D images become one-slice volumes)."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{source} has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar "
            "(grey-level) image is needed. Extract one channel first."
        )
    dim = img.GetDimension()
    if dim == 4:
        size = img.GetSize()
        if size[3] != 1:
            raise ImageError(
                f"{source} is a 4D image ({size[3]} time points); a 3D volume is needed. "
                "Extract one time point first."
            )
        img = sitk.Extract(img, list(size[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim not in (2, 3):
        raise ImageError(f"{source} has {dim} dimensions; a 2D or 3D image is needed.")
    arr = sitk.GetArrayFromImage(img)
    if dim == 2:
        spacing = tuple(img.GetSpacing()) + (1.0,)
        origin = tuple(img.GetOrigin()) + (0.0,)
        d2 = np.asarray(img.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
    else:
        spacing, origin = img.GetSpacing(), img.GetOrigin()
        direction = np.asarray(img.GetDirection()).reshape(3, 3)
    return Volume(arr, spacing, origin, direction)


def volume_to_sitk(volume: Volume, array: np.ndarray | None = None):
    """A SimpleITK image with ``volume``'s geometry and ``array`` (default: its own voxels)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(volume.array if array is None else array)
    img.SetSpacing(volume.spacing)
    img.SetOrigin(volume.origin)
    img.SetDirection(tuple(volume.direction.ravel()))
    return img
