"""Feature accentuation: change the start image only near the seed, and not too much.

The update is weighted by a soft ball ``exp(-r^2 / (2 sigma^2))`` (``r`` the distance to the seed in
millimetres, from the real spacing) and pulled back to the start: the ascent direction is
``g / max|g| - l2 * (X - X0) / scale`` (``scale`` the card's intensity scale,
:func:`..step.intensity_scale`), the gradient of an L2 penalty to the start weighed against the
normalised objective gradient, so its strength does not depend on the network: a voxel stops
changing when it is ``scale * |g| / (max|g| * l2)`` from the start (one window width at the most
sensitive voxel for ``l2 = 1``). Horama's feature accentuation, localised for segmentation.
"""

from __future__ import annotations

import torch


def soft_ball(shape: tuple[int, int, int], seed: tuple[int, int, int], spacing_kji: tuple[float, float, float],
              sigma_mm: float, device=None) -> torch.Tensor:
    """Gaussian weights in [0, 1] over the crop ``[k, j, i]``, 1 at the seed."""
    grids = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in shape], indexing="ij")
    r2 = sum(((g - s) * float(sp)) ** 2 for g, s, sp in zip(grids, seed, spacing_kji))
    return torch.exp(-r2 / (2.0 * float(sigma_mm) ** 2))


def pulled_to_start(grad: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, weight: float, scale: float) -> torch.Tensor:
    """``grad / max|grad| - weight * (x - x0) / scale``: ascent on the objective with an L2 pull to the start."""
    return grad / grad.abs().max().clamp_min(1e-30) - float(weight) * (x - x0) / float(scale)
