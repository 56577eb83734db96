r"""Is the dream trustworthy? Quality flags computed during and after every run.

A run's curves are only worth reading when the dreamed object is an object at the seed, made by
the network's target class, from plausible intensities. These checks look for the ways a dream goes
wrong; each gives a :class:`QualityFlag` (a stable ``code``, a message naming the cause and the
fix, the first iteration where it happened, and the measured value). An empty list means no check
fired: ``AnalysisResult.trustworthy``. docs/quality-flags.md lists every code with its cause and
fix.

Codes and thresholds (:class:`QualityThresholds`, defaults in brackets). Arrays are crops
``[k, j, i]``; a 2D model's crop has ``k`` size 1 and its border is checked in-plane only.

- ``mask_touches_border``: the mask (the connected component at the seed of
  ``probability > threshold``) has a voxel on a face of the crop, at any iteration.
- ``mask_exploded``: the mask grew more than ``explode_factor`` [10] times in one iteration from
  at least ``explode_min_voxels`` [20] voxels (a dream grows gradually; a jump means it merged
  with the network's false positives elsewhere in the crop).
- ``mask_covers_half_crop``: the mask holds more than ``half_crop`` [0.5] of the crop's voxels.
- ``change_outside_region``: where the dream may only change an update region (``update_radius``,
  or a method's region), the largest change outside it exceeds ``outside_change`` [1%] of the
  largest change inside (and 1e-4 image units).
- ``checkerboard``: the checkerboard index of the dream change ``final - start`` exceeds
  ``checkerboard`` [0.5]. The index is the share of the change's in-plane spectral energy
  (per axial slice, 2D FFT over ``[j, i]``) at radial frequencies above half the Nyquist frequency,
  :math:`\sqrt{(f_j/0.5)^2 + (f_i/0.5)^2} > 0.5` with ``f`` in cycles per voxel. A smooth blob
  (a lesion-like change) scores near 0, white noise about 0.8, a voxel-wise checkerboard 1.
- ``out_of_intensity_range``: more than ``saturated_fraction`` [1%] of the changed voxels end at
  or beyond the card's ``intensity_range`` limits (the ascent asked for values the clamp held back:
  intensities no scanner produces).
- ``crop_changed``: the crop is smaller than the requested ``roi_size`` (the image is smaller, or
  the card's ``size_divisible`` trimmed it), or its axes are in another order than the network's
  (:func:`reordered_axes`: a roi written in (i, j, k) order, an image whose spacing matches the
  card's only with its axes permuted, a 2D network on non-axial slices), with the sizes.
- ``no_dream``: ``p(seed)`` never rose above the mask threshold: there is no dreamed object.
- ``wrong_class``: (softmax, more than two classes) at the last iteration another class than the
  target has the highest probability at the seed, and its probability rose during the run: the
  ascent dreamed that class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CODES: dict[str, str] = {
    "mask_touches_border": "the mask reaches the crop's border",
    "mask_exploded": "the mask grew more than 10x in one iteration",
    "mask_covers_half_crop": "the mask covers more than half of the crop",
    "change_outside_region": "the image changed outside the update region",
    "checkerboard": "the dream change is high-frequency texture, not an object",
    "out_of_intensity_range": "the dream pushed voxels to the card's intensity_range limits",
    "crop_changed": "the crop is smaller than the requested roi_size, or its axes are reordered",
    "no_dream": "p(seed) never rose above the threshold",
    "wrong_class": "another class than the target wins at the seed",
}


@dataclass(frozen=True)
class QualityFlag:
    """One problem with a dream: ``code`` (a key of :data:`CODES`), a ``message`` naming the cause
    and the fix, the first ``iteration`` where it was seen (None: the whole run) and the measured
    ``value`` (units in the message; None when there is none)."""

    code: str
    message: str
    iteration: int | None = None
    value: float | None = None

    def to_dict(self) -> dict:
        """``{"code", "message", "iteration", "value"}`` for run.json (a NaN value becomes None)."""
        d = asdict(self)
        if d["value"] is not None and not math.isfinite(d["value"]):
            d["value"] = None
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "QualityFlag":
        return cls(str(data["code"]), str(data.get("message", "")), data.get("iteration"), data.get("value"))


@dataclass(frozen=True)
class QualityThresholds:
    """When a check fires (see the module docstring)."""

    explode_factor: float = 10.0
    explode_min_voxels: int = 20
    half_crop: float = 0.5
    outside_change: float = 0.01
    checkerboard: float = 0.5
    saturated_fraction: float = 0.01


def _size(shape) -> str:
    return " x ".join(str(int(n)) for n in shape)


class QualityMonitor:
    """Watches the masks as the loop runs (:meth:`observe`, cheap), then checks the images
    (:meth:`finish`). ``crop_shape``: the crop ``[k, j, i]``; ``spatial_dims``: 2 or 3;
    ``threshold``: the mask's probability threshold."""

    def __init__(self, crop_shape, spatial_dims: int, threshold: float = 0.5,
                 thresholds: QualityThresholds | None = None):
        self.shape = tuple(int(n) for n in crop_shape)
        self.spatial_dims = int(spatial_dims)
        self.threshold = float(threshold)
        self.t = thresholds or QualityThresholds()
        self.flags: dict[str, QualityFlag] = {}
        self.previous = 0
        self.best_p = -math.inf
        self.best_it: int | None = None
        self.iterations = 0

    def _add(self, flag: QualityFlag) -> None:
        self.flags.setdefault(flag.code, flag)

    def observe(self, iteration: int, mask: np.ndarray, probability_at_seed: float, voxels: int | None = None) -> None:
        """Check one iteration's mask (bool ``[k, j, i]``, the component at the seed; ``voxels``: its
        size when already known)."""
        self.iterations += 1
        if probability_at_seed > self.best_p:
            self.best_p, self.best_it = float(probability_at_seed), int(iteration)
        n = int(mask.sum()) if voxels is None else int(voxels)
        prev, self.previous = self.previous, n
        if n == 0:
            return
        if "mask_touches_border" not in self.flags and touches_border(mask, self.spatial_dims):
            self._add(QualityFlag(
                "mask_touches_border",
                f"The mask reached the border of the crop ({_size(self.shape)} voxels [k, j, i]) at iteration "
                f"{iteration} ({n} voxels): the object is cut off by the crop, so its size and shape features "
                "describe the crop, not the dream. Fix: a larger crop (--roi), --update-radius to keep the change "
                "near the seed, or a higher --threshold.", iteration, float(n)))
        if prev >= self.t.explode_min_voxels and n > self.t.explode_factor * prev:
            self._add(QualityFlag(
                "mask_exploded",
                f"The mask grew from {prev:,} to {n:,} voxels (x{n / prev:.0f}) in one iteration, at iteration "
                f"{iteration}: it merged with the network's false positives elsewhere in the crop, and features "
                "such as the maximum diameter measure that merge, not the dream. Fix: --update-radius to change "
                "only voxels near the seed, a higher --threshold, or a smaller --step.", iteration, n / prev))
        total = int(np.prod(self.shape))
        if n > self.t.half_crop * total:
            self._add(QualityFlag(
                "mask_covers_half_crop",
                f"The mask covers {n / total:.0%} of the crop ({n:,} of {total:,} voxels) at iteration {iteration}: "
                "the network segments most of the region, so the dream is not an object at the seed. Fix: "
                "--update-radius, a higher --threshold, a smaller --step, or a seed where the network does not "
                "already see the target.", iteration, n / total))

    def finish(self, start: np.ndarray | None = None, final: np.ndarray | None = None, region=None,
               intensity_range: tuple[float, float] | None = None) -> list[QualityFlag]:
        """All flags: the mask checks so far plus the image checks on ``start`` and ``final``
        (``[k, j, i]``, image units) and, when the run had one, the update ``region`` (same shape,
        nonzero inside)."""
        if self.iterations and self.best_p <= self.threshold:
            self._add(QualityFlag(
                "no_dream",
                f"p(seed) never rose above the threshold {self.threshold:g} in {self.iterations} iterations (highest "
                f"{self.best_p:.3f} at iteration {self.best_it}): there is no dreamed object, and the features "
                "describe nothing. Fix: a larger --step or more --iterations, --normalize-gradient, or "
                "--objective log_odds for a network with several classes (see the hint).",
                self.best_it, self.best_p))
        if start is not None and final is not None:
            start = np.asarray(start, dtype=np.float64)
            final = np.asarray(final, dtype=np.float64)
            change = final - start
            for flag in (outside_region_flag(change, region, self.t),
                         checkerboard_flag(change, self.t),
                         intensity_flag(start, final, intensity_range, self.t)):
                if flag is not None:
                    self._add(flag)
        return self.sorted()

    def sorted(self) -> list[QualityFlag]:
        order = list(CODES)
        return sorted(self.flags.values(), key=lambda f: order.index(f.code) if f.code in order else len(order))


def status_line(flags) -> str:
    """One line for a status bar (the Slicer panel, a notebook): which checks fired, or that none did."""
    flags = list(flags or [])
    if not flags:
        return "Quality: no flag, the dream passed every check."
    return (f"Quality: {len(flags)} flag(s), the dream may not be trustworthy: "
            + ", ".join(f.code for f in flags) + " (see the report or docs/quality-flags.md).")


def touches_border(mask: np.ndarray, spatial_dims: int = 3) -> bool:
    """True when ``mask`` ([k, j, i]) has a voxel on a face of the array; a 2D model's crop
    (``k`` size 1) is checked on its in-plane border only, as is any axis of size 1."""
    mask = np.asarray(mask, dtype=bool)
    for axis, n in enumerate(mask.shape):
        if n <= 1 or (spatial_dims == 2 and axis == 0):
            continue
        if np.take(mask, 0, axis=axis).any() or np.take(mask, n - 1, axis=axis).any():
            return True
    return False


def checkerboard_index(change: np.ndarray) -> float:
    """Share of the in-plane spectral energy of ``change`` ([k, j, i] or [j, i]) above half the
    Nyquist frequency (module docstring); NaN for a zero change."""
    change = np.asarray(change, dtype=np.float64)
    if change.ndim == 2:
        change = change[None]
    power = np.abs(np.fft.fft2(change, axes=(-2, -1))) ** 2
    total = float(power.sum())
    if not total > 0:
        return math.nan
    fj = np.fft.fftfreq(change.shape[-2])[:, None] / 0.5
    fi = np.fft.fftfreq(change.shape[-1])[None, :] / 0.5
    high = np.sqrt(fj ** 2 + fi ** 2) > 0.5
    return float(power[:, high].sum() / total)


def checkerboard_flag(change: np.ndarray, t: QualityThresholds) -> QualityFlag | None:
    index = checkerboard_index(change)
    if not (math.isfinite(index) and index > t.checkerboard):
        return None
    return QualityFlag(
        "checkerboard",
        f"The dream change (final minus start) is high-frequency texture: {index:.0%} of its energy lies above half "
        f"the Nyquist frequency (checkerboard index {index:.2f} > {t.checkerboard:g}; a lesion-like change scores "
        "near 0, white noise about 0.8). The network is exploited by a pattern, not shown an object; texture "
        "features then measure that pattern. Fix: a dream method with transformation robustness or spectral "
        "preconditioning (--method, docs/dream-methods.md), or a tv regulariser.", None, index)


def outside_region_flag(change: np.ndarray, region, t: QualityThresholds) -> QualityFlag | None:
    if region is None:
        return None
    region = np.asarray(region.detach().cpu().numpy() if hasattr(region, "detach") else region)
    region = np.broadcast_to(region, change.shape)
    outside = region <= 0
    if not outside.any():
        return None
    out = float(np.abs(change[outside]).max())
    inside = float(np.abs(change[~outside]).max()) if (~outside).any() else 0.0
    if out <= 1e-4 or out <= t.outside_change * inside:
        return None
    share = f", {out / inside:.0%} of the largest change inside" if inside > 0 else ""
    return QualityFlag(
        "change_outside_region",
        f"The image changed outside the update region (largest change there {out:.4g} image units{share}): part of "
        "what the network reacts to is not where the dream was meant to be. Cause: the start image has values "
        "outside the card's intensity_range (the clamp moves them), or the dream method leaks. Fix: check "
        "intensity_range in the card, or report the method.", None, out)


def intensity_flag(start: np.ndarray, final: np.ndarray, intensity_range, t: QualityThresholds) -> QualityFlag | None:
    if intensity_range is None:
        return None
    low, high = (float(v) for v in intensity_range)
    changed = final != start
    n_changed = int(changed.sum())
    if n_changed == 0:
        return None
    at_limit = changed & ((final <= low) | (final >= high))
    n = int(at_limit.sum())
    if n == 0 or n <= t.saturated_fraction * n_changed:
        return None
    return QualityFlag(
        "out_of_intensity_range",
        f"{n:,} changed voxels ({n / n_changed:.0%} of the change) end at or beyond the card's intensity_range "
        f"[{low:g}, {high:g}]: the ascent asked for values beyond it and the clamp held them there; no scanner "
        "produces such a lesion. Fix: a smaller --step, an l2 or tv regulariser, or the right intensity_range in "
        "the card (an MR card needs its own).", None, float(n))


def crop_flag(requested_kji, got_kji, image_shape_kji, size_divisible: int = 1, *, spacing_ijk=None,
              direction=None, card_spacing_ijk=None, spatial_dims: int | None = None) -> QualityFlag | None:
    """``crop_changed`` when the crop ``got_kji`` is smaller than ``requested_kji`` along some axis
    (shrunk), or its axes are in another order than the network's (reordered, :func:`reordered_axes`);
    the message gives the requested, the actual and the image's sizes [k, j, i]. ``value``: the share
    of the requested voxels lost (0 when only reordered)."""
    requested = tuple(int(n) for n in requested_kji)
    got = tuple(int(n) for n in got_kji)
    image = tuple(int(n) for n in image_shape_kji)
    reordered = reordered_axes(requested, got, image, spacing_ijk, direction, card_spacing_ijk, spatial_dims)
    shrunk_axes = any(g < r for g, r in zip(got, requested))
    if not shrunk_axes and not reordered:
        return None
    parts = []
    if shrunk_axes:
        why = []
        for axis, (r, g, n) in enumerate(zip(requested, got, image)):
            if g < r:
                if n < r:
                    why.append(f"the image has only {n} voxels along {'kji'[axis]}")
                if size_divisible > 1 and g % size_divisible == 0 and g < min(r, n):
                    why.append(f"the model needs multiples of {size_divisible} along {'kji'[axis]}")
        parts.append(
            f"The crop was shrunk from the requested {_size(requested)} to {_size(got)} voxels [k, j, i] (image "
            f"{_size(image)}; " + ("; ".join(dict.fromkeys(why)) or "to fit the image") + "): the network sees less "
            "context than it was made for, and a mask reaching the crop's border is cut off. Fix: a larger image "
            "(pad it), or a --roi (card roi_size) that fits the image.")
    parts.extend(reordered)
    shrunk = 1.0 - float(np.prod(got)) / float(np.prod(requested)) if shrunk_axes else 0.0
    return QualityFlag("crop_changed", " ".join(parts), None, shrunk)


def reordered_axes(requested, got, image, spacing_ijk=None, direction=None, card_spacing_ijk=None,
                   spatial_dims: int | None = None) -> list[str]:
    """Messages (empty: none) for a crop whose axes are in another order than the network's.

    The engine never permutes axes: the crop is the image array's ``[k, j, i]`` block, fed in that order.
    So a crop is "reordered" when the image's axes are not in the order the network expects:

    - the requested ``roi_size`` had to be shrunk, but the same sizes in another order fit the image
      (the card's or the user's roi was written in (i, j, k) order, or the image is transposed);
    - the image's spacing differs from the card's training ``spacing`` by more than 20% along some axis,
      but matches it with the axes permuted (the volume was stored with its axes swapped);
    - a 2D network on a multi-slice volume whose k axis is not head-feet (``direction``): it dreams on
      sagittal or coronal slices, not axial ones.
    """
    import itertools

    out = []
    n = len(requested)
    fits = lambda sizes: all(s <= m for s, m in zip(sizes, image))  # noqa: E731
    if any(g < r for g, r in zip(got, requested)) and (spatial_dims or 3) == 3 and n == 3:
        for perm in itertools.permutations(range(3)):
            sizes = tuple(requested[p] for p in perm)
            if perm != (0, 1, 2) and sizes != requested and fits(sizes):
                out.append(f"The requested roi_size looks reordered: {_size(requested)} [k, j, i] does not fit the image "
                           f"{_size(image)}, but the same sizes as {_size(sizes)} do. roi_size is [D, H, W] = [k, j, i] "
                           "(Slicer and ITK list sizes as i, j, k); fix the order in the card or --roi, or check that "
                           "the image is not transposed.")
                break
    if spacing_ijk is not None and card_spacing_ijk is not None:
        dims = 2 if spatial_dims == 2 else min(3, len(card_spacing_ijk), len(spacing_ijk))
        ours = np.asarray(spacing_ijk, dtype=float)[:3]
        theirs = np.asarray(card_spacing_ijk, dtype=float)[:dims]
        close = lambda a: bool(np.all(np.abs(a[:dims] / theirs - 1.0) <= 0.2))  # noqa: E731
        if not close(ours) and len(ours) == 3:
            for perm in itertools.permutations(range(3)):
                if perm != (0, 1, 2) and close(ours[list(perm)]):
                    named = ", ".join(f"{'ijk'[a]}" for a in perm[:dims])
                    out.append(
                        f"The crop's axes look reordered: the image's spacing (i, j, k) = {_mm(ours)} mm matches the "
                        f"model's training spacing {_mm(theirs)} mm only with its axes taken as ({named}), so the network "
                        f"sees the crop {_size(got)} [k, j, i] with its axes in another order than it was trained on. "
                        "Fix: reorient the image so its axes match the model's (in Slicer: Orient Scalar Volume; in "
                        "SimpleITK: DICOMOrient), or correct the card's spacing.")
                    break
    if spatial_dims == 2 and direction is not None and len(image) == 3 and image[0] > 1:
        k_axis = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
        if abs(k_axis[2]) < 0.9:
            along = "LR" if abs(k_axis[0]) >= abs(k_axis[1]) else "AP"
            out.append(
                f"The crop's axes are reordered against the anatomy: the 2D network dreams on the image's k slices "
                f"(crop {_size(got)} [k, j, i] of an image of {_size(image)}), but k runs {along}, not head-feet, so "
                "the slices are sagittal or coronal, not axial. Fix: reorient the image to axial (in Slicer: Orient "
                "Scalar Volume) if the model was trained on axial slices; if it was trained on slices stored this "
                "way, this flag does not apply.")
    return out


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def wrong_class_flag(start_probs, final_probs, target: int) -> QualityFlag | None:
    """``wrong_class`` from the class probabilities at the seed at the start and at the end
    (1D arrays over the classes, softmax); None when the target wins or the winner did not rise."""
    if start_probs is None or final_probs is None:
        return None
    start_probs, final_probs = np.asarray(start_probs, float), np.asarray(final_probs, float)
    if final_probs.size <= 2:
        return None
    winner = int(np.argmax(final_probs))
    if winner == int(target) or not final_probs[winner] > start_probs[winner]:
        return None
    return QualityFlag(
        "wrong_class",
        f"At the seed, class {winner} wins (p = {final_probs[winner]:.2f}, up from {start_probs[winner]:.2f}) over the "
        f"target class {target} (p = {final_probs[target]:.2f}): the ascent raised another class faster than the "
        "target, and the dream is that class. Fix: --objective log_odds (it raises the target against all other "
        "classes), or check target_class in the card.", None, float(final_probs[winner]))


def seed_class_probabilities(network, network_input, image, seed_kji, card) -> np.ndarray | None:
    """Softmax probabilities of every class at the seed for ``image`` (a ``[k, j, i]`` tensor), or
    None for a sigmoid network or one with two classes. ``network_input`` maps the image to the
    network's input (the card's preprocessing)."""
    import torch

    if getattr(card, "activation", "softmax") != "softmax" or int(getattr(card, "out_channels", 2)) <= 2:
        return None
    with torch.no_grad():
        logits = network(network_input(image))
    spatial = tuple(seed_kji[1:]) if card.spatial_dims == 2 else tuple(seed_kji)
    z = logits[0][(slice(None),) + spatial]
    return torch.softmax(z.float(), dim=0).cpu().numpy()


def seed_output_is_constant(network, network_input, image, seed_kji, card) -> bool | None:
    """True when no logit at the seed depends on ``image`` (a ``[k, j, i]`` tensor): the gradient of
    every class's logit at the seed is exactly zero (the ReLU units feeding the seed are all off, so the
    logits there are the last layer's bias). None when it cannot be computed."""
    import torch

    x = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = network(network_input(x))
        spatial = tuple(seed_kji[1:]) if card.spatial_dims == 2 else tuple(seed_kji)
        z = logits[0][(slice(None),) + spatial]
        for c in range(z.shape[0]):
            (g,) = torch.autograd.grad(z[c], x, retain_graph=c < z.shape[0] - 1, allow_unused=True)
            if g is not None and bool(g.any()):
                return False
    return True


def stalled_flag(flag: QualityFlag, method: str) -> QualityFlag:
    """The ``no_dream`` flag of a run whose seed output stopped depending on the image, with that cause."""
    redirect = ("the normalised methods redirect the gradient through ReLU layers that are all off (Lucid's "
                "redirected ReLU), but only through torch.nn.ReLU modules, not functional relu calls or TorchScript "
                "models" if method != "paper" else "--method paper follows the plain gradient; the other methods "
                "redirect it through torch.nn.ReLU layers that are all off (e.g. --method robust+spectral)")
    return QualityFlag(
        "no_dream",
        f"p(seed) never rose above the threshold (highest {flag.value:.3f} at iteration {flag.iteration}) because the "
        "network's output at the seed stopped depending on the image: at the last iteration the gradient of every "
        "class's logit at the seed is exactly zero (the ReLU units that feed the seed are all off, so its logits are "
        "the last layer's bias), and no step or number of iterations helps. Fix: " + redirect + "; or start from "
        "noise (--start noise), or move the seed a few voxels.", flag.iteration, flag.value)


__all__ = ["QualityFlag", "QualityThresholds", "QualityMonitor", "CODES", "checkerboard_index", "crop_flag", "reordered_axes", "status_line",
           "touches_border", "wrong_class_flag", "seed_class_probabilities",
           "seed_output_is_constant", "stalled_flag"]
