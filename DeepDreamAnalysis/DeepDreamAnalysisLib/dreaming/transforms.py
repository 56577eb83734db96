"""Transformation robustness for single-channel 2D/3D volumes with real spacing.

The dream must raise the objective not only for the image itself but for K slightly transformed
copies of it (Olah et al. 2017; Lucid/Lucent jitter, scale, rotate). Here the copies are made in
millimetres, centred on the seed: copy ``c`` samples the image at
``q = seed + D^-1 (s_c R_c) D (p - seed) + t_c`` (``D`` the voxel spacing, ``R_c`` a rotation
about the axial k axis, ``s_c`` a zoom, ``t_c`` a jitter in voxels), trilinearly (bilinearly in 2D),
border values outside, plus a little intensity noise. Copy 0 is the image itself, exactly, so the
probability the loop reports is the untransformed one. All copies form ONE batch ``[K, ...]`` for
one forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomTransforms:
    """Draws K-1 random transforms per iteration (a seeded generator: deterministic) and applies them."""

    def __init__(self, crop_shape: tuple[int, int, int], seed: tuple[int, int, int],
                 spacing_kji: tuple[float, float, float], spatial_dims: int, copies: int, jitter: float,
                 scale: float, rotate: float, noise_std: float, random_seed: int = 0, device=None):
        self.spatial_dims = spatial_dims
        self.copies = int(copies)
        self.jitter, self.scale, self.rotate, self.noise_std = float(jitter), float(scale), float(rotate), float(noise_std)
        self.generator = torch.Generator(device="cpu").manual_seed(int(random_seed) + 7919)
        self.shape = tuple(crop_shape[1:]) if spatial_dims == 2 else tuple(crop_shape)
        self.seed = torch.tensor(seed[1:] if spatial_dims == 2 else seed, dtype=torch.float32, device=device)
        spacing = spacing_kji[1:] if spatial_dims == 2 else spacing_kji
        self.spacing = torch.tensor(spacing, dtype=torch.float32, device=device)
        grids = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in self.shape], indexing="ij")
        self.offset_mm = (torch.stack(grids, dim=-1) - self.seed) * self.spacing  # [..., ndim] in mm
        self.device = device

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrices [K-1, n, n] mapping mm offsets to voxel offsets, shifts [K-1, n] in voxels)."""
        n, m = len(self.shape), self.copies - 1
        u = lambda *s: torch.rand(*s, generator=self.generator) * 2 - 1  # noqa: E731  uniform in [-1, 1]
        zoom = 1 + self.scale * u(m)
        angle = math.radians(self.rotate) * u(m)
        shift = self.jitter * u(m, n)
        mats = torch.zeros(m, n, n)
        c, s = torch.cos(angle), torch.sin(angle)
        # rotation in the (j, i) plane, i.e. about the axial k axis; the last two axes are j, i
        mats[:, -2, -2], mats[:, -2, -1], mats[:, -1, -2], mats[:, -1, -1] = c, -s, s, c
        if n == 3:
            mats[:, 0, 0] = 1.0
        mats = mats * zoom[:, None, None] / self.spacing.cpu()[None, :, None]
        return mats.to(self.device), shift.to(self.device)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [k, j, i] -> the copies in the network's spatial layout, ``[K, (k,) j, i]``."""
        image = x[0] if self.spatial_dims == 2 else x
        if self.copies == 1:
            return image.unsqueeze(0)
        mats, shift = self.draw()
        return torch.cat([image.unsqueeze(0), self.apply(image, mats, shift)], dim=0)

    def apply(self, image: torch.Tensor, mats: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The copies of ``image`` ([(k,) j, i]) under the given transforms, ``[M, (k,) j, i]``."""
        q = self.seed + torch.einsum("...a,mba->m...b", self.offset_mm, mats) + shift.view(
            (shift.shape[0],) + (1,) * len(self.shape) + (shift.shape[1],))
        sizes = torch.tensor(self.shape, dtype=torch.float32, device=q.device)
        norm = torch.where(sizes > 1, 2 * q / (sizes - 1).clamp_min(1) - 1, torch.zeros_like(q))
        grid = norm.flip(-1)  # grid_sample wants (i, j[, k]) order
        src = image.unsqueeze(0).unsqueeze(0).expand((mats.shape[0], 1) + tuple(image.shape))
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
        if self.noise_std > 0:
            out = out + self.noise_std * torch.randn(out.shape, generator=self.generator).to(out.device)
        return out
