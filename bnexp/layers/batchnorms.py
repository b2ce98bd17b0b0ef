"""The BN family: layers that keep running statistics, all ``nn.BatchNorm2d`` subclasses (so
``fuse_conv_bn_eval``, ``swa_utils.update_bn`` and ``norms.bn_layers`` see them as BN), all plain BN
with running statistics in eval mode. The conventions (momentum, precision, FrozenBN, plain, ghost
noise) are stated once, in ``norms.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.layers.ghost_noise import affine, ghost_noise_injection


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that can be frozen (FrozenBN), told the fraction of training done, and
    carry ghost noise.

    ``freeze_after``: the training fraction from which ``set_progress`` freezes the layer (``None``:
    ``set_progress`` leaves ``frozen`` as it is). ``ghost_noise``: ghost batch size of GNI between
    normalization and affine in train mode (``None``: off; see ``ghost_noise.py``). Subclasses
    take these keywords as ``**kwargs`` and change ``_normalize`` (the train-mode normalization,
    which updates the running statistics) or ``_train_forward`` (normalize, [GNI], affine).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 freeze_after: Optional[float] = None, ghost_noise: Optional[int] = None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.freeze_after = freeze_after
        self.ghost_noise = ghost_noise
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
        if self.ghost_noise is None or self.plain:
            return self._normalize(x, self.weight, self.bias)
        z = ghost_noise_injection(self._normalize(x, None, None), self.ghost_noise)
        return affine(z, self.weight, self.bias)

    def _normalize(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Train-mode BN with this affine (``None``: none); updates the running statistics."""
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True,
                            self._update_factor(), self.eps)

    def _update_factor(self) -> float:
        """Count this batch; return the weight of its statistics in the running average."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, frozen={self.frozen}, freeze_after={self.freeze_after}, "
                f"ghost_noise={self.ghost_noise}")


GHOST_UPDATES = ("step", "chunk")  # = bnexp.config.GHOST_UPDATES


class GhostBatchNorm2d(BatchNorm2d):
    """Ghost BN (Hoffer et al. 2017): train-mode statistics over sub-batches of ``virtual_batch``.

    The batch is cut into contiguous chunks ``x[0:v], x[v:2v], ...``; a last, smaller chunk takes
    the remainder (so the last batch of an epoch needs no special case). Each chunk is normalized
    with its own mean and biased variance. Running statistics are updated once per forward with
    the average over chunks of the chunk means and of the chunk *unbiased* variances, each chunk
    weighted by its share of the batch (n_g / N), so a remainder of 2 counts for 2 samples: the
    mean fed to the buffer is then the batch mean, and the variance estimates what the layer
    normalizes with at this ghost batch size. A batch of at most ``virtual_batch`` is one chunk,
    and then the layer is exactly ``BatchNorm2d``. ``plain`` keeps the chunks (they are this
    layer's normalization) and drops only the ghost noise. Eval mode: plain BN (foldable).

    ``update="chunk"`` (``norm.ghost_update``): instead, one momentum update per chunk, in chunk
    order, each with that chunk's mean and unbiased variance (the remainder chunk counts as one),
    as Hoffer et al.'s bigBatch code does by running BN once per chunk: k chunks then weigh the
    step's statistics by an effective momentum ``1 - (1 - momentum)^k``, and ``num_batches_tracked``
    counts chunks.
    """

    def __init__(self, num_features: int, virtual_batch: int, update: str = "step", **kwargs):
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch={virtual_batch} must be >= 1")
        if update not in GHOST_UPDATES:
            raise ValueError(f"update={update!r}: allowed values are {', '.join(GHOST_UPDATES)}")
        super().__init__(num_features, **kwargs)
        self.virtual_batch = virtual_batch
        self.update = update

    def _normalize(self, x, weight, bias):
        if x.shape[0] <= self.virtual_batch:
            return super()._normalize(x, weight, bias)
        return _ghost_normalize(self, x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}, update={self.update}"


class BatchRenorm2d(BatchNorm2d):
    """Batch renormalization (Ioffe 2017) with the clip schedule driven by ``set_progress``.

    Train: ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)``
    and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, where ``sigma_B = sqrt(var_B + eps)``
    (biased batch variance) and ``mu``, ``sigma = sqrt(running_var + eps)`` are the running
    statistics before this batch's update. r and d are constants for autograd (stop-gradient).
    Running statistics are updated with momentum exactly as in BN.

    Schedule over the training fraction f, r and d on their own spans as in Ioffe 2017: plain BN
    (clips 1 and 0) while ``f < warmup``; then r's clip grows linearly from 1 to ``r_max`` over the
    next ``r_ramp`` and d's from 0 to ``d_max`` over the next ``d_ramp`` (a ramp of 0: at once).
    Before any ``set_progress`` call f = 0. With clips 1 and 0, or under ``plain``, the layer is BN.

    ``virtual_batch`` (``None``: the whole batch): renormalize per ghost chunk, as each worker of
    Ioffe's multi-worker setting does. The batch is cut, and the running statistics updated, as
    ``GhostBatchNorm2d`` does; each chunk g gets its own ``r_g``, ``d_g`` from its own mean and
    biased variance against the running statistics before this batch. With clips 1 and 0 or
    under ``plain`` the layer is then ghost BN (plain per-chunk BN).
    """

    def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0,
                 warmup: float = 0.0, r_ramp: float = 0.0, d_ramp: float = 0.0,
                 virtual_batch: Optional[int] = None, **kwargs):
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"r_max={r_max} must be >= 1 and d_max={d_max} >= 0")
        if virtual_batch is not None and virtual_batch < 1:
            raise ValueError(f"virtual_batch={virtual_batch} must be >= 1 (or None: the whole batch)")
        super().__init__(num_features, **kwargs)
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self.r_ramp, self.d_ramp = r_ramp, d_ramp
        self.virtual_batch = virtual_batch
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        super().set_progress(fraction)
        self.progress = fraction

    def current_clips(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the current training fraction."""
        if self.progress < self.warmup:
            return 1.0, 0.0
        done = self.progress - self.warmup
        t_r = 1.0 if self.r_ramp <= 0 else min(1.0, done / self.r_ramp)
        t_d = 1.0 if self.d_ramp <= 0 else min(1.0, done / self.d_ramp)
        return 1.0 + t_r * (self.r_max - 1.0), t_d * self.d_max

    def _normalize(self, x, weight, bias):
        r_max, d_max = self.current_clips()
        chunked = self.virtual_batch is not None and x.shape[0] > self.virtual_batch
        if self.plain or (r_max == 1.0 and d_max == 0.0):
            return _ghost_normalize(self, x, weight, bias) if chunked else super()._normalize(x, weight, bias)
        if chunked:
            return _ghost_normalize(self, x, weight, bias, (r_max, d_max))
        r, d = _renorm_correction(x, self.running_mean, self.running_var, self.eps, r_max, d_max)
        # gamma * (x_hat * r + d) + beta is BN with weight gamma * r and bias gamma * d + beta,
        # so the fused kernel does the work and gradients flow through the batch statistics.
        if weight is not None:
            r, d = weight * r, bias + weight * d
        return F.batch_norm(x, self.running_mean, self.running_var, r, d, True,
                            self._update_factor(), self.eps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup={self.warmup}, r_ramp={self.r_ramp}, d_ramp={self.d_ramp}, "
                f"virtual_batch={self.virtual_batch}")


class NoisyBatchNorm2d(BatchNorm2d):
    """Noisy BN in the spirit of Santurkar et al. 2018 ("How Does Batch Normalization Help
    Optimization?", Sec. 2.1 and Appendix A.2.1), not a replication: BN whose output gets a noise
    distribution that changes every step.

    At every train-mode forward (step t), per channel j: ``mu_t ~ U(-noise_mean, noise_mean)`` and
    ``sigma_t ~ U(1, noise_scale)``; then per sample i: scale ``s_ij ~ N(sigma_t, noise_mul^2)``
    and shift ``m_ij ~ N(mu_t, noise_add^2)``, and ``y_ij = s_ij * BN(x)_ij + m_ij``, shared over
    H x W (a channel is BN's unit). Applied to the BN layer's output, after its affine map: the
    paper injects the noise "after BatchNorm layers" to shift the next layer's input distribution.
    The algorithm's exact text could not be retrieved here: this is the form issue 10 states (n_mu,
    n_sigma for the per-step draws, per-sample jitter around them), with the jitter parameters read
    as standard deviations. ``noise_mean=0, noise_scale=1`` leaves only independent per-sample noise
    N(1, noise_mul^2) / N(0, noise_add^2). Drawn from torch's global generator on the input's device.
    Eval mode, frozen, ``plain``, or no noise at all: BN.
    """

    def __init__(self, num_features: int, noise_mul: float = 0.0, noise_add: float = 0.0,
                 noise_mean: float = 0.0, noise_scale: float = 1.0, **kwargs):
        if noise_mul < 0 or noise_add < 0 or noise_mean < 0 or noise_scale < 1:
            raise ValueError(f"noise_mul={noise_mul}, noise_add={noise_add}, noise_mean={noise_mean} "
                             f"must be >= 0 and noise_scale={noise_scale} >= 1")
        super().__init__(num_features, **kwargs)
        self.noise_mul, self.noise_add = noise_mul, noise_add
        self.noise_mean, self.noise_scale = noise_mean, noise_scale

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super()._train_forward(x)
        if self.plain or not (self.noise_mul or self.noise_add or self.noise_mean
                              or self.noise_scale != 1.0):
            return y
        n, c = x.shape[:2]
        u, e = torch.rand(2, 1, c, device=x.device), torch.randn(2, n, c, device=x.device)
        mu_t, sigma_t = (2 * u[0] - 1) * self.noise_mean, 1 + u[1] * (self.noise_scale - 1)
        scale, shift = sigma_t + self.noise_mul * e[0], mu_t + self.noise_add * e[1]
        return torch.addcmul(shift.view(n, c, 1, 1).to(y.dtype), y, scale.view(n, c, 1, 1).to(y.dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, noise_mean={self.noise_mean}, noise_scale={self.noise_scale}, "
                f"noise_mul={self.noise_mul}, noise_add={self.noise_add}")


class PopulationNorm2d(BatchNorm2d):
    """Population normalization (Luo, Wang, Shao & Peng, ICLR 2019): BN whose train-mode forward
    normalizes with the running statistics, i.e. BN's normalization without its batch noise.

    Start: at the first train-mode forward (``num_batches_tracked == 0``) the layer is BN and its
    buffers take that batch's mean and unbiased variance (momentum 1): the running statistics at
    step 0 are the first batch's, not the 0/1 defaults, whose first steps would be unnormalized.
    A layer that has seen batches (a checkpoint, a loaded state) goes straight on. A pass with
    momentum 0 (a probe, a statistics pass) before the start is plain BN and starts nothing.

    Forward, later steps: ``gamma * (x - mu_run) / sqrt(var_run + eps) + beta`` with the buffers as
    they were before this batch, i.e. eval-mode BN: a sample's output depends on its own input and
    the buffers only, so there is no batch-mate noise (the ``forward_noise`` probe reads exactly
    0; under no_grad the output is eval BN bit for bit). What remains is the EMA's memory of the
    last ~1/momentum batches: its lag behind the moving weights, and its estimation noise, a
    momentum / (2 - momentum) share of one batch statistic's variance (std ~0.23 x BN's at
    momentum 0.1), the same for every sample of a step and independent of its batch. The buffers
    are then updated from the batch exactly as BN's.

    Backward: straight-through, ``z = z_B + (z_pop - z_B).detach()``: the gradient is train-mode
    BN's, through the batch mean and variance, so it keeps BN's projection (no gradient along a
    channel's shift and scale, the scale invariance that lets BN train at large learning rates)
    and with it BN's batch noise in the backward pass only. Why: with no gradient through any
    statistics (the naive form) issue 11 measured 56% training accuracy where BN reached 100%;
    the gradient then pushes shifts and scales that the running statistics undo a few steps
    later.

    Measured (Fashion-MNIST, no augmentation, 4-conv VGG of width 16, SGD 0.1 Nesterov, cosine,
    seeds 0 / 1): at batch 64 (the norm_vs_noise budget: 3,000 images, 30 epochs) PN trains as well
    as BN (train accuracy 100 / 100%, in train mode from epoch 19-20 against BN's 15-17; final loss
    0.006-0.007 against 0.003; precise test accuracy 86.2 / 85.7% against 86.7 / 87.1%). At batch
    128 on 4,000 images it is slower (final loss 0.025-0.031, dips at epochs 9 and 17: the lagging
    statistics at a high effective learning rate). So the formulation stays; the lag at large
    steps is the price of having no batch noise.
    """

    def _normalize(self, x, weight, bias):
        if self.plain:
            return super()._normalize(x, weight, bias)
        if not self._started():  # step 0: BN, and the buffers take this batch's statistics
            if self.momentum == 0.0:  # a pass that leaves the statistics alone (a probe): BN only
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            self._update_factor()
            self._has_stats = True
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():  # the running statistics before this batch's update
            pop = F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        z = F.batch_norm(x, self.running_mean, self.running_var, None, None, True,
                         self._update_factor(), self.eps)
        if torch.is_grad_enabled() and x.requires_grad:
            z = z + (pop - z).detach()  # forward: pop; backward: BN's, through the batch statistics
        else:  # no input gradient: the forward alone, exactly pop (z + (pop - z) may round)
            z = pop
        return z if weight is None else affine(z, weight, bias)

    def _started(self) -> bool:
        """Whether the buffers already hold statistics of a training batch (checked on the device
        once, then remembered, so the hot path does not synchronize)."""
        if not getattr(self, "_has_stats", False):
            self._has_stats = bool(self.num_batches_tracked > 0)
        return self._has_stats

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._has_stats = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._has_stats = False  # look at the loaded num_batches_tracked again


def _batch_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fp32 mean and biased variance of ``x`` (no autograd), from the fused BN kernel:
    ``torch.var_mean`` over (0, 2, 3) measured ~6x slower on CPU for NHWC bf16 activations."""
    mean = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    var = torch.zeros_like(mean)
    F.batch_norm(x, mean, var, None, None, True, 1.0, eps)  # momentum 1: buffers <- batch stats
    n = x.numel() // x.shape[1]
    return mean, var * ((n - 1) / n)  # the kernel stores the unbiased variance


def _renorm_correction(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                       eps: float, r_max: float = math.inf,
                       d_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """Ioffe 2017's ``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma``, clipped to
    [1/r_max, r_max] and [-d_max, d_max], as constants for autograd (fp32, per channel)."""
    with torch.no_grad():
        mean, var = _batch_moments(x, eps)
        sigma = (running_var + eps).sqrt()
        r = ((var + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean) / sigma).clamp(-d_max, d_max)
    return r, d


def _ghost_normalize(layer: BatchNorm2d, x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor],
                     clips: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Ghost BN of ``x`` by ``layer`` and its one running-statistics update, as ``GhostBatchNorm2d``
    states; ``clips = (r_max, d_max)``: batch renorm of each chunk against ``layer``'s running
    statistics as they were before this call."""
    batch, size = x.shape[0], layer.virtual_batch
    full = batch // size * size
    renorm = None if clips is None else (layer.running_mean, layer.running_var, *clips)
    parts = [_chunked_batch_norm(x[:full], full // size, weight, bias, layer.eps, renorm)]
    if full < batch:
        parts.append(_chunked_batch_norm(x[full:], 1, weight, bias, layer.eps, renorm))
    share = torch.full((batch // size + (full < batch), 1), size / batch, device=x.device)
    share[full // size:] = (batch - full) / batch  # the remainder chunk, if any
    means, variances = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    with torch.no_grad():  # after every chunk's r, d: they all saw the same running statistics
        if getattr(layer, "update", "step") == "chunk":  # one update per chunk, in order
            for mean, var in zip(means, variances):
                factor = layer._update_factor()
                layer.running_mean.lerp_(mean, factor)
                layer.running_var.lerp_(var, factor)
        else:
            factor = layer._update_factor()
            layer.running_mean.lerp_((means * share).sum(0), factor)
            layer.running_var.lerp_((variances * share).sum(0), factor)
    return parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])


def _chunked_batch_norm(x: torch.Tensor, chunks: int, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], eps: float,
                        renorm: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode BN of ``chunks`` equal contiguous sub-batches of ``x``, each with its own stats.

    Returns the output (shape and memory format of ``x``) and the per-chunk means and unbiased
    variances, each ``[chunks, C]`` fp32. The chunks become channels of one wider batch so that a
    single fused ``F.batch_norm`` call computes all of them (no Python loop over chunks).
    ``renorm = (running_mean, running_var, r_max, d_max)``: batch renorm instead, each chunk's
    ``r``, ``d`` from its own moments against those running statistics (``_renorm_correction``).
    """
    c = x.shape[1]
    folded = _fold(x, chunks)
    means = torch.zeros(chunks * c, device=x.device, dtype=torch.float32)
    variances = torch.zeros_like(means)
    if weight is not None:
        weight, bias = weight.repeat(chunks), bias.repeat(chunks)
    if renorm is not None:  # per-chunk weight gamma * r_g and bias gamma * d_g + beta, as in BN
        mean, var, r_max, d_max = renorm
        r, d = _renorm_correction(folded, mean.repeat(chunks), var.repeat(chunks), eps, r_max, d_max)
        weight, bias = (r, d) if weight is None else (weight * r, bias + weight * d)
    # momentum 1 writes each chunk's mean and unbiased variance into the zeroed buffers
    y = F.batch_norm(folded, means, variances, weight, bias, True, 1.0, eps)
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
