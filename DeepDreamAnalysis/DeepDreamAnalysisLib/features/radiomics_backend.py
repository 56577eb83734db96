r"""Radiomic features computed by pyradiomics, on a crop around the mask.

What is computed, and how it matches a plain pyradiomics run:

1. The image and mask are cropped to the mask's bounding box grown by :data:`PAD` voxels in every
   direction (clipped to the array). pyradiomics is slow on big images; the features depend only on
   the masked voxels (and, for the shape mesh, on the mask's border), so the crop does not change
   any value.
2. SimpleITK images are built with the volume's spacing ``(i, j, k)`` in mm (origin 0, identity
   direction: no feature depends on them). Image voxels are float64; the mask is 1 inside, 0 outside.
3. pyradiomics' feature classes are called directly (what ``RadiomicsFeatureExtractor.execute``
   does after its checks, without its overhead) with the settings ``binWidth = bin_width``,
   ``label = 1``, no resampling, no normalisation, no resegmentation, ``distances = [1]``, and for
   2D models ``force2D = True, force2Ddimension = 0`` (the arrays are one axial slice ``[1, j, i]``;
   texture matrices use in-plane neighbours only and shape features come from the ``shape2D``
   class). Only the requested features are enabled.
4. Names are ``<class>_<feature>``: pyradiomics' ``original_glcm_Contrast`` is ``glcm_Contrast``.

A feature pyradiomics cannot compute on a degenerate mask (for example a one-row mask, where the
shape's minor axis or the GLCM of one direction is undefined) is NaN; no exception escapes. The
``radiomics`` logger is set to WARNING, and pyradiomics' per-feature ``FAILED`` error messages are
turned into DEBUG records (they are expected while the dreamed object is tiny).

The paper's features, with pyradiomics' definitions. :math:`\mathbf{X}` are the :math:`N_p`
intensities inside the mask, :math:`p(i)` the normalised histogram of the grey levels after binning
with ``binWidth`` (bins :math:`\lfloor X/\mathrm{binWidth}\rfloor - \lfloor \min X/\mathrm{binWidth}\rfloor + 1`),
:math:`\epsilon` machine epsilon:

- ``firstorder_RootMeanSquared`` :math:`= \sqrt{\frac{1}{N_p}\sum_{k=1}^{N_p} X(k)^2}` (image units, HU).
- ``firstorder_Entropy`` :math:`= -\sum_{i=1}^{N_g} p(i)\log_2\big(p(i)+\epsilon\big)` (bits).
- ``shape_Maximum3DDiameter``: the largest Euclidean distance (mm) between two vertices of the
  triangle mesh of the mask's surface (marching cubes). 2D: ``shape2D_MaximumDiameter``, the largest
  distance between vertices of the in-plane contour mesh.
- ``shape_Elongation`` :math:`= \sqrt{\lambda_{minor}/\lambda_{major}}`, with
  :math:`\lambda_{major}\ge\lambda_{minor}` the two largest eigenvalues of the covariance of the mask
  voxels' physical coordinates (1 for a round object, toward 0 for an elongated one). 2D: the two
  in-plane eigenvalues (``shape2D_Elongation``).
- ``shape_Sphericity`` :math:`= \frac{\sqrt[3]{36\pi V^2}}{A}` with :math:`V` the mesh volume and
  :math:`A` the mesh surface area (1 for a sphere, less otherwise). 2D: ``shape2D_Sphericity``
  :math:`= \frac{2\sqrt{\pi A}}{P}` with :math:`A` the mesh surface and :math:`P` the perimeter.
- ``glcm_Contrast`` :math:`= \sum_{i=1}^{N_g}\sum_{j=1}^{N_g}(i-j)^2 p(i,j)`, with :math:`p(i,j)`
  the normalised, symmetric grey-level co-occurrence matrix at distance 1, computed per direction
  (13 in 3D, 4 in 2D) and averaged over directions.
- ``gldm_LargeDependenceEmphasis`` :math:`= \frac{\sum_{i=1}^{N_g}\sum_{j=1}^{N_d} P(i,j)\,j^2}{N_z}`,
  with :math:`P(i,j)` the number of voxels of grey level :math:`i` with :math:`j` dependent
  neighbours (neighbours at distance 1 whose grey level differs by at most :math:`\alpha = 0`,
  the voxel itself counted) and :math:`N_z = \sum P(i,j)` the number of voxels.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np

from .catalog import split_name

PAD = 2
"""Voxels kept around the mask's bounding box in the crop given to pyradiomics."""

INSTALL_HINT = (
    'pip install numpy versioneer setuptools wheel && pip install --no-build-isolation "pyradiomics>=3.0" '
    "(in 3D Slicer: install the SlicerRadiomics extension)"
)

_quiet_done = False


def radiomics_available() -> bool:
    """True when ``import radiomics`` works."""
    try:
        import radiomics  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


class _DemoteFailures(logging.Filter):
    """pyradiomics logs ``FAILED: <traceback>`` at ERROR for each feature it cannot compute; we
    return NaN for it (documented), so the record goes down to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("FAILED"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # handlers without a level would still print it: pass it on only when debugging
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _quiet() -> None:
    global _quiet_done
    if _quiet_done:
        return
    logging.getLogger("radiomics").setLevel(logging.WARNING)
    flt = _DemoteFailures()
    for cls in ("firstorder", "shape", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm"):
        logging.getLogger(f"radiomics.{cls}").addFilter(flt)
    _quiet_done = True


def bounding_box(mask: np.ndarray, pad: int = PAD) -> tuple[slice, ...]:
    """Slices ``[k, j, i]`` of ``mask``'s bounding box grown by ``pad`` voxels (clipped to the array)."""
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(a.min()) - pad, 0), min(int(a.max()) + pad + 1, n)) for a, n in zip(idx, mask.shape)
    )


def settings(bin_width: float, force2d: bool) -> dict:
    """The pyradiomics settings used (see the module docstring)."""
    return {
        "binWidth": float(bin_width),
        "label": 1,
        "force2D": bool(force2d),
        "force2Ddimension": 0,
        "distances": [1],
        "resampledPixelSpacing": None,
        "normalize": False,
        "resegmentRange": None,
        "additionalInfo": False,
    }


def to_sitk(image: np.ndarray, mask: np.ndarray, spacing) -> tuple:
    """SimpleITK images (float64 image, uint8 mask) of ``[k, j, i]`` arrays with ``spacing`` (i, j, k) mm."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float64))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    sp = tuple(float(s) for s in spacing)
    img.SetSpacing(sp)
    msk.SetSpacing(sp)
    return img, msk


def compute_radiomics(image: np.ndarray, mask: np.ndarray, spacing, names: Iterable[str],
                      bin_width: float = 25.0, force2d: bool = False) -> dict[str, float]:
    """pyradiomics values of ``names`` for ``image`` (float ``[k, j, i]``) inside ``mask`` (bool, same shape).

    ``spacing`` is (i, j, k) in mm. Returns ``{name: float}`` with NaN for an empty mask and for
    any feature pyradiomics cannot compute here. Raises ImportError only if pyradiomics is missing.
    """
    names = list(names)
    out = {n: math.nan for n in names}
    mask = np.asarray(mask, dtype=bool)
    if not names or not mask.any():
        return out
    from radiomics import getFeatureClasses

    _quiet()
    box = bounding_box(mask)
    img, msk = to_sitk(np.asarray(image)[box], mask[box], spacing)
    by_class: dict[str, list[str]] = {}
    for n in names:
        cls, feat = split_name(n)
        by_class.setdefault(cls, []).append(feat)
    classes = getFeatureClasses()
    kwargs = settings(bin_width, force2d)
    for cls, feats in by_class.items():
        try:
            with np.errstate(all="ignore"):
                fc = classes[cls](img, msk, **kwargs)
                for f in feats:
                    fc.enableFeatureByName(f)
                values = fc.execute()
        except Exception as exc:  # noqa: BLE001 - undefined on this mask: NaN, never an exception
            logging.getLogger(__name__).debug("pyradiomics %s failed on this mask (%s): NaN", cls, exc)
            continue
        for f in feats:
            try:
                v = float(np.asarray(values.get(f, math.nan)))
            except (TypeError, ValueError):
                v = math.nan
            out[f"{cls}_{f}"] = v
    return out
