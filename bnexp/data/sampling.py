"""Batch samplers: which training examples share an optimization batch (and so a BN batch).

A sampler turns an epoch number into a list of int64 CPU index tensors into the training split,
one per step, each of exactly ``batch_size`` indices. The list depends only on (seed, epoch), so a
resumed run redraws the batches it would have seen, however often ``batches`` was called before.

- ``iid``: a fresh permutation per epoch, cut into ``N // batch_size`` batches;
- ``pk``: ``groups`` contiguous P x K groups per batch (P classes x K examples each; all
  ``groups * P`` classes of a batch distinct), shuffled within each group, so that ghost BN with
  ``virtual_batch = P * K`` normalizes exactly one group per chunk. ``groups=1`` is the
  metric-learning P x K batch; ``P=1`` gives class-sorted groups; with ``groups * P`` equal to
  the number of classes every batch holds every class exactly K times (Ioffe 2017's setting:
  each worker normalizes a few classes while the gradient sums over all of them);
- ``sorted``: every batch from a single class;
- ``dirichlet``: per batch, class proportions ``q ~ Dir(alpha * share)`` (Hsu et al. 2019,
  "Measuring the effects of non-identical data distribution"), ``share`` being each class's part of
  the examples not yet drawn this epoch: small alpha gives one-class batches, large alpha i.i.d.
  ones.

An epoch of ``iid``, ``pk`` and ``dirichlet`` is one pass over the data: **no index appears twice
in an epoch**. What the batch structure leaves out, and so the exact epoch guarantees:

- ``dirichlet``: ``N // batch_size`` batches; the ``N mod batch_size`` examples left over are the
  only ones not drawn, so each class's count per epoch is within ``batch_size`` of its share.
- ``pk``: classes are drawn in whole blocks of K from a per-epoch shuffle of each class, so each
  class gives up to K - 1 examples per epoch (a different few each epoch), and a class with fewer
  than K examples is never drawn. A class appears at most once per batch, so it gets at most one
  block per step; the number of steps is the largest S for which the blocks fill S batches under
  that rule, and fewer than ``groups * P`` surplus blocks are dropped at random per epoch. A class
  not capped by the one-per-batch rule gets within 2K of its share of the epoch's draws; under
  ``groups * P`` = classes every class gets exactly K per batch (the smallest class then sets S).
- ``sorted`` rounds each class to whole batches, topped up from a reshuffle of the class: up to
  half a batch per class repeats (the one sampler that does).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from bnexp.config import ConfigError, SamplerConfig
from bnexp.data.datasets import seeded_generator
from bnexp.registry import Registry

SAMPLERS = Registry("sampler.name", "(cfg: SamplerConfig, labels, batch_size, seed) -> BatchSampler")


class BatchSampler(Protocol):
    def batches(self, epoch: int) -> list[torch.Tensor]:
        """One epoch of index batches (int64, CPU), a function of (seed, epoch) only."""

    def __len__(self) -> int:
        """Steps per epoch (the same for every epoch)."""


@SAMPLERS.register("iid")
class IIDSampler:
    """Uniform random batches: a permutation per epoch, the last partial batch dropped."""

    def __init__(self, cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = labels.numel(), batch_size, seed

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=_generator("iid", self.seed, epoch))
        return list(perm[: len(self) * self.batch_size].view(len(self), self.batch_size))


@SAMPLERS.register("pk")
class PKSampler:
    """``groups`` P x K groups per batch of ``groups * p * k``, every class of a batch distinct.

    Batch layout: ``batch.view(groups, p * k)[g]`` is group g, p classes x k examples in random
    order. Which classes share a batch, and a group, is drawn per step in proportion to the blocks
    of K each class has left this epoch; a class with as many blocks left as steps remain is taken
    for sure, which is what lets every block find a batch (see the module docstring).
    """

    def __init__(self, cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int):
        self.members = _members_by_class(labels)
        self.p, self.k, self.groups, self.seed = cfg.p, cfg.k, cfg.groups, seed
        self.slots = cfg.p * cfg.groups  # distinct classes per batch (batch_size / k: cfg.check_batch)
        if self.slots > len(self.members):
            raise ConfigError(f"sampler.p={cfg.p} x sampler.groups={cfg.groups} = {self.slots} distinct "
                              f"classes per batch is more than the {len(self.members)} classes in the "
                              "training set")
        self.blocks = np.array([len(m) // cfg.k for m in self.members], dtype=np.int64)
        if int((self.blocks > 0).sum()) < self.slots:
            raise ConfigError(f"sampler=pk needs {self.slots} classes of at least sampler.k={cfg.k} "
                              f"examples; the training set has {int((self.blocks > 0).sum())}")
        self.steps = _max_steps(self.blocks, self.slots)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = _generator("pk", self.seed, epoch)
        quota = _quota(self.blocks, self.steps, self.slots, g)
        # block j of class c: the examples [j*k, (j+1)*k) of this epoch's shuffle of c
        queues = [iter(torch.from_numpy(m)[torch.randperm(len(m), generator=g)[: q * self.k]].view(q, self.k))
                  for m, q in zip(self.members, quota.tolist())]
        out = []
        for classes in _schedule(quota, self.steps, self.slots, g):
            order = classes[torch.randperm(self.slots, generator=g)].view(self.groups, self.p)
            groups = []
            for group in order.tolist():
                block = torch.cat([next(queues[c]) for c in group])
                groups.append(block[torch.randperm(len(block), generator=g)])
            out.append(torch.cat(groups))
        return out


@SAMPLERS.register("sorted")
class SortedSampler:
    """Single-class batches: each class is cut into ``round(n_c / batch_size)`` (at least one)
    batches of its own, topped up from a reshuffle where needed; batch order shuffled per epoch."""

    def __init__(self, cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int):
        self.members, self.batch_size, self.seed = _members_by_class(labels), batch_size, seed
        self.per_class = [max(1, round(len(m) / batch_size)) for m in self.members]

    def __len__(self) -> int:
        return sum(self.per_class)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = _generator("sorted", self.seed, epoch)
        pools = _ClassPools(self.members, g)
        out = []
        for c, count in enumerate(self.per_class):
            out.extend(torch.from_numpy(pools.take(c, count * self.batch_size)).view(count, self.batch_size))
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


@SAMPLERS.register("dirichlet")
class DirichletSampler:
    """Per batch, class proportions ``q ~ Dir(alpha * share)``, then ``multinomial(batch_size, q)``
    examples per class, capped at what each class has left (the excess goes to the classes ``q``
    favours next); ``N // batch_size`` steps per epoch, no index twice in an epoch."""

    def __init__(self, cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int):
        self.members, self.batch_size, self.seed = _members_by_class(labels), batch_size, seed
        self.alpha, self.n = cfg.alpha, labels.numel()

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = _generator("dirichlet", self.seed, epoch)
        rng = np.random.default_rng(g.initial_seed())  # torch has no seeded Dirichlet sampler
        pools = _ClassPools(self.members, g)
        out = []
        for _ in range(len(self)):
            left = pools.remaining()
            share = left / left.sum()  # > 0: at least one batch of examples is left
            # floor: Dirichlet parameters must be > 0; an exhausted class then gets q ~ 0
            q = rng.dirichlet(self.alpha * np.maximum(share, 1e-9))
            counts = _fit(rng.multinomial(self.batch_size, q / q.sum()), left, q)
            batch = torch.from_numpy(np.concatenate([pools.take(int(c), int(counts[c]))
                                                     for c in np.flatnonzero(counts)]))
            out.append(batch[torch.randperm(len(batch), generator=g)])  # so sub-batches are random subsets
        return out


def build_sampler(cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int) -> BatchSampler:
    """The sampler ``cfg.name`` over the training ``labels`` (any device; kept on the CPU)."""
    factory = SAMPLERS.get(cfg.name)
    n = labels.numel()
    if batch_size > n:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the training set ({n} images)")
    cfg.check_batch(batch_size)
    return factory(cfg, labels.detach().cpu().long(), batch_size, seed)


def _max_steps(blocks: np.ndarray, slots: int) -> int:
    """The largest S such that ``sum(min(blocks, S)) >= S * slots``: a class fills at most one of
    a batch's ``slots`` per step, so S batches can use at most S of its blocks."""
    lo, hi = 0, int(blocks.sum()) // slots  # the condition holds at lo and is monotone in S
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(blocks, mid).sum() >= mid * slots else (lo, mid - 1)
    return lo


def _quota(blocks: np.ndarray, steps: int, slots: int, g: torch.Generator) -> np.ndarray:
    """Blocks each class gives this epoch: ``min(blocks, steps)``, less one block from each of a
    few random classes (weights: their blocks) so that exactly ``steps * slots`` remain. By the
    choice of ``steps`` fewer than ``slots`` are dropped, so the classes stay distinct."""
    quota = np.minimum(blocks, steps)
    surplus = int(quota.sum()) - steps * slots
    if surplus > 0:
        drop = torch.multinomial(torch.from_numpy(quota).double(), surplus, generator=g)
        quota[drop.numpy()] -= 1
    return quota


def _schedule(quota: np.ndarray, steps: int, slots: int, g: torch.Generator) -> list[torch.Tensor]:
    """Per step, ``slots`` distinct classes that use up ``quota`` exactly in ``steps`` steps.

    Invariant (holds at the start by ``_quota``): with R steps left, the classes have ``R * slots``
    blocks and none more than R. Taking every class that has exactly R (there are at most
    ``slots``), then the rest in proportion to the blocks left, keeps it for R - 1.
    """
    left = torch.from_numpy(quota.copy())
    out = []
    for remaining in range(steps, 0, -1):
        forced = torch.nonzero(left == remaining).flatten()
        weights = left.double()
        weights[forced] = 0
        free = slots - len(forced)
        drawn = torch.multinomial(weights, free, generator=g) if free else forced[:0]
        classes = torch.cat([forced, drawn])
        left[classes] -= 1
        out.append(classes)
    return out


def _fit(counts: np.ndarray, left: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``counts`` capped at ``left`` per class, the excess given to the classes with room, the
    largest ``q`` first (the classes this batch favours), so the batch keeps its size."""
    fitted = np.minimum(counts, left)
    deficit = int(counts.sum() - fitted.sum())
    for c in np.argsort(-q, kind="stable"):
        if deficit == 0:
            break
        extra = min(deficit, int(left[c] - fitted[c]))
        fitted[c] += extra
        deficit -= extra
    return fitted


class _ClassPools:
    """Per-class queues for one epoch, each a fresh shuffle of the class; refilled when dry.

    numpy inside: this runs once per class per step, where torch's per-call overhead dominates.
    """

    def __init__(self, members: list[np.ndarray], generator: torch.Generator):
        self.members, self.g = members, generator
        self.queues = [self._shuffle(c) for c in range(len(members))]
        self.left = np.array([len(m) for m in members], dtype=np.int64)  # not yet drawn, per queue

    def _shuffle(self, c: int) -> np.ndarray:
        return self.members[c][torch.randperm(len(self.members[c]), generator=self.g).numpy()]

    def remaining(self) -> np.ndarray:
        """int64 [C]: examples of each class not yet drawn from its current shuffle (a copy)."""
        return self.left.copy()

    def take(self, c: int, n: int) -> np.ndarray:
        """The next ``n`` indices of class ``c``, reshuffling the class whenever it runs dry.

        Distinct as long as ``n`` <= the class size: a reshuffle that starts mid-take puts the
        indices this take already returned at its back. Only ``sorted`` takes past a class's end.
        """
        parts = []
        while n > 0:
            if self.left[c] == 0:
                queue = self._shuffle(c)
                if parts:
                    seen = np.isin(queue, np.concatenate(parts))
                    queue = np.concatenate([queue[~seen], queue[seen]])
                self.queues[c], self.left[c] = queue, len(queue)
            queue, left = self.queues[c], int(self.left[c])
            step = min(n, left)
            parts.append(queue[len(queue) - left: len(queue) - left + step])
            self.left[c] -= step
            n -= step
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _members_by_class(labels: torch.Tensor) -> list[np.ndarray]:
    """Indices of each class present in ``labels``, in increasing label order."""
    order = torch.argsort(labels, stable=True).numpy()
    ends = torch.bincount(labels).cumsum(0).tolist()
    return [m for m in np.split(order, ends[:-1]) if len(m) > 0]


def _generator(name: str, seed: int, epoch: int) -> torch.Generator:
    return seeded_generator("sampler", name, seed, epoch)
