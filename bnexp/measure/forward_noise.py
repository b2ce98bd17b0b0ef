"""The noise that batch-mates put into each sample's forward pass, measured the same way for every
norm (the ``forward_noise`` probe of ``bnexp.measure.probes``).

The ``noise`` probe measures the spread of BN's batch statistics, so it has no value for arms
without BN layers (none, LN, GN, each with or without ghost noise injection). This one looks at
what every arm's next layer receives: the output of each *normalization position*, the module
named ``norm`` (``norm1``, ``norm2``, ... in ResNet blocks) of every block whatever its type,
including the ``nn.Identity`` or ``GhostNoise`` of ``norm=none``.

Procedure (``forward_noise``): ``P`` fixed probe images are placed, at fixed positions spread
``batch // P`` apart, into ``R`` batches of training images of the training batch size, which the
model runs in train mode as training sees them (batch statistics, ghost chunks, FrozenBN as set,
ghost noise and noisy-BN noise on, running statistics untouched: momentum 0, restored by the
caller's ``stats.preserved``), dropout off. Per normalization position and channel c:

    noise_c = sqrt(mean_{p, h, w} var_r y[r, p, c, h, w]) / std(y[:, :, c])

the root mean square over probe images and positions of the spread of a probe image's output
across the R batches (unbiased variance over r, so a few batches give an unbiased estimate of the
variance), divided by the spread of channel c across all images and positions of all R batches
(the signal's scale, so the number is unitless and gamma-free). The row's value is the mean over
channels. It is exactly 0 when a sample's output depends on its own input only (none, LN, GN, PN
without ghost noise, any frozen BN) and > 0 with batch statistics or injected noise.

With ``P`` > 1 the other probe images are batch-mates too, always the same ones: ``P`` is at most
``batch // 16`` (and at most ``MAX_PROBE_IMAGES``), so they are at most 1/16 of a sample's
batch-mates (lowering a whole-batch BN's measured noise by at most ~3%) and, 16 apart, each ghost
chunk of at most 16 holds one probe image (exact for ghost BN 16).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MAX_PROBE_IMAGES = 8
SPACING = 16  # probe images sit at least this far apart in a batch
POSITION = re.compile(r"norm\d*")


def norm_positions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose last name component is ``norm``, ``norm1``, ... (the
    layout of ``bnexp.layers.models``), in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules()
            if POSITION.fullmatch(name.rsplit(".", 1)[-1])]


def probe_count(batch_size: int) -> int:
    """How many probe images share a batch: ``batch // SPACING``, between 1 and ``MAX_PROBE_IMAGES``."""
    return max(1, min(MAX_PROBE_IMAGES, batch_size // SPACING))


def train_as_training(model: nn.Module) -> None:
    """Train mode as training sees it, but dropout off and BN momentum 0 (running statistics
    untouched). Changes modes and momenta only: call it inside ``stats.preserved``."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
        if isinstance(m, _BatchNorm):
            m.momentum = 0.0


@torch.no_grad()
def forward_noise(model: nn.Module, probe: torch.Tensor, batches: Sequence[torch.Tensor],
                  pipe) -> list[dict]:
    """Rows ``{layer, name: "forward_noise.ratio", value}`` per normalization position (module
    doc). ``probe``: [P, ...] prepared probe images; ``batches``: R >= 2 prepared batches, all of
    one size >= P, whose images at ``0, k, 2k, ...`` (k = size // P) are replaced by the probe images.
    Changes modes and momenta (``train_as_training``): call it inside ``stats.preserved``."""
    if len(batches) < 2:
        raise ValueError("forward_noise needs at least 2 batches to measure a spread")
    train_as_training(model)
    where = (torch.arange(len(probe)) * (len(batches[0]) // len(probe))).to(probe.device)
    layers = norm_positions(model)
    seen = {name: [] for name, _ in layers}  # per batch: (probe outputs, channel sum, sum of squares, count)

    def keep(name):
        def hook(_module, _args, out):
            y = out.detach().float()
            seen[name].append((y[where], y.sum((0, 2, 3), dtype=torch.float64),
                               y.double().square().sum((0, 2, 3)), y.numel() // y.shape[1]))
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in layers]
    try:
        for x in batches:
            x = x.clone()
            x[where] = probe
            with pipe.amp():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": name, "name": "forward_noise.ratio", "value": _ratio(seen[name])}
            for name, _ in layers]


def _ratio(seen: list) -> float:
    """Mean over channels of the RMS spread across batches over the pooled std (module doc)."""
    outputs = torch.stack([s[0] for s in seen]).double()  # [R, P, C, H, W]
    spread = outputs.var(0, correction=1).mean((0, 2, 3)).sqrt()
    n = sum(s[3] for s in seen)
    mean = sum(s[1] for s in seen) / n
    var = (sum(s[2] for s in seen) / n - mean.square()).clamp_min(0.0)
    return (spread / var.sqrt().clamp_min(1e-12)).mean().item()
