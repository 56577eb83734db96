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

from .dreaming.registry import resolve_options
from .errors import ConfigError, ModelCardError

OBJECTIVES = ("auto", "logit", "log_odds")


def resolve_objective(objective: str, card) -> str:
    """``auto`` -> ``log_odds`` for a softmax network with more than two classes (another class may
    rise faster than the target: only the log-odds make the target win), else ``logit``."""
    if objective != "auto":
        return objective
    return "log_odds" if card.activation == "softmax" and card.out_channels > 2 else "logit"

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
    step: float | None = None
    """``paper``: alpha in X <- X + alpha * dI/dX (None: 1.0). Every other method: the largest change
    of any voxel per iteration in image units (HU for CT); None: 1% of the card's intensity window
    (:func:`DeepDreamAnalysisLib.dreaming.default_step`)."""
    objective: str = "auto"
    """``logit`` (the target class's logit at the seed), ``log_odds`` (logit minus logsumexp of
    the other classes' logits; the same for a sigmoid model) or ``auto``: log-odds for a softmax
    network with more than two classes, the logit otherwise."""
    method: str = "robust+spectral"
    """How to dream (docs/dream-methods.md, :func:`DeepDreamAnalysisLib.dreaming.list_methods`):
    ``paper`` or components joined with ``+`` (``robust+spectral``)."""
    method_options: dict = field(default_factory=dict)
    """Options of the method's components (``{"copies": 4, "decay": 1.0}``), validated per method."""
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
        if self.step is not None and not _finite_positive(self.step):
            raise ConfigError(f"step must be a positive number, got {self.step!r}.")
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be 'auto', 'logit' or 'log_odds', got {self.objective!r}.")
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a dict such as {{'copies': 4}}, got {self.method_options!r}.")
        resolve_options(self.method, self.method_options)
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
"""The paper method's default alpha (per unit gradient)."""

DREAM_KEYS = ("method", "method_options", "objective", "step", "iterations", "normalize_gradient", "start",
              "noise_mean", "noise_std", "update_radius", "stop_probability", "stop_patience", "threshold",
              "random_seed", "snapshot_every")
"""Every key a model card's ``dream`` block may hold (all DreamConfig fields but roi_size/device, plus
snapshot_every)."""


def card_dream_settings(card) -> dict:
    """The model card's recommended dream settings (its ``dream`` block; {} if none).

    An unknown key raises ModelCardError naming the valid ones.
    """
    if card is None:
        return {}
    rec = getattr(card, "dream", None) or (getattr(card, "extra", None) or {}).get("dream") or {}
    if not isinstance(rec, dict):
        return {}
    unknown = [k for k in rec if k not in DREAM_KEYS]
    if unknown:
        raise ModelCardError(f"The model card's dream block has unknown key(s) {unknown}; valid keys: "
                             f"{', '.join(DREAM_KEYS)} (docs/model-card.md).")
    return dict(rec)


class DreamSettings(tuple):
    """``(iterations, step, sources)`` as before, plus ``values`` (every dream setting that was picked:
    ``{"method": ..., "step": ...}``) and ``sources`` per key; :meth:`config` builds the DreamConfig."""

    values: dict
    origin: dict

    def config(self, **fields) -> DreamConfig:
        """A DreamConfig from the picked values; ``fields`` (roi_size, device...) are added."""
        values = {k: v for k, v in self.values.items() if k != "snapshot_every"}
        return DreamConfig(**{**values, **fields})


def dream_settings(card, iterations=None, step=None, **user) -> DreamSettings:
    """Pick each dream setting: the caller's value (not None), else the card's ``dream`` block, else
    the default (DreamConfig's; the step's default depends on the method: 1.0 for ``paper``, else
    None = 1% of the card's intensity window).

    Returns ``(iterations, step, where they came from)`` (the step may be None: automatic); the
    result's ``values`` holds every setting, given or from the card, and its ``origin`` says where
    each came from.
    """
    rec = card_dream_settings(card)
    unknown = [k for k in user if k not in DREAM_KEYS]
    if unknown:
        raise ConfigError(f"Unknown dream setting(s) {unknown}; valid: {', '.join(DREAM_KEYS)}.")
    user = {**user, "iterations": iterations, "step": step}
    defaults = {f: getattr(DreamConfig(), f) for f in DREAM_KEYS if f in DreamConfig.__dataclass_fields__}
    defaults["snapshot_every"] = 10
    values, origin = {}, {}
    for key in DREAM_KEYS:
        if user.get(key) is not None:
            values[key], origin[key] = user[key], "as given"
        elif rec.get(key) is not None:
            values[key], origin[key] = rec[key], "from the model card"
        else:
            values[key], origin[key] = defaults[key], "from the default"
    if user.get("method") is None and rec.get("step") is not None and rec.get("method") is None:
        # a card written before the methods: its step is the paper's alpha, so the card means the paper
        values["method"], origin["method"] = "paper", "from the model card (a dream.step without dream.method)"
    method = values["method"]
    card_method = rec.get("method") or ("paper" if rec.get("step") is not None else None)
    if origin["step"] == "from the model card" and (card_method == "paper") != (method == "paper"):
        # the card's step is in its method's units (paper: per unit gradient; others: image units)
        values["step"], origin["step"] = None, f"from the default (the card's step is for {card_method})"
    if values["step"] is None and method == "paper":
        values["step"] = DEFAULT_STEP
    values["iterations"] = int(values["iterations"])
    if values["step"] is not None:
        values["step"] = float(values["step"])
    if isinstance(values["method_options"], dict):
        values["method_options"] = dict(values["method_options"])

    def say(key):
        v = values[key]
        shown = "auto" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))
        return f"{key} {shown} {origin[key]}"

    parts = [say("iterations"), say("step")] + [say(k) for k in DREAM_KEYS
                                                  if k not in ("iterations", "step", "snapshot_every")
                                                  and origin[k] != "from the default"]
    out = DreamSettings((values["iterations"], values["step"], ", ".join(parts)))
    out.values, out.origin = values, origin
    return out
