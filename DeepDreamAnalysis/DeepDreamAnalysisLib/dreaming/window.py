"""Exact seed windows: the transformed copies evaluated only where the seed's output can see.

Every method but ``paper`` reads the network's logits at ONE voxel of each copy, the seed. Their
gradient with respect to the input is exactly zero outside the network's receptive field around the
seed (on the demo network, a MONAI UNet with two strides and batch norm: 23 x 23 voxels of a 96 x 96
crop). So each transformed copy (:mod:`.transforms`) needs the network only on a window around the
seed that holds that field, aligned to the network's downsampling grid: its seed logits are then the
full crop's, up to the order of floating-point sums. The loop forwards the K copies' windows with
gradient (one batch); the mask comes from a box around the seed, without gradient, once the seed is
above the threshold (:mod:`.near_seed`), and the full probability map only when asked for.

Exact or off, never approximate:

1. :func:`find_window` probes, once per network, crop size and seed (cached while the weights do not
   change), the support of d(seed logits)/d(input) on the full crop: the union over three seeded
   random inputs, one of them with every ``torch.nn.ReLU`` passing its gradient as if on (so a unit
   that happens to be off does not shrink the field). Its bounding box, plus a margin, is rounded out
   to multiples of the card's ``size_divisible`` (the window's start too, relative to the crop, so
   the seed sits on the same downsampling grid), clipped to the crop.
2. It verifies on a fresh random input that the window's seed logits (all classes) equal the full
   crop's and that the input gradient inside the window matches (zero outside); if not, it tries a
   coarser grid (2x, 4x... ``size_divisible``), and else, or when the window would hold more than
   :data:`MAX_FRACTION` of the crop, there is no window: full-crop copies, as before, with the reason.
   A network that mixes the whole image (instance norm, the MONAI default; attention; global pooling;
   SwinUNETR, UNETR) has a field that is the whole crop and gets full-crop copies this way.
3. Every :data:`AUDIT_EVERY` iterations (iteration 0 first) the loop forwards the K copies on the
   full crop without gradient and compares every copy's seed logits with its window's: a difference
   beyond :data:`RTOL` switches the run to full-crop copies for good, recomputing that iteration with
   the same random transforms, and says so (``copy_window_note`` in run.json). That forward's copy 0
   (the image itself) also gives the iteration's full probability map, against which the box of
   :mod:`.near_seed` is checked.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch

MAX_FRACTION = 0.6
"""A window holding more than this fraction of the crop's voxels saves too little: full-crop copies."""
MARGIN = 0
"""Voxels added around the probed support on each side before rounding to the grid (none: the probes
include one with every ReLU passing its gradient, and the run audits the copies, see AUDIT_EVERY)."""
AUDIT_EVERY = 50
"""Every this many iterations (from iteration 0) the loop also forwards the K copies on the full crop
without gradient and compares their seed logits with the windows' (about 2% of a run's cost)."""
RTOL = 1e-4
"""Relative tolerance (of the largest seed logit, at least 1) for window logits against the full crop's."""
PROBE_SEED = 20191120
"""The probes' random generator seed (fixed: the window never depends on the run's random seed)."""


@dataclass(frozen=True)
class CopyWindow:
    """A window of the crop in the network's spatial axes (``[j, i]`` for a 2D network, ``[k, j, i]``
    for a 3D one): ``start`` and ``size`` in crop voxels, ``seed`` the seed's position inside it."""

    start: tuple[int, ...]
    size: tuple[int, ...]
    seed: tuple[int, ...]
    grid: int = 1
    """The downsampling grid (voxels) the window's start and size are multiples of (verified on it)."""

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.size))


@dataclass(frozen=True)
class WindowPlan:
    """What :func:`find_window` decided: a ``window`` (None: full-crop copies) and a ``note`` saying why."""

    window: CopyWindow | None
    note: str

    def record(self) -> dict:
        """For run.json: ``copy_window`` (the size, or None) and ``copy_window_note``."""
        w = self.window
        return {"copy_window": list(w.size) if w is not None else None,
                "copy_window_start": list(w.start) if w is not None else None,
                "copy_window_note": self.note}


class WindowMismatch(Exception):
    """Copy 0's window logits at the seed differ from the full crop's (the window is not exact)."""


class _PassThroughReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g


@contextlib.contextmanager
def _relus_passing_gradient(modules):
    """Within the block, the ``torch.nn.ReLU`` modules pass their whole gradient (as if every unit were on)."""
    try:
        for m in modules:
            m.forward = _PassThroughReLU.apply
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


def close(window_logits: torch.Tensor, full_logits: torch.Tensor, rtol: float = RTOL) -> bool:
    """True when the seed logits ``[..., C]`` agree within ``rtol`` of the largest (at least 1)."""
    scale = max(1.0, float(full_logits.detach().abs().max()))
    return bool(((window_logits.detach() - full_logits.detach()).abs() <= rtol * scale).all())


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_key(network) -> tuple:
    try:
        return tuple((t.data_ptr(), t._version) for t in list(network.parameters()) + list(network.buffers()))
    except Exception:  # noqa: BLE001 - a module without the usual accessors: never cached
        return (object(),)


def forget(network) -> None:
    """Drop the windows found for ``network`` (one was found not exact during a run)."""
    try:
        _CACHE.pop(network, None)
    except TypeError:
        pass


def find_window(network, card, crop_shape: tuple[int, ...], seed: tuple[int, ...], device, relus=()) -> WindowPlan:
    """The window for the copies of a crop ``[k, j, i]`` (``crop_shape``) with ``seed`` [k, j, i]
    on ``network`` (``relus``: its ``torch.nn.ReLU`` modules). Deterministic; cached per network,
    weights, card, crop and seed."""
    key = (tuple(crop_shape), tuple(seed), str(device), card.spatial_dims, card.out_channels,
           float(card.preprocessing.scale), float(card.preprocessing.offset), int(card.size_divisible),
           _weights_key(network))
    try:
        cached = _CACHE.setdefault(network, {})
    except TypeError:  # not weak-referenceable
        cached = {}
    if key not in cached:
        if len(cached) > 64:
            cached.clear()
        cached[key] = _find_window(network, card, tuple(crop_shape), tuple(seed), device, list(relus))
    return cached[key]


def _find_window(network, card, crop_shape, seed, device, relus) -> WindowPlan:
    dims = card.spatial_dims
    spatial = tuple(crop_shape[1:]) if dims == 2 else tuple(crop_shape)
    s = tuple(seed[1:]) if dims == 2 else tuple(seed)
    gen = torch.Generator(device="cpu").manual_seed(PROBE_SEED)
    weights = 1.0 + torch.rand(card.out_channels, generator=gen)  # generic: no class cancels another
    pre = card.preprocessing
    centre, spread = pre.typical_intensity

    def image_probe():  # image-unit noise about the card's window, through the card's preprocessing
        x = torch.randn((1, 1) + spatial, generator=gen) * spread + centre
        return (x * pre.scale + pre.offset).to(device)

    def normal_probe(scale=1.0):
        return (scale * torch.randn((1, 1) + spatial, generator=gen)).to(device)

    def seed_logits_and_grad(inp, at, pass_through=False):
        inp = inp.detach().requires_grad_(True)
        with torch.enable_grad(), (_relus_passing_gradient(relus) if pass_through else contextlib.nullcontext()):
            out = network(inp)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, card.out_channels) + tuple(inp.shape[2:]):
                raise ValueError(f"the network returned {getattr(out, 'shape', type(out))} for an input of "
                                 f"{list(inp.shape)}")
            z = out[(0, slice(None)) + tuple(at)]
            (g,) = torch.autograd.grad((z * weights.to(z.device, z.dtype)).sum(), inp)
        return z.detach(), g[0, 0].detach()

    try:
        support = None
        for probe, through in ((normal_probe(), True), (image_probe(), False), (normal_probe(3.0), False)):
            _, g = seed_logits_and_grad(probe, s, pass_through=through and bool(relus))
            nz = g != 0
            support = nz if support is None else support | nz
        if not bool(support.any()):
            return WindowPlan(None, "full-crop copies: the seed's output did not depend on the input in the probes")
        lo, hi = [], []
        for a in range(support.dim()):
            other = tuple(d for d in range(support.dim()) if d != a)
            along = support.any(dim=other) if other else support
            idx = torch.nonzero(along, as_tuple=False).flatten()
            lo.append(int(idx.min()))
            hi.append(int(idx.max()))
        verify_in = image_probe()
        z_full, g_full = seed_logits_and_grad(verify_in, s)
    except Exception as exc:  # noqa: BLE001 - the loop's own forward will say what is wrong
        return WindowPlan(None, f"full-crop copies: probing the network failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
    extent = "x".join(str(h - l + 1) for l, h in zip(lo, hi))
    total = math.prod(spatial)
    step = max(1, int(card.size_divisible))
    why = ""
    while True:
        start, size = [], []
        for a, n in enumerate(spatial):
            begin = max(0, ((lo[a] - MARGIN) // step) * step)
            end = min(n, -((-(hi[a] + 1 + MARGIN)) // step) * step)
            start.append(begin)
            size.append(end - begin)
        fraction = math.prod(size) / total
        if fraction > MAX_FRACTION:
            return WindowPlan(None, f"full-crop copies: the seed's output depends on {extent} voxels of the "
                                    f"{'x'.join(map(str, spatial))} crop; a window on the grid of {step} "
                                    f"({'x'.join(map(str, size))}) would hold {100 * fraction:.0f}% of it"
                                    + (f" ({why})" if why else ""))
        window = CopyWindow(tuple(start), tuple(size), tuple(c - b for c, b in zip(s, start)), step)
        ok, why = _verify(seed_logits_and_grad, verify_in, z_full, g_full, window)
        if ok:
            return WindowPlan(window, f"window {'x'.join(map(str, size))} of the {'x'.join(map(str, spatial))} "
                                      f"crop ({100 * fraction:.0f}% of its voxels; the seed's output depends on "
                                      f"{extent}): exact, verified")
        step *= 2


def _verify(seed_logits_and_grad, verify_in, z_full, g_full, window: CopyWindow) -> tuple[bool, str]:
    inside = torch.zeros_like(g_full, dtype=torch.bool)
    inside[window.slices] = True
    if bool((g_full[~inside] != 0).any()):
        return False, "the gradient of a check input reaches outside the window"
    try:
        z_win, g_win = seed_logits_and_grad(verify_in[(slice(None), slice(None)) + window.slices], window.seed)
    except Exception as exc:  # noqa: BLE001 - e.g. a size the network does not take
        return False, f"the network failed on the window ({type(exc).__name__})"
    if not close(z_win, z_full):
        return False, "the window's seed logits differ from the full crop's"
    g_ref = g_full[window.slices]
    scale = float(g_ref.abs().max()) or 1.0
    if not bool(((g_win - g_ref).abs() <= 1e-3 * scale).all()):
        return False, "the window's input gradient differs from the full crop's"
    return True, ""


__all__ = ["CopyWindow", "WindowPlan", "WindowMismatch", "find_window", "forget", "close", "MAX_FRACTION", "MARGIN", "RTOL", "AUDIT_EVERY"]
