"""The step in image units: a model-independent size of one update.

Every method except ``paper`` changes the largest voxel by exactly ``step`` image units (HU for CT)
per iteration: the update direction is normalised by its largest absolute value. When no step is
given, it is :data:`DEFAULT_STEP_FRACTION` of the card's intensity scale (:func:`intensity_scale`),
so the same default carries from a CT network windowed on [-100, 250] HU to an MRI network
normalised by its standard deviation (calibration: docs/dream-methods.md).
"""

from __future__ import annotations

DEFAULT_STEP_FRACTION = 0.01
"""Default step: this fraction of the intensity scale per iteration (e.g. 3.5 HU for a 350 HU window)."""


def intensity_scale(card) -> float:
    """The size of the network's intensity window in image units: ``max - min`` of a ``window``
    preprocessing, ``4 * std`` of a ``normalize`` one, else a tenth of the card's intensity range."""
    pre = card.preprocessing
    if pre.type == "window":
        return float(pre.max - pre.min)
    if pre.type == "normalize":
        return 4.0 * float(pre.std)
    low, high = card.intensity_range
    return float(high - low) / 10.0


def default_step(card) -> float:
    """The step (image units per iteration) used when neither the user nor the card gives one."""
    return DEFAULT_STEP_FRACTION * intensity_scale(card)


def normalised(direction):
    """``direction / max|direction|``: the largest voxel moves by exactly one image unit."""
    return direction / direction.abs().max().clamp_min(1e-30)
