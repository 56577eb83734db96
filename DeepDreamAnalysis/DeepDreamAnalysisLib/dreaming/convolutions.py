"""Which CPU convolution kernels run the small batches of the transformed copies.

On the CPU, torch sends a float convolution to oneDNN (mkldnn) whenever its batch holds more than one
image, however small the images are (aten's ``ConvParams::use_mkldnn``); a single small image goes to
torch's own ("native") kernels. oneDNN's fixed cost per call dominates on small images: the K = 4
copies' seed windows of the demo network (4 x 24 x 24 voxels) take 3.7 ms for a forward + backward
through oneDNN and 1.8 ms through the native kernels (docs/dream-methods.md, "Cost"). Measured on
the demo network and a 3D MONAI UNet, 1 and 2 threads (native / oneDNN time for a forward +
backward):

=====  ==========================  =============
dims   batch x window (voxels)     native/oneDNN
=====  ==========================  =============
2D     4 x 24^2 (2,304)            0.51 - 0.52
2D     16 x 24^2 (9,216)           0.80 - 0.89
2D     4 x 96^2 (36,864)           0.79 - 0.85
2D     1 x 256^2 (65,536)          1.02 - 1.27
3D     4 x 8^3 (2,048)             0.61 - 0.73
3D     4 x 12^3 (6,912)            0.90 - 0.96
3D     4 x 16^3 (16,384)           1.06 - 1.24
=====  ==========================  =============

A forward alone (no gradient: the members' boxes around their seeds, a full crop's probability map),
demo network, 1 and 2 threads, three rounds each: 2 x 56^2 (6,272 voxels) 0.52-0.69, 4 x 56^2 (12,544:
4 restarts' boxes) 0.63-0.87, 4 x 64^2 (16,384) 0.73-0.86, 8 x 48^2 (18,432) 0.74-1.06, 4 x 72^2
(20,736) 0.62-1.19, 4 x 96^2 (36,864) 0.85-1.27.

So every method but ``paper`` runs a batch on the CPU through the native kernels when it holds at
most :data:`NATIVE_MAX_VOXELS` voxels (batch x spatial voxels) for its number of spatial dimensions,
and through torch's own choice otherwise. The two compute the same convolution; their sums may
differ in order (floating-point rounding). ``paper`` never changes: the reproduction's numbers stay
those of torch's defaults. On a GPU nothing changes.

The switch (``torch.backends.mkldnn.enabled``) is process-wide while a batch runs: another thread of
the same process that runs convolutions at that moment uses the native kernels too (same results up
to rounding). The engine's runs in Slicer and in studies run in their own processes.
"""

from __future__ import annotations

import contextlib

import torch

NATIVE_MAX_VOXELS = {(2, True): 40_000, (3, True): 8_000, (2, False): 18_000, (3, False): 0}
"""Largest batch (images x spatial voxels) run through the native CPU kernels, per (spatial dimensions,
with gradient): a forward whose backward follows, or a forward alone."""


def prefers_native(device, spatial_dims: int, voxels: int, gradient: bool = True) -> bool:
    """True when a batch of ``voxels`` voxels (all images together) of a ``spatial_dims``-D network on
    ``device`` runs faster through torch's native CPU convolutions than through oneDNN (``gradient``:
    its forward and backward; else its forward alone)."""
    limit = NATIVE_MAX_VOXELS.get((int(spatial_dims), bool(gradient)), 0)
    return torch.device(device).type == "cpu" and 0 < int(voxels) <= limit


@contextlib.contextmanager
def convolutions_for(device, spatial_dims: int, voxels: int, gradient: bool = True):
    """Within the block (for a batch with gradient: its forward AND its backward), convolutions run
    through the native CPU kernels (neither oneDNN nor NNPACK) when :func:`prefers_native`; else
    nothing changes. Restores both switches."""
    if not prefers_native(device, spatial_dims, voxels, gradient) or not torch.backends.mkldnn.enabled:
        yield
        return
    nnpack = torch._C._get_nnpack_enabled()
    try:
        torch.backends.mkldnn.enabled = False
    except RuntimeError:  # torch.backends.disable_global_flags() was called: leave torch's choice alone
        yield
        return
    torch._C._set_nnpack_enabled(False)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True
        torch._C._set_nnpack_enabled(nnpack)


def batch_voxels(tensor: torch.Tensor) -> int:
    """Images x spatial voxels of a network input ``[N, C, ...]``."""
    n = int(tensor.shape[0])
    for size in tensor.shape[2:]:
        n *= int(size)
    return n


__all__ = ["NATIVE_MAX_VOXELS", "prefers_native", "convolutions_for", "batch_voxels"]
