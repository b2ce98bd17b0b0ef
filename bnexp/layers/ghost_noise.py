"""Ghost noise injection (GNI; Kosson, Fan & Jaggi, AAAI 2024, "Ghost Noise for Regularizing Deep
Neural Networks"), and the norm layers without running statistics that carry it.

Follows the reference code (github.com/epfml/ghost-noise, ``nodo/ghost_noise_injector_replacement.py``,
the version their experiments use): for every sample i of the batch, draw a ghost batch of ``N``
sample indices *with replacement* from the same batch; take the per-channel mean and biased
variance of that ghost batch over (samples, H, W) and of the whole batch; then

    y_i = (x_i - (mu_ghost_i - mu_batch)) / sqrt((var_ghost_i + eps) / (var_batch + eps))

with ``eps = 1e-3`` (the reference default) and no gradient through the noise (shift and scale are
constants for autograd). A ghost batch equal to the whole batch leaves ``x`` unchanged.

Placement, as in their experiments (``norm_cfg`` = norm without affine -> GNI -> gain -> bias): after
the normalization and before the affine map. So for LN/GN, ``GhostNoiseGroupNorm`` normalizes without
affine, injects, then applies its own weight and bias; for ``none`` there is nothing to normalize and
``GhostNoise`` injects into the conv output directly. The BN family does the same inside
``norms.BatchNorm2d``. Noise is drawn in train mode only, and never while ``plain`` is set (see
``norms.set_plain``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-3  # the reference implementation's default (GhostNoiseInjectorR)


def ghost_noise_injection(x: torch.Tensor, size: int,
                          indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` ([B, C, ...]) shifted and scaled per (sample, channel) by ghost-batch noise.

    ``indices`` ([B, size] long): the ghost batch of each sample; default: drawn uniformly with
    replacement from torch's global generator on ``x``'s device. Statistics are fp32; the output
    keeps ``x``'s dtype and layout, and gradients flow to ``x`` as through a fixed affine map.
    """
    b, c = x.shape[:2]
    with torch.no_grad():
        if indices is None:
            indices = torch.randint(b, (b, size), device=x.device)
        flat = x.detach().float().reshape(b, c, -1)
        inst_mean, inst_mean2 = flat.mean(2), flat.square().mean(2)  # per (sample, channel)
        full_mean = inst_mean.mean(0)
        full_var = inst_mean2.mean(0) - full_mean.square()
        # every sample has the same H x W count, so the ghost batch's moments are averages of
        # its members' per-sample moments
        ghost_mean, ghost_mean2 = inst_mean[indices].mean(1), inst_mean2[indices].mean(1)
        ghost_var = ghost_mean2 - ghost_mean.square()
        shift = ghost_mean - full_mean
        scale = ((ghost_var + EPS) / (full_var + EPS)).sqrt()
        view = (b, c) + (1,) * (x.dim() - 2)
    return (x - shift.view(view).to(x.dtype)) / scale.view(view).to(x.dtype)


def affine(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``z * weight + bias`` per channel (dim 1), in ``z``'s dtype."""
    view = (1, -1) + (1,) * (z.dim() - 2)
    return torch.addcmul(bias.view(view).to(z.dtype), z, weight.view(view).to(z.dtype))


class GhostNoise(nn.Identity):
    """``norm=none`` with ghost noise: GNI on the conv output in train mode, identity otherwise.

    An ``nn.Identity`` subclass, so models still give the conv its bias (no real norm follows)."""

    def __init__(self, num_channels: int, size: int):
        super().__init__()
        self.size, self.plain = size, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.plain:
            return ghost_noise_injection(x, self.size)
        return x

    def extra_repr(self) -> str:
        return f"ghost_noise={self.size}"


class GhostNoiseGroupNorm(nn.GroupNorm):
    """GroupNorm (LN for one group) with GNI between normalization and affine in train mode.

    Same parameters and state-dict keys as ``nn.GroupNorm``; eval mode or ``plain``: GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, size: int, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.size, self.plain = size, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.plain:
            return super().forward(x)
        z = F.group_norm(x, self.num_groups, None, None, self.eps)
        return affine(ghost_noise_injection(z, self.size), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_noise={self.size}"
