"""Typed configurations of an analysis. Every field lands in ``run.json``.

Units: ``step`` is in image units (HU for CT) per unit of the objective's gradient with respect to
the image in those units (the paper's alpha in ``X <- X + alpha * dI/dX``); with
``normalize_gradient`` it is the largest change of any voxel in one step, in image units.
Sizes in voxels; ``roi_size`` in the network's spatial order ([D,] H, W).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from numpy import bool_ as np_bool

from .errors import ConfigError

PAPER_FEATURES_3D = (
    "firstorder_RootMeanSquared",
    "firstorder_Entropy",
    "shape_Maximum3DDiameter",
    "shape_Elongation",
    "shape_Sphericity",
    "glcm_Contrast",
    "gldm_LargeDependenceEmphasis",
)
PAPER_FEATURES_2D = (
    "firstorder_RootMeanSquared",
    "firstorder_Entropy",
    "shape2D_MaximumDiameter",
    "shape2D_Elongation",
    "shape2D_Sphericity",
    "glcm_Contrast",
    "gldm_LargeDependenceEmphasis",
)


def paper_features(spatial_dims: int) -> tuple[str, ...]:
    """The paper's default features (first-order RMS and entropy, shape maximum diameter,
    elongation and sphericity, GLCM contrast, GLDM large dependence emphasis) for 2D or 3D."""
    return PAPER_FEATURES_2D if spatial_dims == 2 else PAPER_FEATURES_3D


@dataclass
class DreamConfig:
    """The gradient-ascent loop (DESIGN.md, "One analysis, step by step")."""

    iterations: int = 300
    step: float = 1.0
    objective: str = "logit"
    """``logit`` (the target class's logit at the seed) or ``log_odds`` (logit minus logsumexp of
    the other classes' logits; the same for a sigmoid model)."""
    normalize_gradient: bool = False
    update_radius: float | None = None
    """Only voxels within this distance (voxels) of the seed change; None: the whole crop."""
    l2_weight: float = 0.0
    """Regulariser: objective - l2_weight * mean((X - X0)^2) (image units squared)."""
    tv_weight: float = 0.0
    """Regulariser: objective - tv_weight * mean |grad X| (total variation, image units)."""
    stop_probability: float | None = None
    """Optional early stop once the seed probability stayed above this for ``stop_patience`` steps."""
    stop_patience: int = 10
    start: str = "image"
    """``image`` (the given volume) or ``noise`` (white noise, the paper's section 3.1)."""
    noise_mean: float | None = None
    noise_std: float | None = None
    random_seed: int = 0
    roi_size: tuple[int, ...] | None = None
    """Crop size around the seed; default the model card's ``roi_size``."""
    threshold: float = 0.5
    """Probability threshold of the mask."""
    device: str = "auto"

    def validate(self) -> None:
        if not _is_int(self.iterations) or self.iterations < 1:
            raise ConfigError(f"iterations must be a positive integer, got {self.iterations!r}.")
        if not _finite_positive(self.step):
            raise ConfigError(f"step must be a positive number, got {self.step!r}.")
        if not isinstance(self.objective, str) or self.objective not in ("logit", "log_odds"):
            raise ConfigError(f"objective must be 'logit' or 'log_odds', got {self.objective!r}.")
        if not isinstance(self.start, str) or self.start not in ("image", "noise"):
            raise ConfigError(f"start must be 'image' or 'noise', got {self.start!r}.")
        if not _in_unit_interval(self.threshold):
            raise ConfigError(f"threshold must be between 0 and 1, got {self.threshold!r}.")
        if self.stop_probability is not None and not _in_unit_interval(self.stop_probability):
            raise ConfigError(f"stop_probability must be between 0 and 1, got {self.stop_probability!r}.")
        if not _is_int(self.stop_patience) or self.stop_patience < 1:
            raise ConfigError(f"stop_patience must be a positive integer, got {self.stop_patience!r}.")
        if self.update_radius is not None and not _finite_positive(self.update_radius):
            raise ConfigError(f"update_radius must be a positive number of voxels, got {self.update_radius!r}.")
        for name in ("l2_weight", "tv_weight"):
            v = getattr(self, name)
            if not _finite_number(v) or v < 0:
                raise ConfigError(f"{name} must be zero or a positive number, got {v!r}.")
        if self.noise_mean is not None and not _finite_number(self.noise_mean):
            raise ConfigError(f"noise_mean must be a number (image units), got {self.noise_mean!r}.")
        if self.noise_std is not None and not _finite_positive(self.noise_std):
            raise ConfigError(f"noise_std must be a positive number (image units), got {self.noise_std!r}.")
        if not _is_int(self.random_seed) or not 0 <= self.random_seed < 2**63:
            raise ConfigError(f"random_seed must be an integer from 0 to 2**63 - 1, got {self.random_seed!r}.")
        if not isinstance(self.device, str) or (
                self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}.")
        if self.roi_size is not None:
            if (isinstance(self.roi_size, (str, bytes)) or not isinstance(self.roi_size, (tuple, list))
                    or not self.roi_size or any(not _is_int(s) or s < 1 for s in self.roi_size)):
                raise ConfigError(f"roi_size must be positive integers ([D,] H, W), got {self.roi_size!r}.")


@dataclass
class FeatureConfig:
    """Which features to track and how."""

    names: tuple[str, ...] | None = None
    """pyradiomics names (``firstorder_Entropy``) or registered custom names; None: the paper's seven features."""
    backend: str = "auto"
    """``auto`` (native when all requested features exist natively), ``native`` or ``pyradiomics``."""
    every: int = 1
    """Compute features every N-th iteration (and at the last)."""
    bin_width: float = 25.0
    """Grey-level bin width for texture and entropy (image units), as pyradiomics' binWidth."""
    min_mask_voxels: int = 2
    """Fewer mask voxels than this give NaN features."""
    custom: dict[str, str] = field(default_factory=dict)
    """name -> ``module:function`` of user-defined features f(image, mask, spacing) -> float."""

    def validate(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in ("auto", "native", "pyradiomics"):
            raise ConfigError(f"feature backend must be auto, native or pyradiomics, got {self.backend!r}.")
        if not _is_int(self.every) or self.every < 1:
            raise ConfigError(f"feature interval must be a positive integer, got {self.every!r}.")
        if not _finite_positive(self.bin_width):
            raise ConfigError(f"bin_width must be positive, got {self.bin_width!r}.")
        if not _is_int(self.min_mask_voxels) or self.min_mask_voxels < 0:
            raise ConfigError(f"min_mask_voxels must be zero or a positive integer, got {self.min_mask_voxels!r}.")
        if self.names is not None and (isinstance(self.names, (str, bytes)) or not isinstance(self.names, (tuple, list))
                                       or not all(isinstance(n, str) for n in self.names)):
            raise ConfigError(f"feature names must be a list of names such as ('firstorder_Entropy',), got {self.names!r}.")
        if not isinstance(self.custom, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.custom.items()):
            raise ConfigError(f"custom features must map a name to 'module:function', got {self.custom!r}.")


@dataclass
class AnalysisConfig:
    """Everything one analysis needs besides the image, the seed and the model."""

    dream: DreamConfig = field(default_factory=DreamConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    snapshot_every: int = 10
    """Keep image and probability crops every N-th iteration (and the first and last)."""
    max_snapshots: int = 200
    """Cap on kept snapshots; beyond it every other one is dropped (memory stays bounded)."""

    def validate(self) -> None:
        self.dream.validate()
        self.features.validate()
        if not _is_int(self.snapshot_every) or self.snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be a positive integer, got {self.snapshot_every!r}.")
        if not _is_int(self.max_snapshots) or self.max_snapshots < 2:
            raise ConfigError(f"max_snapshots must be at least 2, got {self.max_snapshots!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np_bool))


def _finite_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np_bool)) and math.isfinite(v)


def _in_unit_interval(v) -> bool:
    return _finite_number(v) and 0.0 < v < 1.0


def _finite_positive(v) -> bool:
    return _finite_number(v) and v > 0


DEFAULT_ITERATIONS = 300
DEFAULT_STEP = 1.0


def card_dream_settings(card) -> dict:
    """The model card's recommended dream settings (``{"step": ..., "iterations": ...}``; {} if none)."""
    if card is None:
        return {}
    rec = getattr(card, "dream", None) or (getattr(card, "extra", None) or {}).get("dream") or {}
    return dict(rec) if isinstance(rec, dict) else {}


def dream_settings(card, iterations=None, step=None) -> tuple[int, float, str]:
    """(iterations, step, where they came from): the caller's values, else the card's
    recommendation, else 300 iterations at step 1.0."""
    rec = card_dream_settings(card)
    sources = []

    def pick(name, given, default):
        if given is not None:
            value, src = given, "as given"
        elif rec.get(name) is not None:
            value, src = rec[name], "from the model card"
        else:
            value, src = default, "from the default"
        sources.append(f"{name} {value:g} {src}")
        return value

    iterations = int(pick("iterations", None if iterations is None else int(iterations), DEFAULT_ITERATIONS))
    step = float(pick("step", None if step is None else float(step), DEFAULT_STEP))
    return int(iterations), float(step), ", ".join(sources)
