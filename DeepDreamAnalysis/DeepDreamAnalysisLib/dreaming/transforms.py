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
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .copy_noise import KEYS_UNIFORMS, gaussian, keys_from_uniforms, voxel_hashes


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
        self.device = device
        c = (np.asarray(self.shape, dtype=np.float64) - 1) / 2
        rows = np.where(c > 0, 1 / np.maximum(c, 1e-12), 0.0)  # an axis of size 1 stays at 0
        self._theta_constants = (c, np.asarray(self.spacing.cpu(), dtype=np.float64), np.asarray(self.seed.cpu(), dtype=np.float64),
                                 rows)
        self._spacing32 = np.asarray(self.spacing.cpu(), dtype=np.float32)
        self.last = None
        """The random draws of the last :meth:`batch` (matrices, shifts, noise keys)."""
        self._hashes: dict = {}  # (window or None, device) -> :func:`.copy_noise.voxel_hashes`
        with warnings.catch_warnings():  # an axis of size 1 is handled in theta (its column is 0)
            warnings.filterwarnings("ignore", message=".*unit-size grids.*")
            eye = torch.eye(len(self.shape), len(self.shape) + 1, device=device).unsqueeze(0)
            self.base = F.affine_grid(eye, (1, 1) + self.shape, align_corners=True)[0]
        """The crop's voxel centres in grid_sample's normalised (i, j[, k]) coordinates, [..., n]."""

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrices [K-1, n, n] mapping mm offsets to voxel offsets, shifts [K-1, n] in voxels): the
        transforms of :meth:`draw_all` (which draws the iteration's noise keys too)."""
        mats, shift, _ = self.draw_all()
        return mats, shift

    def draw_all(self):
        """One iteration's random draws: (matrices ``[K-1, n, n]``, shifts ``[K-1, n]``, the intensity
        noise's two keys (int64 ``[2]``, :mod:`.copy_noise`) or None without noise).

        One call to the generator for the iteration's ``(2 + n) (K-1)`` uniform numbers (three more with
        noise), in the order zooms, angles, shifts, keys (the same numbers as calls in that order);
        the few products are computed in numpy, which costs less than torch's per-call overhead on
        such small arrays."""
        n, m = len(self.shape), self.copies - 1
        extra = KEYS_UNIFORMS if self.noise_std > 0 else 0
        raw = torch.rand(m * (2 + n) + extra, generator=self.generator).numpy()
        u = raw[:m * (2 + n)] * np.float32(2) - np.float32(1)  # [-1, 1]
        zoom = np.float32(1) + np.float32(self.scale) * u[:m]
        angle = np.float32(math.radians(self.rotate)) * u[m:2 * m]
        shift = np.float32(self.jitter) * u[2 * m:].reshape(m, n)
        mats = np.zeros((m, n, n), dtype=np.float32)
        c, s = np.cos(angle), np.sin(angle)
        # rotation in the (j, i) plane, i.e. about the axial k axis; the last two axes are j, i
        mats[:, -2, -2], mats[:, -2, -1], mats[:, -1, -2], mats[:, -1, -1] = c, -s, s, c
        if n == 3:
            mats[:, 0, 0] = 1.0
        mats = mats * zoom[:, None, None] / self._spacing32[None, :, None]
        keys = torch.from_numpy(keys_from_uniforms(raw[m * (2 + n):])) if extra else None
        return torch.from_numpy(mats).to(self.device), torch.from_numpy(shift).to(self.device), keys

    def batch(self, x: torch.Tensor, window=None, drawn=None) -> torch.Tensor:
        """``x`` [k, j, i] -> the copies in the network's spatial layout, ``[K, (k,) j, i]``.

        ``window`` (a :class:`.window.CopyWindow`): only the window's voxels of each copy,
        ``[K, *window.size]``; the copies still sample the whole image, so a rotation, zoom or jitter
        brings in what lies outside the window, and each voxel's value is the full copy's at that
        voxel, exactly. ``drawn``: the transforms to use (default: draw new ones); the ones used are
        kept in :attr:`last`, so an iteration can be recomputed with the same copies.
        """
        image = x[0] if self.spatial_dims == 2 else x
        if self.copies == 1:
            return (image if window is None else image[window.slices]).unsqueeze(0)
        mats, shift, keys = self.last = self.draw_all() if drawn is None else drawn
        copy0 = image if window is None else image[window.slices]
        return torch.cat([copy0.unsqueeze(0), self.apply(image, mats, shift, keys, window)], dim=0)

    def apply(self, image: torch.Tensor, mats: torch.Tensor, shift: torch.Tensor, keys=None,
              window=None) -> torch.Tensor:
        """The copies of ``image`` ([(k,) j, i]) under the given transforms, ``[M, (k,) j, i]`` (only the
        ``window``'s voxels with one); ``keys``: the copies' noise keys (:meth:`draw_all`; default:
        drawn here)."""
        out = _sample(image[None], self.grid(mats, shift, window)[None])[0]
        if self.noise_std > 0 and keys is None:
            keys = torch.from_numpy(keys_from_uniforms(torch.rand(KEYS_UNIFORMS, generator=self.generator).numpy()))
        return self.noisy(out, keys, window)

    def noise(self, keys: torch.Tensor, window=None, device=None) -> torch.Tensor:
        """The intensity noise of the K-1 transformed copies for each row of ``keys`` (int64 ``[N, 2]``):
        ``[N, K-1, *size]`` over the ``window``'s voxels (default the crop's), on ``device`` (default
        this object's), :mod:`.copy_noise`."""
        device = self.device if device is None else device
        key = (window, device)
        hashes = self._hashes.get(key)
        if hashes is None:  # (the shared cache's tensors: looked up once per window and device)
            hashes = self._hashes[key] = voxel_hashes(self.shape, self.copies - 1,
                                                      None if window is None else window.slices, device)
        return self.noise_std * gaussian(hashes, keys)

    def noisy(self, copies: torch.Tensor, keys, window=None) -> torch.Tensor:
        """``copies`` ``[M, ...]`` (the first M transformed copies) plus their intensity noise (``keys``:
        :meth:`draw_all`'s; over the ``window``)."""
        if self.noise_std > 0 and keys is not None:
            copies = copies + self.noise(keys.reshape(1, 2), window, copies.device)[0, :copies.shape[0]]
        return copies

    def grid(self, mats: torch.Tensor, shift: torch.Tensor, window=None, seeds=None) -> torch.Tensor:
        """Where copy ``m`` samples each voxel (of the ``window``): ``[M, *size, n]`` in grid_sample's
        normalised (i, j[, k]) coordinates. ``seeds`` (``[M, n]`` voxels, network spatial axes): each
        copy's own centre (several dreams' copies at once, :func:`copies_together`); default this
        dream's seed. Each copy's row is computed on its own: the same numbers for a copy alone or
        among others."""
        theta = self.theta(mats, shift, seeds)  # [M, n, n+1]
        nd = len(self.shape)
        base = self.base if window is None else self.base[window.slices]
        lead = (slice(None),) + (None,) * nd
        grid = theta[lead + (slice(None), nd)]  # the translation, [M, 1.., n]
        for a in range(nd):  # + sum over input axes of coordinate * column: a few fused ops
            grid = torch.addcmul(grid, base[(None,) + (slice(None),) * nd + (slice(a, a + 1),)],
                                 theta[lead + (slice(None), a)])
        return grid

    def same_copies(self, other: "RandomTransforms") -> bool:
        """Whether ``other`` makes its copies as this does (the same crop, copies, spacing and noise):
        several dreams' copies can then be sampled in one call (:func:`copies_together`)."""
        return (self.shape == other.shape and self.copies == other.copies and self.noise_std == other.noise_std
                and self.spatial_dims == other.spatial_dims and np.array_equal(self._spacing32, other._spacing32))

    def theta(self, mats: torch.Tensor, shift: torch.Tensor, seeds=None) -> torch.Tensor:
        """The transforms as ``affine_grid`` matrices ``[M, n, n+1]`` in normalised (i, j[, k]) coordinates.

        Copy ``m`` samples voxel ``p`` at ``q = seed + mats[m] (D (p - seed)) + shift[m]`` (``D`` the
        spacing); with ``p = c (v + 1)`` and ``u = q / c - 1`` (``c = (size - 1) / 2`` per axis, ``v``
        and ``u`` in [-1, 1]) that is ``u = A v + t``, ``A = mats D c / c_row``. Building the grid
        from these few numbers and the precomputed voxel coordinates (:meth:`apply`) costs less than
        half of transforming every voxel's millimetre offset (docs/dream-methods.md, "Cost").
        ``seeds``: ``[M, n]``, each copy's centre (default: this dream's seed for all).
        """
        m = mats.detach().cpu().numpy().astype(np.float64)  # a few numbers: numpy's small-array ops cost less
        c, sp, seed, rows = self._theta_constants
        seeds = np.broadcast_to(seed if seeds is None else np.asarray(seeds, dtype=np.float64), (m.shape[0], len(c)))
        scaled = m * (sp * c)[None, None, :]  # [M, b, a]
        a = scaled * rows[None, :, None]
        moved = ((m * sp[None, None, :]) * (c - seeds)[:, None, :]).sum(axis=-1)  # row by row: [M, b]
        t = (seeds + shift.detach().cpu().numpy().astype(np.float64) + moved) * rows - 1
        t = np.where(c > 0, t, 0.0)
        theta = np.concatenate([a[:, ::-1, ::-1], t[:, ::-1, None]], axis=-1)  # rows and columns in (i, j[, k])
        return torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32)).to(mats.device)


def _sample(images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """``images`` ``[N, (k,) j, i]`` sampled at ``grids`` ``[N, M, *size, n]`` (:meth:`RandomTransforms.grid`):
    ``[N, M, *size]``. Each image's M copies' grids are stacked along one axis: ONE image to sample
    per dream (no copy per transform, its gradient gathered in one buffer), the same bilinear
    interpolation (border values outside) at every point, one call for all N."""
    n, m, size, nd = grids.shape[0], grids.shape[1], tuple(grids.shape[2:-1]), grids.shape[-1]
    stacked = grids.reshape((n, m * size[0]) + size[1:] + (nd,))
    return F.grid_sample(images[:, None], stacked, mode="bilinear", padding_mode="border",
                         align_corners=True).reshape((n, m) + size)


def copies_together(transforms: list, images, window=None) -> torch.Tensor:
    """The copies of several dreams at once: ``transforms[m]`` (all :meth:`RandomTransforms.same_copies`
    of the first) applied to ``images[m]`` (``[k, j, i]``, with gradient; a list, or one tensor
    ``[N, k, j, i]``), each drawing its own random transforms from its own generator as
    :meth:`RandomTransforms.batch` does; their sampling grids built together (each copy's row on
    its own, as alone) and sampled in ONE grid_sample call over the dreams. Returns ``[sum K, *size]``:
    dream 0's K copies (copy 0 the image itself), then dream 1's, ... (``size`` the ``window``'s, or
    the crop's); each dream's draws are kept in its ``last``."""
    first = transforms[0]
    draws = []
    for t in transforms:
        t.last = t.draw_all()
        draws.append(t.last)
    m = first.copies - 1
    seeds = np.repeat(np.stack([t._theta_constants[2] for t in transforms]), m, axis=0)  # [N (K-1), n]
    grids = first.grid(torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]), window, seeds)
    if isinstance(images, torch.Tensor):  # already one tensor [N, k, j, i]
        spatial = images[:, 0] if first.spatial_dims == 2 else images
    else:
        spatial = torch.stack([x[0] if first.spatial_dims == 2 else x for x in images])
    sampled = _sample(spatial, grids.reshape((len(transforms), m) + tuple(grids.shape[1:])))
    if first.noise_std > 0:  # each dream's own noise, over its copies' window (same_copies: all or none have it)
        sampled = sampled + first.noise(torch.stack([keys for _, _, keys in draws]), window, sampled.device)
    heads = spatial if window is None else spatial[(slice(None),) + window.slices]  # copy 0 of each
    return torch.cat([heads.unsqueeze(1), sampled], dim=1).flatten(0, 1)
