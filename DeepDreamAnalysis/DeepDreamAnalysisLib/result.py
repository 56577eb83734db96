"""What one analysis returns: the curves, the snapshots and the metadata.

Axis order: snapshot arrays are crops ``[k, j, i]`` of the input volume (a 2D model's crop has
``k`` size 1); ``Crop.start`` and ``Crop.size`` are ``(k, j, i)`` voxel indices into the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BASE_COLUMNS = ("iteration", "objective", "probability", "mask_voxels")


@dataclass(frozen=True)
class Crop:
    """The region of the volume the loop works on: ``volume[k0:k0+dk, j0:j0+dj, i0:i0+di]``."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))  # type: ignore[return-value]

    def paste(self, full: np.ndarray, crop: np.ndarray) -> np.ndarray:
        """A copy of ``full`` ([k, j, i]) with ``crop`` written into this region."""
        out = np.array(full, copy=True)
        out[self.slices] = crop
        return out


@dataclass
class Step:
    """One recorded iteration: the values before the update of that iteration.

    ``features`` holds raw values by pyradiomics name; NaN while the mask is empty or too small
    or when features were not computed at this iteration.
    """

    iteration: int
    objective: float
    probability: float
    mask_voxels: int
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    """The dreamed image (image units, e.g. HU) and the network's probability on the crop."""

    iteration: int
    image: np.ndarray
    probability: np.ndarray
    mask: np.ndarray


@dataclass
class AnalysisResult:
    """Curves, snapshots and metadata of one analysis.

    ``status`` is ``completed``, ``stopped`` (the optional probability stop), ``cancelled`` (the
    user stopped it; the result holds everything up to then) or ``fault`` (see ``metadata['fault']``).
    ``quality_flags`` say whether the dream can be trusted (:mod:`.engine.quality`).
    """

    steps: list[Step]
    snapshots: list[Snapshot]
    crop: Crop
    feature_names: tuple[str, ...]
    reference: Any = None  # ReferenceStats or None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"
    quality_flags: list = field(default_factory=list)
    """:class:`~.engine.quality.QualityFlag` s of the run (docs/quality-flags.md); empty: no check fired."""

    @property
    def trustworthy(self) -> bool:
        """True when no quality check fired (``quality_flags`` is empty)."""
        return not self.quality_flags

    @property
    def iterations(self) -> np.ndarray:
        return np.array([s.iteration for s in self.steps], dtype=int)

    def column(self, name: str) -> np.ndarray:
        """One curve by column name (see :meth:`columns`)."""
        if name in BASE_COLUMNS:
            return np.array([getattr(s, name) for s in self.steps], dtype=float)
        if name.endswith("_z") and name[:-2] in self.feature_names:
            return self.zscores(name[:-2])
        if name in self.feature_names:
            return np.array([s.features.get(name, math.nan) for s in self.steps], dtype=float)
        raise KeyError(f"No curve named {name!r}; known: {', '.join(self.columns())}")

    def zscores(self, feature: str) -> np.ndarray:
        """``(f - mean) / std`` against the reference statistics; NaN without a reference."""
        raw = self.column(feature)
        if self.reference is None or feature not in self.reference:
            return np.full_like(raw, math.nan)
        return self.reference.zscore(feature, raw)

    @property
    def normalised(self) -> bool:
        return self.reference is not None

    def columns(self) -> list[str]:
        cols = list(BASE_COLUMNS)
        cols += list(self.feature_names)
        if self.normalised:
            cols += [f"{f}_z" for f in self.feature_names]
        return cols

    def table(self) -> dict[str, np.ndarray]:
        """All curves as columns of equal length, one row per recorded iteration."""
        return {c: self.column(c) for c in self.columns()}

    def first_iteration_above(self, probability: float = 0.5) -> int | None:
        """The first iteration where the seed probability passed ``probability`` (None if never)."""
        for s in self.steps:
            if s.probability > probability:
                return s.iteration
        return None

    def snapshot_at(self, iteration: int) -> Snapshot:
        """The snapshot recorded at, or last before, ``iteration``."""
        best = None
        for snap in self.snapshots:
            if snap.iteration <= iteration:
                best = snap
        if best is None:
            raise KeyError(f"No snapshot at or before iteration {iteration}.")
        return best


@dataclass
class Progress:
    """What the loop reports after each iteration (to a callback or through the runner's queue).

    ``snapshot`` is set only at snapshot iterations. ``eta_s`` is the estimated time left, seconds.
    ``late_steps`` are earlier steps whose features (computed in a worker process) have just
    arrived: redraw those rows.
    """

    step: Step
    snapshot: Snapshot | None
    total_iterations: int
    elapsed_s: float
    eta_s: float
    late_steps: list[Step] = field(default_factory=list)
