"""Batch samplers: which training examples share an optimization batch (and so a BN batch).

A sampler turns an epoch number into a list of int64 CPU index tensors into the training split,
one per step, each of exactly ``batch_size`` indices. The list depends only on (seed, epoch), so a
resumed run redraws the batches it would have seen, however often ``batches`` was called before.
Within a batch the order is shuffled, so sub-batches (ghost BN) are random subsets of it.

- ``iid``: a fresh permutation per epoch, cut into ``N // batch_size`` batches;
- ``pk``: P classes x K examples per batch (metric-learning style);
- ``sorted``: every batch from a single class;
- ``dirichlet``: per batch, class proportions ``q ~ Dir(alpha * share)`` (Hsu et al. 2019,
  "Measuring the effects of non-identical data distribution"), ``share`` being each class's part of
  the examples not yet drawn this epoch: small alpha gives one-class batches, large alpha i.i.d.
  ones, and drawing in proportion to what is left keeps coverage near one pass per epoch.

The non-i.i.d. samplers draw each class from a per-epoch shuffle of its examples; a class that runs
dry is reshuffled and drawn again, so small classes repeat rather than stall.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from bnexp.config import ConfigError, SamplerConfig
from bnexp.data import seeded_generator


class BatchSampler(Protocol):
    def batches(self, epoch: int) -> list[torch.Tensor]:
        """One epoch of index batches (int64, CPU), a function of (seed, epoch) only."""

    def __len__(self) -> int:
        """Steps per epoch (the same for every epoch)."""


class IIDSampler:
    """Uniform random batches: a permutation per epoch, the last partial batch dropped."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = labels.numel(), batch_size, seed

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=_generator("iid", self.seed, epoch))
        return list(perm[: len(self) * self.batch_size].view(len(self), self.batch_size))


class PKSampler:
    """P distinct classes x K examples per batch; ``N // (P * K)`` steps per epoch.

    Classes are drawn per batch without replacement, with weights equal to the examples each has
    left this epoch, so every example is used about once per epoch.
    """

    def __init__(self, labels: torch.Tensor, p: int, k: int, seed: int):
        self.members = _members_by_class(labels)
        if p > len(self.members):
            raise ConfigError(f"sampler.p={p} is larger than the {len(self.members)} classes in the "
                              "training set")
        self.p, self.k, self.seed, self.n = p, k, seed, labels.numel()

    def __len__(self) -> int:
        return self.n // (self.p * self.k)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = _generator("pk", self.seed, epoch)
        pools = _ClassPools(self.members, g)
        out = []
        for _ in range(len(self)):
            # + 1e-3: a class whose shuffle is used up can still be picked when fewer than P have any left
            chosen = torch.multinomial(torch.from_numpy(pools.remaining() + 1e-3), self.p, generator=g)
            out.append(_shuffled([pools.take(c, self.k) for c in chosen.tolist()], g))
        return out


class SortedSampler:
    """Single-class batches: each class is cut into ``round(n_c / batch_size)`` (at least one)
    batches of its own, topped up from a reshuffle where needed; batch order shuffled per epoch."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
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


class DirichletSampler:
    """Per batch, class proportions ``q ~ Dir(alpha * share)``, then ``multinomial(batch_size, q)``
    examples per class (see the module docstring); ``N // batch_size`` steps per epoch."""

    def __init__(self, labels: torch.Tensor, batch_size: int, alpha: float, seed: int):
        self.members, self.batch_size, self.alpha, self.seed = _members_by_class(labels), batch_size, alpha, seed
        self.n = labels.numel()

    def __len__(self) -> int:
        return self.n // self.batch_size

    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = _generator("dirichlet", self.seed, epoch)
        rng = np.random.default_rng(g.initial_seed())  # torch has no seeded Dirichlet sampler
        pools = _ClassPools(self.members, g)
        out = []
        for _ in range(len(self)):
            left = pools.remaining().astype(np.float64)
            share = left / left.sum() if left.sum() > 0 else np.full(len(left), 1 / len(left))
            # floor: Dirichlet parameters must be > 0; an exhausted class is then (almost) never drawn
            q = rng.dirichlet(self.alpha * np.maximum(share, 1e-9))
            counts = rng.multinomial(self.batch_size, q / q.sum())
            parts = [pools.take(int(c), int(counts[c])) for c in np.flatnonzero(counts)]
            out.append(_shuffled(parts, g))
        return out


_Factory = Callable[[SamplerConfig, torch.Tensor, int, int], BatchSampler]
SAMPLERS: dict[str, _Factory] = {
    "iid": lambda cfg, labels, batch_size, seed: IIDSampler(labels, batch_size, seed),
    "pk": lambda cfg, labels, batch_size, seed: PKSampler(labels, cfg.p, cfg.k, seed),
    "sorted": lambda cfg, labels, batch_size, seed: SortedSampler(labels, batch_size, seed),
    "dirichlet": lambda cfg, labels, batch_size, seed: DirichletSampler(labels, batch_size, cfg.alpha, seed),
}


def build_sampler(cfg: SamplerConfig, labels: torch.Tensor, batch_size: int, seed: int) -> BatchSampler:
    """The sampler ``cfg.name`` over the training ``labels`` (any device; kept on the CPU)."""
    if cfg.name not in SAMPLERS:
        raise ConfigError(f"sampler.name={cfg.name!r} is not an option; allowed values: {', '.join(SAMPLERS)}")
    n = labels.numel()
    if batch_size > n:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the training set ({n} images)")
    if cfg.name == "pk" and cfg.p * cfg.k != batch_size:
        raise ConfigError(f"sampler=pk needs sampler.p * sampler.k == data.batch_size, got "
                          f"{cfg.p} * {cfg.k} = {cfg.p * cfg.k} != {batch_size}")
    return SAMPLERS[cfg.name](cfg, labels.detach().cpu().long(), batch_size, seed)


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
        indices this take already returned at its back.
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


def _shuffled(parts: list[np.ndarray], g: torch.Generator) -> torch.Tensor:
    """One batch from per-class parts, in random order (so sub-batches are random subsets)."""
    batch = torch.from_numpy(np.concatenate(parts))
    return batch[torch.randperm(len(batch), generator=g)]


def _generator(name: str, seed: int, epoch: int) -> torch.Generator:
    return seeded_generator("sampler", name, seed, epoch)
