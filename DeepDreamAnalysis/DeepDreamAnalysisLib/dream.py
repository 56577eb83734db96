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
from .dreaming.near_seed import START_RADIUS, component_in_box
from .dreaming.redirect import RedirectCounter, redirected_relus, relu_modules
from .dreaming.window import AUDIT_EVERY, WindowMismatch, WindowPlan, find_window, forget
from .errors import ConfigError, ModelError, RunFault, SeedError
from .result import Crop
from .seed_outputs import SeedMaps, class_probability, masks_near_seed, seed_objectives, windowed_objectives


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
        copy 0 gives the full probability map (:func:`.seed_outputs.windowed_objectives`, for one dream)."""
        (result,) = windowed_objectives([self], logits, [x], self.run_network)
        if isinstance(result, WindowMismatch):
            raise result
        return result

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
        return seed_objectives(self.card, self.objective, at_seed[None])[0]

    def _probability(self, z: torch.Tensor) -> torch.Tensor:
        """The target's probability map [k, j, i] from one copy's detached logits ``[C, ...]``."""
        prob = class_probability(self.card, z[None])[0]
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
        return component_in_box(maps.box_probability.cpu().numpy(), maps.box, self.spatial_seed, self.config.threshold,
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
