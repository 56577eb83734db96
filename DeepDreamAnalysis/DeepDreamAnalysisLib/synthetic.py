"""Synthetic liver lesions and the 135-degree line marking, for training demo and study networks.

Everything here works on one axial slice: arrays are ``[j, i]`` (rows, columns), intensities in HU,
``spacing`` is ``(i, j)`` in mm. Generators take a ``numpy.random.Generator`` and are
deterministic for a given one.

- :class:`HypointenseLesions`: the paper's section 3.2 synthetic tumours: lower the intensity in
  random round (or elongated) regions of healthy liver, with soft edges. With a lesion weight
  ``w(x)`` in [0, 1] (1 inside, a linear ramp of width ``edge_mm`` across the boundary, 0 outside),
  the image becomes ``X - c * w`` for a contrast ``c`` HU drawn per lesion; the label is
  ``w >= 0.5`` (the voxels inside the nominal boundary), restricted to the liver.
- :class:`LineMarking`: the paper's section 3.1 marking: a texture of line segments at 135 degrees
  with random positions and intensities, added inside a lesion.
- :class:`MarkedLesions`: lesions of a base generator, each marked with probability ``p``.

Orientation convention (used by the marking, :func:`line_kernel` and :func:`line_response`): an
angle is measured counter-clockwise from the +i axis as the slice is displayed, with row j = 0 at
the top. 0 degrees runs along a row (left to right); 90 degrees runs up the screen; 135 degrees runs
from the bottom-right to the top-left, i.e. along ``array[j0 + t, i0 + t]`` (the array's main
diagonal direction). Use :func:`line_response` with ``angle_deg=135`` for the paper's
"characteristic feature" so that the marking and the feature agree.

The small image operations (Gaussian filter, dilation, distance map) live here too, so that the
package needs no SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- image operations


def gaussian_filter(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter of a 2D array (float64), edges extended ("nearest")."""
    a = np.asarray(a, dtype=np.float64)
    if sigma <= 0:
        return a.copy()
    radius = max(1, int(math.ceil(4 * sigma)))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(p, len(kernel), axis=axis)
        out = windows @ kernel
    return out


def binary_dilation(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Dilate a 2D boolean mask with the 4-connected cross, ``iterations`` times."""
    m = np.asarray(mask, dtype=bool).copy()
    for _ in range(int(iterations)):
        d = m.copy()
        d[1:, :] |= m[:-1, :]
        d[:-1, :] |= m[1:, :]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        m = d
    return m


def distance_to_outside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of each ``True`` voxel to the nearest ``False`` voxel or the
    image edge (voxels outside the array count as ``False``); 0 outside the mask."""
    import SimpleITK as sitk

    m = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    img = sitk.GetImageFromArray(m)
    dist = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=False)
    )[1:-1, 1:-1]
    return np.clip(dist, 0, None).astype(np.float64)


def line_kernel(angle_deg: float = 135.0, length: int = 7) -> np.ndarray:
    """A zero-mean ``length x length`` line-segment kernel at ``angle_deg`` (convention above).

    The segment through the centre gets ``1/n`` on its ``n`` voxels (bilinear footprint of the
    ideal segment, normalised to sum 1), minus the box mean ``1/length^2`` everywhere, so the
    response to a constant image is 0 and the response to a unit-intensity line along the kernel
    is about 1.
    """
    if length < 3 or length % 2 == 0:
        raise ValueError("length must be an odd integer >= 3")
    r = length // 2
    theta = math.radians(angle_deg)
    di, dj = math.cos(theta), -math.sin(theta)  # screen "up" is -j
    k = np.zeros((length, length))
    for t in np.linspace(-r, r, 8 * length):
        i, j = r + t * di, r + t * dj
        i0, j0 = int(math.floor(i)), int(math.floor(j))
        fi, fj = i - i0, j - j0
        for jj, ii, w in ((j0, i0, (1 - fi) * (1 - fj)), (j0, i0 + 1, fi * (1 - fj)), (j0 + 1, i0, (1 - fi) * fj), (j0 + 1, i0 + 1, fi * fj)):
            if 0 <= jj < length and 0 <= ii < length:
                k[jj, ii] += w
    k /= k.sum()
    return k - 1.0 / (length * length)


def line_response(image: np.ndarray, angle_deg: float = 135.0, length: int = 7) -> np.ndarray:
    """Correlation of a 2D ``image`` ``[j, i]`` with :func:`line_kernel` (same size, edges
    extended). The paper's characteristic feature is the maximum of this response (inside a mask
    or a window around the seed)."""
    k = line_kernel(angle_deg, length)
    r = length // 2
    p = np.pad(np.asarray(image, dtype=np.float64), r, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(p, k.shape)
    return np.einsum("abij,ij->ab", windows, k)


# ----------------------------------------------------------------------------- lesions


def _pick_range(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(lo if hi <= lo else rng.uniform(lo, hi))


@dataclass
class HypointenseLesions:
    """Random hypointense lesions inside the liver (the paper's section 3.2 synthetic tumours).

    ``shape``: ``"round"`` (discs) or ``"elongated"`` (ellipses of axis ratio ``axis_ratio`` with
    the area of a disc of the drawn radius, at a random orientation). ``count``: inclusive range of
    lesions per slice. ``radius_mm``: range of the (equivalent) radius. ``contrast_hu``: range of the
    intensity drop inside the lesion. ``edge_mm``: width of the linear ramp across the boundary.
    ``spacing``: ``(i, j)`` mm (the LiTS 117 assumption 1.6 mm by default). ``min_depth_mm``: a
    lesion centre lies at least ``radius + min_depth_mm`` inside the liver when there is room.

    Call with ``(image [j, i] HU, liver bool [j, i], rng)``; returns ``(image, label bool)``.
    :meth:`generate` also returns the list of per-lesion labels.
    """

    shape: str = "round"
    count: tuple[int, int] = (1, 3)
    radius_mm: tuple[float, float] = (4.0, 12.0)
    contrast_hu: tuple[float, float] = (30.0, 70.0)
    edge_mm: float = 2.0
    axis_ratio: tuple[float, float] = (2.5, 4.0)
    spacing: tuple[float, float] = (1.6, 1.6)
    min_depth_mm: float = 2.0

    def __post_init__(self):
        if self.shape not in ("round", "elongated"):
            raise ValueError(f"shape must be 'round' or 'elongated', got {self.shape!r}")

    def __call__(self, image, liver, rng):
        img, label, _ = self.generate(image, liver, rng)
        return img, label

    def generate(self, image: np.ndarray, liver: np.ndarray, rng: np.random.Generator):
        """``(image, label, lesions)``: the image with lesions, their union, and each one's label."""
        image = np.asarray(image, dtype=np.float32)
        liver = np.asarray(liver, dtype=bool)
        drop = np.zeros(image.shape, dtype=np.float64)
        lesions: list[np.ndarray] = []
        if not liver.any():
            return image.copy(), np.zeros(image.shape, bool), lesions
        depth = distance_to_outside(liver) * min(self.spacing)
        jj, ii = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        x_mm, y_mm = ii * self.spacing[0], jj * self.spacing[1]
        n = int(rng.integers(self.count[0], self.count[1] + 1))
        for _ in range(n):
            radius = _pick_range(rng, self.radius_mm)
            room = depth >= radius + self.min_depth_mm
            if not room.any():
                radius = max(1.5 * min(self.spacing), float(depth.max()) - self.min_depth_mm)
                room = depth >= depth.max() - 1e-6
            cj, ci = np.nonzero(room)
            pick = int(rng.integers(len(cj)))
            cx, cy = ci[pick] * self.spacing[0], cj[pick] * self.spacing[1]
            if self.shape == "round":
                r = np.hypot(x_mm - cx, y_mm - cy) / radius
            else:
                ratio = _pick_range(rng, self.axis_ratio)
                a, b = radius * math.sqrt(ratio), radius / math.sqrt(ratio)
                phi = rng.uniform(0, math.pi)
                u = (x_mm - cx) * math.cos(phi) + (y_mm - cy) * math.sin(phi)
                v = -(x_mm - cx) * math.sin(phi) + (y_mm - cy) * math.cos(phi)
                r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            # signed distance to the boundary in mm (approximate for ellipses), then a linear ramp
            signed = (1.0 - r) * radius
            w = np.clip(signed / max(self.edge_mm, 1e-6) + 0.5, 0.0, 1.0) * liver
            contrast = _pick_range(rng, self.contrast_hu)
            drop = np.maximum(drop, contrast * w)
            lesion = (w >= 0.5) & liver
            if lesion.any():
                lesions.append(lesion)
        out = (image - drop).astype(np.float32)
        label = np.zeros(image.shape, bool)
        for lesion in lesions:
            label |= lesion
        return out, label, lesions


@dataclass
class LineMarking:
    """The paper's section 3.1 marking: 135-degree line segments at random positions and intensities.

    Inside a lesion of ``A`` voxels, ``max(min_segments, round(A * density))`` segments are drawn,
    each centred on a random lesion voxel, ``length`` voxels long (odd range, inclusive), along
    ``angle_deg`` (convention in the module docstring: 135 degrees runs along
    ``array[j0 + t, i0 + t]``), with an intensity drawn from ``intensity_hu`` (added to the image).
    Only voxels inside the lesion are changed.

    ``width``: ``None`` (the default) rasterises each segment one voxel wide (the voxel nearest to
    each point of the segment gets the full intensity). A number (voxels) draws an anti-aliased
    segment of that width instead: a voxel at distance ``d`` (voxels) from the ideal segment gets
    ``amp * clip(width / 2 + 1/2 - d, 0, 1)`` (a box profile of ``width`` voxels averaged over one
    voxel). The random draws (positions, lengths, intensities) are the same for every ``width``.
    Where segments overlap, the brighter value wins.
    """

    angle_deg: float = 135.0
    density: float = 1.0 / 15.0
    min_segments: int = 2
    length: tuple[int, int] = (5, 11)
    intensity_hu: tuple[float, float] = (40.0, 120.0)
    width: float | None = None

    def apply(self, image: np.ndarray, lesion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``image`` (``[j, i]`` HU) with the marking added inside ``lesion`` (bool ``[j, i]``)."""
        out = np.asarray(image, dtype=np.float32).copy()
        lj, li = np.nonzero(lesion)
        if len(lj) == 0:
            return out
        theta = math.radians(self.angle_deg)
        di, dj = math.cos(theta), -math.sin(theta)
        texture = np.zeros(out.shape, dtype=np.float64)
        n = max(self.min_segments, int(round(len(lj) * self.density)))
        for _ in range(n):
            pick = int(rng.integers(len(lj)))
            length = int(rng.integers(self.length[0], self.length[1] + 1))
            amp = _pick_range(rng, self.intensity_hu)
            half = (length - 1) / 2.0
            if self.width is not None:
                _draw_antialiased(texture, lj[pick], li[pick], di, dj, half, float(self.width), amp)
                continue
            for t in np.arange(-half, half + 1):
                j = int(round(lj[pick] + t * dj))
                i = int(round(li[pick] + t * di))
                if 0 <= j < out.shape[0] and 0 <= i < out.shape[1]:
                    texture[j, i] = max(texture[j, i], amp)
        out += (texture * lesion).astype(np.float32)
        return out


def _draw_antialiased(texture: np.ndarray, cj: float, ci: float, di: float, dj: float, half: float, width: float,
                      amp: float) -> None:
    """Draw into ``texture`` (max) a segment centred at voxel ``(cj, ci)``, direction ``(di, dj)``
    in (i, j), ``half`` voxels from its centre to each end, ``width`` voxels wide, anti-aliased."""
    reach = int(math.ceil(half + width / 2.0 + 1.0))
    j0, j1 = max(int(cj) - reach, 0), min(int(cj) + reach + 1, texture.shape[0])
    i0, i1 = max(int(ci) - reach, 0), min(int(ci) + reach + 1, texture.shape[1])
    if j0 >= j1 or i0 >= i1:
        return
    jj, ii = np.mgrid[j0:j1, i0:i1].astype(np.float64)
    along = (ii - ci) * di + (jj - cj) * dj
    across = np.abs(-(ii - ci) * dj + (jj - cj) * di)
    dist = np.hypot(across, np.clip(np.abs(along) - half, 0.0, None))
    value = amp * np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0)
    np.maximum(texture[j0:j1, i0:i1], value, out=texture[j0:j1, i0:i1])


@dataclass
class MarkedLesions:
    """Lesions of ``base``, each marked by ``marking`` with probability ``p`` (the paper's G_p)."""

    base: HypointenseLesions = field(default_factory=HypointenseLesions)
    p: float = 1.0
    marking: LineMarking = field(default_factory=LineMarking)

    def __call__(self, image, liver, rng):
        img, label, lesions = self.base.generate(image, liver, rng)
        for lesion in lesions:
            if rng.random() < self.p:
                img = self.marking.apply(img, lesion, rng)
        return img, label
