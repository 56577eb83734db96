"""Tiny real torch networks and model cards for the tests (made in the test, no files needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from DeepDreamAnalysisLib.card import ModelCard


def tiny_net(spatial_dims: int = 2, out_channels: int = 2, seed: int = 0) -> torch.nn.Module:
    """Two convolutions; deterministic weights; eval mode, frozen."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.Tanh(), conv(4, out_channels, 3, padding=1))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def tiny_card(spatial_dims: int = 2, roi=None, **over) -> ModelCard:
    data = dict(name="tiny", spatial_dims=spatial_dims, in_channels=1, out_channels=2, activation="softmax",
                target_class=1, preprocessing={"type": "window", "min": -100.0, "max": 250.0},
                roi_size=list(roi) if roi else ([24, 24] if spatial_dims == 2 else [12, 12, 12]))
    data.update(over)
    return ModelCard.from_dict(data)


@dataclass
class TinyModel:
    """Duck-types models.LoadedModel for loop-level tests."""

    network: torch.nn.Module
    card: ModelCard
    path: Path = Path("tiny")
    format: str = "module"
    sha256: str = "0" * 64
    executes_code: bool = False
    extra: dict = field(default_factory=dict)


def tiny_model(spatial_dims: int = 2, **card_over) -> TinyModel:
    return TinyModel(tiny_net(spatial_dims), tiny_card(spatial_dims, **card_over))


class BlurThenClasses(torch.nn.Module):
    """A fixed Gaussian blur (sigma 2 voxels), then per-class ``z_c = weight_c * y + bias_c``: a
    network whose dream at the seed is a smooth blob (or another class, with the right weights)."""

    def __init__(self, weights, biases, blur: bool = True):
        super().__init__()
        r = 4
        g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * 2.0 ** 2))
        kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
        self.blur = torch.nn.Conv2d(1, 1, 2 * r + 1, padding=r, bias=False, padding_mode="replicate")
        self.blur.weight.data[:] = kernel if blur else torch.zeros_like(kernel)
        if not blur:
            self.blur.weight.data[0, 0, r, r] = 1.0
        self.head = torch.nn.Conv2d(1, len(weights), 1)
        self.head.weight.data[:, 0, 0, 0] = torch.tensor(weights, dtype=torch.float32)
        self.head.bias.data[:] = torch.tensor(biases, dtype=torch.float32)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.blur(x))


def blur_model(weights, biases, blur=True, **card):
    card.setdefault("out_channels", len(weights))
    card.setdefault("roi", (24, 24))
    return TinyModel(BlurThenClasses(weights, biases, blur), tiny_card(2, **card))


def liver_like(shape=(1, 40, 48), seed: int = 0, mean: float = 110.0, std: float = 15.0) -> np.ndarray:
    """A smooth-ish random image in HU, [k, j, i]."""
    rng = np.random.default_rng(seed)
    return (rng.normal(mean, std, shape)).astype(np.float32)


def write_case(folder: Path, spatial_dims: int = 2) -> dict:
    """A tiny TorchScript model with its card and a small CT-like NIfTI, for command-line tests."""
    import json

    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = tiny_net(spatial_dims)
    model = folder / "tiny.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    card = tiny_card(spatial_dims).to_dict()
    (folder / "tiny.card.json").write_text(json.dumps(card))
    image = folder / "ct.nii.gz"
    img = sitk.GetImageFromArray(liver_like((3, 40, 48) if spatial_dims == 2 else (16, 20, 20)))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(image))
    return {"model": model, "card": folder / "tiny.card.json", "image": image}
