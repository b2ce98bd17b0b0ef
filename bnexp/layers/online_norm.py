"""PN with an online backward (``norm=pn_online``): population normalization whose gradient, like
its forward, has no batch-mates in it.

Why: PN (``batchnorms.PopulationNorm2d``) normalizes with the running statistics in the forward
pass, but its backward is train-mode BN's, straight through the batch mean and variance. Sample
i's input gradient there is ``(g_i - mean_B(g) - z_i * mean_B(g * z)) / sigma_B``: it reads every
batch-mate's input (through ``sigma_B`` and ``z``) and every batch-mate's upstream gradient
(through the two batch means). So "PN - BN" changes the batch noise of the forward pass only, not
"the noise with the normalization held fixed". This layer removes the batch-mates from the
backward too, in the spirit of Online Normalization (Chiley et al., NeurIPS 2019).

Contract, with ``g = dL/dz`` (``z`` the normalized output before gamma and beta) and ``sigma =
sqrt(running_var + eps)`` the running std the forward used:

    forward:   z = (x - running_mean) / sigma            (exactly PN's: eval-mode BN)
    backward:  dL/dx = (g - a_run - z * b_run) / sigma

``a_run`` and ``b_run`` (buffers ``running_grad_mean`` and ``running_grad_zmean``, per channel)
are running averages of ``mean(g)`` and ``mean(g * z)`` over (N, H, W), taken as they were when
this batch's forward ran, then updated from this batch in its backward with the factor of the
running statistics (``norm.momentum``, PyTorch's convention, or ``1 / batches`` for ``None``). So
sample i's input gradient depends on its own ``g_i``, its own ``x_i`` and the buffers only. The
gradients of gamma and beta are the ordinary ones (the affine map is applied outside).

Start and passes, as PN: at the first train-mode forward the layer is plain BN, the running
statistics take the batch's (momentum 1) and, in that step's backward, ``a_run`` and ``b_run``
take the batch's ``mean(g)`` and ``mean(g * z)`` (momentum 1). Under ``plain`` (statistics passes)
the layer is plain BN and the gradient buffers stay as they are. A pass with momentum 0 (a probe)
updates no buffer, in its forward or its backward. Under no_grad the output is eval BN bit for
bit. A graph backpropagated twice (``retain_graph``) updates the gradient buffers twice.

Caveat: BN's backward projects, per batch and channel, the components along 1 and ``z`` out of
the gradient, so it never moves a channel's shift or scale, the invariance that lets BN train at
large learning rates (``PopulationNorm2d``'s note). Here the projection uses running averages:
it is removed on average over recent batches, not in each batch. The per-batch residual
``mean_B(g) - a_run`` (and its ``z`` twin) stays in the gradient, a bias that pushes shifts and
scales the running statistics then undo a few steps later, as the naive PN did (issue 11; see
below for what it costs). The backward is affine in the upstream gradient, not linear: a sample with no loss still
gets ``-(a_run + z * b_run) / sigma``. Its gradient is not the gradient of any loss.

Measured (synthetic data, ``scale=smoke``, seed 0, SGD Nesterov, cosine; 1 CPU thread): it does
not train at BN's learning rate. With the smoke defaults (8 convs of width 16, batch 128, lr 0.1)
it diverges within the first epoch, where PN reaches 68.5% and BN 74.6% train accuracy. On
norm_vs_noise's smoke net (4 convs, batch 64, 1000 un-augmented images, 15 epochs) it diverges
at lr 0.1, 0.03 and 0.02 (also in fp32, with 3 warm-up epochs, with ``norm.momentum=0.5``), and at 0.01
trains to 77.3% train / 73.0% test accuracy, against PN's 83.7% / 76.3% (lr 0.1) and 85.4% /
80.2% (0.03) and BN's 99.9% / 83.6% (0.1) and 94.4% / 80.7% (0.03). The way it fails, traced at
lr 0.1: the per-batch residual of the projection is as large as ``mean(g)`` itself (the running
average does not follow its sign from batch to batch), so the pre-norm convs get a gradient
along their own scale and shift; the activations grow faster than the running std follows
(``|z|`` max 5, 12, 14, then 4,500 at steps 1-4) and the loss explodes. Chiley et al.'s own code
guards the forward for this (activation clamping at 5 or layer scaling after the norm; backward
decay 0.99, forward 0.999), which would change PN's forward and is left out here. The
``grad_noise`` probe reads ~1e-12 for it (fp32 rounding), against 0.01-0.05 for PN and 0.05-0.39
for BN on the same net.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from bnexp.layers.batchnorms import PopulationNorm2d
from bnexp.layers.ghost_noise import affine

CHANNEL = (1, -1, 1, 1)
REDUCE = (0, 2, 3)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 at least (bf16 activations under autocast; fp64 stays)."""
    return t if t.dtype == torch.float64 else t.float()


class _OnlineGradient(torch.autograd.Function):
    """Forward: eval-mode BN without affine. Backward: ``(g - a - z * b) / sigma`` with the
    gradient buffers as they were at the forward; then the buffers take this batch's means."""

    @staticmethod
    def forward(ctx, x, mean, var, eps: float, a_run, b_run, factor: float):
        z = F.batch_norm(x, mean, var, None, None, False, 0.0, eps)
        ctx.save_for_backward(z, (_wide(var) + eps).rsqrt())
        ctx.before = (a_run.clone(), b_run.clone())  # the buffers before this batch
        ctx.buffers, ctx.factor, ctx.dtype = (a_run, b_run), factor, x.dtype
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        z, inv_std = ctx.saved_tensors
        (a, b), (a_run, b_run) = ctx.before, ctx.buffers
        g, z = _wide(g), _wide(z)
        dx = (g - a.view(CHANNEL) - z * b.view(CHANNEL)) * inv_std.view(CHANNEL)
        if ctx.factor:
            update_gradient_stats(a_run, b_run, g, z, ctx.factor)
        return dx.to(ctx.dtype), None, None, None, None, None, None


@torch.no_grad()
def update_gradient_stats(a_run: torch.Tensor, b_run: torch.Tensor, g: torch.Tensor, z: torch.Tensor,
                          factor: float) -> None:
    """``a_run``, ``b_run`` move by ``factor`` towards this batch's ``mean(g)``, ``mean(g * z)``
    over (N, H, W), as the running statistics move towards the batch's (in the buffers' dtype)."""
    g, z = g.to(a_run.dtype), z.to(a_run.dtype)
    a_run.lerp_(g.mean(REDUCE), factor)
    b_run.lerp_((g * z).mean(REDUCE), factor)


class OnlinePopulationNorm2d(PopulationNorm2d):
    """PN whose backward has no batch-mates either (module doc): ``norm=pn_online``."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.register_buffer("running_grad_mean", torch.zeros(num_features))
        self.register_buffer("running_grad_zmean", torch.zeros(num_features))

    def _normalize(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.plain or not self._started():
            z = self._start(x)
        else:
            z = self._online(x)
        return z if weight is None else affine(z, weight, bias)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """PN's step 0 (or a plain pass): BN; at the start the gradient buffers take this batch's
        gradient means in its backward."""
        starting = not self.plain and self.momentum != 0.0
        z = super()._normalize(x, None, None)
        if starting and z.requires_grad:
            seen = z.detach()
            z.register_hook(lambda g: update_gradient_stats(self.running_grad_mean, self.running_grad_zmean,
                                                            g, seen, 1.0))
        return z

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        """The running statistics before this batch normalize; then they take the batch's."""
        factor = self._update_factor()
        if torch.is_grad_enabled() and x.requires_grad:
            z = _OnlineGradient.apply(x, self.running_mean, self.running_var, self.eps,
                                      self.running_grad_mean, self.running_grad_zmean, factor)
        else:  # no input gradient: the forward alone, eval BN bit for bit
            z = F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        if factor:
            with torch.no_grad():  # BN's update of the running statistics from this batch
                F.batch_norm(x, self.running_mean, self.running_var, None, None, True, factor, self.eps)
        return z

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "running_grad_mean"):  # nn.BatchNorm2d's __init__ calls this before they exist
            self.running_grad_mean.zero_()
            self.running_grad_zmean.zero_()
