"""The transformed copies' intensity noise (dreaming/copy_noise.py): standard normal, independent
between voxels, copies and iterations, drawn from the dream's generator with its transforms, and the
same numbers on a seed window as on the full crop at the window's voxels."""

import math

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib.dreaming.copy_noise import gaussian, keys_from_uniforms, voxel_counters, voxel_hashes
from DeepDreamAnalysisLib.dreaming.transforms import RandomTransforms
from DeepDreamAnalysisLib.dreaming.window import CopyWindow

from tiny_models import liver_like


def _keys(*pairs):
    return torch.tensor(pairs, dtype=torch.int64)


def test_the_noise_is_standard_normal():
    z = gaussian(voxel_hashes((64, 64, 64), 3, None), _keys((12345, 678)))[0].flatten().double()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 4 * math.sqrt(0.5 / n)
    # tails of a normal: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027, and some values beyond 4
    assert float((z.abs() > 2).double().mean()) == pytest.approx(0.0455, abs=0.002)
    assert float((z.abs() > 3).double().mean()) == pytest.approx(0.0027, abs=0.0004)
    assert float(z.abs().max()) > 4
    # the Kolmogorov-Smirnov distance to the normal distribution function, below its 1% critical value
    s = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    assert float((cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()) < 1.63 / math.sqrt(n)


def _uncorrelated(x, y):
    """Neither the values nor their sizes correlate (within 4 standard errors)."""
    bound = 4 / math.sqrt(x.numel())
    for a, b in ((x, y), (x.abs(), y.abs())):
        assert abs(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]) < bound


def test_neighbours_copies_and_iterations_are_uncorrelated():
    hashes = voxel_hashes((96, 96), 3, None)
    a, b = gaussian(hashes, _keys((1, 2), (3, 4)))
    for x, y in ((a[:, :, 1:], a[:, :, :-1]), (a[:, 1:], a[:, :-1]), (a[0], a[1]), (a, b)):
        _uncorrelated(x, y)
    # draws that differ in one bit of one uniform number give another field, not the same values
    # reordered or the same sizes: each key depends on all three numbers, and enters after the hash's
    # first round
    u = np.array([0.25, 0.5, 0.75], dtype=np.float32)
    base = gaussian(hashes, torch.from_numpy(keys_from_uniforms(u))[None])[0]
    for i, bits in ((0, (0, 12, 23)), (1, (0, 12, 23)), (2, (0, 15))):  # the third number gives 16 bits
        for bit in bits:
            v = u.copy()
            v[i] = np.float32((np.floor(float(u[i]) * (1 << 24)) + (1 << bit)) / (1 << 24))
            _uncorrelated(base, gaussian(hashes, torch.from_numpy(keys_from_uniforms(v))[None])[0])
def test_a_windows_noise_is_the_full_crops_at_its_voxels():
    for shape, where in (((96, 96), (slice(36, 60), slice(30, 54))), ((20, 32, 28), (slice(4, 12), slice(8, 24), slice(0, 28)))):
        keys = _keys((77, 5), (123456, 999))
        full = gaussian(voxel_hashes(shape, 4, None), keys)
        window = gaussian(voxel_hashes(shape, 4, where), keys)
        assert torch.equal(window, full[(slice(None), slice(None)) + where])


def test_the_counters_are_the_voxels_linear_indices_per_copy():
    counters = voxel_counters((3, 4, 5), 2, None)
    assert torch.equal(counters.flatten(), torch.arange(2 * 60))
    part = voxel_counters((3, 4, 5), 2, (slice(1, 3), slice(0, 2), slice(2, 5)))
    assert torch.equal(part, counters[:, 1:3, 0:2, 2:5])


def test_keys_come_from_uniform_numbers():
    """Each key is 32 bits, depends on all three numbers, and is the same for the same numbers."""
    u = np.array([0.0, 0.999999940, 0.5], dtype=np.float32)
    keys = keys_from_uniforms(u)
    assert keys.dtype == np.int64 and all(0 <= k < 1 << 32 for k in keys.tolist())
    assert keys.tolist() == keys_from_uniforms(u.copy()).tolist()
    for i in range(3):
        v = u.copy()
        v[i] = np.float32(0.123456)
        other = keys_from_uniforms(v).tolist()
        assert other[0] != keys[0] and other[1] != keys[1]


def test_a_dream_draws_its_noise_keys_with_its_transforms_in_one_generator_call():
    """The keys are made of the generator's three numbers after the transforms' (zooms, angles, shifts)."""
    for n, shape in ((2, (1, 24, 32)), (3, (8, 16, 16))):
        t = RandomTransforms(shape, tuple(s // 2 for s in shape), (2.0, 0.8, 0.7), n, copies=4, jitter=2, scale=0.1,
                             rotate=10, noise_std=0.5, random_seed=11)
        mats, shift, keys = t.draw_all()
        g = torch.Generator().manual_seed(11 + 7919)
        u = torch.rand(3 * (2 + n) + 3, generator=g).numpy()
        assert keys.tolist() == keys_from_uniforms(u[-3:]).tolist()
        torch.testing.assert_close(shift, torch.from_numpy(2 * (u[6:6 + 3 * n] * 2 - 1)).reshape(3, n), rtol=0, atol=1e-6)
        assert t.draw_all()[2].tolist() != keys.tolist()  # the next iteration's


def test_the_copies_noise_on_a_window_equals_the_full_crops():
    """RandomTransforms.batch with the same draws: on a seed window, each copy's voxels are the full
    copy's, noise included (the dream is the same with either)."""
    shape = (1, 40, 48)
    image = torch.as_tensor(liver_like(shape))
    t = RandomTransforms(shape, (0, 20, 24), (3.0, 0.8, 0.8), 2, copies=4, jitter=2, scale=0.05, rotate=5,
                         noise_std=10.0, random_seed=3)
    window = CopyWindow(start=(12, 16), size=(16, 16), seed=(8, 8))
    full = t.batch(image)
    drawn = t.last
    part = t.batch(image, window, drawn=drawn)
    torch.testing.assert_close(part, full[(slice(None),) + window.slices], rtol=0, atol=1e-4)
    noiseless = RandomTransforms(shape, (0, 20, 24), (3.0, 0.8, 0.8), 2, copies=4, jitter=2, scale=0.05, rotate=5,
                                 noise_std=0.0, random_seed=3)
    clean = noiseless.apply(image[0], drawn[0], drawn[1])
    added = full[1:] - clean
    assert 8 < float(added.std()) < 12  # the noise is there, at its standard deviation
