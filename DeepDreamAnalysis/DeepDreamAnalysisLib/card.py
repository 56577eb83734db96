"""The model card: what the tool cannot guess about a segmentation network.

A model card is a small JSON file beside the model (``<model>.card.json`` or ``card.json`` in the
same folder, or given explicitly). Every field is documented in ``docs/model-card.md``.

Axis order: ``roi_size`` is in the network's spatial order, ``[H, W]`` for a 2D model (= ``[j, i]``
of an axial slice) and ``[D, H, W]`` for a 3D model (= ``[k, j, i]``). ``spacing`` is ``(i, j, k)``
in millimetres, as images report it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelCardError

# Sane ranges: a card outside them is a mistake (or an attack), refused before any tensor is made.
MAX_CHANNELS = 4096
MAX_ROI = 4096            # voxels per axis of roi_size
MAX_ROI_VOXELS = 1 << 28  # voxels of the whole roi (a 1 GiB float32 probe)
MAX_SIZE_DIVISIBLE = 1024
MAX_INTENSITY = 1e7       # |image units| (HU are within +-1e4)
MAX_SPACING = 1e5         # mm
MAX_DREAM_ITERATIONS = 1_000_000
MAX_DREAM_STEP = 1e12

REQUIRED_FIELDS = ("spatial_dims", "in_channels", "out_channels", "activation", "target_class", "preprocessing")

CARD_TEMPLATE = {
    "name": "my-liver-lesion-unet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "activation": "softmax",
    "target_class": 1,
    "preprocessing": {"type": "window", "min": -100.0, "max": 250.0},
    "roi_size": [96, 96],
    "spacing": [1.5, 1.5, 1.5],
    "intensity_range": [-1024.0, 3071.0],
}


@dataclass
class Preprocessing:
    """Intensity preprocessing applied inside the autograd graph (never clipped).

    - ``window``: ``x' = (x - min) / (max - min) * (out_max - out_min) + out_min`` (a linear map,
      as MONAI's ScaleIntensityRange without ``clip``).
    - ``normalize``: ``x' = (x - mean) / std``.
    - ``none``: ``x' = x``.
    """

    type: str = "window"
    min: float = -1000.0
    max: float = 1000.0
    out_min: float = 0.0
    out_max: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.type not in ("window", "normalize", "none"):
            raise ModelCardError(
                f"preprocessing.type is {self.type!r}; use 'window' (with min, max), 'normalize' "
                "(with mean, std) or 'none'."
            )
        for name in ("min", "max", "out_min", "out_max", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ModelCardError(f"preprocessing.{name} must be a finite number, got {value!r}.")
            if abs(value) > MAX_INTENSITY:
                raise ModelCardError(f"preprocessing.{name} is {value!r}; it must be within +-{MAX_INTENSITY:g} (image "
                                     "units).")
            setattr(self, name, float(value))
        if self.type == "window" and not self.max > self.min:
            raise ModelCardError(f"preprocessing.max ({self.max}) must be greater than preprocessing.min ({self.min}).")
        if self.type == "normalize" and not self.std > 0:
            raise ModelCardError(f"preprocessing.std must be positive, got {self.std}.")

    @property
    def scale(self) -> float:
        """d(x')/d(x): how much one image unit (HU) moves the network input."""
        if self.type == "window":
            return (self.out_max - self.out_min) / (self.max - self.min)
        if self.type == "normalize":
            return 1.0 / self.std
        return 1.0

    @property
    def offset(self) -> float:
        """``x' = x * scale + offset``."""
        if self.type == "window":
            return self.out_min - self.min * self.scale
        if self.type == "normalize":
            return -self.mean / self.std
        return 0.0

    @property
    def typical_intensity(self) -> tuple[float, float]:
        """(mean, standard deviation) in image units of an image this network expects: the window's
        centre and a sixth of its width (the window spans +-3 sd), the normalisation's mean and sd,
        else (0, 1). The default of a white-noise start, and of the probes of the copies' window."""
        if self.type == "window":
            return (self.min + self.max) / 2, (self.max - self.min) / 6
        if self.type == "normalize":
            return self.mean, self.std
        return 0.0, 1.0


@dataclass
class ModelCard:
    """What the analysis needs to know about a network. See docs/model-card.md."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    activation: str
    target_class: int
    preprocessing: Preprocessing
    name: str = "model"
    roi_size: tuple[int, ...] | None = None
    spacing: tuple[float, float, float] | None = None
    intensity_range: tuple[float, float] = (-1024.0, 3071.0)
    size_divisible: int = 1
    network: dict[str, Any] | None = None
    dream: dict[str, Any] | None = None
    """Recommended dream settings for this network, used when the user gives none:
    ``{"step": 500.0, "iterations": 300}`` (step in image units per unit gradient, see DreamConfig)."""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _int_field(self, "spatial_dims", choices=(2, 3))
        _int_field(self, "in_channels", minimum=1, maximum=MAX_CHANNELS)
        _int_field(self, "out_channels", minimum=1, maximum=MAX_CHANNELS)
        _int_field(self, "target_class", minimum=0)
        _int_field(self, "size_divisible", minimum=1, maximum=MAX_SIZE_DIVISIBLE)
        if self.activation not in ("sigmoid", "softmax"):
            raise ModelCardError(f"activation is {self.activation!r}; use 'sigmoid' or 'softmax'.")
        if self.activation == "softmax" and self.out_channels < 2:
            raise ModelCardError("activation 'softmax' needs out_channels >= 2 (background and target).")
        if self.target_class >= self.out_channels:
            raise ModelCardError(
                f"target_class is {self.target_class} but the model has out_channels={self.out_channels}; "
                f"use a class index from 0 to {self.out_channels - 1}."
            )
        if isinstance(self.preprocessing, dict):
            try:
                self.preprocessing = Preprocessing(**self.preprocessing)
            except TypeError as exc:
                raise ModelCardError(f"preprocessing has an unknown field ({exc}); see docs/model-card.md.") from None
        elif not isinstance(self.preprocessing, Preprocessing):
            raise ModelCardError("preprocessing must be an object such as {\"type\": \"window\", \"min\": -100, \"max\": 250}.")
        if self.roi_size is not None:
            roi = _number_list(self.roi_size, "roi_size", int)
            if len(roi) != self.spatial_dims or min(roi) < 1:
                raise ModelCardError(
                    f"roi_size {list(roi)} must hold {self.spatial_dims} positive sizes (one per spatial "
                    "dimension of the model, in [D,] H, W order)."
                )
            if max(roi) > MAX_ROI or math.prod(roi) > MAX_ROI_VOXELS:
                raise ModelCardError(
                    f"roi_size {list(roi)} is too large: at most {MAX_ROI} voxels per axis and {MAX_ROI_VOXELS} in all "
                    "(the analysis works on a crop around the seed; 96 to 256 per axis is usual)."
                )
            self.roi_size = tuple(roi)
        if self.spacing is not None:
            sp = _number_list(self.spacing, "spacing", float)
            if len(sp) not in (2, 3) or min(sp) <= 0 or max(sp) > MAX_SPACING:
                raise ModelCardError(f"spacing {list(sp)} must be 2 or 3 positive numbers (mm, i j [k] order).")
            self.spacing = tuple(sp)
        rng = _number_list(self.intensity_range, "intensity_range", float)
        if len(rng) != 2 or not rng[1] > rng[0]:
            raise ModelCardError(f"intensity_range {list(rng)} must be [low, high] with low < high.")
        if max(abs(v) for v in rng) > MAX_INTENSITY:
            raise ModelCardError(f"intensity_range {list(rng)} must lie within +-{MAX_INTENSITY:g} (image units; CT is "
                                 "[-1024, 3071]).")
        self.intensity_range = (rng[0], rng[1])
        if self.dream is not None:
            if not isinstance(self.dream, dict):
                raise ModelCardError("dream must be an object such as {\"step\": 500.0, \"iterations\": 300}.")
            for key in ("step", "iterations"):
                v = self.dream.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                      or not math.isfinite(v)):
                    raise ModelCardError(f"dream.{key} must be a positive number, got {v!r}.")
            for key, high in (("iterations", MAX_DREAM_ITERATIONS), ("snapshot_every", MAX_DREAM_ITERATIONS)):
                v = self.dream.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                      or float(v) != int(v) or not 1 <= v <= high):
                    raise ModelCardError(f"dream.{key} must be a whole number from 1 to {high}, got {v!r}.")
            step = self.dream.get("step")
            if isinstance(step, (int, float)) and not isinstance(step, bool) and step > MAX_DREAM_STEP:
                raise ModelCardError(f"dream.step is {step!r}; it must be at most {MAX_DREAM_STEP:g}.")
        if self.network is not None and (not isinstance(self.network, dict) or "name" not in self.network):
            raise ModelCardError(
                "network must be an object like {\"name\": \"monai.networks.nets.UNet\", \"args\": {...}}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model card") -> "ModelCard":
        if not isinstance(data, dict):
            raise ModelCardError(f"{source} must be a JSON object; see docs/model-card.md.")
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise ModelCardError(
                f"{source} lacks the field(s) {', '.join(missing)}. Add them; for example:\n"
                + json.dumps({k: CARD_TEMPLATE[k] for k in missing}, indent=2)
                + "\nSee docs/model-card.md for every field."
            )
        known = set(cls.__dataclass_fields__) - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except ModelCardError as exc:
            raise ModelCardError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        from .inputs import read_json

        p = Path(path)
        data = read_json(p, "model card", ModelCardError, max_bytes=1 << 20,
                         missing=f"Model card not found: {p}. Write one (see docs/model-card.md).")
        return cls.from_dict(data, source=f"Model card {p.name}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        for key in ("roi_size", "spacing", "intensity_range"):
            if d[key] is not None:
                d[key] = list(d[key])
        d.update(extra)
        return d

    def save(self, path: str | Path) -> None:
        from .atomic import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def find_card(model_path: str | Path) -> Path | None:
    """The card beside a model: ``<name>.card.json``, ``<stem>.card.json``, then ``card.json``."""
    p = Path(model_path)
    folder = p if p.is_dir() else p.parent
    candidates = [p.with_name(p.name + ".card.json"), p.with_name(p.stem + ".card.json"), folder / "card.json"]
    if p.is_dir():
        candidates.insert(0, p / "card.json")
    for c in candidates:
        if c.is_file():
            return c
    return None


def _int_field(card, name, choices=None, minimum=None, maximum=None):
    value = getattr(card, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ModelCardError(f"{name} must be an integer, got {value!r}.")
    if choices is not None and value not in choices:
        raise ModelCardError(f"{name} is {value}; it must be one of {choices}.")
    if minimum is not None and value < minimum:
        raise ModelCardError(f"{name} is {value}; it must be at least {minimum}.")
    if maximum is not None and value > maximum:
        raise ModelCardError(f"{name} is {value}; it must be at most {maximum}.")
    setattr(card, name, value)


def _number_list(value, name, kind):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ModelCardError(f"{name} must be a list of numbers, got {value!r}.")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ModelCardError(f"{name} must be a list of numbers, got {list(value)!r}.")
        if kind is int and float(v) != int(v):
            raise ModelCardError(f"{name} must be a list of integers, got {list(value)!r}.")
        out.append(kind(v))
    return out
