"""Adam on the image (Kingma & Ba 2015), as Lucid/Lucent optimise their parametrisations.

The direction returned is Adam's bias-corrected ``m / (sqrt(v) + eps)``; the loop then normalises it
so that the largest voxel moves by ``step`` image units.
"""

from __future__ import annotations

import torch


class Adam:
    """Per-voxel first and second moments of the gradient ([k, j, i])."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-12):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = self.v = None
        self.t = 0

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        self.t += 1
        self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        m_hat = self.m / (1 - self.beta1 ** self.t)
        v_hat = self.v / (1 - self.beta2 ** self.t)
        scale = v_hat.sqrt().max().clamp_min(1e-30)
        return m_hat / (v_hat.sqrt() + self.eps * scale)
