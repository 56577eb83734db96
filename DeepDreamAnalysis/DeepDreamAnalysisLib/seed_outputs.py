"""What one forward gives at and near the seed, for one dream or several dreams at once.

For the methods whose transformed copies run on an exact seed window (:mod:`.dreaming.window`),
an iteration reads from the network's outputs: the objective (the copies' seed logits, averaged),
the probability at the seed (copy 0, the image itself), and the mask near the seed
(:mod:`.dreaming.near_seed`: empty while the seed is below the threshold, else the probabilities of a
box around the seed). :class:`~.dream.DreamLoop` asks for its own; batched restarts
(:mod:`.engine.batched`) ask for all members at once. Either way each member's numbers are computed
row by row with the same operations, so a member's values do not depend on the others: the
members' rows are only stacked so that a few tensor operations and ONE copy to Python serve all of
them (on a CPU the per-operation overhead of a small tensor, and on a GPU its kernel launch, is what
several dreams would otherwise pay once each).

Axis order: logits ``[N, C, ...]`` (batch rows, classes, the network's spatial axes: ``[j, i]`` for a
2D network, ``[k, j, i]`` for a 3D one); probability maps over the crop ``[k, j, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .dreaming.near_seed import SLACK, START_RADIUS, grown, plan_box, reaches
from .dreaming.window import AUDIT_EVERY, WindowMismatch, close

AUDIT_BATCH_VOXELS = 1 << 18
"""At most this many voxels (copies x crop voxels) in one audit forward of several dreams' copies
(the demo's 4 restarts x 4 copies x 96^2 = 147,456): more, and the members are audited in smaller
groups (a 3D crop's copies alone can fill the memory)."""


@dataclass
class SeedMaps:
    """What one iteration's forward knows besides the objective: the probability at the seed, and the
    full probability map ``[k, j, i]`` and/or the seed's mask when computed (:mod:`.dreaming.near_seed`).
    ``full_logits``: the untransformed crop's logits ``[C, ...]`` when a window audit computed them."""

    p_seed: float
    probability: torch.Tensor | None = None
    empty: bool = False
    """The mask is empty (the seed is at or below the threshold)."""
    full_logits: torch.Tensor | None = None
    box: object = None
    """The :class:`~.dreaming.near_seed.Box` whose probabilities (``box_probability``, network spatial
    axes) hold the whole mask, or None."""
    box_probability: torch.Tensor | None = None

    @classmethod
    def of(cls, output, seed) -> "SeedMaps":
        """A forward's maps: ``output`` itself when it is SeedMaps, else a full probability map [k, j, i]."""
        if isinstance(output, SeedMaps):
            return output
        probability = output.detach()
        return cls(float(probability[tuple(seed)]), probability)


def class_probability(card, logits: torch.Tensor) -> torch.Tensor:
    """The target class's probability from logits ``[N, C, ...]`` (sigmoid or softmax over C, per the
    card): ``[N, ...]``."""
    t = card.target_class
    if card.activation == "sigmoid":
        return torch.sigmoid(logits[:, t])
    return torch.softmax(logits, dim=1)[:, t]


def seed_objectives(card, objective: str, at_seed: torch.Tensor) -> torch.Tensor:
    """Each dream's objective averaged over its copies, from their seed logits ``[N, K, C]``: ``[N]``
    (the target's logit, or its log-odds ``z_t - logsumexp(z_other)`` for a softmax model with
    ``objective="log_odds"``)."""
    t = card.target_class
    value = at_seed[..., t]
    if card.activation == "softmax" and objective == "log_odds":
        others = torch.cat([at_seed[..., :t], at_seed[..., t + 1:]], dim=-1)
        value = value - torch.logsumexp(others, dim=-1)
    return value.mean(dim=-1)


def windowed_objectives(loops: list, logits: torch.Tensor, xs: list, run: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Per member, (objective, :class:`SeedMaps`) or the :class:`WindowMismatch` that ends its window,
    from the copies' window logits ``logits`` ``[N K, C, *window]`` (member ``m``'s K rows from
    ``m K`` on) of the members ``loops`` at images ``xs``. The members share the window's size and
    seed position, the number of copies and the card's target, activation and objective
    (:func:`same_seed_outputs`). The seed's probability comes from copy 0 (the image itself).

    At an audited iteration (every :data:`AUDIT_EVERY`, iteration 0 first) the members' copies also
    run on the full crop without gradient (``run``; several members per forward, up to
    :data:`AUDIT_BATCH_VOXELS`): a member whose copies' seed logits differ from its window's gets a
    :class:`WindowMismatch`; the others get copy 0's full probability map from it."""
    first = loops[0]
    window, k, n = first.window, first.method.copies, len(loops)
    if tuple(logits.shape) != (n * k, first.card.out_channels) + tuple(window.size):
        shape = [k] + list(logits.shape[1:])
        return [WindowMismatch(f"the network returned {shape} for the copies' windows") for _ in loops]
    at_seed = logits[(slice(None), slice(None)) + tuple(window.seed)].reshape(n, k, -1)  # [N, K, C]
    p_seed = class_probability(first.card, at_seed[:, 0].detach()).tolist()
    objectives = seed_objectives(first.card, first.objective, at_seed).unbind(0)
    results: list = [(objective, SeedMaps(p)) for objective, p in zip(objectives, p_seed)]
    if first._iteration % AUDIT_EVERY == 0:
        _audit(loops, at_seed.detach(), xs, run, results)
    return results


def _audit(loops: list, at_seed: torch.Tensor, xs: list, run, results: list) -> None:
    k = loops[0].method.copies
    crop = loops[0]._crop_spatial()
    per_member = k * int(np.prod(crop))
    step = max(1, AUDIT_BATCH_VOXELS // per_member)
    for begin in range(0, len(loops), step):
        chunk = range(begin, min(len(loops), begin + step))
        with torch.no_grad():
            batch = torch.cat([loops[m]._batch_input(loops[m].method.batch(xs[m].detach(), drawn=loops[m].method.transforms.last))
                               for m in chunk], dim=0)
            copies = run(batch)
        for row, m in enumerate(chunk):
            loop = loops[m]
            full = copies[row * k:(row + 1) * k]
            loop._check_logits(full, k, crop)
            if not close(at_seed[m], full[(slice(None), slice(None)) + loop.spatial_seed]):
                results[m] = WindowMismatch(f"the copies' seed logits on the window differ from the same copies' on "
                                            f"the full crop (audit at iteration {loop._iteration})")
                continue
            maps = results[m][1]
            maps.full_logits = full[0].detach()
            maps.probability = loop._probability(maps.full_logits)


def same_seed_outputs(a, b) -> bool:
    """Whether dreams ``a`` and ``b`` read their objective, seed probability and mask from their outputs
    the same way (the same window size and seed position, copies, card target, activation, objective
    and threshold): their outputs can then be read together."""
    return (a.window is not None and b.window is not None and tuple(a.window.size) == tuple(b.window.size)
            and tuple(a.window.seed) == tuple(b.window.seed) and a.method.copies == b.method.copies
            and a.card.target_class == b.card.target_class and a.card.activation == b.card.activation
            and a.card.spatial_dims == b.card.spatial_dims and a.objective == b.objective
            and a.config.threshold == b.config.threshold)


def masks_near_seed(loops: list, xs: list, maps: list, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give each windowed loop's :class:`SeedMaps` (``loops[m]`` at image ``xs[m]``) what its mask
    needs (:mod:`.dreaming.near_seed`): nothing when the seed is at or below the threshold (empty), the
    probabilities of a box around the seed that holds every voxel above the threshold it could reach,
    or, where boxes are off for it, the full map. ``run``: the network on a batch without gradient
    (one call per input size: the loops' boxes share one radius, hence one size). The boxes of one
    size and kind are read together (:func:`_read_boxes`)."""
    requests = []  # (loop, x, maps, box or None for the full crop)
    wanted = [lp for lp, m in zip(loops, maps) if m.p_seed > lp.config.threshold and lp.box_off is None]
    radius = max((lp.box_radius for lp in wanted), default=START_RADIUS)
    for loop, x, m in zip(loops, xs, maps):
        if m.p_seed <= loop.config.threshold:  # the seed itself is outside the mask: it is empty
            m.empty = True
        elif loop.box_off is None:
            requests.append((loop, x, m, plan_box(loop.window, loop._crop_spatial(), loop.spatial_seed, radius)))
        elif m.probability is None:
            requests.append((loop, x, m, None))
    while requests:
        groups: dict[tuple, list] = {}  # input size -> [(loop, x, maps, box or None: the full crop)]
        for loop, x, m, box in requests:
            if box is None and m.full_logits is not None:  # a window audit ran the full crop already
                m.probability = loop._probability(m.full_logits)
                continue
            if box is not None and not loop.box_checked and m.full_logits is None:  # a box's first use: checked
                groups.setdefault(loop._crop_spatial(), []).append((loop, x, m, None))
            size = box.input_size if box is not None else loop._crop_spatial()
            groups.setdefault(size, []).append((loop, x, m, box))
        outputs = []  # (the group's items, the network's output for them, rows in order)
        with torch.no_grad():
            for group in groups.values():
                images = [(x[0] if lp.card.spatial_dims == 2 else x).detach() for lp, x, _, _ in group]
                crops = torch.stack([image[b.inp if b is not None else ...] for (_, _, _, b), image in zip(group, images)])
                first = group[0][0]
                if all(lp.card.preprocessing == first.card.preprocessing for lp, _, _, _ in group):
                    batch = first._batch_input(crops)  # one preprocessing for all (the usual case: one card)
                else:
                    batch = torch.cat([lp._batch_input(c[None]) for (lp, _, _, _), c in zip(group, crops)], dim=0)
                outputs.append((group, run(batch)))
        for group, zs in outputs:  # the full crops first: a box is checked against them
            for (loop, _, m, box), z in zip(group, zs):
                if box is None:
                    loop._check_logits(z[None], 1, loop._crop_spatial())
                    m.full_logits = z
                    m.probability = loop._probability(z)
        requests = []
        for group, zs in outputs:
            requests.extend(_read_boxes(group, zs, radius))


def _read_boxes(group: list, zs: torch.Tensor, radius: int) -> list:
    """The boxes among ``group`` (items ``(loop, x, maps, box)``, their network outputs ``zs`` in
    order): each box's probabilities, checked at its first use and at audits against the full crop's;
    the box kept where nothing above the threshold touches its open sides, else a request for a
    larger one (returned). Items of the same box and kind are read with one set of operations."""
    kinds: dict[tuple, list[int]] = {}
    for row, (loop, _, m, box) in enumerate(group):
        if box is None:
            continue
        if m.full_logits is not None:  # a box's first use, or a window audit
            inner = zs[row][(slice(None),) + box.inner]
            if not close(inner, m.full_logits[(slice(None),) + box.out]):
                loop.box_off = (f"at iteration {loop._iteration} the box's logits differed from the full crop's "
                                "(full probability maps from then on)")
                continue
            loop.box_checked = True
        c = loop.card
        where = tuple((s.start, s.stop) for s in box.inp + box.out)  # slices do not hash before Python 3.12
        key = (where, tuple(loop.spatial_seed), c.target_class, c.activation, c.spatial_dims, loop.config.threshold)
        kinds.setdefault(key, []).append(row)
    again = []
    for (_, seed, *_), rows in kinds.items():
        loop, box = group[rows[0]][0], group[rows[0]][3]
        picked = zs[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else zs[rows]
        probability = class_probability(loop.card, picked[(slice(None), slice(None)) + box.inner])  # [G, *out]
        for row, p, reach in zip(rows, probability, reaches(probability > loop.config.threshold, box, seed)):
            loop, x, m, _ = group[row]
            if reach is not None:  # nothing above the threshold on the box's open sides: the mask is inside
                m.box, m.box_probability = box, p
                loop.box_radius = max(START_RADIUS, reach + SLACK)
                continue
            loop.box_radius = grown(max(loop.box_radius, radius), loop._crop_spatial())  # a larger box
            again.append((loop, x, m, plan_box(loop.window, loop._crop_spatial(), loop.spatial_seed, loop.box_radius)))
    return again


__all__ = ["SeedMaps", "class_probability", "seed_objectives", "windowed_objectives", "same_seed_outputs",
           "masks_near_seed", "AUDIT_BATCH_VOXELS"]
