"""The gradient-ascent loop ("DeepDream") on a crop around the seed.

At each iteration ``j`` (Couteaux et al. 2019, section 2.2):

1. ``X_j`` (image units, e.g. HU) -> the model card's intensity preprocessing, inside the autograd
   graph and without clipping -> network -> logits;
2. objective = the logit of the target class at the seed (``objective="logit"``, the default), or its
   log-odds ``z_t - logsumexp(z_other)`` (``"log_odds"``; equal to the logit for a sigmoid model),
   minus the optional regularisers;
3. ``X_{j+1} = X_j + alpha * dObjective/dX`` (optionally ``alpha * g / max|g|``, optionally only
   inside a ball of ``update_radius`` voxels around the seed), then clamped to the card's
   ``intensity_range`` outside the graph.

The loop yields the state *before* each update, so iteration 0 is the start image.
Axis order: the crop is ``[k, j, i]``; a 3D network sees ``[1, C, k, j, i]``; a 2D network sees the
single axial slice as ``[1, C, j, i]``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .card import ModelCard
from .config import DreamConfig, resolve_objective
from .dreaming.convolutions import batch_voxels, convolutions_for
from .dreaming.method import DreamMethod
from .dreaming.near_seed import SLACK, START_RADIUS, component_in_box, grown, plan_box, reach_of
from .dreaming.redirect import RedirectCounter, redirected_relus, relu_modules
from .dreaming.window import AUDIT_EVERY, WindowMismatch, WindowPlan, close, find_window, forget
from .errors import ConfigError, ModelError, RunFault, SeedError
from .result import Crop


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU raises ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no GPU. Use --device cpu (or auto).")
    return torch.device(name)


def default_roi(card: ModelCard, config: DreamConfig) -> tuple[int, ...]:
    """Crop size in the network's spatial order: the configuration's, else the card's, else 96^3 / 256^2."""
    if config.roi_size is not None:
        roi = tuple(int(s) for s in config.roi_size)
        if len(roi) != card.spatial_dims:
            raise ConfigError(
                f"roi_size {roi} has {len(roi)} values but the model is {card.spatial_dims}D; give "
                f"{card.spatial_dims} sizes ([D,] H, W)."
            )
        return roi
    if card.roi_size is not None:
        return tuple(card.roi_size)
    return (256, 256) if card.spatial_dims == 2 else (96, 96, 96)


def model_fault(exc: Exception, iteration: int, card: ModelCard, crop_shape) -> RunFault:
    """The fault for an exception raised inside the user's model; when the crop is not the card's
    ``roi_size`` (an image smaller than it, or another ``--roi``), it says that a network with a fixed
    input size accepts only that size (UNETR: its ``img_size``)."""
    message = f"The model raised {type(exc).__name__} at iteration {iteration}: {exc}"
    roi = tuple(int(r) for r in card.roi_size) if card.roi_size is not None else None
    size = tuple(int(s) for s in crop_shape)[-len(roi):] if roi else None
    if roi and size != roi:
        message += (f". The crop is {'x'.join(map(str, size))}, not the card's roi_size {'x'.join(map(str, roi))}: a "
                    "network with a fixed input size (such as UNETR, whose img_size fixes its positional embedding) "
                    "accepts only that size; use an image at least that large along every axis (and no other --roi)")
    return RunFault(message)


def crop_around_seed(shape_kji: tuple[int, int, int], seed_kji: tuple[int, int, int], roi: tuple[int, ...],
                     spatial_dims: int, size_divisible: int = 1) -> Crop:
    """The crop of size ``roi`` centred on the seed, shifted to stay inside the volume.

    Along an axis where the volume is smaller than ``roi`` the crop is the whole axis, trimmed to a
    multiple of ``size_divisible``. A 2D crop has size 1 along k (the seed's axial slice).
    """
    full_roi = (1,) + tuple(roi) if spatial_dims == 2 else tuple(roi)
    start, size = [], []
    for axis, (n, s, r) in enumerate(zip(shape_kji, seed_kji, full_roi)):
        r = min(int(r), n)
        if not (spatial_dims == 2 and axis == 0) and size_divisible > 1:
            r = (r // size_divisible) * size_divisible
            if r == 0:
                raise ModelError(
                    f"The image has only {n} voxels along axis {'kji'[axis]} but the model needs multiples "
                    f"of {size_divisible} (size_divisible in its card). Use a larger image or a model without "
                    "that constraint."
                )
        lo = min(max(s - r // 2, 0), n - r)
        start.append(lo)
        size.append(r)
    return Crop(tuple(start), tuple(size))  # type: ignore[arg-type]


@dataclass
class DreamState:
    """The loop's state at one iteration, before that iteration's update.

    ``image`` and ``probability`` are tensors ``[k, j, i]`` on the loop's device (do not modify);
    ``objective`` is the objective's value (logit units), ``probability_at_seed`` in [0, 1].
    ``probability`` is computed when first read where the loop did not need it (one forward of
    ``image``); :attr:`seed_mask` is the mask when the loop can give it without the full map.
    """

    iteration: int
    objective: float
    probability_at_seed: float
    image: torch.Tensor
    known_probability: torch.Tensor | None = None
    compute_probability: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    find_mask: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)

    @property
    def probability(self) -> torch.Tensor:
        """The target's probability map ``[k, j, i]`` of ``image`` (detached)."""
        if self.known_probability is None:
            self.known_probability = self.compute_probability().detach()
        return self.known_probability

    @property
    def seed_mask(self) -> np.ndarray | None:
        """The mask (bool ``[k, j, i]``: the component of ``probability > threshold``, the run's
        threshold, that holds the seed) when the loop knows it without the full map
        (:mod:`.dreaming.near_seed`: empty while the seed is below the threshold, else found in the
        box around the seed); None: compute it from :attr:`probability`."""
        if self.find_mask is not None:
            self._mask, self.find_mask = self.find_mask(), None
        return getattr(self, "_mask", None)


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


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device | str = "cpu"):
    """Seed torch's generators; on CUDA also ask for deterministic kernels (restored afterwards).

    The CPU kernels the loop uses (convolutions, their gradients) are deterministic already; the
    switch is left alone there because its first use imports torch's compiler stack, holding the
    GIL for seconds on the worker thread.
    """
    torch.manual_seed(seed)
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


class DreamLoop:
    """Gradient ascent on ``start`` (a ``[k, j, i]`` crop in image units).

    Iterate it to get one :class:`DreamState` per iteration (``config.iterations`` in all, fewer
    with the probability stop). Faults (non-finite gradients, an exception in the model, out of
    memory) raise :class:`RunFault` naming the iteration; the states yielded before stay valid. A seed
    whose output does not depend on the image at all (zero gradient at iteration 0) raises
    :class:`SeedError` before anything is yielded.
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard, start: np.ndarray,
                 seed_in_crop: tuple[int, int, int], config: DreamConfig, device: torch.device,
                 spacing: tuple[float, float, float] | None = None, reference=None, copy_window: bool = True):
        """``spacing``: the voxel spacing in mm, (i, j, k) order as :class:`Volume`; default the card's,
        else 1 mm (only the millimetre-aware methods, robust, spectral, accentuate and lesion-spectrum,
        use it). ``reference``: the run's :class:`~.reference.ReferenceStats` (``lesion-spectrum`` reads
        their lesion spectrum; a ConfigError names the fix when it is missing). ``copy_window``: evaluate
        the transformed copies of the methods that have them on an exact window around the seed when
        the network allows it (:mod:`.dreaming.window`; False: always on the full crop)."""
        self.network = network
        self.card = card
        self.config = config
        self.device = device
        self.seed = tuple(int(v) for v in seed_in_crop)
        if not all(0 <= s < n for s, n in zip(self.seed, start.shape)):
            raise SeedError(f"Seed {self.seed} lies outside the crop of shape {start.shape}.")
        self.x0 = torch.as_tensor(np.ascontiguousarray(start), dtype=torch.float32, device=device)
        self.low, self.high = card.intensity_range
        if spacing is None:
            spacing = tuple(card.spacing) + (1.0,) * (3 - len(card.spacing)) if card.spacing else (1.0, 1.0, 1.0)
        self.spacing_kji = tuple(float(v) for v in tuple(spacing)[::-1])
        self.objective = resolve_objective(config.objective, card)
        self.method = DreamMethod(config, card, tuple(start.shape), self.seed, self.spacing_kji, device, self.x0,
                                  reference)
        self.stopped_early = False
        self.redirects = RedirectCounter()
        """How often a ReLU layer's stuck gradient was redirected (:mod:`.dreaming.redirect`; not for paper)."""
        self._relus = [] if self.method.is_paper else relu_modules(network)
        self._iteration = 0
        self._gradient_voxels = 0
        self.window_plan = self._plan_window(copy_window)
        """How the transformed copies are evaluated (:class:`~.dreaming.window.WindowPlan`; None without copies)."""
        self.box_radius = START_RADIUS
        """Half-size of the box of outputs the mask is looked for in (:mod:`.dreaming.near_seed`); grows."""
        self.box_checked = False
        self.box_off: str | None = None
        """Why masks near the seed are off for the rest of the run (full maps), or None."""

    @property
    def window(self):
        """The :class:`~.dreaming.window.CopyWindow` the copies are evaluated on, or None (the full crop)."""
        return self.window_plan.window if self.window_plan is not None else None

    def _plan_window(self, enabled: bool):
        if self.method.is_paper or self.method.copies < 2:
            return None
        if not enabled:
            return WindowPlan(None, "full-crop copies: windows turned off")
        return find_window(self.network, self.card, tuple(self.x0.shape), self.seed, self.device, self._relus)

    def copy_window_record(self) -> dict:
        """For run.json: ``copy_window`` (the window's size, or None), its start and the reason, and
        ``mask_near_seed``: how the mask was found (:mod:`.dreaming.near_seed`)."""
        if self.window_plan is None:
            return {"copy_window": None, "copy_window_start": None,
                    "copy_window_note": f"no transformed copies (method {self.config.method})",
                    "mask_near_seed": "off: no seed window (full probability maps)"}
        record = self.window_plan.record()
        if self.box_off is not None:
            record["mask_near_seed"] = f"off: {self.box_off}"
        elif self.window is None:
            record["mask_near_seed"] = "off: no seed window (full probability maps)"
        else:
            record["mask_near_seed"] = ("exact, in a box around the seed (the box's probabilities checked against the "
                                        f"full crop's at its first use and every {AUDIT_EVERY} iterations)")
        return record

    def drop_window(self, why: str) -> None:
        """Evaluate the copies on the full crop from now on (the window was found not exact)."""
        forget(self.network)
        self.window_plan = WindowPlan(None, f"full-crop copies from iteration {self._iteration}: {why}")
        if self.box_off is None:
            self.box_off = f"from iteration {self._iteration}, with the seed window"

    @property
    def update_region(self) -> torch.Tensor | None:
        """Where the image may change: a float tensor [k, j, i] over the crop (1 inside, soft weights for
        ``accentuate``), or None for the whole crop."""
        return self.method.update_region

    @property
    def region(self) -> torch.Tensor | None:
        return self.method.update_region

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.card.preprocessing
        y = x * pre.scale + pre.offset
        y = y[0] if self.card.spatial_dims == 2 else y
        return y.unsqueeze(0).unsqueeze(0)

    def _batch_input(self, batch: torch.Tensor) -> torch.Tensor:
        """``[K, (k,) j, i]`` image-unit copies -> the network's ``[K, C=1, ...]`` input."""
        pre = self.card.preprocessing
        return (batch * pre.scale + pre.offset).unsqueeze(1)

    def forward(self, x: torch.Tensor):
        """(objective averaged over the method's copies, probability map [k, j, i] of copy 0): ONE
        forward pass of the network on a batch of K copies (K = 1 for the paper); with a copy window,
        the K copies' windows with gradient and the full crop once without."""
        if self.method.is_paper:
            return self._objective_and_probability(self.network(self._network_input(x)))
        if self.window is not None:
            with redirected_relus(self._relus, self.redirects):
                logits = self.run_network(self.window_input(x), for_backward=True)
            try:
                objective, maps = self.windowed_objective(logits, x)
            except WindowMismatch as why:
                self.drop_window(str(why))
                return self.full_copies_forward(x, self.method.transforms.last)
            masks_near_seed([self], [x], [maps], self.run_network)
            return objective, maps
        return self.full_copies_forward(x)

    def run_network(self, batch: torch.Tensor, for_backward: bool = False) -> torch.Tensor:
        """The network on ``batch`` ``[N, C, ...]`` (every method but paper), with the CPU convolution
        kernels chosen for its size and for whether gradients are recorded
        (:mod:`.dreaming.convolutions`); ``for_backward``: the batch whose backward
        :meth:`gradient_convolutions` will run."""
        if for_backward:
            self._gradient_voxels = batch_voxels(batch)
        with convolutions_for(self.device, self.card.spatial_dims, batch_voxels(batch), torch.is_grad_enabled()):
            return self.network(batch)

    def gradient_convolutions(self):
        """The convolution kernels for the backward of the last batch run with gradient (paper: torch's)."""
        if self.method.is_paper:
            return contextlib.nullcontext()
        return convolutions_for(self.device, self.card.spatial_dims, self._gradient_voxels)

    def full_copies_forward(self, x: torch.Tensor, drawn=None):
        """The K copies on the full crop, one forward (``drawn``: the random transforms to reuse)."""
        with redirected_relus(self._relus, self.redirects):
            logits = self.run_network(self._batch_input(self.method.batch(x, drawn=drawn)), for_backward=True)
        return self._objective_and_probability(logits)

    def window_input(self, x: torch.Tensor) -> torch.Tensor:
        """The copies' windows as network input ``[K, 1, *window]``."""
        return self._batch_input(self.method.batch(x, self.window))

    @property
    def spatial_seed(self) -> tuple[int, ...]:
        """The seed in the network's spatial axes (``[j, i]`` for a 2D network)."""
        return self.seed[1:] if self.card.spatial_dims == 2 else self.seed

    def windowed_objective(self, logits: torch.Tensor, x: torch.Tensor):
        """(objective, :class:`SeedMaps`) from the copies' window logits (of image ``x``): the seed's
        probability from copy 0's (the image itself). At an audited iteration (every
        :data:`AUDIT_EVERY`, iteration 0 first) the copies also run on the full crop without gradient:
        :class:`WindowMismatch` when any copy's seed logits differ from its window's; that forward's
        copy 0 gives the full probability map."""
        window = self.window
        if tuple(logits.shape) != (self.method.copies, self.card.out_channels) + tuple(window.size):
            raise WindowMismatch(f"the network returned {list(logits.shape)} for the copies' windows")
        at_seed = logits[(slice(None), slice(None)) + tuple(window.seed)]  # [K, C]
        maps = SeedMaps(self._seed_probability(at_seed[0].detach()))
        if self._iteration % AUDIT_EVERY == 0:
            with torch.no_grad():
                copies = self.run_network(self._batch_input(self.method.batch(x.detach(), drawn=self.method.transforms.last)))
            self._check_logits(copies, self.method.copies, self._crop_spatial())
            if not close(at_seed, copies[(slice(None), slice(None)) + self.spatial_seed]):
                raise WindowMismatch(f"the copies' seed logits on the window differ from the same copies' on the full "
                                     f"crop (audit at iteration {self._iteration})")
            maps.full_logits = copies[0].detach()
            maps.probability = self._probability(maps.full_logits)
        return self._seed_objective(at_seed), maps

    def _seed_probability(self, z: torch.Tensor) -> float:
        """The target's probability from the seed's logits ``[C]``."""
        t = self.card.target_class
        return float(torch.sigmoid(z[t]) if self.card.activation == "sigmoid" else torch.softmax(z, dim=0)[t])

    def full_probability(self, x: torch.Tensor) -> torch.Tensor:
        """The probability map ``[k, j, i]`` of image ``x``: one forward of the crop, without gradient."""
        with torch.no_grad():
            logits = self.run_network(self._network_input(x.detach()))
        self._check_logits(logits, 1, self._crop_spatial())
        return self._probability(logits[0])

    def _crop_spatial(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:]) if self.card.spatial_dims == 2 else tuple(self.x0.shape)

    def _check_logits(self, logits: torch.Tensor, copies: int, crop: tuple[int, ...]) -> None:
        if logits.dim() != self.card.spatial_dims + 2:
            raise ModelError(
                f"The network returned a tensor of shape {tuple(logits.shape)}; expected "
                f"[1, {self.card.out_channels}, ...] with {self.card.spatial_dims} spatial dimensions. "
                "Check spatial_dims and out_channels in the model card."
            )
        if logits.shape[1] != self.card.out_channels:
            raise ModelError(
                f"The network returned {logits.shape[1]} output channels but its model card says out_channels="
                f"{self.card.out_channels}. Fix out_channels (and target_class) in the model card."
            )
        if logits.shape[0] != copies or tuple(logits.shape[2:]) != crop:
            raise ModelError(  # else the seed's logit would be read from the wrong voxel
                f"For an input crop of spatial size {list(crop)} the network returned {list(logits.shape)}, not "
                f"[{copies}, {self.card.out_channels}, {', '.join(str(n) for n in crop)}]: the analysis needs one logit per "
                "input voxel. Check spatial_dims, roi_size and size_divisible in the model card, or use a network "
                "whose output has its input's size."
            )

    def _seed_objective(self, at_seed: torch.Tensor) -> torch.Tensor:
        """The objective averaged over the copies, from their seed logits ``[K, C]``."""
        t = self.card.target_class
        objective = at_seed[:, t]
        if self.card.activation == "softmax" and self.objective == "log_odds":
            others = torch.cat([at_seed[:, :t], at_seed[:, t + 1:]], dim=1)
            objective = objective - torch.logsumexp(others, dim=1)
        return objective.mean()

    def _probability(self, z: torch.Tensor) -> torch.Tensor:
        """The target's probability map [k, j, i] from one copy's detached logits ``[C, ...]``."""
        t = self.card.target_class
        prob = torch.sigmoid(z[t]) if self.card.activation == "sigmoid" else torch.softmax(z, dim=0)[t]
        return prob.unsqueeze(0) if self.card.spatial_dims == 2 else prob

    def _objective_and_probability(self, logits: torch.Tensor):
        t = self.card.target_class
        spatial_seed = self.seed[1:] if self.card.spatial_dims == 2 else self.seed
        self._check_logits(logits, self.method.copies, self._crop_spatial())
        if not self.method.is_paper:
            at_seed = logits[(slice(None), slice(None)) + spatial_seed]  # [K, C]
            return self._seed_objective(at_seed), self._probability(logits[0].detach())
        z = logits[0]
        if self.card.activation == "sigmoid":
            prob = torch.sigmoid(z[t])
            objective = z[t][spatial_seed]
        else:
            prob = torch.softmax(z, dim=0)[t]
            objective = z[t][spatial_seed]
            if self.objective == "log_odds":
                others = torch.cat([z[:t], z[t + 1:]])[(slice(None),) + spatial_seed]
                objective = objective - torch.logsumexp(others, dim=0)
        if self.card.spatial_dims == 2:
            prob = prob.unsqueeze(0)
        return objective, prob

    def _regularised(self, objective, x):
        cfg = self.config
        total = objective
        if cfg.l2_weight:
            total = total - cfg.l2_weight * ((x - self.x0) ** 2).mean()
        if cfg.tv_weight:
            tv = sum((torch.diff(x, dim=d).abs().mean() for d in range(x.dim()) if x.shape[d] > 1), torch.zeros((), device=x.device))
            total = total - cfg.tv_weight * tv
        penalty = self.method.penalty(x)
        if penalty is not None:
            total = total - penalty
        return total

    def initial_image(self) -> torch.Tensor:
        """The start image: the crop itself, or white noise (``start="noise"``), in image units."""
        cfg = self.config
        if cfg.start == "image":
            return self.x0.clone()
        mean_default, std_default = self.card.preprocessing.typical_intensity
        mean = mean_default if cfg.noise_mean is None else float(cfg.noise_mean)
        std = std_default if cfg.noise_std is None else float(cfg.noise_std)
        gen = torch.Generator(device="cpu").manual_seed(int(cfg.random_seed))
        noise = torch.randn(tuple(self.x0.shape), generator=gen) * std + mean
        return noise.to(self.device).clamp_(self.low, self.high)

    def state(self, iteration: int, objective: float, x: torch.Tensor, maps: SeedMaps) -> DreamState:
        """The :class:`DreamState` of image ``x`` (detached) at ``iteration``."""
        return DreamState(iteration, objective, maps.p_seed, x, maps.probability, lambda: self.full_probability(x),
                          lambda: self.mask_near_seed(maps))

    def mask_near_seed(self, maps: SeedMaps) -> np.ndarray | None:
        """The mask of an iteration from its :class:`SeedMaps`, where no full map is needed (else None)."""
        if maps.empty:
            return np.zeros(tuple(self.x0.shape), dtype=bool)
        if maps.box is None:
            return None
        probability = maps.box_probability[0] if self.card.spatial_dims == 2 else maps.box_probability
        return component_in_box(probability.cpu().numpy(), maps.box, self.spatial_seed, self.config.threshold,
                                tuple(self.x0.shape))

    def __iter__(self) -> Iterator[DreamState]:
        cfg = self.config
        x = self.initial_image()
        above = 0
        for it in range(cfg.iterations):
            x.requires_grad_(True)
            self._iteration = it
            try:
                objective, prob = self.forward(x)
                total = self._regularised(objective, x)
                with self.gradient_convolutions():
                    (grad,) = torch.autograd.grad(total, x)
            except (ModelError, RunFault):
                raise
            except torch.cuda.OutOfMemoryError:
                raise RunFault(
                    f"Out of GPU memory at iteration {it}. Use a smaller crop (roi_size) or run on the CPU "
                    "(--device cpu)."
                ) from None
            except Exception as exc:  # an exception inside the user's model
                raise model_fault(exc, it, self.card, self.x0.shape) from exc
            x = x.detach()
            obj_value = float(objective.detach())
            maps = SeedMaps.of(prob, self.seed)
            p_seed = maps.p_seed
            if not (math.isfinite(obj_value) and bool(torch.isfinite(grad).all())):
                raise RunFault(
                    f"The gradient became NaN or infinite at iteration {it}; the result keeps the iterations "
                    "before it. Try a smaller step or --normalize-gradient."
                )
            if it == 0 and not bool(grad.any()):
                raise SeedError(
                    "The network's output at the seed does not depend on the image (its gradient is zero at the "
                    "start): the seed lies where the model cannot see, or the model is saturated there. Pick a "
                    "seed inside the region the model segments (for example inside the organ), or try --start noise."
                )
            yield self.state(it, obj_value, x, maps)
            if cfg.stop_probability is not None:
                above = above + 1 if p_seed > cfg.stop_probability else 0
                if above >= cfg.stop_patience:
                    self.stopped_early = True
                    return
            x = self.method.update(x, grad)


def masks_near_seed(loops: list, xs: list, maps: list, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give each windowed loop's :class:`SeedMaps` (``loops[m]`` at image ``xs[m]``) what its mask
    needs (:mod:`.dreaming.near_seed`): nothing when the seed is at or below the threshold (empty), the
    probabilities of a box around the seed that holds every voxel above the threshold it could reach,
    or, where boxes are off for it, the full map. ``run``: the network on a batch without gradient
    (one call per input size: the loops' boxes share one radius, hence one size)."""
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
        outputs = []
        with torch.no_grad():
            for group in groups.values():
                images = [(x[0] if lp.card.spatial_dims == 2 else x).detach() for lp, x, _, _ in group]
                batch = torch.cat([lp._batch_input(image[b.inp if b is not None else ...].unsqueeze(0))
                                   for (lp, _, _, b), image in zip(group, images)], dim=0)
                outputs.extend(zip(group, run(batch)))
        for (loop, _, m, box), z in outputs:  # the full crops first: a box is checked against them
            if box is None:
                loop._check_logits(z[None], 1, loop._crop_spatial())
                m.full_logits = z
                m.probability = loop._probability(z)
        requests = []
        for (loop, x, m, box), z in outputs:
            if box is None:
                continue
            inner = z[(slice(None),) + box.inner]
            if m.full_logits is not None:  # a box's first use, or a window audit
                if not close(inner, m.full_logits[(slice(None),) + box.out]):
                    loop.box_off = (f"at iteration {loop._iteration} the box's logits differed from the full crop's "
                                    "(full probability maps from then on)")
                    continue
                loop.box_checked = True
            probability = loop._probability(inner)
            above = (probability[0] if loop.card.spatial_dims == 2 else probability) > loop.config.threshold
            reach = reach_of(above, box, loop.spatial_seed)
            if reach is not None:  # nothing above the threshold on the box's open sides: the mask is inside
                m.box, m.box_probability = box, probability
                loop.box_radius = max(START_RADIUS, reach + SLACK)
                continue
            loop.box_radius = grown(max(loop.box_radius, radius), loop._crop_spatial())  # a larger box
            requests.append((loop, x, m, plan_box(loop.window, loop._crop_spatial(), loop.spatial_seed,
                                                  loop.box_radius)))
