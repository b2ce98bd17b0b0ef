"""Running averages at other momenta, kept beside each BN layer's own (``eval.ema_momenta``).

Train-mode BN normalizes with the statistics of the batch and never reads its running averages,
so the BN momentum does not change the weights: runs that differ only in the momentum train the
same network. One run can therefore score the EMA at several momenta on one set of weights
(ema_vs_precise: one run per seed, not one per momentum and seed).

Each BN layer of the family (``norms.bn_layers``) gets buffers ``shadow_mean`` and ``shadow_var``
([k, C], initialised as PyTorch initialises the running statistics: 0 and 1) and ``shadow_count``
([k], updates seen). After every forward in which the layer updated its own statistics with
factor f > 0 (the momentum, or 1 / batches for ``momentum=None``), the statistics it fed in are
recovered from the update, b = (r_new - (1 - f) r_old) / f, and each shadow k takes
s_k <- (1 - m_k) s_k + m_k b (m_k = ``None``: the cumulative average, 1 / updates seen). Passes
that leave the statistics alone (momentum 0: probes, precise BN; eval mode; FrozenBN) update no
shadow. The buffers are in the state dict, so checkpoints and resumed runs keep them.

Eval mode ``ema_m<m>`` (``mode_name``: ``ema_m0p01``, ``ema_cumulative``) is plain eval with
shadow k in place of the running statistics; ``stats.evaluate_modes`` scores every shadow
wherever it scores ``ema``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bnexp.config import ConfigError
from bnexp.layers.norms import bn_layers


def mode_name(momentum: Optional[float]) -> str:
    """``ema_m0p01`` for momentum 0.01, ``ema_cumulative`` for ``None`` (no dot: the mode is
    the suffix of record keys such as ``test_acc.<mode>``)."""
    return "ema_cumulative" if momentum is None else "ema_m" + f"{momentum:g}".replace(".", "p")


def attach(model: nn.Module, momenta: Sequence[Optional[float]]) -> nn.Module:
    """Give every BN layer of ``model`` shadow running averages at ``momenta``; returns ``model``.
    Nothing when ``momenta`` is empty. A model without BN layers is a ``ConfigError``."""
    if not momenta:
        return model
    layers = bn_layers(model)
    if not layers:
        raise ConfigError("eval.ema_momenta needs BatchNorm layers (norm=bn, ghost_bn, batch_renorm, "
                          "noisy_bn); this norm keeps no running statistics")
    for _, layer in layers:
        k, c = len(momenta), layer.num_features
        dev = layer.running_mean.device
        layer.shadow_momenta = tuple(momenta)
        layer.register_buffer("shadow_mean", torch.zeros(k, c, device=dev))
        layer.register_buffer("shadow_var", torch.ones(k, c, device=dev))
        layer.register_buffer("shadow_count", torch.zeros(k, dtype=torch.long, device=dev))
        layer.register_forward_pre_hook(_before)
        layer.register_forward_hook(_after)
    return model


def shadow_modes(model: nn.Module) -> list[tuple[str, int]]:
    """(mode name, shadow index) of the shadows ``model`` carries (none: [])."""
    layers = [m for _, m in bn_layers(model) if hasattr(m, "shadow_momenta")]
    return [(mode_name(m), k) for k, m in enumerate(layers[0].shadow_momenta)] if layers else []


def swapped(model: nn.Module, k: int) -> None:
    """Put shadow ``k`` in place of every layer's running statistics (call inside
    ``moments.preserved``, which puts them back)."""
    for _, m in bn_layers(model):
        m.running_mean.copy_(m.shadow_mean[k])
        m.running_var.copy_(m.shadow_var[k])


def _before(layer: nn.Module, args) -> None:
    layer._shadow_old = ((layer.running_mean.clone(), layer.running_var.clone(),
                          int(layer.num_batches_tracked)) if layer.training else None)


@torch.no_grad()
def _after(layer: nn.Module, args, output) -> None:
    old, layer._shadow_old = layer._shadow_old, None
    if old is None or int(layer.num_batches_tracked) == old[2]:
        return  # eval mode, or FrozenBN: the layer did not update its statistics
    f = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
    if f == 0.0:
        return  # a pass that leaves the statistics alone
    # each shadow's weight for this batch: its momentum, or 1 / (updates seen) when cumulative
    weights = [1.0 / (seen + 1) if m is None else m
               for m, seen in zip(layer.shadow_momenta, layer.shadow_count.tolist())]
    for shadow, new, prev in ((layer.shadow_mean, layer.running_mean, old[0]),
                              (layer.shadow_var, layer.running_var, old[1])):
        batch = (new - (1.0 - f) * prev) / f
        for k, w in enumerate(weights):
            shadow[k].mul_(1.0 - w).add_(batch, alpha=w)
    layer.shadow_count.add_(1)
