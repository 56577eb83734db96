"""Spectral preconditioning: the update in a Fourier basis scaled by ``1 / f^decay``.

``f`` is the spatial frequency in cycles per millimetre, from the real voxel spacing (a CT crop of
0.8 x 0.8 x 5 mm voxels has a much lower top frequency along k than in-plane), clamped below at the
crop's lowest non-zero frequency so the mean change keeps a finite weight. Preconditioning the
gradient ``g`` as ``F^-1(w * F g)`` is plain ascent in the parametrisation ``X = X0 + F^-1(w c)``
up to a second factor ``w`` (Lucid's decorrelated Fourier parametrisation; Horama's 1/f^1.5).
A 2D network's crop ([1, j, i]) is transformed in-plane only.
"""

from __future__ import annotations

import torch


def frequency_weights(shape: tuple[int, ...], spacing_mm: tuple[float, ...], decay: float,
                      device=None) -> torch.Tensor:
    """Weights ``1 / max(f, f_min)^decay`` on the ``rfftn`` grid of ``shape`` (max weight 1).

    ``shape`` and ``spacing_mm`` are in the same axis order (``[k, j, i]`` or ``[j, i]``).
    """
    freqs = []
    for axis, (n, sp) in enumerate(zip(shape, spacing_mm)):
        f = torch.fft.rfftfreq(n, d=float(sp)) if axis == len(shape) - 1 else torch.fft.fftfreq(n, d=float(sp))
        freqs.append(f.to(torch.float64))
    grids = torch.meshgrid(*freqs, indexing="ij")
    f = torch.sqrt(sum(g ** 2 for g in grids))
    f_min = min(1.0 / (n * float(sp)) for n, sp in zip(shape, spacing_mm) if n > 1) if any(n > 1 for n in shape) else 1.0
    w = f.clamp_min(f_min) ** (-float(decay))
    return (w / w.max()).to(device=device, dtype=torch.float32)


class SpectralPreconditioner:
    """``F^-1(w * F g)`` for a crop ``[k, j, i]``; 2D crops use the in-plane axes."""

    def __init__(self, crop_shape: tuple[int, int, int], spacing_kji: tuple[float, float, float], decay: float,
                 spatial_dims: int, device=None):
        self.dims = (1, 2) if spatial_dims == 2 else (0, 1, 2)
        shape = tuple(crop_shape[d] for d in self.dims)
        spacing = tuple(spacing_kji[d] for d in self.dims)
        self.shape = shape
        self.weights = frequency_weights(shape, spacing, decay, device)
        if spatial_dims == 2:
            self.weights = self.weights.unsqueeze(0)

    def __call__(self, grad: torch.Tensor, stacked: bool = False) -> torch.Tensor:
        """``grad`` [k, j, i], or ``[M, k, j, i]`` with ``stacked`` (M gradients of the same crop, each
        transformed as alone up to rounding, in one call)."""
        dims = tuple(d + 1 for d in self.dims) if stacked else self.dims
        spectrum = torch.fft.rfftn(grad, dim=dims)
        return torch.fft.irfftn(spectrum * self.weights, s=self.shape, dim=dims)
