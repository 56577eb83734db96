"""The transformed copies' intensity noise, as a function of where it lands.

Each iteration a dream draws two keys ``s1, s2`` (24-bit integers, from its generator, in the same call
as its random transforms: :meth:`.transforms.RandomTransforms.draw_all`). Copy ``c``'s noise at voxel
``v`` (``v`` its linear index in the crop, network spatial axes in C order: ``[j, i]`` for a 2D network,
``[k, j, i]`` for a 3D one; ``c`` = 0 for the first transformed copy) is then the Box-Muller normal

    ``n = c V + v``  (``V`` the crop's voxels),
    ``u1 = (floor(h(n XOR s1) / 2^8) + 1/2) / 2^24``,  ``u2 = floor(h(n XOR s2) / 2^8) / 2^24``,
    ``z = sqrt(-2 ln u1) cos(2 pi u2)``,

times the method's noise standard deviation; ``h`` is a 32-bit integer hash
(``x <- ((x >> 16) XOR x) * 0x45d9f3b mod 2^32`` twice, then ``(x >> 16) XOR x``). So the noise of a
copy's seed window (:mod:`.window`) is computed for the window's voxels alone and equals the
full crop's at those voxels, exactly: a dream reads the same numbers whether its copies run on the
window or on the full crop, and batched restarts compute all members' windows' noise in one go
instead of each member drawing the whole crop's from its generator (the window is about 6% of the
demo crop). The values are standard normal to within sampling error (tested: mean, standard
deviation, tails, and no correlation between neighbours, copies or iterations).

All integer arithmetic stays below 2^63 (products of a 32-bit value and a 27-bit constant), so it is
exact in int64 on every device, and it runs where the copies are (no noise is drawn on the CPU and
copied to a GPU). Cost on this 2-core CPU: the demo's 3 x 24^2 window 0.11 ms (4 dreams at once
0.20 ms), where drawing the whole 96^2 crop's noise from the generator took 0.11 ms per dream; over a
whole crop, for copies without a window, the hash costs about 3x the generator's draw (3 x 64^3:
11.7 against 3.4 ms), about 1% of such an iteration (a 3D MONAI UNet's forward and backward of
4 x 64^3: 0.6 s).
"""

from __future__ import annotations

import math

import numpy as np
import torch

KEY_BITS = 24
"""Bits of each of an iteration's two keys (a float32 uniform number carries 24 random bits)."""
_MASK = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B


def keys_from_uniforms(u: np.ndarray) -> np.ndarray:
    """Two uniform numbers in [0, 1) (float32, from the generator) -> the iteration's keys ``[2]``
    (int64, each in [0, 2^24))."""
    return np.floor(np.asarray(u, dtype=np.float64) * (1 << KEY_BITS)).astype(np.int64)


def _hash_(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash ``h`` of values in [0, 2^32) (an int64 tensor, changed in place)."""
    for _ in range(2):
        x ^= x >> 16
        x *= _MULTIPLIER
        x &= _MASK
    x ^= x >> 16
    return x


def voxel_counters(shape: tuple[int, ...], copies: int, slices: tuple[slice, ...] | None, device=None) -> torch.Tensor:
    """``n = c V + v`` for the ``copies`` transformed copies of a crop of spatial ``shape`` over the
    voxels in ``slices`` (the whole crop when None): int64 ``[copies, *size]``."""
    slices = tuple(slice(0, n) for n in shape) if slices is None else tuple(slices)
    total = int(np.prod(shape))
    index = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):  # C order: the last axis varies fastest
        s = slices[axis]
        steps = torch.arange(s.start, s.stop, dtype=torch.int64, device=device) * stride
        index = index.unsqueeze(0) + steps.reshape((-1,) + (1,) * (len(shape) - 1 - axis))
        stride *= int(shape[axis])
    offsets = torch.arange(int(copies), dtype=torch.int64, device=device) * total
    return (offsets.reshape((-1,) + (1,) * len(shape)) + index) & _MASK


def gaussian(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Standard normal noise at ``counters`` (:func:`voxel_counters`, ``[M, *size]``) for each row of
    ``keys`` (int64 ``[N, 2]``, one dream's iteration each): float32 ``[N, M, *size]``. Both hashes of
    all rows in one pass, in place (on small windows the per-operation cost is what counts)."""
    k = keys.to(device=counters.device, dtype=torch.int64)
    x = _hash_(counters.unsqueeze(0).unsqueeze(0) ^ k.reshape(tuple(k.shape) + (1,) * counters.dim()))
    x >>= 8  # 24 bits: exact in float32
    u1, u2 = x.to(torch.float32).unbind(1)
    radius = u1.add_(0.5).mul_(1.0 / (1 << KEY_BITS)).log_().mul_(-2.0).sqrt_()
    return radius.mul_(u2.mul_(2.0 * math.pi / (1 << KEY_BITS)).cos_())


__all__ = ["KEY_BITS", "keys_from_uniforms", "voxel_counters", "gaussian"]
