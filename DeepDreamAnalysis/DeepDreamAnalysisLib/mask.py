"""The dreamed object's mask: the connected component of ``probability > threshold`` at the seed.

Axis order: arrays ``[k, j, i]``; the seed is given as ``(k, j, i)`` into the same array.
Connectivity: face neighbours (6 in 3D, 4 within a single slice), as SimpleITK's
``ConnectedThreshold``.
"""

from __future__ import annotations

import numpy as np


def seed_component(probability: np.ndarray, seed_kji: tuple[int, int, int], threshold: float = 0.5) -> np.ndarray:
    """Boolean mask of the component of ``probability > threshold`` that contains the seed.

    Empty when the seed itself is not above the threshold.
    """
    import SimpleITK as sitk

    above = np.asarray(probability) > threshold
    if not above[tuple(seed_kji)]:
        return np.zeros(above.shape, dtype=bool)
    if above.all():
        return above
    img = sitk.GetImageFromArray(above.astype(np.uint8))
    k, j, i = (int(v) for v in seed_kji)
    seg = sitk.ConnectedThreshold(img, seedList=[(i, j, k)], lower=1, upper=1)
    return sitk.GetArrayViewFromImage(seg).astype(bool)
