"""The thing under study: normalization layers, chosen by short stable names.

``NORMS[name](cfg)`` returns a factory ``norm(num_channels) -> nn.Module``; models take that factory
and never see the config. Every layer that keeps running statistics subclasses ``BatchNorm2d``
(``batchnorms.py``; itself an ``nn.BatchNorm2d``, so ``fuse_conv_bn_eval``, ``swa_utils.update_bn`` and
``bn_layers`` see it as BN), and in eval mode all of them are plain BN with running statistics.

Conventions, stated once:

* Momentum is PyTorch's: ``running = (1 - momentum) * running + momentum * batch_stat``, where the
  batch variance fed to ``running_var`` is the *unbiased* one (divides by n - 1, n = N * H * W) and
  the one used to normalize is the biased one, exactly as ``nn.BatchNorm2d``. ``momentum=None``
  means a cumulative average over the batches counted in ``num_batches_tracked``, as in PyTorch.
* Precision: statistics are computed in fp32 and running buffers stay fp32 under bf16 autocast.
  ``F.batch_norm`` already does this for bf16 input with fp32 buffers (its CPU and CUDA kernels
  accumulate in fp32 and return the input dtype), so the layers build on it instead of re-deriving
  BN from elementwise ops on ``x.float()``, which measured 3-4x slower on CPU. Batch renorm's r
  and d also take their statistics from that kernel (``_batch_moments``).
* FrozenBN: any layer with ``frozen = True`` normalizes with its running statistics in train mode
  too and stops updating them, i.e. its forward is its eval forward. ``set_progress`` sets the
  flag from ``freeze_after``; ``set_frozen`` sets it by hand. Setting it back restores training
  behaviour. Code that needs batch statistics (precise BN, batch-stat eval) must unfreeze first.
* Plain: any layer with a ``plain`` attribute, set by ``set_plain``, normalizes in train mode with
  plain batch statistics while it is ``True``: no noisy-BN noise, no renorm r/d, no ghost noise, PN
  with batch statistics; ghost BN keeps its chunks. Statistics passes use it.
* Ghost noise (``ghost_noise=N``, any norm): see ``ghost_noise.py``; train mode only, between
  normalization and affine; ``none``/``ln``/``gn`` then use ``GhostNoise``/``GhostNoiseGroupNorm``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnexp.layers.batchnorms import (BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, NoisyBatchNorm2d,
                         PopulationNorm2d)
from bnexp.config import NormConfig
from bnexp.layers.ghost_noise import GhostNoise, GhostNoiseGroupNorm
from bnexp.layers.online_norm import OnlinePopulationNorm2d
from bnexp.registry import Registry

__all__ = ["NORMS", "BatchNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "NoisyBatchNorm2d",
           "PopulationNorm2d", "OnlinePopulationNorm2d", "GhostNoise", "GhostNoiseGroupNorm", "GroupNorm",
           "bn_layers", "group_count",
           "group_norm", "fix_affine", "make_norm", "set_frozen", "set_plain", "set_progress"]


def group_count(num_channels: int, groups: int) -> int:
    """The largest divisor of ``num_channels`` that is <= ``groups`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(groups, num_channels) + 1) if num_channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalizes a channels_last CPU input in NCHW order and hands it back
    channels_last: the same numbers, but PyTorch's CPU kernel for channels_last with more than one
    group is slow (measured at batch 64 on 16 x 28 x 28, forward + backward under bf16 autocast:
    43.6 ms against 8.9 ms with the two copies, 13.4 against 3.4 ms on 64 x 7 x 7). One group
    (layer norm) is fast as it is, and slower with the copies, so it stays ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.is_contiguous() or not x.is_contiguous(
                memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def group_norm(num_channels: int, groups: int, eps: float = 1e-5,
               ghost_noise: Optional[int] = None) -> nn.GroupNorm:
    """GroupNorm with ``group_count(num_channels, groups)`` groups; ``groups=1`` is layer norm.
    With ``ghost_noise``: GNI between normalization and affine in train mode."""
    count = group_count(num_channels, groups)
    if ghost_noise is None:
        return (GroupNorm if count > 1 else nn.GroupNorm)(count, num_channels, eps=eps)
    return GhostNoiseGroupNorm(count, num_channels, ghost_noise, eps=eps)


NORMS = Registry("norm.name", "(cfg: NormConfig) -> Callable[[int], nn.Module]")


def _bn_kwargs(cfg: NormConfig) -> dict:
    return {"eps": cfg.eps, "momentum": cfg.momentum, "freeze_after": cfg.freeze_after,
            "ghost_noise": cfg.ghost_noise}


@NORMS.register("bn")
def _bn(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(BatchNorm2d, **_bn_kwargs(cfg))


@NORMS.register("none")
def _none(cfg: NormConfig) -> Callable[[int], nn.Module]:
    if cfg.ghost_noise is None:
        return nn.Identity
    return functools.partial(GhostNoise, size=cfg.ghost_noise)


@NORMS.register("gn")
def _gn(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(group_norm, groups=cfg.groups, eps=cfg.eps, ghost_noise=cfg.ghost_noise)


@NORMS.register("ln")
def _ln(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(group_norm, groups=1, eps=cfg.eps, ghost_noise=cfg.ghost_noise)


@NORMS.register("ghost_bn")
def _ghost_bn(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(GhostBatchNorm2d, virtual_batch=cfg.virtual_batch, update=cfg.ghost_update,
                             **_bn_kwargs(cfg))


@NORMS.register("batch_renorm")
def _batch_renorm(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(BatchRenorm2d, r_max=cfg.r_max, d_max=cfg.d_max,
                             warmup=cfg.renorm_warmup, r_ramp=cfg.renorm_r_ramp,
                             d_ramp=cfg.renorm_d_ramp, virtual_batch=cfg.virtual_batch,
                             **_bn_kwargs(cfg))


@NORMS.register("noisy_bn")
def _noisy_bn(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(NoisyBatchNorm2d, noise_mul=cfg.noise_mul, noise_add=cfg.noise_add,
                             noise_mean=cfg.noise_mean, noise_scale=cfg.noise_scale,
                             **_bn_kwargs(cfg))


@NORMS.register("pn")
def _pn(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(PopulationNorm2d, **_bn_kwargs(cfg))


@NORMS.register("pn_online")
def _pn_online(cfg: NormConfig) -> Callable[[int], nn.Module]:
    return functools.partial(OnlinePopulationNorm2d, **_bn_kwargs(cfg))


def make_norm(cfg: NormConfig) -> Callable[[int], nn.Module]:
    """The ``norm(num_channels)`` factory of ``cfg.name``; an unknown name is a ``ConfigError``.
    ``cfg.affine`` other than ``both``: the layers it makes keep only the affine parameters named."""
    factory = NORMS.get(cfg.name)(cfg)
    if cfg.affine == "both":
        return factory
    return lambda num_channels: fix_affine(factory(num_channels), cfg.affine)


def fix_affine(layer: nn.Module, keep: str) -> nn.Module:
    """Turn the affine parameters that ``keep`` (both | gamma | beta | none) does not name into
    buffers of their initial values (gamma = ``weight`` = 1, beta = ``bias`` = 0), so the forward
    pass is unchanged and they do not learn; ``weight`` and ``bias`` stay readable attributes
    (fusion, batch-stat eval read them). A layer without them (``Identity``) is returned as is."""
    for name, learned in (("weight", keep in ("both", "gamma")), ("bias", keep in ("both", "beta"))):
        param = layer._parameters.get(name)
        if param is not None and not learned:
            del layer._parameters[name]
            layer.register_buffer(name, param.detach().clone())
    return layer


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(name, module) of every layer that keeps running statistics, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None]


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell every schedule-dependent norm layer that ``fraction`` (in [0, 1]) of training is done.

    Drives batch renorm's clip ramp and FrozenBN's ``freeze_after``; the training loop calls it
    before every step. Layers without a schedule ignore it.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"training fraction {fraction} must be in [0, 1]")
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.set_progress(fraction)


def set_frozen(model: nn.Module, frozen: bool) -> list[str]:
    """Freeze (FrozenBN) or unfreeze every bnexp BN layer by hand; return the names it set."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm2d):
            m.frozen = frozen
            names.append(name)
    return names


def set_plain(model: nn.Module, plain: bool) -> list[str]:
    """Make every bnexp norm layer normalize with plain batch statistics in train mode (``True``):
    no injected noise, no renorm correction; or restore its own training behaviour (``False``).

    The statistics passes (precise BN, batch-stat noise, discrepancy probes) measure the batch
    statistics themselves, so they switch the extras off. Returns the names it set.
    """
    names = []
    for name, m in model.named_modules():
        if hasattr(m, "plain"):
            m.plain = plain
            names.append(name)
    return names
