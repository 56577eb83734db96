"""The amplitude spectrum of real lesions, measured on a reference set (numpy only).

The ``lesion-spectrum`` dream method (:mod:`.phase`) keeps the amplitude spectrum of the dream
change fixed to the one real lesions make, and optimises only its phase (MACO, Fel et al. 2023,
with the amplitude taken from the reference lesions instead of natural images).

What is measured, per reference lesion (a connected component of the reference mask, as for the
feature statistics, :func:`~DeepDreamAnalysisLib.reference.lesion_components`): the change the
lesion makes to its surroundings, ``c = (I - b) * mask``, ``b`` the median of the image around the
lesion (the component's box, grown by a margin, outside the lesion), in image units. Its discrete
Fourier transform, zero-padded to at least :data:`PATCH_MM` millimetres per axis, times the voxel
volume (mm^d), approximates the continuous transform: a magnitude in image units x mm^d that does
not depend on the patch size or the voxel spacing. Its magnitude is averaged within rings of
:data:`BIN_WIDTH` cycles/mm (the radial frequency ``|f|``, from the real, possibly anisotropic,
spacing), then averaged over the lesions: one radial profile, stored in the reference statistics
file (``"spectrum"``).

On a crop, :meth:`LesionSpectrum.on_grid` evaluates the profile at each DFT frequency of the crop's
own grid and spacing and divides by the crop's voxel volume: the DFT magnitudes a mean lesion's
change would have on that crop. Frequencies above the highest one the reference measured get 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ReferenceStatsError

PATCH_MM = 128.0
"""Each lesion's change is zero-padded to at least this many millimetres per axis before its DFT
(so every ring of :data:`BIN_WIDTH` holds at least one frequency)."""

BIN_WIDTH = 1.0 / PATCH_MM
"""Width of the radial frequency rings, cycles/mm."""

FORMAT = "lesion-amplitude-profile"


@dataclass(frozen=True)
class LesionSpectrum:
    """Mean amplitude of the reference lesions' change against the radial frequency.

    ``frequency``: ring centres, cycles/mm (increasing); ``amplitude``: mean DFT magnitude x voxel
    volume, image units x mm^``spatial_dims``; ``spatial_dims``: 2 (axial slices, in-plane
    frequencies) or 3; ``lesions``: how many lesions were averaged.
    """

    frequency: tuple[float, ...]
    amplitude: tuple[float, ...]
    spatial_dims: int
    lesions: int

    def to_dict(self) -> dict:
        return {"format": FORMAT, "spatial_dims": self.spatial_dims, "lesions": self.lesions,
                "frequency_per_mm": list(self.frequency), "amplitude": list(self.amplitude)}

    @classmethod
    def from_dict(cls, data, where: str = "the reference statistics") -> "LesionSpectrum":
        """Read and check a ``"spectrum"`` block; ReferenceStatsError names what is wrong and the fix."""
        fix = "Recompute the file with `deepdream-analysis reference`."
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ReferenceStatsError(f"{where}: 'spectrum' must be an object with format {FORMAT!r}. {fix}")
        f, a = data.get("frequency_per_mm"), data.get("amplitude")
        dims, lesions = data.get("spatial_dims"), data.get("lesions")
        ok = (isinstance(f, list) and isinstance(a, list) and len(f) == len(a) >= 2
              and all(_finite(v) for v in f + a) and all(v >= 0 for v in f + a)
              and all(y > x for x, y in zip(f, f[1:])) and any(v > 0 for v in a)
              and dims in (2, 3) and not isinstance(dims, bool)
              and isinstance(lesions, int) and not isinstance(lesions, bool) and lesions >= 1)
        if not ok:
            raise ReferenceStatsError(
                f"{where}: the lesion spectrum must hold increasing frequencies (cycles/mm) and as many "
                f"non-negative finite amplitudes (at least two), spatial_dims 2 or 3 and a lesion count >= 1. {fix}")
        return cls(tuple(float(v) for v in f), tuple(float(v) for v in a), int(dims), int(lesions))

    def on_grid(self, shape: tuple[int, ...], spacing_mm: tuple[float, ...]) -> np.ndarray:
        """DFT magnitudes (image units) of a mean lesion's change on a grid of ``shape`` voxels of
        ``spacing_mm`` (same axis order, e.g. ``[j, i]`` or ``[k, j, i]``), for ``numpy.fft.fftn``'s
        layout. The self-conjugate frequencies (the mean, and Nyquist along even axes) get 0, so a
        change built on them with antisymmetric phases is real with exactly these magnitudes."""
        if len(shape) != self.spatial_dims:
            raise ConfigError(
                f"The reference lesion spectrum is {self.spatial_dims}D but the network dreams in {len(shape)}D. "
                f"Compute the reference with `deepdream-analysis reference ... --dims {len(shape)}`.")
        grids = np.meshgrid(*[np.fft.fftfreq(n, d=float(sp)) for n, sp in zip(shape, spacing_mm)], indexing="ij")
        radius = np.sqrt(sum(g ** 2 for g in grids))
        amp = np.interp(radius, self.frequency, self.amplitude, left=self.amplitude[0], right=0.0)
        amp = amp / float(np.prod([float(s) for s in spacing_mm]))
        amp[self_conjugate(shape)] = 0.0
        return amp


def self_conjugate(shape: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the DFT bins equal to their own negative (index ``n == -n mod N`` on every axis)."""
    masks = np.meshgrid(*[(np.arange(n) == (-np.arange(n)) % n) for n in shape], indexing="ij")
    return np.logical_and.reduce(masks)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class SpectrumAccumulator:
    """Averages the radial amplitude profiles of lesions one at a time (for ``compute_reference``)."""

    def __init__(self, spatial_dims: int, margin: int = 4):
        self.spatial_dims = int(spatial_dims)
        self.margin = margin
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.lesions = 0

    def add(self, image_box: np.ndarray, lesion: np.ndarray, spacing_ijk) -> None:
        """One lesion: ``image_box`` [k, j, i] (image units) around it and its boolean mask ``lesion``
        (same shape; a 2D reference's boxes are one slice thick). ``spacing_ijk``: mm, (i, j, k)."""
        image = np.asarray(image_box, dtype=np.float64)
        lesion = np.asarray(lesion, dtype=bool)
        spacing_kji = tuple(float(s) for s in tuple(spacing_ijk)[::-1])
        if self.spatial_dims == 2:
            image, lesion, spacing = image[0], lesion[0], spacing_kji[1:]
        else:
            spacing = spacing_kji
        around = ~lesion
        if not around.any() or not lesion.any():
            return
        change = np.where(lesion, image - np.median(image[around]), 0.0)
        pad = [max(int(math.ceil(PATCH_MM / sp)), n) for n, sp in zip(change.shape, spacing)]
        magnitude = np.abs(np.fft.fftn(change, s=pad, axes=tuple(range(change.ndim)))) * float(np.prod(spacing))
        grids = np.meshgrid(*[np.fft.fftfreq(n, d=sp) for n, sp in zip(pad, spacing)], indexing="ij")
        ring = np.floor(np.sqrt(sum(g ** 2 for g in grids)) / BIN_WIDTH).astype(np.int64).ravel()
        sums = np.bincount(ring, weights=magnitude.ravel())
        counts = np.bincount(ring)
        for r in np.nonzero(counts)[0]:
            self.sums[int(r)] = self.sums.get(int(r), 0.0) + float(sums[r] / counts[r])
            self.counts[int(r)] = self.counts.get(int(r), 0) + 1
        self.lesions += 1

    def result(self) -> LesionSpectrum | None:
        """The mean profile (each ring averaged over the lesions whose spacing reaches it), or None
        without lesions."""
        if not self.lesions:
            return None
        rings = sorted(self.sums)
        freq = tuple((r + 0.5) * BIN_WIDTH for r in rings)
        amp = tuple(self.sums[r] / self.counts[r] for r in rings)
        return LesionSpectrum(freq, amp, self.spatial_dims, self.lesions)


def spectrum_for(method: str, reference) -> LesionSpectrum | None:
    """The reference's lesion spectrum when ``method`` needs one (``lesion-spectrum``), else None.

    Raises ConfigError naming the fix when the method needs reference lesions and ``reference`` is
    None, or when the reference statistics were computed without a spectrum.
    """
    from .registry import needs_reference

    if not needs_reference(method):
        return None
    if reference is None:
        raise ConfigError(
            f"The dream method {method!r} takes its amplitude spectrum from real lesions, but no reference was "
            "given. Give reference statistics: --reference stats.json on the command line (compute them with "
            "`deepdream-analysis reference --images IMG... --masks MASK... --out stats.json`), reference= in "
            "Python (run_analysis(..., reference=ReferenceStats.load('stats.json'))), or the panel's reference "
            "file; or choose a method without it (e.g. --method robust+spectral).")
    spectrum = getattr(reference, "spectrum", None)
    if spectrum is None:
        where = getattr(reference, "source", None) or "The reference statistics"
        raise ConfigError(
            f"{where} holds no lesion spectrum (it was computed before the lesion-spectrum method existed, or "
            f"by hand), and the dream method {method!r} needs it. Recompute it with `deepdream-analysis "
            "reference --images IMG... --masks MASK... --out stats.json`, or choose another method.")
    return spectrum
