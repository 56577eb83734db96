r"""User-defined features, and the two built-in line-orientation features.

A custom feature is a Python callable ``f(image, mask, spacing) -> float``, or
``f(image, mask, spacing, context) -> float`` to know where it is (both are supported; the
signature decides: a fourth parameter, one named ``context``, or ``**kwargs`` gets the context):

- ``image``: numpy float64 array ``[k, j, i]`` in image units (HU for CT); for a 2D model ``k == 1``;
- ``mask``: numpy bool array of the same shape (the dreamed object, or a reference lesion);
- ``spacing``: ``(i, j, k)`` voxel size in mm;
- ``context``: a :class:`FeatureContext`: the iteration, the seed in crop coordinates ``[k, j, i]``,
  in volume voxels ``(i, j, k)`` and in millimetres, the spacing, the start image of the crop and
  the crop itself. ``image`` and ``mask`` are the whole crop while dreaming, so
  ``image[context.seed_kji]`` is the voxel at the seed. For reference lesions (``deepdream-analysis
  reference``) only ``spacing`` is set; the other fields are None.

A **window feature** (decorate it with ``@custom_feature(window=True)``, or
``register_feature(name, f, window=True)``) is computed at every iteration, iteration 0 included,
whatever the mask (empty or smaller than ``min_mask_voxels``, and between ``--feature-every``
iterations): use it for values measured in a window around the seed rather than on the dreamed
object. Other features give NaN while the mask is empty or too small.

A custom feature cannot take the name of a curve the tool writes (``iteration``, ``objective``,
``probability``, ``mask_voxels``), of a radiomics feature, of a built-in custom feature below, or
end in ``_z`` (the z-score columns): :class:`~..errors.FeatureError` says so.

Register one by name with :func:`register_feature`, or name it as ``module:function`` (a module on
the Python path) or ``path/to/file.py:function`` (``--custom-feature NAME=TARGET`` on the command
line, ``FeatureConfig.custom`` in Python); :func:`load_custom` imports it. A custom feature that
raises, or returns something that is not a number, gives NaN for that value and one warning per
feature set naming the feature and the error; the analysis goes on.

Built-in features (the paper's section 3.1 "characteristic feature" of a 135-degree line marking)
-------------------------------------------------------------------------------------------------

Orientation convention, in the axial plane of the array ``[j, i]`` (row ``j``, column ``i``; the
slice displayed with row ``j = 0`` at the top, as ``matplotlib.imshow`` and
``DeepDreamAnalysisLib.synthetic`` show it): an angle is measured counter-clockwise on screen from
the ``+i`` axis. 0 degrees runs along a row; 90 degrees runs along a column; **135 degrees runs
along the array's main diagonal**, the voxels ``array[j0 + t, i0 + t]`` (top-left to bottom-right on
screen); 45 degrees runs along the anti-diagonal ``array[j0 - t, i0 + t]``. This is the convention
of ``synthetic.LineMarking``, so the marking and the feature agree.

Kernel :math:`K_\theta` (``line_kernel``): an ``L x L`` window (``L = 7`` voxels) in which each
voxel gets the weight :math:`w = \max(0, 1 - 2d)`, :math:`d` its distance (voxels) to the segment
through the centre at angle :math:`\theta` that crosses the whole window (so at 0, 45, 90 and 135
degrees it covers exactly ``L`` voxels, with weight 1, and no others); the weights are divided by their sum,
then the window's mean :math:`1/L^2` is subtracted. So a constant image responds 0 and a
unit-contrast line along the kernel responds about 1. Voxel units: the in-plane spacing is not
used (CT slices have square pixels).

Response :math:`R_\theta = X \star K_\theta`, the 2D correlation of each axial slice with the
kernel (for this point-symmetric kernel the same as convolution), at every voxel ``(k, j, i)`` of
the **mask's bounding box**; the filter reads the image around the box too (edge values repeated
only at the array's border).

- ``line135_response`` :math:`= \max_{v \in \mathrm{bbox}(M)} R_{135}(v)`, image units. The paper's
  characteristic feature (measured there on the whole dream). It grows with local contrast, whatever
  the network learned (DESIGN.md): use it together with the selectivity below.
- ``line135_selectivity`` :math:`= \frac{E_{135} - E_{45}}{E_{135} + E_{45}}`, with
  :math:`E_\theta = \sum_{v \in \mathrm{bbox}(M)} R_\theta(v)^2`, dimensionless in [-1, 1]: +1 for
  pure 135-degree lines, -1 for pure 45-degree lines, about 0 for isotropic texture or noise, and
  unchanged when the contrast is scaled (bright and dark lines alike). NaN when both energies are 0
  (a constant region).

An empty mask gives NaN for both (as for every feature: the curve starts when the object appears).
To measure over a whole crop as the paper does, pass a mask that is all ``True``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FeatureError

log = logging.getLogger(__name__)

CustomFeature = Callable[..., float]

LINE_LENGTH = 7

_REGISTRY: dict[str, CustomFeature] = {}
BUILTIN: tuple[str, ...] = ("line135_response", "line135_selectivity")
CURVE_COLUMNS: tuple[str, ...] = ("iteration", "objective", "probability", "mask_voxels")
"""The curves every run writes (``result.BASE_COLUMNS``); no feature may take these names."""


@dataclasses.dataclass(frozen=True)
class FeatureContext:
    """Where a custom feature is measured (the fourth argument of a context-aware feature).

    ``iteration``: the dream iteration (0 = the start image); ``seed_kji``: the seed in crop
    coordinates, an index into ``image`` and ``mask`` ``[k, j, i]``; ``seed_ijk``: the seed's voxel
    indices ``(i, j, k)`` in the input volume; ``seed_mm``: its physical position ``(x, y, z)`` in mm
    (LPS, the volume's origin and direction); ``spacing``: ``(i, j, k)`` in mm; ``start_image``: the
    crop at iteration 0, ``[k, j, i]`` in image units (do not modify); ``crop``: the
    :class:`~..result.Crop` (start and size ``[k, j, i]`` in the volume). For reference lesions only
    ``spacing`` is set.
    """

    spacing: tuple[float, float, float]
    iteration: int | None = None
    seed_kji: tuple[int, int, int] | None = None
    seed_ijk: tuple[int, int, int] | None = None
    seed_mm: tuple[float, float, float] | None = None
    start_image: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    crop: object | None = None


def custom_feature(func: CustomFeature | None = None, *, window: bool = False):
    """Decorator marking a custom feature: ``@custom_feature(window=True)`` makes it a window
    feature (computed at every iteration whatever the mask; module docstring)."""
    def mark(f):
        f.deepdream_window = bool(window)
        return f
    return mark(func) if func is not None else mark


def is_window_feature(func) -> bool:
    """True for a feature marked ``window=True``."""
    return bool(getattr(func, "deepdream_window", False))


def check_name(name: str) -> str:
    """``name`` stripped, or FeatureError when it is empty or taken by a curve, a radiomics feature,
    a built-in custom feature or the z-score columns."""
    from .catalog import radiomics_names

    if not isinstance(name, str) or not name.strip():
        raise FeatureError(f"A custom feature needs a non-empty name, got {name!r}.")
    name = name.strip()
    taken = None
    if name in CURVE_COLUMNS:
        taken = f"a curve every run writes ({', '.join(CURVE_COLUMNS)})"
    elif name in BUILTIN:
        taken = "a built-in custom feature (use it by name, without redefining it)"
    elif any(name in names for dims in (2, 3) for names in radiomics_names(dims).values()):
        taken = "a radiomics feature"
    elif name.endswith("_z"):
        taken = "reserved: '<feature>_z' columns hold the z-scores"
    if taken:
        raise FeatureError(f"A custom feature cannot be named {name!r}: that name is {taken}. Give it another name, "
                           f"for example 'my_{name}'.")
    return name


def register_feature(name: str, func: CustomFeature, window: bool | None = None) -> None:
    """Make ``func(image, mask, spacing[, context]) -> float`` available as ``name`` (module
    docstring); ``window=True`` makes it a window feature."""
    name = check_name(name)
    _register(name, func, window)


def _register(name: str, func: CustomFeature, window: bool | None = None) -> None:
    if not callable(func):
        raise FeatureError(f"Custom feature {name!r}: {func!r} is not callable; give a function f(image, mask, spacing).")
    if window is not None:
        func = custom_feature(func, window=window)
    _REGISTRY[name] = func


def wants_context(func) -> str | None:
    """How ``func`` takes the context: ``"keyword"`` (a parameter named ``context`` or ``**kwargs``),
    ``"positional"`` (a fourth positional parameter), or None (the old ``f(image, mask, spacing)``)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the old three arguments
        return None
    kinds = inspect.Parameter
    if any(p.name == "context" and p.kind != kinds.POSITIONAL_ONLY for p in params) \
            or any(p.kind == kinds.VAR_KEYWORD for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    return "positional" if len(positional) >= 4 else None


def registered() -> dict[str, CustomFeature]:
    """The registered custom features by name (the built-ins included)."""
    return dict(_REGISTRY)


def load_custom(target: str) -> CustomFeature:
    """Import ``module:function`` or ``path/to/file.py:function`` and return the function.

    Raises FeatureError when the target is malformed, cannot be imported, or is not callable.
    """
    if not isinstance(target, str) or ":" not in target:
        raise FeatureError(
            f"A custom feature is given as 'module:function' or 'path/to/file.py:function', got {target!r}."
        )
    module_part, _, func_name = target.rpartition(":")
    if not module_part or not func_name:
        raise FeatureError(
            f"A custom feature is given as 'module:function' or 'path/to/file.py:function', got {target!r}."
        )
    looks_like_path = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    if looks_like_path:
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise FeatureError(f"Custom feature {target!r}: the file {path} does not exist. Check the path.")
        mod_name = f"_deepdream_custom_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"not a Python file: {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure while importing user code
            sys.modules.pop(mod_name, None)
            raise FeatureError(
                f"Custom feature {target!r}: importing {path} failed ({type(exc).__name__}: {exc}). Fix that file."
            ) from None
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:  # noqa: BLE001
            raise FeatureError(
                f"Custom feature {target!r}: cannot import module {module_part!r} ({type(exc).__name__}: {exc}). "
                "Check the name, put the module on PYTHONPATH, or give a file path: path/to/file.py:function."
            ) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise FeatureError(f"Custom feature {target!r}: {module_part} has no attribute {func_name!r}.")
    if not callable(func):
        raise FeatureError(
            f"Custom feature {target!r}: {func_name} is a {type(func).__name__}, not a function f(image, mask, spacing)."
        )
    return func


def call_custom(name: str, func: CustomFeature, image: np.ndarray, mask: np.ndarray, spacing,
                warned: dict[str, str] | None = None, context: FeatureContext | None = None) -> float:
    """``func(image, mask, spacing)`` (or ``func(image, mask, spacing, context)``, see
    :func:`wants_context`) as a float; NaN when it raises or returns something that is not a real
    number, with one warning per name: ``warned`` (name -> first problem) remembers them."""
    try:
        how = wants_context(func)
        ctx = context if context is not None else FeatureContext(spacing=tuple(spacing))
        if how == "keyword":
            value = func(image, mask, tuple(spacing), context=ctx)
        elif how == "positional":
            value = func(image, mask, tuple(spacing), ctx)
        else:
            value = func(image, mask, tuple(spacing))
    except Exception as exc:  # noqa: BLE001 - a user feature must not stop the analysis
        _warn_once(name, f"raised {type(exc).__name__}: {exc}", warned)
        return math.nan
    number = _as_float(value)
    if number is None:
        _warn_once(name, f"returned {type(value).__name__} {_short(value)}, not a number", warned)
        return math.nan
    return number


def _as_float(value) -> float | None:
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001
        return None
    if arr.size == 1 and np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating):
        return float(arr.reshape(()))
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _warn_once(name: str, what: str, warned: dict[str, str] | None) -> None:
    if warned is not None:
        if name in warned:
            return
        warned[name] = what
    log.warning("Custom feature %r %s; its value is NaN (further failures of it are not reported).", name, what)


# ----------------------------------------------------------------------------- line features


def line_kernel(angle_deg: float = 135.0, length: int = LINE_LENGTH) -> np.ndarray:
    """Zero-mean ``length x length`` line-segment kernel ``[j, i]`` at ``angle_deg`` (module docstring)."""
    if length < 3 or length % 2 == 0:
        raise ValueError("length must be an odd integer >= 3")
    r = length // 2
    theta = math.radians(angle_deg)
    # direction in (i, j): counter-clockwise on screen with j pointing down
    di, dj = math.cos(theta), -math.sin(theta)
    jj, ii = np.mgrid[-r:r + 1, -r:r + 1].astype(float)
    along = ii * di + jj * dj
    across = np.abs(-ii * dj + jj * di)
    half = r / max(abs(di), abs(dj))  # the segment crosses the whole window (7 voxels at 0, 45, 90, 135 degrees)
    over = np.clip(np.abs(along) - half, 0, None)  # beyond the segment's ends
    dist = np.hypot(across, over)
    w = np.clip(1.0 - 2.0 * dist, 0.0, None)
    w /= w.sum()
    return w - 1.0 / (length * length)


def line_responses(image: np.ndarray, mask: np.ndarray, angle_deg: float, length: int = LINE_LENGTH) -> np.ndarray:
    """Responses ``R_theta`` at the voxels of ``mask``'s bounding box (array ``[k, j, i]`` of that box)."""
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim == 2:
        image, mask = image[None], mask[None]
    idx = np.nonzero(mask)
    k0, k1 = int(idx[0].min()), int(idx[0].max()) + 1
    j0, j1 = int(idx[1].min()), int(idx[1].max()) + 1
    i0, i1 = int(idx[2].min()), int(idx[2].max()) + 1
    r = length // 2
    nj, ni = image.shape[1:]
    # the box grown by r, read from the image where it exists, edge values repeated beyond
    pj0, pj1, pi0, pi1 = max(j0 - r, 0), min(j1 + r, nj), max(i0 - r, 0), min(i1 + r, ni)
    window = image[k0:k1, pj0:pj1, pi0:pi1]
    window = np.pad(window, ((0, 0), (r - (j0 - pj0), r - (pj1 - j1)), (r - (i0 - pi0), r - (pi1 - i1))), mode="edge")
    kernel = line_kernel(angle_deg, length)
    views = np.lib.stride_tricks.sliding_window_view(window, kernel.shape, axis=(1, 2))
    return np.einsum("kjiab,ab->kji", views, kernel)


def line135_response(image: np.ndarray, mask: np.ndarray, spacing=None) -> float:
    """Maximum 135-degree line-filter response in the mask's bounding box (image units); NaN if empty."""
    if not np.asarray(mask).any():
        return math.nan
    return float(line_responses(image, mask, 135.0).max())


def line135_selectivity(image: np.ndarray, mask: np.ndarray, spacing=None) -> float:
    """(E135 - E45) / (E135 + E45) in the mask's bounding box, in [-1, 1]; NaN if empty or constant."""
    if not np.asarray(mask).any():
        return math.nan
    e135 = float(np.sum(line_responses(image, mask, 135.0) ** 2))
    e45 = float(np.sum(line_responses(image, mask, 45.0) ** 2))
    total = e135 + e45
    if not total > 1e-12 * max(1.0, float(np.max(np.abs(image))) ** 2):
        return math.nan
    return (e135 - e45) / total


_register("line135_response", line135_response)
_register("line135_selectivity", line135_selectivity)
