"""Training small 2D segmentation networks on axial slices of LiTS volume 117.

This module is shared by ``scripts/train_demo.py`` (the bundled demo network) and the reproduction
of the paper's experiments (networks G_p with the 135-degree marking, real vs synthetic lesions,
elongated vs round lesions). Import it from another script in ``scripts/`` with ``import training``.

Conventions: slices are ``[j, i]`` arrays in HU (axis 0 of the LiTS volume is axial); the network
sees ``x' = (x - window_min) / (window_max - window_min)``, a linear map *without* clipping, the
same as the model card's ``window`` preprocessing that the analysis applies inside its graph.
Voxel spacing of LiTS 117 is not recorded; we assume (1.6, 1.6, 3.0) mm (i, j, k).

Typical use::

    import training
    from DeepDreamAnalysisLib.synthetic import HypointenseLesions
    train, val = training.lits_split(kind="healthy")      # tumours inpainted away
    model, card, log = training.train_unet2d(train, val, HypointenseLesions(), epochs=30, seed=0)
    training.save_model(model, card, log, "out/my_unet.pt")

``lesion_fn=None`` trains on the real tumour labels (use ``kind="real"`` slices).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from DeepDreamAnalysisLib import lits

LesionFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]
"""``lesion_fn(image [j, i] HU, liver bool [j, i], rng) -> (image with lesions, label bool)``."""


@dataclass
class SliceSample:
    """One axial slice: ``image`` float32 ``[j, i]`` HU, ``liver`` bool (liver incl. tumours),
    ``label`` bool (real tumours; all False on a healthy slice), ``k`` its index in the volume."""

    image: np.ndarray
    liver: np.ndarray
    label: np.ndarray
    k: int


def split_indices(
    n_slices: int = 128, val_block: Sequence[int] = lits.VALIDATION_BLOCK, gap: int = lits.VALIDATION_GAP
) -> tuple[list[int], list[int]]:
    """Training and validation slice indices: a contiguous validation block, and ``gap`` slices on
    either side of it left out, so that neighbouring (nearly identical) slices do not leak."""
    val = [k for k in val_block if 0 <= k < n_slices]
    lo, hi = min(val) - gap, max(val) + gap
    train = [k for k in range(n_slices) if not lo <= k <= hi]
    return train, val


def lits_slices(ks: Sequence[int], kind: str = "healthy", data_dir=None, volume=None) -> list[SliceSample]:
    """Slices ``ks`` of LiTS 117: ``kind="healthy"`` (tumours inpainted, label empty) or ``"real"``
    (original image and tumour label). ``volume``: an already loaded ``(image, labels)`` pair."""
    if kind not in ("healthy", "real"):
        raise ValueError("kind must be 'healthy' or 'real'")
    image, labels = volume if volume is not None else lits.load_lits117(data_dir)
    out = []
    for k in ks:
        if kind == "healthy":
            hs = lits.healthy_slice(image, labels, k)
            out.append(SliceSample(hs.image, hs.liver, np.zeros_like(hs.liver), k))
        else:
            lab = labels[k]
            out.append(SliceSample(image[k].astype(np.float32), (lab == 1) | (lab == 2), lab == 2, k))
    return out


def lits_split(kind: str = "healthy", data_dir=None) -> tuple[list[SliceSample], list[SliceSample]]:
    """``(train, val)`` slices of LiTS 117 with the standard split (:func:`split_indices`)."""
    volume = lits.load_lits117(data_dir)
    train_k, val_k = split_indices(volume[0].shape[0])
    return lits_slices(train_k, kind, volume=volume), lits_slices(val_k, kind, volume=volume)


def build_unet(channels=(8, 16, 32), strides=(2, 2), num_res_units: int = 1, norm: str = "batch") -> tuple[torch.nn.Module, dict]:
    """A 2D MONAI UNet (1 input channel, 2 output classes) and its ``network`` card entry."""
    from monai.networks.nets import UNet

    args = {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": list(channels),
        "strides": list(strides),
        "num_res_units": int(num_res_units),
        "norm": norm,
    }
    return UNet(**args), {"name": "monai.networks.nets.UNet", "args": args}


def _sample(
    s: SliceSample, lesion_fn: LesionFn | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if lesion_fn is None:
        return s.image, s.label
    img, lab = lesion_fn(s.image, s.liver, rng)
    return np.asarray(img, np.float32), np.asarray(lab, bool)


def _crop(img, lab, patch: int, rng: np.random.Generator, lesion_bias: float = 0.7):
    """A ``patch``-square crop, centred near a lesion voxel with probability ``lesion_bias``."""
    h, w = img.shape
    if patch >= h and patch >= w:
        return img, lab
    if lab.any() and rng.random() < lesion_bias:
        jj, ii = np.nonzero(lab)
        n = int(rng.integers(len(jj)))
        cj, ci = jj[n] + rng.integers(-patch // 4, patch // 4 + 1), ii[n] + rng.integers(-patch // 4, patch // 4 + 1)
        j0 = int(np.clip(cj - patch // 2, 0, h - patch))
        i0 = int(np.clip(ci - patch // 2, 0, w - patch))
    else:
        j0, i0 = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    return img[j0 : j0 + patch, i0 : i0 + patch], lab[j0 : j0 + patch, i0 : i0 + patch]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence[np.ndarray], window=(-100.0, 250.0), batch: int = 16) -> list[np.ndarray]:
    """Tumour probability maps (softmax class 1), one ``[j, i]`` float array per slice."""
    model.eval()
    lo, hi = window
    out = []
    for n in range(0, len(images), batch):
        x = torch.from_numpy((np.stack(images[n : n + batch]).astype(np.float32) - lo) / (hi - lo))[:, None]
        p = torch.softmax(model(x), dim=1)[:, 1].numpy()
        out.extend(list(p))
    return out


def make_validation_set(
    val_slices: Sequence[SliceSample], lesion_fn: LesionFn | None, seed: int, copies: int = 2
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fixed validation images and labels: ``copies`` lesion draws per slice (one, unchanged,
    when ``lesion_fn`` is None, i.e. real tumours), from ``np.random.default_rng(seed + 100003)``."""
    rng = np.random.default_rng(seed + 100003)
    imgs, labs = [], []
    for s in val_slices:
        for _ in range(1 if lesion_fn is None else copies):
            img, lab = _sample(s, lesion_fn, rng)
            imgs.append(img)
            labs.append(lab)
    return imgs, labs


def evaluate(model, images, labels, window=(-100.0, 250.0)) -> dict:
    """``{"dice": global Dice over all slices, "dice_mean": mean per-slice Dice}`` at p > 0.5."""
    probs = predict(model, images, window)
    preds = [p > 0.5 for p in probs]
    inter = sum(int(np.logical_and(p, t).sum()) for p, t in zip(preds, labels))
    total = sum(int(p.sum() + t.sum()) for p, t in zip(preds, labels))
    return {
        "dice": 1.0 if total == 0 else 2.0 * inter / total,
        "dice_mean": float(np.mean([dice(p, t) for p, t in zip(preds, labels)])),
    }


def train_unet2d(
    train_slices: Sequence[SliceSample],
    val_slices: Sequence[SliceSample],
    lesion_fn: LesionFn | None,
    epochs: int,
    seed: int = 0,
    *,
    val_lesion_fn: LesionFn | None | str = "same",
    val_copies: int = 2,
    channels=(8, 16, 32),
    strides=(2, 2),
    num_res_units: int = 1,
    patch: int = 96,
    batch_size: int = 8,
    lr: float = 3e-3,
    window=(-100.0, 250.0),
    num_threads: int | None = 1,
    noise_hu: float = 0.0,
    name: str = "unet2d",
    description: str = "",
    verbose: bool = True,
) -> tuple[torch.nn.Module, dict, dict]:
    """Train a small 2D MONAI UNet to segment lesions in axial LiTS slices.

    - ``train_slices`` / ``val_slices``: :class:`SliceSample` lists (see :func:`lits_split`).
    - ``lesion_fn(image, liver, rng) -> (image, label)`` makes the lesions of a training sample; a
      fresh draw for every slice in every epoch. ``None``: the slices' own (real) tumour labels.
    - ``val_lesion_fn``: the lesions of the validation set (drawn once, ``val_copies`` per
      slice, fixed by ``seed``); ``"same"`` uses ``lesion_fn``. For the paper's G_p networks pass
      the *unmarked* generator here, so that Dice is measured without the marking.
    - One epoch = one pass over the training slices, a random ``patch`` x ``patch`` crop of each
      (centred near a lesion 70 % of the time), a random 180-degree rotation (which keeps 135-degree
      lines at 135 degrees; no flips), optional Gaussian noise (standard deviation drawn from
      [0, ``noise_hu``] HU per sample), batches of ``batch_size``; Adam at ``lr`` with cosine decay;
      loss = Dice + cross-entropy (MONAI DiceCELoss, softmax, 2 classes).
    - Deterministic: ``torch.manual_seed(seed)``, ``np.random.default_rng(seed)``, torch
      deterministic algorithms, ``num_threads`` CPU threads (results depend on the thread count).

    Returns ``(model in eval mode, card dict, log dict)``. The card is a model card
    (docs/model-card.md) with ``network`` naming ``monai.networks.nets.UNet`` and its args, so the
    state dict loads with ``torch.load(weights_only=True)``; the log holds per-epoch loss and
    validation Dice and the final ``val_dice``.
    """
    from monai.losses import DiceCELoss

    if num_threads:
        torch.set_num_threads(int(num_threads))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    model, network = build_unet(channels, strides, num_res_units)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_slices) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, epochs * steps_per_epoch), eta_min=lr * 0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    vfn = lesion_fn if val_lesion_fn == "same" else val_lesion_fn
    val_imgs, val_labs = make_validation_set(val_slices, vfn, seed, val_copies)
    lo, hi = window
    log = {"name": name, "seed": seed, "epochs": [], "settings": {
        "epochs": epochs, "channels": list(channels), "strides": list(strides), "num_res_units": num_res_units,
        "patch": patch, "batch_size": batch_size, "lr": lr, "window": list(window), "num_threads": num_threads,
        "noise_hu": noise_hu, "train_slices": [s.k for s in train_slices], "val_slices": [s.k for s in val_slices],
        "val_copies": val_copies, "lesion_fn": repr(lesion_fn), "val_lesion_fn": repr(vfn),
    }}
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_slices))
        losses = []
        for b in range(0, len(order), batch_size):
            xs, ys = [], []
            for n in order[b : b + batch_size]:
                img, lab = _sample(train_slices[int(n)], lesion_fn, rng)
                img, lab = _crop(img, lab, patch, rng)
                if rng.random() < 0.5:
                    img, lab = img[::-1, ::-1], lab[::-1, ::-1]
                if noise_hu > 0:
                    img = img + rng.normal(0.0, rng.uniform(0.0, noise_hu), img.shape)
                xs.append((img - lo) / (hi - lo))
                ys.append(lab)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs), dtype=np.float32))[:, None]
            y = torch.from_numpy(np.ascontiguousarray(np.stack(ys), dtype=np.int64))[:, None]
            optim.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(loss.item())
        metrics = evaluate(model, val_imgs, val_labs, window)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": metrics["dice"],
                 "val_dice_mean": metrics["dice_mean"], "seconds": round(time.perf_counter() - t0, 2)}
        log["epochs"].append(entry)
        if verbose:
            print(f"[{name}] epoch {epoch + 1}/{epochs} loss {entry['loss']:.4f} val Dice {entry['val_dice']:.3f} "
                  f"({entry['seconds']:.0f} s)", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log["val_dice"] = log["epochs"][-1]["val_dice"] if log["epochs"] else float("nan")
    log["val_dice_mean"] = log["epochs"][-1]["val_dice_mean"] if log["epochs"] else float("nan")
    log["train_seconds"] = round(time.perf_counter() - t0, 2)
    log["torch_version"] = torch.__version__
    card = {
        "name": name,
        "description": description,
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "activation": "softmax",
        "target_class": 1,
        "preprocessing": {"type": "window", "min": float(lo), "max": float(hi)},
        "roi_size": [patch, patch],
        "spacing": list(lits.ASSUMED_SPACING),
        "intensity_range": [-1024.0, 3071.0],
        "size_divisible": int(np.prod(strides)),
        "network": network,
        "training": {"data": "LiTS volume 117 (CC BY-NC-SA 4.0), axial slices, assumed spacing 1.6 x 1.6 x 3.0 mm",
                     "epochs": epochs, "seed": seed, "val_dice": log["val_dice"],
                     "val_slices": [s.k for s in val_slices]},
    }
    return model, card, log


def save_model(model: torch.nn.Module, card: dict, log: dict | None, path: str | Path) -> dict[str, Path]:
    """Write ``<path>`` (state dict), ``<path>.card.json`` beside it named ``<stem>.card.json``, and
    ``training_log.json`` (if ``log``) in the same folder. Returns the written paths."""
    from DeepDreamAnalysisLib.atomic import atomic_path, write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    card_path = path.with_name(path.stem + ".card.json")
    write_text_atomic(card_path, json.dumps(card, indent=2) + "\n")
    out = {"model": path, "card": card_path}
    if log is not None:
        log_path = path.with_name("training_log.json")
        write_text_atomic(log_path, json.dumps(log, indent=2) + "\n")
        out["log"] = log_path
    for p in out.values():
        p.chmod(0o644)  # temporary files are created 0600
    return out


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load a state dict written by :func:`save_model` with ``weights_only=True`` into the
    network its card names (a MONAI UNet). Returns ``(model in eval mode, card dict)``."""
    from monai.networks.nets import UNet

    path = Path(path)
    card = json.loads(path.with_name(path.stem + ".card.json").read_text())
    net = card["network"]
    if net["name"] != "monai.networks.nets.UNet":
        raise ValueError(f"unexpected network {net['name']}")
    model = UNet(**net["args"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def seed_probability(model: torch.nn.Module, image2d: np.ndarray, seed_ij: tuple[int, int], window=(-100.0, 250.0)) -> float:
    """Tumour probability at ``seed_ij`` = (i, j) of a whole slice ``[j, i]`` (HU)."""
    p = predict(model, [image2d], window)[0]
    return float(p[seed_ij[1], seed_ij[0]])
