"""The thing under study: normalization layers, chosen by short stable names.

``NORMS[name](cfg)`` returns a factory ``norm(num_channels) -> nn.Module``; models take that factory
and never see the config. Every layer that keeps running statistics subclasses ``BatchNorm2d``
below (itself an ``nn.BatchNorm2d``, so ``fuse_conv_bn_eval``, ``swa_utils.update_bn`` and
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
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import ConfigError, NormConfig


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that can be frozen (FrozenBN) and told the fraction of training done.

    ``freeze_after``: the training fraction from which ``set_progress`` freezes the layer (``None``:
    ``set_progress`` leaves ``frozen`` as it is). Subclasses change only ``_train_forward``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 freeze_after: Optional[float] = None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.freeze_after = freeze_after
        self.frozen = False
        self.plain = False  # see set_plain

    def set_progress(self, fraction: float) -> None:
        if self.freeze_after is not None:
            self.frozen = fraction >= self.freeze_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training and not self.frozen:
            return self._train_forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def _update_factor(self) -> float:
        """Count this batch; return the weight of its statistics in the running average."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen={self.frozen}, freeze_after={self.freeze_after}"


class GhostBatchNorm2d(BatchNorm2d):
    """Ghost BN (Hoffer et al. 2017): train-mode statistics over sub-batches of ``virtual_batch``.

    The batch is cut into contiguous chunks ``x[0:v], x[v:2v], ...``; a last, smaller chunk takes
    the remainder (so the last batch of an epoch needs no special case). Each chunk is normalized
    with its own mean and biased variance. Running statistics are updated once per forward with
    the average over chunks of the chunk means and of the chunk *unbiased* variances: they estimate
    what the layer normalizes with at this ghost batch size. A batch of at most ``virtual_batch``
    is one chunk, and then the layer is exactly ``BatchNorm2d``. Eval mode: plain BN (foldable).
    """

    def __init__(self, num_features: int, virtual_batch: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, freeze_after: Optional[float] = None):
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch={virtual_batch} must be >= 1")
        super().__init__(num_features, eps=eps, momentum=momentum, freeze_after=freeze_after)
        self.virtual_batch = virtual_batch

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, size = x.shape[0], self.virtual_batch
        if batch <= size:
            return super()._train_forward(x)
        full = batch // size * size
        parts = [_chunked_batch_norm(x[:full], full // size, self.weight, self.bias, self.eps)]
        if full < batch:
            parts.append(_chunked_batch_norm(x[full:], 1, self.weight, self.bias, self.eps))
        factor = self._update_factor()
        with torch.no_grad():
            self.running_mean.lerp_(torch.cat([p[1] for p in parts]).mean(0), factor)
            self.running_var.lerp_(torch.cat([p[2] for p in parts]).mean(0), factor)
        return parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class BatchRenorm2d(BatchNorm2d):
    """Batch renormalization (Ioffe 2017) with the clip schedule driven by ``set_progress``.

    Train: ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)``
    and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, where ``sigma_B = sqrt(var_B + eps)``
    (biased batch variance) and ``mu``, ``sigma = sqrt(running_var + eps)`` are the running
    statistics before this batch's update. r and d are constants for autograd (stop-gradient).
    Running statistics are updated with momentum exactly as in BN.

    Schedule over the training fraction f: plain BN (clips 1 and 0) while ``f < warmup``, then the
    clips grow linearly to ``r_max`` and ``d_max`` over the next ``ramp`` (``ramp=0``: at once).
    Before any ``set_progress`` call f = 0. With clips 1 and 0 the layer is exactly BN.
    """

    def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0,
                 warmup: float = 0.0, ramp: float = 0.0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, freeze_after: Optional[float] = None):
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"r_max={r_max} must be >= 1 and d_max={d_max} >= 0")
        super().__init__(num_features, eps=eps, momentum=momentum, freeze_after=freeze_after)
        self.r_max, self.d_max, self.warmup, self.ramp = r_max, d_max, warmup, ramp
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        super().set_progress(fraction)
        self.progress = fraction

    def current_clips(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the current training fraction."""
        if self.progress < self.warmup:
            return 1.0, 0.0
        t = 1.0 if self.ramp <= 0 else min(1.0, (self.progress - self.warmup) / self.ramp)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        r_max, d_max = self.current_clips()
        if r_max == 1.0 and d_max == 0.0:
            return super()._train_forward(x)
        with torch.no_grad():
            mean, var = _batch_moments(x, self.eps)
            sigma = (self.running_var + self.eps).sqrt()
            r = ((var + self.eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean) / sigma).clamp(-d_max, d_max)
        # gamma * (x_hat * r + d) + beta is BN with weight gamma * r and bias gamma * d + beta,
        # so the fused kernel does the work and gradients flow through the batch statistics.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight * r,
                            self.bias + self.weight * d, True, self._update_factor(), self.eps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup={self.warmup}, ramp={self.ramp}")


class NoisyBatchNorm2d(BatchNorm2d):
    """BN with extra noise in train mode (in the spirit of Santurkar et al. 2018's noisy BN).

    After normalization and before the affine map, ``x_hat * (1 + noise_mul * e1) + noise_add * e2``
    with ``e1, e2 ~ N(0, 1)`` drawn once per (sample, channel) and shared over H x W: the noise
    mimics batch-statistic noise, which also shifts and scales a whole channel of a sample. Drawn
    from torch's global generator on the input's device. Eval mode, frozen, or both stds 0: BN.
    """

    def __init__(self, num_features: int, noise_mul: float = 0.0, noise_add: float = 0.0,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 freeze_after: Optional[float] = None):
        if noise_mul < 0 or noise_add < 0:
            raise ValueError(f"noise_mul={noise_mul} and noise_add={noise_add} are stds: must be >= 0")
        super().__init__(num_features, eps=eps, momentum=momentum, freeze_after=freeze_after)
        self.noise_mul, self.noise_add = noise_mul, noise_add

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_mul == 0 and self.noise_add == 0:
            return super()._train_forward(x)
        z = F.batch_norm(x, self.running_mean, self.running_var, None, None, True,
                         self._update_factor(), self.eps)
        n, c = x.shape[:2]
        e1, e2 = torch.randn(2, n, c, 1, 1, device=x.device, dtype=self.weight.dtype)
        w = self.weight.view(1, c, 1, 1)
        scale = w * (1.0 + self.noise_mul * e1)
        shift = self.bias.view(1, c, 1, 1) + w * (self.noise_add * e2)
        return torch.addcmul(shift.to(z.dtype), z, scale.to(z.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_mul={self.noise_mul}, noise_add={self.noise_add}"


def group_count(num_channels: int, groups: int) -> int:
    """The largest divisor of ``num_channels`` that is <= ``groups`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(groups, num_channels) + 1) if num_channels % g == 0)


def group_norm(num_channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with ``group_count(num_channels, groups)`` groups; ``groups=1`` is layer norm."""
    return nn.GroupNorm(group_count(num_channels, groups), num_channels, eps=eps)


def _identity(num_channels: int) -> nn.Module:
    return nn.Identity()


def _bn_kwargs(cfg: NormConfig) -> dict:
    return {"eps": cfg.eps, "momentum": cfg.momentum, "freeze_after": cfg.freeze_after}


NORMS: dict[str, Callable[[NormConfig], Callable[[int], nn.Module]]] = {
    "bn": lambda cfg: functools.partial(BatchNorm2d, **_bn_kwargs(cfg)),
    "none": lambda cfg: _identity,
    "gn": lambda cfg: functools.partial(group_norm, groups=cfg.groups, eps=cfg.eps),
    "ln": lambda cfg: functools.partial(group_norm, groups=1, eps=cfg.eps),
    "ghost_bn": lambda cfg: functools.partial(
        GhostBatchNorm2d, virtual_batch=cfg.virtual_batch, **_bn_kwargs(cfg)),
    "batch_renorm": lambda cfg: functools.partial(
        BatchRenorm2d, r_max=cfg.r_max, d_max=cfg.d_max, warmup=cfg.renorm_warmup,
        ramp=cfg.renorm_ramp, **_bn_kwargs(cfg)),
    "noisy_bn": lambda cfg: functools.partial(
        NoisyBatchNorm2d, noise_mul=cfg.noise_mul, noise_add=cfg.noise_add, **_bn_kwargs(cfg)),
}


def make_norm(cfg: NormConfig) -> Callable[[int], nn.Module]:
    """The ``norm(num_channels)`` factory of ``cfg.name``; an unknown name is a ``ConfigError``."""
    if cfg.name not in NORMS:
        raise ConfigError(f"norm.name={cfg.name!r} is not an option; allowed values: {', '.join(NORMS)}")
    return NORMS[cfg.name](cfg)


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


def _batch_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fp32 mean and biased variance of ``x`` (no autograd), from the fused BN kernel:
    ``torch.var_mean`` over (0, 2, 3) measured ~6x slower on CPU for NHWC bf16 activations."""
    mean = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    var = torch.zeros_like(mean)
    F.batch_norm(x, mean, var, None, None, True, 1.0, eps)  # momentum 1: buffers <- batch stats
    n = x.numel() // x.shape[1]
    return mean, var * ((n - 1) / n)  # the kernel stores the unbiased variance


def _chunked_batch_norm(x: torch.Tensor, chunks: int, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode BN of ``chunks`` equal contiguous sub-batches of ``x``, each with its own stats.

    Returns the output (shape and memory format of ``x``) and the per-chunk means and unbiased
    variances, each ``[chunks, C]`` fp32. The chunks become channels of one wider batch so that a
    single fused ``F.batch_norm`` call computes all of them (no Python loop over chunks).
    """
    c = x.shape[1]
    means = torch.zeros(chunks * c, device=x.device, dtype=torch.float32)
    variances = torch.zeros_like(means)
    # momentum 1 writes each chunk's mean and unbiased variance into the zeroed buffers
    y = F.batch_norm(_fold(x, chunks), means, variances, weight.repeat(chunks), bias.repeat(chunks),
                     True, 1.0, eps)
    return _unfold(y, chunks), means.view(chunks, c), variances.view(chunks, c)


def _fold(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """[chunks * n, C, H, W] -> [n, chunks * C, H, W]: chunk g owns channels g*C .. g*C + C-1."""
    b, c, h, w = x.shape
    n = b // chunks
    if x.is_contiguous(memory_format=torch.channels_last):  # keep NHWC: the next conv wants it
        nhwc = x.permute(0, 2, 3, 1).reshape(chunks, n, h, w, c)
        return nhwc.permute(1, 2, 3, 0, 4).reshape(n, h, w, chunks * c).permute(0, 3, 1, 2)
    return x.reshape(chunks, n, c, h, w).transpose(0, 1).reshape(n, chunks * c, h, w)


def _unfold(y: torch.Tensor, chunks: int) -> torch.Tensor:
    """The inverse of ``_fold``."""
    n, gc, h, w = y.shape
    c = gc // chunks
    if y.is_contiguous(memory_format=torch.channels_last):
        nhwc = y.permute(0, 2, 3, 1).reshape(n, h, w, chunks, c)
        return nhwc.permute(3, 0, 1, 2, 4).reshape(chunks * n, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(n, chunks, c, h, w).transpose(0, 1).reshape(chunks * n, c, h, w)
