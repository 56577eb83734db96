"""One dream method assembled from its components for one crop (see :mod:`.registry`).

The loop asks it for the batch to forward (:meth:`DreamMethod.batch`), the penalty to subtract
from the objective (:meth:`DreamMethod.penalty`) and the next image (:meth:`DreamMethod.update`).
"""

from __future__ import annotations

import torch

from .accentuate import pulled_to_start, soft_ball
from .adam import Adam
from .lesion_spectrum import spectrum_for
from .paper import paper_update
from .phase import PhaseDream
from .registry import parse_method, resolve_options
from .spectral import SpectralPreconditioner
from .step import default_step, intensity_scale, normalised
from .transforms import RandomTransforms


def ball_region(shape, seed, radius_voxels: float, device=None) -> torch.Tensor:
    """1 within ``radius_voxels`` of the seed, 0 elsewhere (float tensor [k, j, i])."""
    grids = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in shape], indexing="ij")
    dist2 = sum((g - s) ** 2 for g, s in zip(grids, seed))
    return (dist2 <= float(radius_voxels) ** 2).float()


class DreamMethod:
    """The components of ``config.method`` with their options, for a crop of ``crop_shape`` [k, j, i]."""

    def __init__(self, config, card, crop_shape, seed, spacing_kji, device, x0: torch.Tensor, reference=None):
        """``reference``: the run's reference statistics (their lesion spectrum feeds ``lesion-spectrum``)."""
        self.components = parse_method(config.method)
        self.options = resolve_options(config.method, config.method_options)
        self.config, self.card, self.x0 = config, card, x0
        self.low, self.high = card.intensity_range
        self.is_paper = self.components == ("paper",)
        self.scale = intensity_scale(card)
        if self.is_paper:
            self.step = float(config.step) if config.step is not None else 1.0
        else:
            self.step = float(config.step) if config.step is not None else default_step(card)
        o = self.options
        region = ball_region(crop_shape, seed, config.update_radius, device) if config.update_radius else None
        if "accentuate" in self.components:
            ball = soft_ball(crop_shape, seed, spacing_kji, o["sigma_mm"], device)
            region = ball if region is None else region * ball
        self.update_region = region
        self.transforms = RandomTransforms(
            crop_shape, seed, spacing_kji, card.spatial_dims, o["copies"], o["jitter"], o["scale"], o["rotate"],
            o["noise"] * self.scale, config.random_seed, device) if "robust" in self.components else None
        self.adam = Adam(o["beta1"], o["beta2"]) if "adam" in self.components else None
        self.spectral = SpectralPreconditioner(crop_shape, spacing_kji, o["decay"], card.spatial_dims, device) \
            if "spectral" in self.components and o["decay"] > 0 else None
        self.phase = None
        spectrum = spectrum_for(config.method, reference)
        if spectrum is not None:
            dims = (1, 2) if card.spatial_dims == 2 else (0, 1, 2)
            amplitude = spectrum.on_grid(tuple(crop_shape[d] for d in dims), tuple(spacing_kji[d] for d in dims))
            self.phase = PhaseDream(amplitude, card.spatial_dims, self.step, o["strength"], o["max_phase"],
                                    config.random_seed, device)

    @property
    def copies(self) -> int:
        return self.transforms.copies if self.transforms is not None else 1

    def batch(self, x: torch.Tensor, window=None, drawn=None) -> torch.Tensor:
        """The images to forward in one pass, ``[K, (k,) j, i]``; copy 0 is ``x`` itself. With a
        ``window`` (:class:`.window.CopyWindow`) only its voxels, ``[K, *window.size]``; ``drawn``:
        the random transforms to use (default: new ones; the last are ``transforms.last``)."""
        if self.transforms is not None:
            return self.transforms.batch(x, window, drawn)
        image = x[0] if self.card.spatial_dims == 2 else x
        return (image if window is None else image[window.slices]).unsqueeze(0)

    def penalty(self, x: torch.Tensor):
        """A term to subtract from the objective (None: the components pull in :meth:`update` instead)."""
        return None

    @property
    def _plain(self) -> bool:
        """The update is the gradient, optionally spectrally preconditioned, normalised and stepped
        (no Adam state, pull to the start, phase or update region)."""
        return (not self.is_paper and self.phase is None and self.adam is None and self.update_region is None
                and not ("accentuate" in self.components and self.options["l2"] > 0))

    def same_update(self, other: "DreamMethod") -> bool:
        """Whether ``other`` updates an image exactly as this method does (:func:`update_together`)."""
        if not (self._plain and other._plain and self.step == other.step and (self.low, self.high) ==
                (other.low, other.high) and tuple(self.x0.shape) == tuple(other.x0.shape)):
            return False
        a, b = self.spectral, other.spectral
        return (a is None and b is None) or (a is not None and b is not None and a.dims == b.dims
                                             and torch.equal(a.weights, b.weights))

    def update(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The next image: ``x`` moved along the method's direction, at most ``step`` image units per voxel."""
        if self.is_paper:
            return paper_update(x, grad, self.step, self.config.normalize_gradient, self.update_region,
                                self.low, self.high)
        if self.phase is not None:
            return self.phase.update(x, grad, self.update_region, self.low, self.high, self.adam)
        with torch.no_grad():
            direction = grad
            if "accentuate" in self.components and self.options["l2"] > 0:
                direction = pulled_to_start(grad, x, self.x0, self.options["l2"], self.scale)
            if self.adam is not None:
                direction = self.adam.direction(direction)
            if self.spectral is not None:
                direction = self.spectral(direction)
            if self.update_region is not None:
                direction = direction * self.update_region
            return (x + self.step * normalised(direction)).clamp_(self.low, self.high)


def update_together(methods: list, xs, grads) -> list:
    """The next images of several dreams (``methods[m]`` at image ``xs[m]`` with gradient
    ``grads[m]``; ``xs`` and ``grads`` lists, or each one stacked tensor ``[N, ...]``): when every
    method updates as the first does (:meth:`DreamMethod.same_update`), in one stacked computation
    (one Fourier transform of all the gradients, each normalised by its own largest value), giving
    each what its own :meth:`DreamMethod.update` gives up to rounding (a stacked Fourier transform may
    sum in another order: about 1e-7 of the image's values); else one by one."""
    first = methods[0]
    if len(methods) < 2 or not all(first.same_update(m) for m in methods[1:]):
        return [m.update(x, g) for m, x, g in zip(methods, xs, grads)]
    with torch.no_grad():
        direction = grads if isinstance(grads, torch.Tensor) else torch.stack(grads)
        if first.spectral is not None:
            direction = first.spectral(direction, stacked=True)
        largest = direction.abs().amax(dim=tuple(range(1, direction.dim())), keepdim=True).clamp_min(1e-30)
        images = xs if isinstance(xs, torch.Tensor) else torch.stack(xs)
        moved = (images + first.step * (direction / largest)).clamp_(first.low, first.high)
    return list(moved.unbind(0))
