"""The noise that batch-mates put into a sample's weight gradient, measured the same way for every
norm (the ``grad_noise`` probe of ``bnexp.measure.probes``).

``forward_noise`` reads each norm's output; PN's reads 0, yet PN's backward is BN's, through the
batch statistics, so its gradient still carries batch-mates (``bnexp.layers.online_norm``). This
probe reads the gradient of every weight (every parameter: convs, linear, gamma and beta).

Procedure (``grad_noise``): the ``P`` fixed probe images of ``forward_noise`` (with their labels,
at the same positions, ``batch // P`` apart) are placed into ``R`` batches of training images of
the training batch size, which the model runs in train mode as training sees it (batch
statistics, ghost chunks, FrozenBN as set, ghost noise and noisy-BN noise on, dropout off; BN
momentum 0, so no running statistic and no gradient buffer moves; call inside
``moments.preserved``), in fp32 without autocast (bf16's rounding would be noise of its own).
Per batch r, ``G_r`` is the gradient w.r.t. every weight of the cross-entropy summed over the
probe images only. Rows (layer ``model``):

* ``grad_noise.batchmates``: the share of ``G_r``'s mean square that moves with the batch-mates,
  ``sum_params var_r(G_r) / mean_r ||G_r||^2`` (unbiased variance over r);
* ``grad_noise.sampling``, the reference: the same share for the gradient of the whole batch's mean
  loss over the ``R`` batches as drawn (no probe images), i.e. the minibatch sampling noise of SGD;
* ``grad_noise.ratio``: batchmates / sampling.

The normalization: the share estimates ``tr Cov / E||G||^2 = s / (1 + s)``, with ``s = tr Cov /
||E G||^2`` the noise-to-signal ratio (McCandlish et al. 2018's simple noise scale over the batch
size, for the sampling row). ``s`` itself is not reported: with few batches ``||mean_r G_r||^2``
overestimates ``||E G||^2`` by ``tr Cov / R``, so its plain estimate saturates near ``R`` where the
noise dominates, as it does late in training when the mean gradient vanishes; both parts of the
share are unbiased at any R and it stays in [0, R / (R - 1)]. Unitless and invariant to the loss's
scale. Variances are accumulated by Welford's update in float64, so identical gradients give 0
exactly.

0 where a sample's gradient depends on its own input only: exactly for none, LN, GN and any
frozen BN, up to float rounding for pn_online (below); > 0 for BN, ghost BN, PN and any injected
noise. One subtlety:
pn_online's backward is affine, not linear, in the upstream gradient (it subtracts running
gradient means from every sample, whatever its loss), so the gradient of the probe images' loss
also holds every batch-mate's own constant term. ``G_r`` is therefore the weight gradient's
response to the probe loss, ``grad(L_probe) - grad(0 * L_probe)`` on the same graph: for every
other norm the backward is linear and the second term is exactly 0. For pn_online the difference
keeps the fp32 rounding of those terms: a share of ~1e-7 on the tests' tiny net with running
gradient means as large as its gradients, against > 1e-3 for BN and PN.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.measure.forward_noise import train_as_training

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, labels)


class Spread:
    """Streaming spread of flat vectors (float64): Welford's mean and sum of squared deviations,
    and the mean squared norm."""

    def __init__(self):
        self.n, self.mean, self.m2, self.sq = 0, None, 0.0, 0.0

    def add(self, v: torch.Tensor) -> None:
        v = v.double()
        self.n += 1
        if self.mean is None:
            self.mean = torch.zeros_like(v)
        delta = v - self.mean
        self.mean += delta / self.n
        self.m2 += float(delta @ (v - self.mean))
        self.sq += float(v @ v)

    def share(self) -> float:
        """``sum var / mean ||v||^2`` (unbiased variance); 0 for vectors that are all 0."""
        if self.n < 2:
            raise ValueError("a spread needs at least 2 vectors")
        return (self.m2 / (self.n - 1)) / (self.sq / self.n) if self.sq > 0 else 0.0


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor], retain: bool = False) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one flat vector (zeros for unused ones)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def probe_response(model: nn.Module, x: torch.Tensor, y: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``grad(L) - grad(0 * L)`` with L the cross-entropy summed over the images at ``where``
    (module doc: the second term is 0 for every backward but pn_online's)."""
    params = weights(model)
    loss = F.cross_entropy(model(x).float()[where], y[where], reduction="sum")
    full = flat_grad(loss, params, retain=True)
    return full - flat_grad(loss * 0.0, params)


def mean_loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the batch's mean cross-entropy, the one SGD steps with."""
    return flat_grad(F.cross_entropy(model(x).float(), y), weights(model))


def grad_noise(model: nn.Module, probe: Batch, batches: Sequence[Batch]) -> list[dict]:
    """Rows ``grad_noise.batchmates | sampling | ratio`` (layer ``model``; module doc). ``probe``:
    ``(x, y)`` of P prepared probe images; ``batches``: R >= 2 prepared ``(x, y)`` batches of one
    size >= P. Changes modes and momenta (``train_as_training``): call inside ``moments.preserved``."""
    if len(batches) < 2:
        raise ValueError("grad_noise needs at least 2 batches to measure a spread")
    train_as_training(model)
    px, py = probe[0].float(), probe[1]
    where = (torch.arange(len(px)) * (len(batches[0][0]) // len(px))).to(px.device)
    mates, sampling = Spread(), Spread()
    for x, y in batches:
        x = x.float()
        sampling.add(mean_loss_gradient(model, x, y))
        x, y = x.clone(), y.clone()
        x[where], y[where] = px, py
        mates.add(probe_response(model, x, y, where))
    b, s = mates.share(), sampling.share()
    return [_row("grad_noise.batchmates", b), _row("grad_noise.sampling", s),
            _row("grad_noise.ratio", b / s if s > 0 else float("nan"))]


def _row(name: str, value: float) -> dict:
    return {"layer": "model", "name": name, "value": value}
