"""Statistics passes over a model: BN input moments per normalization batch, precise BN, FrozenBN's
re-estimate, the seeded batches they draw, and the state hygiene around them.

A *normalization batch* is the set of images one BN layer normalizes together: the whole batch,
or each ghost chunk of a ghost-BN layer (``normalization_batches``). Moments are collected per
normalization batch, so the two variance estimators of ``LayerMoments`` differ exactly as the law
of total variance says when the batches are not i.i.d. Every pass normalizes with plain batch
statistics (``plain_statistics``: no injected noise, no renorm r/d) and draws and augments its
images with generators of its own, so training's streams are untouched. ``stats`` re-exports the
names that callers have always found there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from bnexp.config import SamplerConfig
from bnexp.data.datasets import Split, seeded_generator
from bnexp.layers.norms import bn_layers, set_frozen, set_plain
from bnexp.data.sampling import build_sampler


# ------------------------------------------------------------------- state hygiene

@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Undo, on exit, every change to ``model`` (parameters, buffers, training flags, BN momentum,
    ``frozen`` and ``plain`` flags, instance ``forward`` overrides) and to the global RNG state."""
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    flags = [(m, m.training) for m in model.modules()]
    attrs = [(m, {k: m.__dict__[k] for k in ("momentum", "frozen", "plain", "forward") if k in m.__dict__})
             for m in model.modules()]
    param = next(model.parameters(), None)
    cuda = [param.device.index or 0] if param is not None and param.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield model
    finally:
        with torch.no_grad():
            for t, saved in zip((*model.parameters(), *model.buffers()), tensors):
                t.copy_(saved)
        for m, training in flags:
            m.training = training
        for m, saved in attrs:
            m.__dict__.pop("forward", None)
            m.__dict__.update(saved)


@contextlib.contextmanager
def plain_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every bnexp norm layer normalizes with plain batch statistics in train mode
    (``norms.set_plain``: no injected noise, no renorm r/d); on exit each layer's own flag is back."""
    saved = [(m, m.plain) for m in model.modules() if hasattr(m, "plain")]
    set_plain(model, True)
    try:
        yield model
    finally:
        for m, plain in saved:
            m.plain = plain


def bn_train_mode(model: nn.Module) -> list:
    """Eval mode except the BN layers: train mode, unfrozen, momentum 0 (running stats untouched).
    Use inside ``preserved``. Returns ``bn_layers(model)``."""
    model.eval()
    layers = bn_layers(model)
    for _, m in layers:
        m.train()
        m.momentum = 0.0
        if hasattr(m, "frozen"):
            m.frozen = False
    return layers


# ------------------------------------------------------------------------ precise BN

class LayerMoments:
    """Streaming per-channel moments of one BN layer's input, one normalization batch per ``add``
    (float64 sums).

    ``pooled()``: mean and *unbiased* variance over all N * H * W values seen, i.e.
    ``torch.var_mean(all_inputs, dim=(0, 2, 3), correction=1)`` whatever the batching (Chan et al.'s
    parallel update); unbiased because PyTorch's ``running_var`` is. ``mean_batch_var()``: the mean
    over normalization batches of each one's unbiased variance, weighted by its number of values,
    what a cumulative average of batch statistics (``swa_utils.update_bn``) gives; it misses the
    variance between the batch means (law of total variance), so it is smaller than pooled under
    non-i.i.d. batches. ``keep=True`` also keeps each batch's mean, biased variance and number of
    values (``batch_means``, ``batch_vars``, ``batch_counts``), for the noise probe.
    """

    def __init__(self, keep: bool = False):
        self.n, self.batches, self.keep = 0, 0, keep
        self.mean = self.m2 = self.var_sum = None
        self.batch_means, self.batch_vars, self.batch_counts = [], [], []

    def add(self, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), correction=0)
        nb = x.numel() // x.shape[1]
        if self.mean is None:
            self.mean, self.m2, self.var_sum = (torch.zeros_like(mean, dtype=torch.float64) for _ in range(3))
        if self.keep:
            self.batch_means.append(mean)
            self.batch_vars.append(var)
            self.batch_counts.append(nb)
        var, mean, total = var.double(), mean.double(), self.n + nb
        delta = mean - self.mean
        self.mean += delta * (nb / total)
        self.m2 += var * nb + delta.square() * (self.n * nb / total)
        self.var_sum += var * (nb * nb / max(nb - 1, 1))  # nb * the batch's unbiased variance
        self.n, self.batches = total, self.batches + 1

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / max(self.n - 1, 1)

    def mean_batch_var(self) -> torch.Tensor:
        return self.var_sum / max(self.n, 1)


def normalization_batches(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The sub-batches of ``x`` that ``layer`` normalizes separately: ghost BN (a layer with
    ``virtual_batch``) in train mode cuts contiguous chunks of ``virtual_batch``, the remainder
    last, as ``norms.GhostBatchNorm2d`` does; every other layer normalizes the whole batch."""
    size = getattr(layer, "virtual_batch", None)
    if not size or not layer.training or getattr(layer, "frozen", False) or len(x) <= size:
        return [x]
    return list(x.split(size))


@torch.no_grad()
def collect_moments(model: nn.Module, inputs: Iterable[torch.Tensor], pipe,
                    keep: bool = False) -> dict[str, LayerMoments]:
    """Run prepared ``inputs`` through ``model`` as it is and return each BN layer's input moments,
    one ``add`` per normalization batch (``normalization_batches``)."""
    layers = bn_layers(model)
    moments = {name: LayerMoments(keep) for name, _ in layers}

    def add(acc, layer, args):
        for part in normalization_batches(layer, args[0]):
            acc.add(part)

    hooks = [m.register_forward_pre_hook(functools.partial(add, moments[name])) for name, m in layers]
    try:
        for x in inputs:
            with pipe.amp():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return moments


ESTIMATORS = ("pooled", "bvar")


def precise_bn(model: nn.Module, inputs: Iterable[torch.Tensor], pipe, estimator: str = "pooled") -> list[dict]:
    """Set every BN layer's running mean to the mean of its input over ``inputs`` and its running
    variance to the ``pooled`` variance or to the mean of per-normalization-batch variances
    (``bvar``); BN layers in train mode with plain batch statistics, momentum 0, dropout off.
    Returns per-layer estimator summaries.

    Changes the model (modes, momentum, running stats; not ``plain``): call it inside ``preserved``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: allowed values are {', '.join(ESTIMATORS)}")
    layers = bn_train_mode(model)
    ema = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}
    with plain_statistics(model):
        moments = collect_moments(model, inputs, pipe)
    model.eval()
    table = []
    for name, m in layers:
        mean, var = moments[name].pooled()
        bvar = moments[name].mean_batch_var()
        m.running_mean.copy_(mean)
        m.running_var.copy_(var if estimator == "pooled" else bvar)
        ema_mean, ema_var = (t.double() for t in ema[name])
        var = var.clamp_min(1e-12)
        table.append({"layer": name, "channels": len(mean), "batches": moments[name].batches,
                      "values_per_channel": moments[name].n, "pooled_var": var.mean().item(),
                      "var_ratio": (bvar / var).mean().item(),
                      "ema_var_ratio": (ema_var / var).mean().item(),
                      "ema_mean_shift": ((ema_mean - mean).abs() / var.sqrt()).mean().item()})
    return table


def freeze_precisely(model: nn.Module, split: Split, pipe, samples: int, batch_size: int,
                     seed: int) -> None:
    """FrozenBN as Wu & Johnson 2021 do it: set the running statistics to the precise (pooled)
    population statistics of the current weights over ``samples`` i.i.d. images of ``split`` with
    the training augmentation, then freeze every bnexp BN layer (``norms.set_frozen``). Nothing
    else of the model, nor the RNG state, changes."""
    with preserved(model):
        precise_bn(model, input_batches(split, samples, batch_size, pipe, seed, "freeze", augment=True), pipe)
        estimates = [(m.running_mean.clone(), m.running_var.clone()) for _, m in bn_layers(model)]
    with torch.no_grad():
        for (_, m), (mean, var) in zip(bn_layers(model), estimates):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    set_frozen(model, True)


# ----------------------------------------------------------------------------- batches

def sample_indices(n_total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices in [0, n_total): a random subset, or whole permutations back to back (CPU)."""
    reps = -(-n // n_total)
    return torch.cat([torch.randperm(n_total, generator=generator) for _ in range(reps)])[:n]


def _own_augmentation(pipe, seed: int, tag: str, augment: bool):
    """``pipe`` with a generator of its own when augmenting: training's stream stays untouched."""
    if not augment:
        return pipe
    return dataclasses.replace(pipe, generator=seeded_generator(seed, tag, "augment",
                                                                device=pipe.generator.device))


def input_batches(split: Split, n: int, batch_size: int, pipe, seed: int, tag: str,
                  augment: bool, labels: bool = False) -> Iterator:
    """Prepared i.i.d. batches of ``split``: a seeded random draw of ``n`` images cut into
    ``ceil(n / batch_size)`` batches of near-equal size (4096 at 128 is 32 x 128; 50 at 16 is
    13, 13, 12, 12), so every image counts and no batch is tiny. Augmented with a generator of
    their own: training's augmentation stream is untouched. ``labels``: yield ``(x, y)``."""
    idx = sample_indices(len(split), max(n, 1), seeded_generator(seed, tag)).to(split.x.device)
    pipe = _own_augmentation(pipe, seed, tag, augment)
    for b in idx.tensor_split(-(-len(idx) // batch_size)):
        x = pipe.prep(split.x.index_select(0, b), train=augment)
        yield (x, split.y.index_select(0, b)) if labels else x


def sampler_indices(sampler: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int,
                    tag: str, n: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Index batches drawn by the sampler ``sampler`` over ``labels`` (as training draws them,
    ``bnexp.data.sampling.build_sampler``), with its seed derived from (``seed``, ``tag``): one epoch,
    or whole batches until at least ``n`` indices (further epochs when one is not enough)."""
    built = build_sampler(sampler, labels.cpu(), batch_size, seeded_generator(seed, tag).initial_seed())
    drawn = 0
    for epoch in range(1 if n is None else max(-(-n // max(len(built) * batch_size, 1)), 1)):
        for b in built.batches(epoch):
            if n is not None and drawn >= n:
                return
            drawn += len(b)
            yield b


def sampler_batches(split: Split, sampler: SamplerConfig, n: int, batch_size: int, pipe, seed: int,
                    tag: str, augment: bool) -> Iterator[torch.Tensor]:
    """Prepared batches of ``split`` with the structure of ``sampler`` (``sampler_indices``)."""
    pipe = _own_augmentation(pipe, seed, tag, augment)
    for b in sampler_indices(sampler, split.y, batch_size, seed, tag, n):
        yield pipe.prep(split.x.index_select(0, b.to(split.x.device)), train=augment)
