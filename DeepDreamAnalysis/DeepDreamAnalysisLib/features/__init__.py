"""Feature sets: which features to compute for (image, mask) pairs, and by which backend.

Usage::

    from DeepDreamAnalysisLib.config import FeatureConfig
    from DeepDreamAnalysisLib.features import build_feature_set
    fs = build_feature_set(FeatureConfig(names=("firstorder_Entropy", "glcm_Contrast")), spatial_dims=3)
    values = fs.compute(image, mask, spacing)   # {"firstorder_Entropy": ..., "glcm_Contrast": ...}

Axis order and units: ``image`` float ``[k, j, i]`` (numpy or torch) in image units (HU for CT),
``mask`` bool of the same shape, ``spacing`` ``(i, j, k)`` in mm. For 2D models the arrays are one
axial slice ``[1, j, i]`` and the features are 2D (pyradiomics ``force2D``, ``shape2D_*`` names).

Backends (``FeatureConfig.backend``):

- ``auto``: each feature by the native torch implementation (``features/native.py``) when it has
  it, by pyradiomics otherwise; when pyradiomics is not installed, the features only it provides
  are dropped with a warning that names them and says how to install it;
- ``native``: all by the native implementation (FeatureError for a feature it lacks);
- ``pyradiomics``: all by pyradiomics (FeatureError with the install command when it is missing).

Custom features (``features/custom.py``) are always computed by their own function; one that takes
a context gets ``compute``'s ``context`` (a :class:`~.custom.FeatureContext`: seed, spacing,
iteration, start image).

An empty mask, or one with fewer than ``config.min_mask_voxels`` voxels, gives NaN for every
feature but the window features (custom features marked ``window=True``, computed whatever the
mask); a feature undefined on a degenerate mask gives NaN for that feature. ``compute`` never
raises for either.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import FeatureConfig, paper_features
from ..errors import FeatureError
from . import custom as _custom
from .catalog import radiomics_names, shape_class, split_name
from .custom import FeatureContext, custom_feature, load_custom, register_feature  # noqa: F401 - public API
from .radiomics_backend import INSTALL_HINT, compute_radiomics, radiomics_available

log = logging.getLogger(__name__)

try:  # engineer D's native torch features; optional
    from .native import NATIVE_FEATURES, compute_native
except ImportError:  # pragma: no cover - depends on what is installed
    NATIVE_FEATURES = frozenset()
    compute_native = None

__all__ = ["FeatureSet", "build_feature_set", "list_features", "register_feature", "load_custom",
           "NATIVE_FEATURES", "FeatureContext", "custom_feature"]


def list_features(spatial_dims: int = 3) -> dict[str, list[str]]:
    """Every available feature name, grouped by class (firstorder, shape or shape2D, glcm, glrlm,
    glszm, gldm, ngtdm, then ``custom`` for the registered custom features)."""
    groups = {g: list(names) for g, names in radiomics_names(spatial_dims).items()}
    groups["custom"] = sorted(_custom.registered())
    return groups


def _all_radiomics(spatial_dims: int) -> set[str]:
    return {n for names in radiomics_names(spatial_dims).values() for n in names}


@dataclass
class FeatureSet:
    """The features to compute, in order, and the backend of each.

    ``names``: tuple of feature names in the requested order. ``backend_of``: name -> ``native``,
    ``pyradiomics`` or ``custom``. ``spatial_dims``: 2 or 3. ``failures``: custom feature name ->
    the first problem it had (raised, or returned a non-number), for the run's metadata; each
    is warned about once.
    """

    names: tuple[str, ...]
    backend_of: dict[str, str]
    spatial_dims: int
    config: FeatureConfig
    custom_functions: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False)

    @property
    def force2d(self) -> bool:
        return self.spatial_dims == 2

    def names_by(self, backend: str) -> tuple[str, ...]:
        return tuple(n for n in self.names if self.backend_of[n] == backend)

    @property
    def window_names(self) -> tuple[str, ...]:
        """The window features: custom features computed whatever the mask (``custom_feature(window=True)``)."""
        return tuple(n for n in self.names_by("custom") if _custom.is_window_feature(self.custom_functions[n]))

    def compute_window(self, image, mask, spacing, context=None) -> dict[str, float]:
        """``{name: value}`` of the window features only."""
        image_np = _to_numpy(image).astype(np.float64, copy=False)
        mask_np = _to_numpy(mask).astype(bool, copy=False)
        return {n: _custom.call_custom(n, self.custom_functions[n], image_np, mask_np, spacing, self.failures, context)
                for n in self.window_names}

    def compute(self, image, mask, spacing, context=None) -> dict[str, float]:
        """``{name: value}`` for every feature of the set (see the module docstring for axes and units);
        ``context``: the :class:`~.custom.FeatureContext` for the custom features that take one."""
        out = {n: math.nan for n in self.names}
        mask_np = _to_numpy(mask).astype(bool, copy=False)
        if tuple(mask_np.shape) != tuple(image.shape):
            raise FeatureError(f"Image {tuple(image.shape)} and mask {tuple(mask_np.shape)} must have the same shape.")
        if mask_np.ndim == 2:
            mask_np = mask_np[None]
            image = image[None]
        if self.force2d and mask_np.shape[0] != 1:
            raise FeatureError(
                f"2D features need one axial slice [1, j, i]; got shape {tuple(mask_np.shape)}. "
                "Compute them slice by slice."
            )
        if int(mask_np.sum()) < max(int(self.config.min_mask_voxels), 1):
            if self.window_names:
                out.update(self.compute_window(image, mask_np, spacing, context))
            return out
        native = self.names_by("native")
        if native:
            out.update(self._native(image, mask_np, spacing, native))
        rest = [n for n in self.names if self.backend_of[n] != "native"]
        if rest:
            image_np = _to_numpy(image).astype(np.float64, copy=False)
            pyr = self.names_by("pyradiomics")
            if pyr:
                out.update(compute_radiomics(image_np, mask_np, spacing, pyr, self.config.bin_width, self.force2d))
            for n in self.names_by("custom"):
                out[n] = _custom.call_custom(n, self.custom_functions[n], image_np, mask_np, spacing, self.failures,
                                             context)
        return {n: out[n] for n in self.names}

    def _native(self, image, mask, spacing, names) -> dict[str, float]:
        try:
            values = compute_native(image, mask, spacing, names, bin_width=self.config.bin_width,
                                    force2d=self.force2d)
            return {n: float(values.get(n, math.nan)) for n in names}
        except Exception as exc:  # noqa: BLE001 - a feature failure is NaN, never a failed run
            if "native" not in self._warned:
                self._warned.add("native")
                log.warning("Native features failed (%s: %s); their values are NaN.", type(exc).__name__, exc)
            return {n: math.nan for n in names}


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _unknown(name: str, spatial_dims: int, known: set[str]) -> FeatureError:
    cls, feat = split_name(name)
    other = "shape" if spatial_dims == 2 else "shape2D"
    if cls == other and feat:
        right = shape_class(spatial_dims)
        return FeatureError(
            f"Feature {name!r} is a {cls} feature, but the model is {spatial_dims}D: use {right}_* names "
            f"(see `deepdream-analysis features --dims {spatial_dims}`)."
        )
    close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return FeatureError(
        f"Unknown feature {name!r}.{hint} Run `deepdream-analysis features --dims {spatial_dims}` to list "
        "the names, or register a custom feature (--custom-feature NAME=module:function)."
    )


def build_feature_set(config: FeatureConfig, spatial_dims: int) -> FeatureSet:
    """Resolve ``config`` into a :class:`FeatureSet` for a 2D or 3D model (see the module docstring).

    Raises FeatureError for an unknown name, a custom feature that cannot be imported, a ``native``
    backend lacking a feature, or a ``pyradiomics`` backend without pyradiomics installed.
    """
    if spatial_dims not in (2, 3):
        raise FeatureError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    config.validate()
    functions: dict[str, Any] = {}
    for name, target in (config.custom or {}).items():
        functions[_custom.check_name(name)] = load_custom(target)
    if config.names is None:
        names = tuple(paper_features(spatial_dims)) + tuple(n for n in functions if n not in paper_features(spatial_dims))
    else:  # the custom features given are always computed, ``names=()`` included ("--features none")
        names = tuple(config.names) + tuple(n for n in functions if n not in config.names)
    seen = set()
    names = tuple(n for n in names if not (n in seen or seen.add(n)))
    if not names:
        if config.names is not None:  # an explicit empty selection: dream without tracking features
            return FeatureSet(names=(), backend_of={}, spatial_dims=spatial_dims, config=config, custom_functions={})
        raise FeatureError("No features requested. Give at least one name (deepdream-analysis features lists them).")
    known_radiomics = _all_radiomics(spatial_dims)
    registry = _custom.registered()
    backend_of: dict[str, str] = {}
    for n in names:
        if n in functions:
            backend_of[n] = "custom"
        elif n in known_radiomics:
            backend_of[n] = "radiomics"
        elif n in registry:
            functions[n] = registry[n]
            backend_of[n] = "custom"
        else:
            raise _unknown(n, spatial_dims, known_radiomics | set(registry) | set(functions))
    radiomic = [n for n in names if backend_of[n] == "radiomics"]
    not_native = [n for n in radiomic if n not in NATIVE_FEATURES]
    backend = config.backend
    if backend == "native":
        if not_native:
            raise FeatureError(
                f"The native backend lacks {', '.join(not_native)}. Use backend 'auto' (pyradiomics for "
                "those) or 'pyradiomics'."
            )
        chosen = {n: "native" for n in radiomic}
    elif backend == "pyradiomics":
        if radiomic and not radiomics_available():
            raise FeatureError(f"The pyradiomics backend was asked for but pyradiomics is not installed. Install it: {INSTALL_HINT}")
        chosen = {n: "pyradiomics" for n in radiomic}
    else:  # auto
        chosen = {n: ("native" if n in NATIVE_FEATURES else "pyradiomics") for n in radiomic}
        if not_native and not radiomics_available():
            log.warning(
                "pyradiomics is not installed: the features %s are dropped (only pyradiomics computes them). "
                "Install it to get them: %s", ", ".join(not_native), INSTALL_HINT,
            )
            names = tuple(n for n in names if n not in not_native)
            for n in not_native:
                chosen.pop(n)
            if not names:
                raise FeatureError(
                    f"None of the requested features can be computed without pyradiomics. Install it: {INSTALL_HINT}"
                )
    backend_of.update(chosen)
    backend_of = {n: backend_of[n] for n in names}
    functions = {n: f for n, f in functions.items() if n in backend_of and backend_of[n] == "custom"}
    return FeatureSet(names=names, backend_of=backend_of, spatial_dims=spatial_dims, config=config,
                      custom_functions=functions)
