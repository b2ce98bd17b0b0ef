"""bnexp.data.sampling: batch shapes, coverage, determinism and class composition, per registry entry."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, make_config

from bnexp import config as C
from bnexp.config import ConfigError, SamplerConfig
from bnexp.registry import Registry
from bnexp.data.sampling import SAMPLERS, build_sampler

BATCH = 32


def imbalanced_labels(n: int = 1200, classes: int = 10, seed: int = 0) -> torch.Tensor:
    """Class c has weight c + 3, so class sizes differ by up to 4x (CIFAR subsets are not balanced)."""
    weights = torch.arange(classes, dtype=torch.float) + 3
    return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def sampler_cfg(name: str, p: int = 4, k: int = 8, alpha: float = 0.1, groups: int = 1) -> SamplerConfig:
    cfg = SamplerConfig(name=name, p=p, k=k, groups=groups, alpha=alpha)
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


@pytest.mark.parametrize("name,extra", [(name, {}) for name in SAMPLERS] + [("pk", {"p": 2, "groups": 2})])
def test_batches_depend_only_on_seed_and_epoch(name, extra):
    labels = imbalanced_labels()
    sampler = build_sampler(sampler_cfg(name, **extra), labels, BATCH, seed=3)
    first = sampler.batches(2)
    sampler.batches(5)
    fresh = build_sampler(sampler_cfg(name, **extra), labels, BATCH, seed=3)
    for again in (sampler.batches(2), fresh.batches(2)):
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_epoch = torch.cat(sampler.batches(3))
    other_seed = torch.cat(build_sampler(sampler_cfg(name, **extra), labels, BATCH, seed=4).batches(2))
    assert not torch.equal(torch.cat(first), other_epoch)
    assert not torch.equal(torch.cat(first), other_seed)


@pytest.mark.parametrize("p,k", [(4, 8), (2, 16), (16, 2)])
def test_pk_batches_hold_p_classes_of_k_each(p, k):
    labels = imbalanced_labels(classes=19)
    labels[:3] = 19  # a class of 3 examples: a whole block of k only when k <= 3, else never drawn
    sizes = torch.bincount(labels)
    sampler = build_sampler(sampler_cfg("pk", p, k), labels, p * k, seed=0)
    # whole blocks of k per class, at most one per batch: the most steps those blocks can fill
    blocks = [int(n) // k for n in sizes]
    assert len(sampler) == max(s for s in range(len(labels) + 1) if sum(min(b, s) for b in blocks) >= s * p)
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


# ---------------------------------------------------------------- one pass per epoch (defect 1)
def labels_with_sizes(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Class c exactly ``sizes[c]`` times, in random order."""
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


LABEL_SETS = {
    "balanced2000": lambda seed: labels_with_sizes([200] * 10, seed),
    "imbalanced4000": lambda seed: imbalanced_labels(n=4000, seed=seed),  # sizes up to 4x apart
    "uneven20x": lambda seed: labels_with_sizes([60 + 17 * c for c in range(20)], seed),
}


def epoch_report(labels: torch.Tensor, batches) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(all indices of the epoch, fraction distinct, examples drawn per class)."""
    drawn = torch.cat(batches)
    counts = torch.bincount(labels[drawn], minlength=int(labels.max()) + 1)
    return drawn, drawn.unique().numel() / drawn.numel(), counts


@pytest.mark.parametrize("labels_name", list(LABEL_SETS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,p,k,alpha", [("pk", 2, 16, 0.1), ("pk", 4, 8, 0.1),
                                            ("dirichlet", 4, 8, 0.1), ("dirichlet", 4, 8, 1.0)])
def test_non_iid_epoch_is_one_pass_with_each_class_at_its_share(labels_name, seed, name, p, k, alpha):
    """Old code: a dry class was refilled and became the likeliest pick (2000 balanced labels,
    pk 2x16: class counts 160-288 for a share of 200, 94% distinct; Dirichlet(0.1) 88%)."""
    labels = LABEL_SETS[labels_name](seed)
    sizes = torch.bincount(labels).double()
    sampler = build_sampler(sampler_cfg(name, p, k, alpha), labels, BATCH, seed)
    for epoch in range(3):
        drawn, distinct, counts = epoch_report(labels, sampler.batches(epoch))
        assert distinct == 1.0, (epoch, distinct)
        share = sizes * drawn.numel() / len(labels)  # each class's part of what the epoch drew
        if name == "dirichlet":  # only the N mod batch examples are left out
            assert drawn.numel() == len(labels) // BATCH * BATCH
            assert (counts - share).abs().max() < BATCH, (counts, share)
        else:  # whole blocks of k: < k left per class, < p blocks dropped
            assert drawn.numel() > len(labels) - len(sizes) * k - p * k
            assert int(sizes.max()) // k < len(sampler)  # no class capped at one block per step
            assert (counts - share).abs().max() < 2 * k, (counts, share)


# ------------------------------------------------------------- grouped P x K batches (defect 2)
@pytest.mark.parametrize("p,k,groups,sizes", [
    (2, 16, 5, [200] * 10),                       # noniid on 10 classes: each class once per batch
    (2, 16, 5, [150 + 30 * c for c in range(10)]),  # the same on unbalanced classes
    (1, 16, 10, [200] * 10),                      # class-sorted groups covering every class
    (2, 8, 3, [200] * 10),                        # 6 of 10 classes per batch: classes rotate
    (16, 2, 5, [40] * 100),                       # CIFAR-100 style: 80 of 100 classes per batch
])
def test_grouped_pk_batches_are_contiguous_groups_of_distinct_classes(p, k, groups, sizes):
    labels = labels_with_sizes(sizes)
    sampler = build_sampler(sampler_cfg("pk", p, k, groups=groups), labels, p * k * groups, seed=0)
    for epoch in range(2):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler) > 0
        blocked = 0
        for batch in batches:
            rows = labels[batch].view(groups, p * k)  # ghost BN's chunks at virtual_batch = p * k
            for row in rows:
                counts = torch.bincount(row)
                assert sorted(counts[counts > 0].tolist()) == [k] * p
                blocked += p > 1 and bool((row.view(p, k) == row.view(p, k)[:, :1]).all())
            assert rows.unique().numel() == groups * p  # no class in two groups of a batch
        assert blocked <= 0.05 * len(batches) * groups  # within a group the order is shuffled
        _, distinct, counts = epoch_report(labels, batches)
        assert distinct == 1.0
        present = counts[counts > 0]
        if groups * p == len(sizes):  # every class in every batch: exactly k per batch each
            assert present.numel() == len(sizes) and (present == k * len(batches)).all()
        else:  # balanced classes rotate: shares differ by at most one block
            assert present.numel() == len(sizes) and int(present.max() - present.min()) <= k


def test_grouped_pk_uses_every_block_the_structure_allows():
    """Balanced 10 x 200, 5 groups of 2 x 16: 12 whole blocks per class, so 12 batches of 160."""
    labels = labels_with_sizes([200] * 10)
    sampler = build_sampler(sampler_cfg("pk", 2, 16, groups=5), labels, 160, seed=0)
    assert len(sampler) == 200 // 16


def test_grouped_pk_errors_name_the_settings():
    labels = labels_with_sizes([50] * 10)
    with pytest.raises(ConfigError, match=r"sampler\.p=4 x sampler\.groups=3 = 12 .* 10 classes"):
        build_sampler(sampler_cfg("pk", 4, 4, groups=3), labels, 48, 0)
    with pytest.raises(ConfigError, match=r"data\.batch_size / sampler\.groups, got 2 \* 16 = 32 != 128 / 5"):
        build_sampler(sampler_cfg("pk", 2, 16, groups=5), labels, 128, 0)
    with pytest.raises(ConfigError, match=r"sampler\.groups=5 applies to sampler=pk only"):
        sampler_cfg("sorted", groups=5)
    with pytest.raises(ConfigError, match=r"sampler\.p \* sampler\.k == data\.batch_size / sampler\.groups"):
        make_config(["sampler=pk", "sampler.p=2", "sampler.k=16", "sampler.groups=5", "data.batch_size=128"])
    assert make_config(["sampler=pk", "sampler.p=2", "sampler.k=16", "sampler.groups=5",
                        "data.batch_size=160"]).sampler.groups == 5


def test_sampler_presets_parse_at_their_own_batch_size():
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / "sampler").glob("*.yaml")):
        s = compose_config([f"sampler={path.stem}"]).sampler
        batch = s.p * s.k * s.groups if s.name == "pk" else 128
        cfg = make_config([f"sampler={path.stem}", f"data.batch_size={batch}"])
        assert cfg.sampler.name == s.name, path.stem


def test_registry_names_match_the_config_tuple():
    assert isinstance(SAMPLERS, Registry) and SAMPLERS.names() == C.SAMPLERS
    with pytest.raises(ConfigError, match="sampler.name='foo' is not an option; allowed values: iid, pk"):
        build_sampler(SamplerConfig(name="foo", p=4, k=8, groups=1, alpha=0.1), imbalanced_labels(), BATCH, 0)


def test_sorted_and_two_class_groups_put_every_class_16_times_in_every_batch():
    """noniid's GN arms: sorted16g10 (p=1, 10 groups) and pk2x16g5 (p=2, 5 groups) draw batches of
    the same class content, every one of 10 classes exactly 16 times, so a norm that normalizes
    each sample on its own trains on the same batch distribution under both (noniid's notes)."""
    labels = torch.arange(10).repeat_interleave(300)[torch.randperm(3000, generator=torch.Generator().manual_seed(0))]
    for p, groups in ((1, 10), (2, 5)):
        cfg = SamplerConfig(name="pk", p=p, k=16, groups=groups, alpha=0.1)
        sampler = build_sampler(cfg, labels, 160, seed=0)
        for epoch in range(2):
            for batch in sampler.batches(epoch):
                counts = torch.bincount(labels[batch], minlength=10)
                assert counts.tolist() == [16] * 10
                # the group structure differs: p classes per contiguous group of p * 16
                per_group = [len(set(labels[g].tolist())) for g in batch.view(groups, -1)]
                assert per_group == [p] * groups
    # and for a seed the same examples in the same step: only the order inside a batch differs
    one, two = (build_sampler(SamplerConfig(name="pk", p=p, k=16, groups=g, alpha=0.1), labels, 160, seed=3)
                for p, g in ((1, 10), (2, 5)))
    for epoch in range(3):
        assert [sorted(b.tolist()) for b in one.batches(epoch)] == [sorted(b.tolist()) for b in two.batches(epoch)]
