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
        if abs(float(np.linalg.det(self.direction))) < 1e-6:
            raise ImageError(
                "The image's direction matrix is singular (its axes are not independent), so its geometry is "
                "undefined. Fix the header (for example in 3D Slicer: Volumes module, Volume information) and save "
                "it again."
            )
        if self.array.size == 0:
            raise ImageError(f"The image holds no voxels (shape {list(self.array.shape)}, [k, j, i]). Give an image "
                             "with voxels.")

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
    """Read a scalar image (NIfTI, NRRD, MHA, a DICOM folder...) into a :class:`Volume`.

    Before any reader runs: the path must be a regular file or a folder (:func:`.inputs.check_path`:
    FIFOs and devices are refused), a detached data file (MHD/MHA ``ElementDataFile``, NRRD ``data
    file``) too, and the header's voxel count must fit in the memory available. ITK's errors are
    translated into what is wrong with the file; NaN or infinite voxels are reported.
    """
    import SimpleITK as sitk

    from .inputs import check_path

    p = check_path(path, "image", ImageError, folders=True, missing=f"Image file not found: {path}. Check the path.")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(p))
            if not files:
                raise ImageError(f"{p} is a folder without a DICOM series. Give an image file or a DICOM folder.")
            for f in files[:1]:
                check_path(f, "DICOM file", ImageError)
            reader.SetFileNames(files)
            _check_header(sitk, files[0], p, slices=len(files))
            img = reader.Execute()
        else:
            _check_detached_data(p)
            _check_nifti(p)
            _check_header(sitk, str(p), p)
            img = sitk.ReadImage(str(p))
    except ImageError:
        raise
    except RuntimeError as exc:
        raise ImageError(_translate_itk(exc, p)) from None
    volume = volume_from_sitk(img, source=str(p))
    bad = ~np.isfinite(volume.array)
    if bad.any():
        k = np.argwhere(bad)[0]
        raise ImageError(
            f"{p} holds {int(bad.sum())} NaN or infinite voxels (the first at (i,j,k)=({k[2]}, {k[1]}, {k[0]})). "
            "Replace them (for example with the background value) and save the image again."
        )
    return volume


def _check_header(sitk, file: str, p: Path, slices: int = 1) -> None:
    """Refuse an image without voxels, or one whose voxels would not fit in memory, before reading it."""
    from .inputs import available_memory, human_bytes

    info = sitk.ImageFileReader()
    info.SetFileName(file)
    info.ReadImageInformation()
    size = list(info.GetSize())
    if slices > 1:
        size = size[:2] + [slices]
    if not size or min(size) == 0:
        raise ImageError(f"{p} holds no voxels (its size is {' x '.join(str(n) for n in size)}). Give an image with "
                         "voxels; the file may be truncated or written empty.")
    voxels = 1
    for n in size:
        voxels *= int(n)
    voxels *= max(1, int(info.GetNumberOfComponents()))
    need = voxels * (4 + 8)  # the voxels as read (up to 8 bytes) and as float32
    avail = available_memory()
    if avail is not None and need > avail:
        raise ImageError(
            f"{p} is {' x '.join(str(n) for n in size)} voxels; reading it needs about {human_bytes(need)} of memory "
            f"but {human_bytes(avail)} is available. Crop or downsample the image first (the analysis only uses a "
            "region around the seed)."
        )


_NIFTI_FLOATS = {16: np.float32, 64: np.float64}
_NIFTI_MAX_SCAN = 1 << 30  # bytes of float voxels scanned for NaN/Inf in the file itself


def _check_nifti(p: Path) -> None:
    """What ITK hides in a NIfTI file: a zero/NaN spacing (read as 1), NaN/Inf voxels (read as 0), and
    missing voxel data (read as 0)."""
    import gzip
    import struct
    import zlib

    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as fh:
            head = fh.read(352)
            if len(head) < 348:
                return  # ITK says what is wrong
            order = "<" if struct.unpack_from("<i", head, 0)[0] == 348 else ">"
            if struct.unpack_from(order + "i", head, 0)[0] != 348:
                return
            dim = struct.unpack_from(order + "8h", head, 40)
            datatype = struct.unpack_from(order + "h", head, 70)[0]
            bitpix = struct.unpack_from(order + "h", head, 72)[0]
            pixdim = struct.unpack_from(order + "8f", head, 76)
            vox_offset = int(struct.unpack_from(order + "f", head, 108)[0])
            ndim = dim[0] if 1 <= dim[0] <= 7 else 0
            if any(n <= 0 for n in dim[1:ndim + 1]):
                raise ImageError(f"{p} holds no voxels (its header gives the size {list(dim[1:ndim + 1])}). Give an "
                                 "image with voxels; the file may have been written empty.")
            spacing = pixdim[1:min(ndim, 3) + 1]
            if any(not np.isfinite(v) or v == 0 for v in spacing):
                raise ImageError(
                    f"{p} has a voxel spacing of zero or NaN in its header ({[float(v) for v in spacing]}), so its "
                    "geometry is undefined. Fix the spacing (for example in 3D Slicer: Volumes module, Volume "
                    "information) and save the image again."
                )
            voxels = 1
            for n in dim[1:ndim + 1]:
                voxels *= int(n)
            nbytes = voxels * max(bitpix, 8) // 8
            if not name.endswith(".gz") and p.stat().st_size < vox_offset + nbytes:
                raise ImageError(f"{p} is truncated: its header promises {nbytes} bytes of voxels but the file is "
                                 f"{p.stat().st_size} bytes long. Copy or save it again.")
            dtype = _NIFTI_FLOATS.get(datatype)
            if dtype is None or nbytes > _NIFTI_MAX_SCAN:
                return
            fh.seek(vox_offset)
            data = np.frombuffer(fh.read(nbytes), dtype=np.dtype(dtype).newbyteorder(order))
    except (OSError, EOFError, struct.error, ValueError, zlib.error):
        return  # unreadable here: ITK reports it
    bad = ~np.isfinite(data)
    if bad.any():
        raise ImageError(
            f"{p} holds {int(np.isnan(data).sum())} NaN and {int(np.isinf(data).sum())} infinite voxels. Replace them "
            "(for example with the background value) and save the image again; the reader would turn them into 0."
        )


def _check_detached_data(p: Path) -> None:
    """The data file an MHD/MHA or NRRD header names must be a regular file too."""
    from .inputs import check_path

    name = p.name.lower()
    if not name.endswith((".mhd", ".mha", ".nhdr", ".nrrd")):
        return
    try:
        with open(p, "rb") as fh:
            head = fh.read(16384)
    except OSError:
        return
    for line in head.split(b"\n"):
        key, _, value = line.partition(b"=" if name.endswith((".mhd", ".mha")) else b":")
        key = key.strip().lower()
        if key in (b"elementdatafile", b"data file", b"datafile"):
            value = value.strip().decode("utf-8", "replace")
            if value.upper() in ("LOCAL", "") or value.upper().startswith("LIST"):
                return
            data = Path(value) if os.path.isabs(value) else p.parent / value
            check_path(data, "image data file", ImageError)
            return
        if not line.strip() and name.endswith((".nrrd", ".nhdr")):
            return  # end of the NRRD header


def _translate_itk(exc: Exception, p: Path) -> str:
    """ITK's C++ exception text, as what is wrong with the file and what to do."""
    text = str(exc)
    low = text.lower()
    fix = " Fix the header (for example in 3D Slicer: Volumes module, Volume information) and save it again."
    if "spacing" in low and ("zero" in low or "nan" in low or "0" in low):
        return f"{p} has a voxel spacing of zero or NaN in its header, so its geometry is undefined." + fix
    if "direction" in low or "singular" in low or "determinant" in low:
        return (f"{p} has a direction matrix that is singular (its axes are not independent) or not finite, so "
                "its geometry is undefined." + fix)
    if "no imageio" in low or "unable to determine imageio" in low or "could not create io object" in low:
        return (f"Cannot read {p} as an image: no reader recognises its format. Give a NIfTI (.nii/.nii.gz), NRRD, "
                "MHA file or a DICOM folder.")
    if "end of file" in low or "truncated" in low or "premature" in low or "not enough" in low:
        return f"{p} is truncated: its header promises more voxels than the file holds. Copy or save it again."
    first = ""
    for line in text.strip().splitlines():
        line = line.strip()
        if line and not line.startswith(("/", "itk::", "Location", "File:", "Line:", "Description:")) \
                and ".cxx" not in line and ".hxx" not in line and ".h:" not in line:
            first = line
            break
    if not first:
        for line in text.strip().splitlines():
            if "Description:" in line:
                first = line.split("Description:", 1)[1].strip()
                break
    return (f"Cannot read {p} as an image ({first[:200] or 'the reader failed'}). Give a NIfTI (.nii/.nii.gz), "
            "NRRD, MHA file or a DICOM folder.")


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
