"""The paper's update, unchanged (Couteaux et al. 2019, section 2.2).

``X <- clamp(X + step * g, intensity_range)`` with ``g = dObjective/dX``, optionally ``g / max|g|``
(``normalize_gradient``) and optionally only inside the update region. This is the exact arithmetic
of the reproduction; tests pin its numbers, so do not reorder these operations.
"""

from __future__ import annotations

import torch


def paper_update(x: torch.Tensor, grad: torch.Tensor, step: float, normalize_gradient: bool,
                 region: torch.Tensor | None, low: float, high: float) -> torch.Tensor:
    """One update of the image ``x`` ([k, j, i], image units) by its gradient ``grad``."""
    with torch.no_grad():
        if normalize_gradient:
            grad = grad / grad.abs().max().clamp_min(1e-12)
        if region is not None:
            grad = grad * region
        return (x + step * grad).clamp_(low, high)
