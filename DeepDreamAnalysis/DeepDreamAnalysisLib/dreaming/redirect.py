"""Redirected ReLU gradients: the ascent does not stop where the network's ReLUs are all off.

A ReLU passes no gradient where its input is negative. When every unit of a ReLU layer that the
objective depends on is off for an image (seen: the 6-class held-out SegResNet, whose last ReLU
layer switched off at the seed after 9 iterations, so the seed's logits were the final bias and the
gradient was exactly zero: ``no_dream`` whatever the step), plain ascent is stuck for good.

Lucid (Olah et al. 2017, ``lucid.misc.redirected_relu_grad``) overrides the ReLU gradient so that it
also flows through an off unit when raising that unit would raise the objective. Here that override
acts **only where the ordinary gradient is stuck**: in the backward pass of each ``torch.nn.ReLU``
module, for each image of the batch (each transformed copy) separately, when the ordinary gradient
``g * (x > 0)`` is zero everywhere, the gradient ``g * ((x > 0) | (g > 0))`` is passed instead
(``g`` = dObjective/d(output), ascent: ``g > 0`` means switching the unit on raises the objective).
Wherever the ordinary gradient flows, it is unchanged. The forward pass is unchanged.

Used by every method except ``paper`` (the paper's update stays exact). Only ``torch.nn.ReLU``
modules are redirected, not ``torch.nn.functional.relu`` calls or TorchScript models.
"""

from __future__ import annotations

import contextlib

import torch


class RedirectCounter:
    """How many backward passes through a ReLU layer took the redirected gradient."""

    def __init__(self):
        self.redirected = 0


class _RedirectedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace: bool, counter: RedirectCounter):
        on = x > 0
        ctx.save_for_backward(on)
        ctx.counter = counter
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (on,) = ctx.saved_tensors
        ordinary = g * on
        if ordinary.dim() == 0:
            return ordinary, None, None
        flat = ordinary.reshape(ordinary.shape[0], -1)
        stuck = ~flat.any(dim=1) & g.reshape(g.shape[0], -1).gt(0).any(dim=1)
        if not bool(stuck.any()):
            return ordinary, None, None
        ctx.counter.redirected += 1
        redirected = g * (on | (g > 0))
        shape = (-1,) + (1,) * (g.dim() - 1)
        return torch.where(stuck.view(shape), redirected, ordinary), None, None


def relu_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's ``torch.nn.ReLU`` modules (exactly that class; none for a TorchScript model)."""
    if isinstance(network, torch.jit.ScriptModule):
        return []
    return [m for m in network.modules() if type(m) is torch.nn.ReLU]


@contextlib.contextmanager
def redirected_relus(modules: list[torch.nn.Module], counter: RedirectCounter):
    """Within the block, the ``modules`` (from :func:`relu_modules`) compute the same ReLU with the
    redirected gradient; their own forward is restored afterwards."""
    patched = []
    try:
        for m in modules:
            inplace = bool(getattr(m, "inplace", False))
            m.forward = (lambda x, _inplace=inplace: _RedirectedReLU.apply(x, _inplace, counter))
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
