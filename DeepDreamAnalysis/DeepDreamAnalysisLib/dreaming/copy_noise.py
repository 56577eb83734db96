"""The transformed copies' intensity noise, as a function of where it lands.

Each iteration a dream draws two keys ``s1, s2`` (32-bit integers, each made of all three of the
uniform numbers it draws from its generator in the same call as its random transforms:
:meth:`.transforms.RandomTransforms.draw_all`, :func:`keys_from_uniforms`). Copy ``c``'s noise at voxel
``v`` (``v`` its linear index in the crop, network spatial axes in C order: ``[j, i]`` for a 2D network,
``[k, j, i]`` for a 3D one; ``c`` = 0 for the first transformed copy) is then the Box-Muller normal

    ``n = c V + v``  (``V`` the crop's voxels),
    ``a1 = h(2 n)``, ``a2 = h(2 n + 1)``  (fixed per voxel and copy),
    ``u1 = (floor(h(a1 XOR s1) / 2^9) + 1/2) / 2^23``,  ``u2 = floor(h(a2 XOR s2) / 2^8) / 2^24``,
    ``z = sqrt(-2 ln u1) cos(2 pi u2)``  (``|z|`` at most 5.8),

times the method's noise standard deviation; ``h`` is a 32-bit integer hash
(``x <- ((x >> 16) XOR x) * 0x45d9f3b mod 2^32`` twice, then ``(x >> 16) XOR x``). The keys enter
after a first round of the hash, so two iterations' fields share nothing but chance (a key XORed
into the plain counters would only reorder one fixed set of values), and ``u1`` and ``u2`` come
from different counters. So the noise of a copy's seed window (:mod:`.window`) is computed for the
window's voxels alone and equals the full crop's at those voxels, exactly: a dream reads the same
numbers whether its copies run on the window or on the full crop, and batched restarts compute all
members' windows' noise in one go instead of each member drawing the whole crop's from its
generator (the window is about 6% of the demo crop). The values are standard normal to within
sampling error (tested: mean, standard deviation, tails; no correlation of the values or of their
sizes between neighbours, copies or iterations). Counters repeat beyond ``2 (K-1) V = 2^32`` values
(a crop of about 890^3 voxels for K = 4).

All integer arithmetic stays below 2^63 (products of a 32-bit value and a 27-bit constant), so it is
exact in int64 on every device, and it runs where the copies are (no noise is drawn on the CPU and
copied to a GPU). The first round, ``a1`` and ``a2``, is computed once per crop shape, copies and
window, and kept (16 bytes a voxel and copy, 42 MB for the 3 copies of a 96^3 crop; shared by the
dreams of a batch; 16 are kept, the least recently used dropped). Cost on this 2-core CPU: the
demo's 3 x 24^2 window 0.16-0.21 ms (4 dreams at once 0.26-0.29 ms), where drawing the whole 96^2 crop's noise from
the generator took 0.12-0.14 ms per dream (4 dreams: 0.55-0.61 ms); over a whole crop, for copies
without a window, about 4x the generator's draw (3 x 64^3: 18.6 against 4.1 ms), about 3% of such
an iteration (a 3D MONAI UNet's forward and backward of 4 x 64^3: 0.6 s); it briefly needs about 24
bytes per value (the generator: 4).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

UNIFORM_BITS = 24
"""Random bits of one float32 uniform number from the generator."""
KEYS_UNIFORMS = 3
"""Uniform numbers an iteration's two 32-bit keys are made of (:func:`keys_from_uniforms`)."""
_MASK = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B


def keys_from_uniforms(u: np.ndarray) -> np.ndarray:
    """Three uniform numbers in [0, 1) (float32, from the generator) -> the iteration's keys ``[2]``
    (int64, each in [0, 2^32)). 64 of their 72 random bits make two 32-bit words ``w1, w2`` (the
    first two numbers' 24 bits, each with 8 of the third's lowest 16), and ``s1 = w1 XOR h(w2)``,
    ``s2 = w2 XOR h(w1)``: each key depends on all three numbers."""
    bits = np.floor(np.asarray(u, dtype=np.float64)[:KEYS_UNIFORMS] * (1 << UNIFORM_BITS)).astype(np.int64)
    w1 = int(bits[0] | ((bits[2] & 0xFF) << 24))
    w2 = int(bits[1] | (((bits[2] >> 8) & 0xFF) << 24))
    return np.array([w1 ^ _hash_(w2), w2 ^ _hash_(w1)], dtype=np.int64)


def _hash_(x):
    """The 32-bit integer hash ``h`` of values in [0, 2^32): an int64 tensor (changed in place) or one
    Python integer."""
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
    return offsets.reshape((-1,) + (1,) * len(shape)) + index


@functools.lru_cache(maxsize=16)
def _first_round(shape: tuple[int, ...], copies: int, where: tuple | None, device: str) -> torch.Tensor:
    n = voxel_counters(shape, copies, None if where is None else tuple(slice(a, b) for a, b in where), device)
    return _hash_(torch.stack([(2 * n) & _MASK, (2 * n + 1) & _MASK]))


def voxel_hashes(shape: tuple[int, ...], copies: int, slices: tuple[slice, ...] | None, device=None) -> torch.Tensor:
    """``a1 = h(2 n)`` and ``a2 = h(2 n + 1)`` of :func:`voxel_counters` (the first round of the hash,
    before the keys): int64 ``[2, copies, *size]`` in [0, 2^32), not to be changed. Kept per shape,
    copies, window and device (shared, least recently used dropped first)."""
    where = None if slices is None else tuple((int(s.start), int(s.stop)) for s in slices)
    return _first_round(tuple(int(n) for n in shape), int(copies), where, str(torch.device(device or "cpu")))


def gaussian(hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Standard normal noise at the voxels of ``hashes`` (:func:`voxel_hashes`, ``[2, M, *size]``) for
    each row of ``keys`` (int64 ``[N, 2]``, one dream's iteration each): float32 ``[N, M, *size]``.
    Both hashes of all rows in one pass, in place (on small windows the per-operation cost is what
    counts)."""
    k = keys.to(device=hashes.device, dtype=torch.int64)
    x = _hash_(hashes.unsqueeze(0) ^ k.reshape(tuple(k.shape) + (1,) * (hashes.dim() - 1)))  # [N, 2, M, *size]
    u1 = (x[:, 0] >> 9).to(torch.float32)  # 23 bits: u1 + 1/2 exact in float32, so 0 < u1 < 1
    u2 = (x[:, 1] >> 8).to(torch.float32)
    radius = u1.add_(0.5).mul_(1.0 / (1 << 23)).log_().mul_(-2.0).sqrt_()
    return radius.mul_(u2.mul_(2.0 * math.pi / (1 << 24)).cos_())


__all__ = ["UNIFORM_BITS", "KEYS_UNIFORMS", "keys_from_uniforms", "voxel_counters", "voxel_hashes", "gaussian"]
