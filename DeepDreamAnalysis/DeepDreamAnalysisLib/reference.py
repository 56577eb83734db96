"""Feature statistics of a reference set of real lesions, and z-scores against them.

The paper normalises each feature of the dreamed object by the same feature over the lesions of a
validation set: ``z = (f - mean) / std``; the band ``[-1, 1]`` is the "normal" range.

File format (JSON, written atomically)::

    {
      "format": "deepdream-analysis-reference", "version": 1,
      "features": {"firstorder_Entropy": {"mean": 3.1, "std": 0.4, "n": 57}, ...},
      "settings": {"bin_width": 25.0, "spatial_dims": 2, "min_mask_voxels": 2, "label": null,
                   "backend_of": {...}, "connectivity": "face"},
      "sources": [{"image": "ct.nii.gz", "mask": "seg.nii.gz", "lesions": 12}, ...],
      "lesion_count": 57,
      "spectrum": {"format": "lesion-amplitude-profile", "spatial_dims": 2, "lesions": 57,
                   "frequency_per_mm": [...], "amplitude": [...]}
    }

``std`` is the sample standard deviation (``ddof = 1``) of the feature over the lesions where it is
defined (``n`` of them; NaN values are left out). Lesions: each connected component (face
neighbours) of the mask (voxels equal to ``label``, or all non-zero voxels); for 2D feature sets
each axial slice's components, each computed on that slice alone. ``spectrum`` (optional) is the lesions' mean amplitude spectrum
for the ``lesion-spectrum`` dream method (:mod:`.dreaming.lesion_spectrum`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .atomic import write_text_atomic
from .errors import ImageError, ReferenceStatsError

FORMAT = "deepdream-analysis-reference"
VERSION = 1
CONTEXT_PAD = 8
"""Voxels of image kept around each lesion's bounding box (custom features such as the line filter
read the surroundings; pyradiomics crops again to its own box)."""


def _recompute_hint(names: Iterable[str], path: str | None) -> str:
    out = path or "stats.json"
    return (
        "Recompute the statistics with these features: deepdream-analysis reference --images IMG... "
        f"--masks MASK... --features {','.join(names)} --out {out}"
    )


@dataclass
class ReferenceStats:
    """Per-feature ``mean``, ``std`` (sample, ddof 1) and ``n`` (lesions) of a reference set.

    ``settings`` records how the features were computed (bin_width, spatial_dims, ...);
    ``sources`` the image/mask pairs; ``source`` the file this was loaded from (None if computed).
    Every std is checked to be finite and positive on construction.
    """

    mean: dict[str, float]
    std: dict[str, float]
    n: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    lesion_count: int = 0
    source: str | None = None
    spectrum: Any = None
    """The lesions' mean amplitude spectrum (:class:`~.dreaming.lesion_spectrum.LesionSpectrum`) or None."""

    def __post_init__(self):
        self.mean = {k: float(v) for k, v in self.mean.items()}
        self.std = {k: float(v) for k, v in self.std.items()}
        self.n = {k: int(v) for k, v in self.n.items()}
        where = f" in {self.source}" if self.source else ""
        if set(self.mean) != set(self.std) or set(self.mean) != set(self.n):
            raise ReferenceStatsError(f"Reference statistics{where}: every feature needs mean, std and n.")
        for name in self.mean:
            m, s = self.mean[name], self.std[name]
            if not math.isfinite(m):
                raise ReferenceStatsError(
                    f"Reference statistics{where}: the mean of {name} is {m}. It was not defined on the "
                    "reference lesions; use more (or larger) reference lesions, or leave this feature out."
                )
            if not (math.isfinite(s) and s > 0):
                raise ReferenceStatsError(
                    f"Reference statistics{where}: the standard deviation of {name} is {s} "
                    f"(over {self.n[name]} lesions), so z-scores are undefined. Use more reference lesions "
                    "(at least two different ones), or leave this feature out."
                )

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.mean)

    def __contains__(self, name) -> bool:
        return name in self.mean

    def zscore(self, name: str, values) -> np.ndarray:
        """``(values - mean) / std`` of feature ``name`` (NaN stays NaN)."""
        self.require([name])
        return (np.asarray(values, dtype=float) - self.mean[name]) / self.std[name]

    def require(self, names: Iterable[str]) -> None:
        """Raise ReferenceStatsError naming every feature of ``names`` these statistics lack."""
        names = list(names)
        missing = [n for n in names if n not in self.mean]
        if missing:
            where = self.source or "the reference statistics"
            raise ReferenceStatsError(
                f"{where} has no statistics for {', '.join(missing)} (it has: "
                f"{', '.join(self.features) or 'none'}). {_recompute_hint(names, self.source)}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "version": VERSION,
            "features": {k: {"mean": self.mean[k], "std": self.std[k], "n": self.n[k]} for k in self.mean},
            "settings": self.settings,
            "sources": self.sources,
            "lesion_count": self.lesion_count,
        }
        if self.spectrum is not None:
            out["spectrum"] = self.spectrum.to_dict()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (atomically); returns the path."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read and validate a statistics file written by :meth:`save` (or by hand, same format)."""
        from .inputs import read_json

        p = Path(path)
        try:
            data = read_json(p, "reference statistics file", ReferenceStatsError,
                             missing=f"Reference statistics file not found: {p}. Check the path, or compute one "
                                     "with `deepdream-analysis reference`.")
        except ReferenceStatsError as exc:
            if "not valid JSON" in str(exc):
                raise ReferenceStatsError(f"{exc} Recompute it with `deepdream-analysis reference`.") from None
            raise
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "ReferenceStats":
        where = source or "the reference statistics"
        if not isinstance(data, dict) or not isinstance(data.get("features"), dict):
            raise ReferenceStatsError(
                f"{where} lacks the 'features' object ({{name: {{mean, std, n}}}}). "
                "Recompute it with `deepdream-analysis reference`."
            )
        if not data["features"]:
            raise ReferenceStatsError(f"{where} holds no features. Recompute it with `deepdream-analysis reference`.")
        mean, std, n = {}, {}, {}
        for name, entry in data["features"].items():
            if not isinstance(entry, dict):
                raise ReferenceStatsError(f"{where}: the entry of {name} must be an object with mean, std and n.")
            lacking = [k for k in ("mean", "std", "n") if k not in entry]
            if lacking:
                raise ReferenceStatsError(f"{where}: feature {name} lacks {', '.join(lacking)}.")
            try:
                mean[name] = _number(entry["mean"])
                std[name] = _number(entry["std"])
                count = entry["n"]
                if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) \
                        or float(count) != int(count) or count < 0:
                    raise ValueError
                n[name] = int(count)
            except (TypeError, ValueError, OverflowError):
                raise ReferenceStatsError(f"{where}: the mean, std and n of {name} must be numbers (n a whole number "
                                          f"of lesions), got {entry!r}.") from None
            for key, v in (("mean", mean[name]), ("std", std[name])):
                if math.isinf(v) or abs(v) > MAX_STAT:
                    raise ReferenceStatsError(f"{where}: the {key} of {name} is {v!r}; it must be a finite number "
                                              f"within +-{MAX_STAT:g}. Recompute the file with `deepdream-analysis "
                                              "reference`.")
            if std[name] < 0:
                raise ReferenceStatsError(f"{where}: the std of {name} is negative ({std[name]!r}).")
        settings, sources, lesions = data.get("settings") or {}, data.get("sources") or [], data.get("lesion_count")
        if not isinstance(settings, dict) or not isinstance(sources, list):
            raise ReferenceStatsError(f"{where}: 'settings' must be an object and 'sources' a list. Recompute it with "
                                      "`deepdream-analysis reference`.")
        if lesions is not None and (isinstance(lesions, bool) or not isinstance(lesions, int) or lesions < 0):
            raise ReferenceStatsError(f"{where}: 'lesion_count' must be a whole number, got {lesions!r}.")
        spectrum = None
        if data.get("spectrum") is not None:
            from .dreaming.lesion_spectrum import LesionSpectrum

            spectrum = LesionSpectrum.from_dict(data["spectrum"], where)
        return cls(mean, std, n, settings=dict(settings), sources=list(sources),
                   lesion_count=int(lesions or max(n.values(), default=0)), source=source, spectrum=spectrum)


MAX_STAT = 1e15  # |mean| and std of a feature; beyond it z-scores overflow


def _number(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or isinstance(v, (list, dict)):
        raise TypeError
    return float(v)


def _as_volume(item, role: str):
    from .volume import Volume, read_volume

    if isinstance(item, Volume):
        return item, "<in-memory volume>"
    return read_volume(item), str(item)


def lesion_components(mask: np.ndarray, label: int | None = None, spatial_dims: int = 3,
                      min_voxels: int = 1) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The lesions of a label map ``[k, j, i]`` as boolean masks inside their own boxes.

    Returns a list of ``(box, component_mask)``: ``box`` slices ``[k, j, i]`` of the component's
    bounding box grown by :data:`CONTEXT_PAD` (in-plane only for 2D) and ``component_mask`` bool of
    the box's shape. 2D: components of each axial slice separately (``box`` spans one slice).
    """
    import SimpleITK as sitk

    arr = np.asarray(mask)
    fg = (arr == label) if label is not None else (arr != 0)
    out = []
    planes = [(k, fg[k:k + 1]) for k in range(fg.shape[0])] if spatial_dims == 2 else [(0, fg)]
    for k0, part in planes:
        if not part.any():
            continue
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(part.astype(np.uint8)), False)
        lab = sitk.GetArrayFromImage(cc)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(cc)
        for comp in stats.GetLabels():
            if stats.GetNumberOfPixels(comp) < min_voxels:
                continue
            bi, bj, bk, si, sj, sk = stats.GetBoundingBox(comp)
            pad_k = 0 if spatial_dims == 2 else CONTEXT_PAD
            lo = (max(bk - pad_k, 0), max(bj - CONTEXT_PAD, 0), max(bi - CONTEXT_PAD, 0))
            hi = (min(bk + sk + pad_k, part.shape[0]), min(bj + sj + CONTEXT_PAD, part.shape[1]),
                  min(bi + si + CONTEXT_PAD, part.shape[2]))
            local = tuple(slice(a, b) for a, b in zip(lo, hi))
            box = (slice(lo[0] + k0, hi[0] + k0), local[1], local[2])
            out.append((box, lab[local] == comp))
    return out


def compute_reference(pairs, feature_set, label: int | None = None, on_lesion=None) -> ReferenceStats:
    """Statistics of ``feature_set``'s features over the lesions of image/mask ``pairs``.

    ``pairs``: iterable of ``(image, mask)``, each a path (read with SimpleITK) or a
    :class:`~.volume.Volume`. Each connected component of the mask (voxels equal to ``label``, or all
    non-zero voxels when ``label`` is None) is one lesion; for a 2D feature set each axial slice's
    components are lesions. Components smaller than the feature set's ``min_mask_voxels`` are
    skipped. Features use the image's spacing. ``on_lesion(done, total)`` is called after each
    lesion of a pair (optional progress).

    Raises ImageError when an image and its mask differ in size, ReferenceStatsError when no lesion
    is found or a feature's standard deviation is zero or undefined.
    """
    from .dreaming.lesion_spectrum import SpectrumAccumulator

    names = tuple(feature_set.names)
    spectrum = SpectrumAccumulator(feature_set.spatial_dims)
    min_voxels = max(int(feature_set.config.min_mask_voxels), 1)
    values: dict[str, list[float]] = {n: [] for n in names}
    sources = []
    total = 0
    for image_item, mask_item in pairs:
        image, image_name = _as_volume(image_item, "image")
        mask, mask_name = _as_volume(mask_item, "mask")
        if image.array.shape != mask.array.shape:
            raise ImageError(
                f"Image {image_name} has size (i, j, k) {image.shape_ijk} but mask {mask_name} has "
                f"{mask.shape_ijk}. Give each image with its own mask (same grid)."
            )
        if not np.allclose(image.spacing, mask.spacing, rtol=1e-3):
            import logging

            logging.getLogger(__name__).warning(
                "Mask %s has spacing %s but image %s has %s; the image's spacing is used.",
                mask_name, mask.spacing, image_name, image.spacing)
        comps = lesion_components(np.rint(mask.array).astype(np.int64), label, feature_set.spatial_dims, min_voxels)
        for idx, (box, comp) in enumerate(comps):
            vals = feature_set.compute(image.array[box], comp, image.spacing)
            spectrum.add(image.array[box], comp, image.spacing)
            for n in names:
                v = vals.get(n, math.nan)
                if v is not None and math.isfinite(v):
                    values[n].append(float(v))
            if on_lesion is not None:
                on_lesion(idx + 1, len(comps))
        sources.append({"image": image_name, "mask": mask_name, "lesions": len(comps)})
        total += len(comps)
    if total == 0:
        what = f"label {label}" if label is not None else "non-zero voxels"
        raise ReferenceStatsError(
            f"No lesion of at least {min_voxels} voxels ({what}) was found in the masks. Check the masks and --label."
        )
    mean, std, n = {}, {}, {}
    for name in names:
        v = np.asarray(values[name], dtype=float)
        n[name] = int(v.size)
        mean[name] = float(v.mean()) if v.size else math.nan
        std[name] = float(v.std(ddof=1)) if v.size >= 2 else math.nan
    settings = {
        "bin_width": float(feature_set.config.bin_width),
        "spatial_dims": int(feature_set.spatial_dims),
        "min_mask_voxels": min_voxels,
        "label": label,
        "connectivity": "face",
        "backend_of": dict(getattr(feature_set, "backend_of", {})),
    }
    return ReferenceStats(mean, std, n, settings=settings, sources=sources, lesion_count=total,
                          spectrum=spectrum.result())
