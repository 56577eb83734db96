"""Lesion-spectrum dreaming: the dream change has the reference lesions' amplitude spectrum; only its
phase is optimised (MACO, Fel et al. 2023, "Unlocking Feature Visualization for Deeper Networks with
MAgnitude Constrained Optimization"; Horama's ``maco``), with no generative model.

The image at iteration ``t`` is ``X_t = clamp(X_0 + r * D_t)`` with the change

    D_t = g_t * Re F^-1( A * exp(i * (theta - theta(-f))) )

``A`` the DFT magnitudes of a mean reference lesion's change on the crop's grid and spacing
(:meth:`.lesion_spectrum.LesionSpectrum.on_grid`), ``theta`` the optimised phases (random at the
start, from the run's random seed), ``r`` the update region (None: 1). ``theta - theta(-f)`` is
antisymmetric, so the change is real and ``|F D_t| = g_t * A`` exactly (before clamping and the
region). The gain ``g_t`` grows by ``step / peak`` per iteration up to ``strength`` (``peak`` =
``mean(A)``, the largest value the change can take at full gain), so the largest possible change
per voxel grows by ``step`` image units per iteration, as with the other methods; iteration 0 is the
start image. The phases move along the objective's gradient (through the inverse transform; Adam's
direction with ``adam``), normalised so that, to first order, no voxel changes by more than ``step``
per iteration, and no phase by more than ``max_phase`` radians.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from .step import normalised


def mirrored(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` at the negated frequency index (``n -> -n mod N`` along each of ``dims``)."""
    return torch.roll(torch.flip(t, dims), shifts=(1,) * len(dims), dims=dims)


class PhaseDream:
    """The phase-only parametrisation of the dream change on a crop ``[k, j, i]``.

    ``amplitude``: DFT magnitudes on the transformed axes (``[j, i]`` for a 2D network, ``[k, j, i]``
    for a 3D one), image units; ``step``: image units per iteration; ``strength``: the final gain
    (1 = the mean reference lesion's amplitude); ``max_phase``: radians per iteration.
    """

    def __init__(self, amplitude: np.ndarray, spatial_dims: int, step: float, strength: float, max_phase: float,
                 random_seed: int = 0, device=None):
        self.dims = (1, 2) if spatial_dims == 2 else (0, 1, 2)
        a = torch.as_tensor(np.asarray(amplitude), dtype=torch.float32, device=device)
        self.amplitude = a.unsqueeze(0) if spatial_dims == 2 else a
        self.peak = float(self.amplitude.mean())
        if not self.peak > 0:
            raise ConfigError("The reference lesions' amplitude spectrum is zero at every frequency of this crop "
                              "(the crop is too small to hold a lesion). Use a larger crop (--roi-size) or another "
                              "method.")
        gen = torch.Generator(device="cpu").manual_seed(int(random_seed) + 104729)
        self.theta = ((torch.rand(tuple(self.amplitude.shape), generator=gen) * 2 - 1) * math.pi).to(device)
        self.step, self.strength, self.max_phase = float(step), float(strength), float(max_phase)
        self.gain = 0.0
        self.base: torch.Tensor | None = None

    def spectrum(self, theta: torch.Tensor) -> torch.Tensor:
        """``A * exp(i (theta - theta(-f)))``: a Hermitian spectrum (its inverse transform is real)."""
        phase = theta - mirrored(theta, self.dims)
        return torch.polar(self.amplitude, phase)

    def change(self, theta: torch.Tensor | None = None, gain: float | None = None) -> torch.Tensor:
        """The dream change ``D`` [k, j, i] (image units) for the phases ``theta`` (default the current)."""
        theta = self.theta if theta is None else theta
        gain = self.gain if gain is None else gain
        return gain * torch.fft.ifftn(self.spectrum(theta), dim=self.dims).real

    def phase_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """dObjective/dtheta from dObjective/dX (``grad`` [k, j, i]), through the inverse transform."""
        with torch.enable_grad():
            theta = self.theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.change(theta), theta, grad_outputs=grad)
        return g

    def update(self, x: torch.Tensor, grad: torch.Tensor, region: torch.Tensor | None, low: float, high: float,
               adam=None) -> torch.Tensor:
        """The next image from this iteration's image ``x`` and objective gradient ``grad``."""
        if self.base is None:  # iteration 0: the start image (the change is still zero)
            self.base = x.detach().clone()
        if region is not None:
            grad = grad * region
        if self.gain > 0:
            direction = self.phase_gradient(grad)
            if adam is not None:
                direction = adam.direction(direction)
            direction = normalised(direction)
            with torch.no_grad():
                moved = self.gain * torch.fft.ifftn(
                    self.spectrum(self.theta) * (1j * (direction - mirrored(direction, self.dims))),
                    dim=self.dims).real
                if region is not None:
                    moved = moved * region
                eta = min(self.max_phase, self.step / max(float(moved.abs().max()), 1e-30))
                self.theta = self.theta + eta * direction
        self.gain = min(self.strength, self.gain + self.step / self.peak)
        with torch.no_grad():
            change = self.change()
            if region is not None:
                change = change * region
            return (self.base + change).clamp_(low, high)
