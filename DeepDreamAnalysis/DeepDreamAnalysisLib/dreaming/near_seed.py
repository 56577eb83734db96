"""The mask near the seed, exactly, without the network's forward on the whole crop.

At every iteration a run needs the mask: the connected component of ``probability > threshold``
that holds the seed (:func:`..mask.seed_component`, face connectivity). The methods whose copies
run on an exact seed window (:mod:`.window`) used to forward the whole crop once more per iteration
for it. Where the window is exact the mask can be had for less, and still exactly:

1. **Seed below the threshold** (the first iterations of a dream): the mask is empty. The seed's
   probability comes from copy 0's window logits, which equal the full crop's (the window is exact,
   and audited): no other forward is needed.
2. **Seed above it**: the network runs, without gradient, on an input window around the seed
   that holds the receptive field of every output in a box around the seed (the seed window's
   field on either side of the box, one more grid step for outputs on another phase of the
   network's downsampling grid, aligned to that grid as the seed window is). When no voxel on a side
   of the box that lies inside the crop is above the threshold, the component cannot leave the box
   (a path out of it passes through its border), and the component found in the box is the whole
   mask; otherwise the box is doubled and the iteration's box recomputed, up to the whole crop. The
   next iteration's box reaches :data:`SLACK` voxels beyond the farthest voxel above the threshold
   (at least :data:`START_RADIUS`); the members of a batch share the largest, so their boxes run as
   one batch. The component itself is found when the run reads the mask (``DreamState.seed_mask``).
3. **Checked, exact or off**: the first time a run uses a box, and at every window audit
   (:data:`.window.AUDIT_EVERY` iterations, whose full-crop forward gives the full map anyway), the
   box's probabilities are compared with the full crop's; a difference beyond :data:`.window.RTOL`
   turns the boxes off for the rest of the run (full maps, as before), noted in run.json.

The full probability map (snapshots, every ``snapshot_every`` iterations) is computed when asked
for: :class:`~..dream.DreamState` ``.probability`` runs the network on that iteration's image then.

Axis order: boxes are in the network's spatial axes, ``[j, i]`` for a 2D network (the crop's single
axial slice) and ``[k, j, i]`` for a 3D one; masks are ``[k, j, i]`` over the crop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

START_RADIUS = 8
"""Half-size, in output voxels, of the first box around the seed (a dream's first mask is small)."""
SLACK = 4
"""Voxels the next iteration's box leaves around the last mask (a mask grows a little per iteration;
one that grows more reaches the box's side and the box is doubled)."""


@dataclass(frozen=True)
class Box:
    """Outputs ``out`` (crop voxels, network spatial axes) computed exactly from the input window
    ``inp``; ``inner``: ``out`` in the window's own coordinates; ``open_sides[a]``: whether the low
    and high sides of ``out`` along axis ``a`` lie inside the crop (a mask touching them may go on)."""

    inp: tuple[slice, ...]
    out: tuple[slice, ...]
    inner: tuple[slice, ...]
    open_sides: tuple[tuple[bool, bool], ...]

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.inp)


def plan_box(window, spatial: tuple[int, ...], seed: tuple[int, ...], radius: int) -> Box | None:
    """The box of outputs within ``radius`` voxels of ``seed`` (network spatial axes) and the input
    window that computes them exactly on a network whose seed ``window`` (a
    :class:`.window.CopyWindow`, its ``grid`` the downsampling grid it was verified on) is exact;
    None when that input window would be the whole crop (then the full map costs the same)."""
    grid = max(1, int(getattr(window, "grid", 1)))
    before = tuple(window.seed)
    after = tuple(n - s - 1 for n, s in zip(window.size, window.seed))
    inp, out, inner, sides = [], [], [], []
    for a, n in enumerate(spatial):
        lo, hi = max(0, seed[a] - radius), min(n - 1, seed[a] + radius)
        begin = max(0, ((lo - before[a] - grid) // grid) * grid)
        end = min(n, -((-(hi + 1 + after[a] + grid)) // grid) * grid)
        inp.append(slice(begin, end))
        out.append(slice(lo, hi + 1))
        inner.append(slice(lo - begin, hi + 1 - begin))
        sides.append((lo > 0, hi < n - 1))
    if all(s.start == 0 and s.stop == n for s, n in zip(inp, spatial)):
        return None
    return Box(tuple(inp), tuple(out), tuple(inner), tuple(sides))


def component_in_box(probability: np.ndarray, box: Box, seed: tuple[int, ...], threshold: float,
                     crop_shape: tuple[int, int, int]) -> np.ndarray | None:
    """The seed's component as a bool mask ``[k, j, i]`` over the crop, from ``probability`` on
    ``box.out`` (network spatial axes); None when the component reaches an open side of the box
    (it may go on outside: a larger box is needed)."""
    from ..mask import seed_component

    local_seed = tuple(s - o.start for s, o in zip(seed, box.out))
    lifted = probability if len(crop_shape) == probability.ndim else probability[None]
    offset = 0 if len(crop_shape) == probability.ndim else 1
    part = seed_component(lifted, ((0,) if offset else ()) + local_seed, threshold)
    flat = part[0] if offset else part
    for a, (low, high) in enumerate(box.open_sides):
        index = [slice(None)] * flat.ndim
        if low:
            index[a] = 0
            if flat[tuple(index)].any():
                return None
        if high:
            index[a] = -1
            if flat[tuple(index)].any():
                return None
    mask = np.zeros(crop_shape, dtype=bool)
    mask[((slice(None),) if offset else ()) + box.out] = part
    return mask


def reaches(above, box: Box, seed: tuple[int, ...]) -> list[int | None]:
    """For each row of ``above`` (a bool tensor ``[G, *box.out]``: the voxels above the threshold in the
    box of G dreams with the same box and seed, network spatial axes): how far (voxels, along any
    axis) from the seed they reach, 0 when none; None when any lies on an open side of the box (the
    mask might go on outside it: a larger box is needed). A few operations for all rows and one copy
    to Python."""
    import torch

    g = int(above.shape[0])
    rows = [torch.where(above, _distance(tuple(above.shape[1:]), tuple(s - o.start for s, o in zip(seed, box.out)),
                                         str(above.device)), -1).reshape(g, -1).amax(dim=1)]
    for a, (low, high) in enumerate(box.open_sides):
        for open_side, end in ((low, 0), (high, -1)):
            if open_side:
                rows.append(above.select(a + 1, end).reshape(g, -1).any(dim=1).to(rows[0].dtype))
    table = torch.stack(rows).tolist()
    return [None if any(r[col] for r in table[1:]) else max(0, int(table[0][col])) for col in range(g)]


@functools.lru_cache(maxsize=64)
def _distance(shape: tuple[int, ...], local: tuple[int, ...], device: str):
    """The Chebyshev distance (voxels) of every voxel of a box of ``shape`` from ``local``: int64 ``shape``."""
    import torch

    dist = torch.zeros(shape, dtype=torch.int64, device=device)
    for a, (n, c) in enumerate(zip(shape, local)):
        along = (torch.arange(n, device=device) - c).abs().reshape((n,) + (1,) * (len(shape) - a - 1))
        dist = torch.maximum(dist, along)
    return dist


def grown(radius: int, spatial: tuple[int, ...]) -> int:
    """The next box radius: twice the last, enough to reach the whole crop in a few steps."""
    return min(2 * max(1, radius), max(spatial))


__all__ = ["Box", "plan_box", "component_in_box", "grown", "reaches", "START_RADIUS", "SLACK"]
