"""bnexp.sampling: batch shapes, coverage, determinism and class composition, per registry entry."""
from __future__ import annotations

import math

import pytest
import torch

from bnexp.config import ConfigError, SamplerConfig
from bnexp.sampling import SAMPLERS, build_sampler

BATCH = 32


def imbalanced_labels(n: int = 1200, classes: int = 10, seed: int = 0) -> torch.Tensor:
    """Class c has weight c + 3, so class sizes differ by up to 4x (CIFAR subsets are not balanced)."""
    weights = torch.arange(classes, dtype=torch.float) + 3
    return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def sampler_cfg(name: str, p: int = 4, k: int = 8, alpha: float = 0.1) -> SamplerConfig:
    cfg = SamplerConfig(name=name, p=p, k=k, alpha=alpha)
    cfg.check()
    return cfg


def class_entropy(labels: torch.Tensor, batches) -> float:
    """Mean over batches of the entropy (nats) of the batch's class histogram."""
    total = 0.0
    for batch in batches:
        counts = torch.bincount(labels[batch]).double()
        p = counts[counts > 0] / counts.sum()
        total += float(-(p * p.log()).sum())
    return total / len(batches)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batches_are_exact_valid_and_cover_the_epoch(name):
    labels = imbalanced_labels(n=4000)
    sampler = build_sampler(sampler_cfg(name), labels, BATCH, seed=0)
    # sorted rounds each class to whole batches: at most half a batch per class off one pass
    assert abs(len(sampler) * BATCH - len(labels)) <= 10 * BATCH / 2
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert batch.shape == (BATCH,) and batch.dtype == torch.int64 and batch.device.type == "cpu"
            assert 0 <= int(batch.min()) and int(batch.max()) < len(labels)
        coverage = torch.cat(batches).unique().numel() / len(labels)
        assert coverage > 0.85, (epoch, coverage)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batches_depend_only_on_seed_and_epoch(name):
    labels = imbalanced_labels()
    sampler = build_sampler(sampler_cfg(name), labels, BATCH, seed=3)
    first = sampler.batches(2)
    sampler.batches(5)
    fresh = build_sampler(sampler_cfg(name), labels, BATCH, seed=3)
    for again in (sampler.batches(2), fresh.batches(2)):
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_epoch = torch.cat(sampler.batches(3))
    other_seed = torch.cat(build_sampler(sampler_cfg(name), labels, BATCH, seed=4).batches(2))
    assert not torch.equal(torch.cat(first), other_epoch)
    assert not torch.equal(torch.cat(first), other_seed)


@pytest.mark.parametrize("p,k", [(4, 8), (2, 16), (16, 2)])
def test_pk_batches_hold_p_classes_of_k_each(p, k):
    labels = imbalanced_labels(classes=19)
    labels[:3] = 19  # a class of 3 examples: topped up from reshuffles, so it repeats when k > 3
    sizes = torch.bincount(labels)
    sampler = build_sampler(sampler_cfg("pk", p, k), labels, p * k, seed=0)
    assert len(sampler) == len(labels) // (p * k)
    for batch in sampler.batches(1):
        counts = torch.bincount(labels[batch])
        assert sorted(counts[counts > 0].tolist()) == [k] * p
        for c in labels[batch].unique().tolist():  # examples repeat only when the class is too small
            assert batch[labels[batch] == c].unique().numel() == min(k, int(sizes[c]))


def test_sorted_batches_hold_one_class_and_every_class_appears():
    labels = imbalanced_labels()
    batches = build_sampler(sampler_cfg("sorted"), labels, BATCH, seed=0).batches(0)
    assert all(labels[b].unique().numel() == 1 for b in batches)
    assert {int(labels[b[0]]) for b in batches} == set(range(10))
    # the batch order is shuffled, not class after class
    firsts = [int(labels[b[0]]) for b in batches]
    assert firsts != sorted(firsts)


def test_dirichlet_alpha_interpolates_between_single_class_and_iid_batches():
    labels = imbalanced_labels(n=4000)
    entropy = {name: class_entropy(labels, build_sampler(sampler_cfg(name, alpha=alpha), labels, BATCH, 0)
                                   .batches(0))
               for name, alpha in (("iid", 1.0), ("dirichlet", 0.1))}
    broad = class_entropy(labels, build_sampler(sampler_cfg("dirichlet", alpha=1000.0), labels, BATCH, 0).batches(0))
    assert entropy["iid"] > 0.8 * math.log(10)  # sanity of the oracle: i.i.d. batches mix ~all classes
    assert entropy["dirichlet"] < 0.25 * entropy["iid"]
    assert broad > 0.95 * entropy["iid"]


def test_errors_name_the_settings():
    labels = imbalanced_labels(n=100, classes=5)
    with pytest.raises(ConfigError, match=r"data\.batch_size=128.*100 images"):
        build_sampler(sampler_cfg("iid"), labels, 128, 0)
    with pytest.raises(ConfigError, match=r"sampler\.p \* sampler\.k == data\.batch_size"):
        build_sampler(sampler_cfg("pk", 4, 4), labels, 32, 0)
    with pytest.raises(ConfigError, match=r"sampler\.p=8 .* 5 classes"):
        build_sampler(sampler_cfg("pk", 8, 4), labels, 32, 0)
