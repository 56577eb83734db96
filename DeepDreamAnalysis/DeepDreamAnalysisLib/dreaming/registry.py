"""The dream methods by name: what each does, where it comes from, and its options.

A method is one component (``paper``, ``ascent``, ``robust``, ``spectral``, ``accentuate``,
``adam``, ``lesion-spectrum``) or several joined with ``+`` (``robust+spectral``). The components
always run in the same order whatever the order of the name: transformed copies (forward) -> penalty
to the start -> optimiser -> spectral preconditioner -> update region -> step in image units.
``paper`` is the paper's update, unchanged, and combines with nothing. ``lesion-spectrum`` replaces
the image update by a phase update (:mod:`.phase`); it combines with ``robust`` and ``adam`` (Adam on
the phases), not with ``spectral`` or ``accentuate`` (both would change its fixed spectrum), and needs
the run's reference statistics.

``method_options`` is one flat dict; each option belongs to one component (``copies`` to
``robust``, ``decay`` to ``spectral``...). An option of a component that is not in the method, an
unknown option or a value out of range raises :class:`ConfigError` naming the valid ones.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One option of a component: its default, what it means (with units) and its valid range."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], bool]
    expect: str
    """What a valid value is, for the error message (``a number >= 0``)."""
    integer: bool = False


@dataclass(frozen=True)
class Component:
    name: str
    description: str
    source: str
    options: tuple[Option, ...] = field(default_factory=tuple)
    excludes: tuple[str, ...] = ()
    """Components it cannot be combined with (and why: :data:`EXCLUDE_REASON`)."""
    needs_reference: bool = False
    """True: it reads the reference lesions (a run without reference statistics is refused)."""


def _number(v) -> bool:
    from numpy import bool_

    return isinstance(v, numbers.Real) and not isinstance(v, (bool, bool_)) and math.isfinite(v)


def non_negative(v) -> bool:
    return _number(v) and v >= 0


def positive(v) -> bool:
    return _number(v) and v > 0


def fraction(v) -> bool:
    return _number(v) and 0 <= v < 1


def angle(v) -> bool:
    return _number(v) and 0 < v <= math.pi


def count(v) -> bool:
    return _number(v) and float(v).is_integer() and v >= 1


COMPONENTS: dict[str, Component] = {}


def register(component: Component) -> Component:
    COMPONENTS[component.name] = component
    return component


register(Component(
    "paper",
    "The paper's plain gradient ascent X <- X + step * dI/dX (step per unit gradient; "
    "--normalize-gradient makes it the largest change per voxel). Reproduces the paper exactly.",
    "Couteaux et al. 2019, section 2.2 (/work/shared/paper); Mordvintsev et al. 2015 (DeepDream)"))
register(Component(
    "ascent",
    "Normalised gradient ascent: each iteration changes the largest voxel by exactly `step` image "
    "units (HU for CT); the default step is a fixed fraction of the card's intensity window, so it "
    "carries from one network to another.",
    "Normalised steps as in Mordvintsev et al. 2015 (DeepDream, g / mean|g|); step in image units: ours"))
register(Component(
    "robust",
    "Transformation robustness: the objective is averaged over K copies of the image (the image "
    "itself plus K-1 randomly jittered, scaled, rotated about the axial axis in millimetres and "
    "noised copies, all centred on the seed), evaluated as ONE batched forward.",
    "Olah et al. 2017, Feature Visualization (Distill; Lucid/Lucent transforms: jitter, scale 0.9-1.1, "
    "rotate +-10 deg); captum.optim; adapted to single-channel 2D/3D volumes with real spacing",
    (
        Option("copies", 4, "K, the number of copies in the batch (copy 0 is the untransformed image)",
               count, "an integer >= 1", integer=True),
        Option("jitter", 2.0, "largest random shift along each axis, voxels (2D: in-plane only)",
               non_negative, "a number of voxels >= 0"),
        Option("scale", 0.05, "largest relative zoom: each copy is zoomed by a factor in [1-scale, 1+scale]",
               fraction, "a number from 0 to below 1"),
        Option("rotate", 5.0, "largest rotation about the axial (k) axis, degrees, computed in millimetres",
               non_negative, "a number of degrees >= 0"),
        Option("noise", 0.01, "intensity noise std of the copies, as a fraction of the card's intensity scale "
               "(window width)", non_negative, "a number >= 0"),
    )))
register(Component(
    "spectral",
    "Spectral preconditioning: the update is taken in a Fourier basis whose coefficients are scaled "
    "by 1/f^decay, f in cycles per millimetre from the real (anisotropic) spacing, so the dream "
    "favours smooth, object-like changes over checkerboards.",
    "Olah et al. 2017 (Lucid's decorrelated Fourier parametrisation, 1/f); Horama (1/f^1.5 preconditioner); "
    "the physical frequencies from the voxel spacing: ours",
    (
        Option("decay", 1.0, "exponent d of the 1/f^d weights (0: no preconditioning)", non_negative,
               "a number >= 0"),
    )))
register(Component(
    "accentuate",
    "Feature accentuation: the change is weighted by a soft ball (Gaussian, sigma in mm) around the "
    "seed and penalised by an L2 distance to the start image, so a dream from a healthy image stays "
    "realistic and local.",
    "Horama (feature accentuation from a seed image with an L2 penalty); Hamblin et al. 2024 (feature "
    "accentuation); the soft ball in millimetres: ours",
    (
        Option("l2", 1.0, "pull back to the start: direction g/max|g| - l2 (X - X0) / scale (scale: the card's "
               "window width); 1 lets the most sensitive voxel move one window width at most", non_negative,
               "a number >= 0"),
        Option("sigma_mm", 15.0, "width (Gaussian sigma, mm) of the soft ball around the seed where the image may change",
               positive, "a number of millimetres > 0"),
    )))
register(Component(
    "adam",
    "Adam optimiser on the image (per-voxel adaptive steps) instead of plain ascent; the largest "
    "change per iteration is still `step` image units.",
    "Kingma & Ba 2015; Lucid/Lucent use Adam (lr 0.05) for feature visualisation",
    (
        Option("beta1", 0.9, "Adam's first-moment decay", fraction, "a number from 0 to below 1"),
        Option("beta2", 0.999, "Adam's second-moment decay", fraction, "a number from 0 to below 1"),
    )))

register(Component(
    "lesion-spectrum",
    "Lesion-spectrum dreaming: the dream change is an inverse Fourier transform whose amplitude "
    "spectrum is fixed to that of the reference lesions' change to their surroundings (frequencies "
    "in cycles/mm from the real spacing) and whose phase alone is optimised; its gain grows by `step` "
    "per iteration. Needs reference statistics (--reference).",
    "Fel et al. 2023, Unlocking Feature Visualization for Deeper Networks with MAgnitude Constrained "
    "Optimization (MACO; Horama's maco); the amplitude from real reference lesions instead of natural "
    "images, in millimetres, for 2D/3D volumes: ours",
    (
        Option("strength", 1.0, "final gain of the change: 1 gives it the mean reference lesion's amplitude "
               "spectrum, 2 twice that", positive, "a number > 0"),
        Option("max_phase", 1.0, "largest change of any phase per iteration, radians", angle,
               "a number of radians > 0 and at most pi"),
    ),
    excludes=("spectral", "accentuate"),
    needs_reference=True))

EXCLUDE_REASON = {
    ("lesion-spectrum", "spectral"): "both fix the change's spectrum (lesion-spectrum to the reference lesions', "
                                     "spectral to 1/f^d)",
    ("lesion-spectrum", "accentuate"): "accentuate's soft ball and pull to the start would change the amplitude "
                                       "spectrum that lesion-spectrum keeps fixed (use --update-radius to keep "
                                       "the change near the seed)",
}

DEFAULT_METHOD = "robust+spectral"
"""The default (DreamConfig.method): chosen by measurement, docs/dream-methods.md."""


@dataclass(frozen=True)
class MethodInfo:
    """One row of :func:`list_methods`."""

    name: str
    description: str
    source: str
    options: dict[str, Any]


def list_methods() -> list[MethodInfo]:
    """Every component with its one-line description, its source and its options' defaults.

    Components combine with ``+`` (``robust+spectral``); ``paper`` combines with nothing.
    """
    return [MethodInfo(c.name, c.description, c.source, {o.name: o.default for o in c.options})
            for c in COMPONENTS.values()]


def parse_method(method: str) -> tuple[str, ...]:
    """The components of ``method`` in the fixed order, or a ConfigError naming the known ones."""
    if not isinstance(method, str) or not method.strip():
        raise ConfigError(f"method must be a name such as 'paper' or 'robust+spectral', got {method!r}.")
    parts = [p.strip() for p in method.split("+")]
    known = ", ".join(COMPONENTS)
    for p in parts:
        if p not in COMPONENTS:
            raise ConfigError(f"Unknown dream method {p!r} in {method!r}. Known methods: {known} "
                              "(combine with '+', e.g. robust+spectral; see docs/dream-methods.md).")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"method {method!r} names a component twice; name each once.")
    if "paper" in parts and len(parts) > 1:
        raise ConfigError(f"method {method!r}: 'paper' is the paper's exact update and combines with nothing; "
                          "use 'ascent' to combine the image-unit step with other components.")
    for p in parts:
        for other in COMPONENTS[p].excludes:
            if other in parts:
                raise ConfigError(f"method {method!r}: {p!r} and {other!r} do not combine: "
                                  f"{EXCLUDE_REASON.get((p, other), 'they conflict')}. Use one of them.")
    return tuple(c for c in COMPONENTS if c in parts)


def needs_reference(method: str) -> bool:
    """True when a component of ``method`` reads the reference lesions (``lesion-spectrum``)."""
    return any(COMPONENTS[c].needs_reference for c in parse_method(method))


def resolve_options(method: str, options: dict | None) -> dict[str, Any]:
    """Every option of ``method``'s components: the given value, else the default; validated."""
    parts = parse_method(method)
    options = dict(options or {})
    if not all(isinstance(k, str) for k in options):
        raise ConfigError(f"method_options keys must be option names, got {list(options)!r}.")
    valid = {o.name: (c, o) for c in parts for o in COMPONENTS[c].options}
    unknown = [k for k in options if k not in valid]
    if unknown:
        owners = {o.name: c.name for c in COMPONENTS.values() for o in c.options}
        msgs = []
        for k in unknown:
            if k in owners:
                msgs.append(f"{k!r} belongs to the {owners[k]!r} method, which {method!r} does not include "
                            f"(use e.g. --method {method}+{owners[k]})")
            else:
                msgs.append(f"{k!r} is not an option of any method")
        names = ", ".join(valid) or "none"
        raise ConfigError(f"Unknown option for method {method!r}: " + "; ".join(msgs)
                          + f". Its options are: {names}.")
    out = {}
    for name, (_, opt) in valid.items():
        v = options.get(name, opt.default)
        if not opt.check(v):
            raise ConfigError(f"method option {name}={v!r} is out of range: {name} ({opt.help}) must be {opt.expect}.")
        out[name] = int(v) if opt.integer else float(v)
    return out
