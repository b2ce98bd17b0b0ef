"""Eval statistic modes against independent computations: precise BN vs torch.var_mean, batch mode
vs F.batch_norm by hand, ECE vs a hand-made table, and every mode leaving the model untouched."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import config, records
from bnexp.measure import moments
from bnexp.layers import norms
from bnexp.measure import modes as stats
from bnexp.training import assemble
from bnexp.training import fit as train
from bnexp.training.fit import Pipeline
from bnexp.data.datasets import DataBundle, Split, load_data, normalize, seeded_generator
from bnexp.layers.models import build_model
from bnexp.data.sampling import build_sampler
from conftest import make_config


class RawPipe:
    """Inputs are already float tensors: no normalization, no autocast."""

    def prep(self, x, train=False):
        return x

    def amp(self):
        return contextlib.nullcontext()


def sorted_batches(n_per_class=40, classes=4, channels=3, seed=0):
    """Class-sorted batches: each batch holds one class, whose channels have their own mean."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(classes, channels, generator=g) * 3
    return [torch.randn(n_per_class, channels, 4, 4, generator=g) + offsets[c].view(1, -1, 1, 1)
            for c in range(classes)]


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, norms.BatchNorm2d])
@pytest.mark.parametrize("sizes", [[160], [40, 40, 40, 40], [7, 33, 1, 119], [1] * 160])
def test_precise_equals_var_mean_over_all_pixels_for_any_batching(bn_cls, sizes):
    x = torch.cat(sorted_batches())
    model = nn.Sequential(bn_cls(3))
    with torch.no_grad():  # a stale EMA that precise must overwrite
        model[0].running_mean.fill_(5.0)
    stats.precise_bn(model, x.split(sizes), RawPipe())
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=1)  # PyTorch's running_var: unbiased
    assert torch.allclose(model[0].running_mean.double(), mean, atol=1e-6)
    assert torch.allclose(model[0].running_var.double(), var, rtol=1e-5)
    assert not model.training and model[0].momentum == 0.0  # precise_bn changes modes: caller restores


def test_mean_of_batch_variances_differs_from_pooled_under_sorted_batches_only():
    batches = sorted_batches()
    sorted_moments = stats.LayerMoments()
    for b in batches:
        sorted_moments.add(b)
    by_hand = torch.stack([torch.var(b.double(), dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(sorted_moments.mean_batch_var(), by_hand, rtol=1e-6)
    _, pooled = sorted_moments.pooled()
    assert (sorted_moments.mean_batch_var() / pooled).max() < 0.5  # between-class variance is missed

    one = stats.LayerMoments()
    one.add(torch.cat(batches))
    assert torch.allclose(one.mean_batch_var(), one.pooled()[1], rtol=1e-12)
    assert torch.allclose(one.pooled()[1], pooled, rtol=1e-6)  # fp32 per-batch moments


def test_ece_matches_a_hand_made_table():
    # 10 predictions at confidence 0.9 of which 8 right, 5 at confidence 0.6 all right:
    # ECE = (10 * |0.8 - 0.9| + 5 * |1.0 - 0.6|) / 15 = 0.2
    logits = torch.tensor([[math.log(0.9), math.log(0.1)]] * 10 + [[math.log(0.4), math.log(0.6)]] * 5)
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 5)
    assert stats.expected_calibration_error(logits, labels) == pytest.approx(0.2, abs=1e-6)  # fp32 softmax
    perfect = torch.tensor([[10.0, -10.0]] * 4)
    assert stats.expected_calibration_error(perfect, torch.zeros(4, dtype=torch.long)) < 1e-6


# ------------------------------------------------------------------ modes on a real model

@functools.lru_cache(maxsize=None)
def _config(overrides: tuple):
    return make_config(list(overrides))  # composing through Hydra is the slow part of a setup


def tiny_setup(norm="bn", extra=(), n_train=96, n_test=50, seed=0):
    cfg = _config((f"norm={norm}", "model.width=4", "model.depth=4", "data.batch_size=16",
                       "eval.batch_size=16", "eval.precise_samples=64", "channels_last=false", *extra))
    torch.manual_seed(seed)
    model = build_model(cfg.model, norms.make_norm(cfg.norm), 3)
    g = torch.Generator().manual_seed(seed)
    # class-dependent brightness, so that statistics matter
    split = lambda n: Split(
        (torch.randint(0, 120, (n, 3, 32, 32), generator=g) + 60 * (torch.arange(n) % 3).view(-1, 1, 1, 1)).to(torch.uint8),
        torch.arange(n) % 3)
    data = DataBundle(split(n_train), split(n_test), 3, torch.full((3,), 0.5), torch.full((3,), 0.25), "t")
    pipe = Pipeline(torch.device("cpu"), "fp32", data.mean, data.std, False, True,
                    torch.Generator().manual_seed(1))
    with torch.no_grad():  # a few train-mode passes so that the EMA is not the init value
        model.train()
        for i in range(3):
            model(pipe.prep(data.train.x[i * 16:(i + 1) * 16], train=True))
    return cfg, model, data, pipe


def model_state(model):
    bn = [(m.momentum, getattr(m, "frozen", None), getattr(m, "plain", None)) for _, m in norms.bn_layers(model)]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], bn, torch.get_rng_state())


@pytest.mark.parametrize("norm", ["bn", "ghost_bn", "batch_renorm", "noisy_bn"])
def test_every_mode_leaves_the_model_exactly_as_it_found_it(norm):
    cfg, model, data, pipe = tiny_setup(norm, ["model.dropout=0.3", "model.dropout_placement=before_norm",
                                               "norm.noise_mul=0.2", "norm.virtual_batch=4",
                                               "sampler=pk", "sampler.p=2", "sampler.k=8"])
    model.train()
    norms.set_frozen(model, True)
    before, gen_state = model_state(model), pipe.generator.get_state()
    results = {}
    for mode in stats.MODES:
        results[mode], _ = stats.run_mode(mode, model, data, pipe, cfg.eval, 16, cfg.seed, cfg.sampler)
        after = model_state(model)
        assert after[0].keys() == before[0].keys()
        assert all(torch.equal(after[0][k], before[0][k]) for k in before[0]), mode
        assert after[1:3] == before[1:3], mode
        assert torch.equal(after[3], before[3]), mode
        assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(pipe.generator.get_state(), gen_state)  # training's augmentation stream untouched
    # the modes really are different computations
    assert len({round(r["loss"], 6) for r in results.values()}) == len(stats.MODES) == 9
    # and deterministic
    again, _ = stats.run_mode("batch", model, data, pipe, cfg.eval, 16, cfg.seed)
    assert again == results["batch"]


def manual_forward(model, x, batch_stats: bool):
    """The VGG of tiny_setup written out with F.conv2d / F.batch_norm (dropout off)."""
    for block in model.features:
        if "pool" in block._modules:
            x = F.max_pool2d(x, 2)
        x = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
        n = block.norm
        if batch_stats:
            x = F.batch_norm(x, None, None, n.weight, n.bias, training=True, eps=n.eps)
        else:
            x = F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, training=False, eps=n.eps)
        x = F.relu(x)
    return model.head(x.mean((2, 3)))


def test_batch_sorted_mode_normalizes_each_batch_of_the_label_sorted_test_set():
    cfg, model, data, pipe = tiny_setup(n_test=50)
    got, _ = stats.run_mode("batch_sorted", model, data, pipe, cfg.eval, 16, cfg.seed)
    order = np.argsort(data.test.y.numpy(), kind="stable")  # numpy's sort, not torch's
    losses, hits = [], []
    with torch.no_grad():
        for start in range(0, 50, cfg.eval.batch_size):  # the last batch shorter, nothing topped up
            idx = torch.from_numpy(order[start:start + cfg.eval.batch_size])
            logits = manual_forward(model, pipe.prep(data.test.x[idx]), True)
            losses.append(F.cross_entropy(logits, data.test.y[idx], reduction="none"))
            hits.append(logits.argmax(1) == data.test.y[idx])
    assert got["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert got["acc"] == pytest.approx(torch.cat(hits).float().mean().item())


@pytest.mark.parametrize("n_test", [48, 50])  # 50: the last batch is topped up with 14 uncounted images
def test_batch_mode_equals_f_batch_norm_per_test_batch(n_test):
    cfg, model, data, pipe = tiny_setup(n_test=n_test)
    got, _ = stats.run_mode("batch", model, data, pipe, cfg.eval, 16, cfg.seed)
    perm = torch.randperm(n_test, generator=seeded_generator(cfg.seed, "batch_eval"))
    losses, hits = [], []
    with torch.no_grad():
        for start in range(0, n_test, 16):
            idx = perm[start:start + 16]
            counted = len(idx)
            idx = torch.cat([idx, perm[:16 - counted]])
            logits = manual_forward(model, pipe.prep(data.test.x[idx]), True)[:counted]
            losses.append(F.cross_entropy(logits, data.test.y[idx][:counted], reduction="none"))
            hits.append(logits.argmax(1) == data.test.y[idx][:counted])
    assert got["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert got["acc"] == pytest.approx(torch.cat(hits).float().mean().item())
    ema, _ = stats.run_mode("ema", model, data, pipe, cfg.eval, 16, cfg.seed)
    with torch.no_grad():
        manual = F.cross_entropy(manual_forward(model, pipe.prep(data.test.x), False), data.test.y)
    assert ema["loss"] == pytest.approx(manual.item(), rel=1e-5)


def test_precise_mode_recomputes_from_augmented_training_images_and_adapted_from_test():
    cfg, model, data, pipe = tiny_setup(extra=["eval.precise_batch_size=32"])
    first = norms.bn_layers(model)[0][1]
    with stats.preserved(model):
        x = torch.cat(list(stats.input_batches(data.train, 64, 32, pipe, cfg.seed, "precise", augment=True)))
        stats.precise_bn(model, x.split(32), RawPipe())
        expected = first.running_mean.clone()
    with stats.preserved(model):
        result, info = stats.MODES["precise"](model, data, pipe, cfg.eval, 16, cfg.seed)
        assert torch.allclose(first.running_mean, expected)
        assert first.running_mean.dtype == torch.float32
    # the first BN layer's input under adapted: the conv of the (unaugmented) test images
    with stats.preserved(model):
        stats.MODES["adapted"](model, data, pipe, cfg.eval, 16, cfg.seed)
        conv_out = model.features[0].conv(pipe.prep(data.test.x)).detach()
        var, mean = torch.var_mean(conv_out.double(), dim=(0, 2, 3))
        assert torch.allclose(first.running_mean.double(), mean, atol=1e-5)
        assert torch.allclose(first.running_var.double(), var, rtol=1e-4)
    assert {row["layer"] for row in info["layers"]} == {n for n, _ in norms.bn_layers(model)}


def test_modes_are_skipped_with_a_reason_without_bn_and_default_mode_feeds_test_acc(tmp_path):
    cfg, model, data, pipe = tiny_setup("gn", ["eval.default_mode=precise"])
    out = stats.evaluate_modes(model, data, pipe, cfg.eval, 16, cfg.seed)
    assert set(out.skipped) == {"precise", "batch", "adapted"}  # the default modes, less ema
    assert all("no BatchNorm" in why for why in out.skipped.values())
    assert out.metrics["test_acc"] == out.metrics["test_acc.ema"]
    assert "test_acc.precise" not in out.metrics and out.extra["test_acc_from"] == "ema"

    cfg, model, data, pipe = tiny_setup("bn", ["eval.default_mode=precise", "eval.modes=[ema,batch]"])
    out = stats.evaluate_modes(model, data, pipe, cfg.eval, 16, cfg.seed, run_dir=tmp_path)
    assert out.skipped == {}
    assert {k for k in out.metrics if k.startswith("test_acc.")} == {"test_acc.ema", "test_acc.batch",
                                                                      "test_acc.precise"}
    assert out.metrics["test_loss"] == out.metrics["test_loss.precise"]
    assert out.metrics["ece"] == out.metrics["ece.precise"]
    assert 0 < out.metrics["precise.var_ratio"] and (tmp_path / records.PRECISE_STATS).exists()


def test_statistics_stay_fp32_under_bf16_autocast():
    cfg, model, data, pipe = tiny_setup()
    pipe.precision = "bf16"
    with stats.preserved(model):
        result, info = stats.MODES["precise"](model, data, pipe, cfg.eval, 16, cfg.seed)
        assert all(m.running_var.dtype == torch.float32 for _, m in norms.bn_layers(model))
    assert math.isfinite(result["loss"]) and all(math.isfinite(r["var_ratio"]) for r in info["layers"])


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_final_train_acc_uses_the_statistics_of_test_acc(mode):
    """gen_gap compares like with like: the training images are scored under the default mode.
    With one test batch holding every training image, ``batch`` mode is a plain train-mode
    forward of all of them at once, and ``ema`` a plain eval-mode forward: both by hand here."""
    cfg = make_config(["data=synthetic", "data.synthetic_train=192", "data.synthetic_test=64",
                       "data.batch_size=32", "model.width=8", "precision=fp32", "device=cpu",
                       "eval.modes=[ema,batch]", f"eval.default_mode={mode}", "eval.batch_size=192"])
    data = load_data(cfg.data, "cpu", seed=0)
    torch.manual_seed(0)
    model = assemble.build(cfg, data.num_classes, torch.device("cpu"))
    x = normalize(data.train.x, data.mean, data.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(192, generator=torch.Generator().manual_seed(0)).split(32) * 5:
        optimizer.zero_grad()  # a little training: predictions that depend on the statistics
        F.cross_entropy(model(x[idx]), data.train.y[idx]).backward()
        optimizer.step()
    with torch.no_grad():  # EMA statistics off the batch's, so the two modes disagree
        for _, m in norms.bn_layers(model):
            m.running_mean.add_(torch.randn_like(m.running_mean), alpha=0.5)
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2))
    pipe = train.Pipeline(torch.device("cpu"), "fp32", data.mean, data.std, True, True,
                          torch.Generator().manual_seed(1))
    by_hand = {}
    with torch.no_grad():
        model.eval()
        by_hand["ema"] = (model(x).argmax(1) == data.train.y).float().mean().item()
        for _, m in norms.bn_layers(model):
            m.train()
            m.momentum = 0.0
        by_hand["batch"] = (model(x).argmax(1) == data.train.y).float().mean().item()
        for _, m in norms.bn_layers(model):
            m.momentum = cfg.norm.momentum
    model.eval()
    assert by_hand["ema"] != by_hand["batch"]  # else the test could not tell the modes apart
    metrics = train.final_metrics(model, data, pipe, cfg).metrics
    assert metrics["train_acc"] == pytest.approx(by_hand[mode], abs=1e-6)
    assert metrics["test_acc"] == metrics[f"test_acc.{mode}"]
    assert metrics["gen_gap"] == pytest.approx(metrics["train_acc"] - metrics["test_acc"])


# ------------------------------------------------- normalization batches, estimators, samplers

def test_registry_names_are_the_config_choices():
    assert tuple(stats.MODES) == config.EVAL_MODES
    with pytest.raises(config.ConfigError, match=r"eval\.modes='exact'.*precise_sampler_bvar"):
        stats.MODES.get("exact")


def test_ghost_bn_moments_are_per_chunk_with_the_remainder_weighted_by_size():
    """Ghost BN normalizes chunks x[0:8], x[8:16], x[16:20] of a batch of 20 (and a batch of 5
    whole): precise BN's moments must be those of each chunk, as torch.var_mean computes them."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(20, 3, 4, 4, generator=g) * torch.arange(1, 21).view(-1, 1, 1, 1) / 5,
               torch.randn(5, 3, 4, 4, generator=g) + 2.0]
    chunks = [*batches[0].split(8), batches[1]]  # sizes 8, 8, 4, 5
    model = nn.Sequential(norms.GhostBatchNorm2d(3, virtual_batch=8))
    with stats.preserved(model):
        stats.bn_train_mode(model)
        got = stats.collect_moments(model, batches, RawPipe(), keep=True)["0"]
    assert got.batches == 4 and got.batch_counts == [8 * 16, 8 * 16, 4 * 16, 5 * 16]
    for chunk, mean, var in zip(chunks, got.batch_means, got.batch_vars):
        want_var, want_mean = torch.var_mean(chunk, dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean, want_mean, atol=1e-6) and torch.allclose(var, want_var, rtol=1e-5)
    sizes = torch.tensor([len(c) for c in chunks], dtype=torch.float64).view(-1, 1)
    unbiased = torch.stack([torch.var(c.double(), dim=(0, 2, 3)) for c in chunks])
    assert torch.allclose(got.mean_batch_var(), (sizes * unbiased).sum(0) / sizes.sum(), rtol=1e-6)
    var, mean = torch.var_mean(torch.cat(batches).double(), dim=(0, 2, 3), correction=1)
    assert torch.allclose(got.pooled()[0], mean, atol=1e-6) and torch.allclose(got.pooled()[1], var, rtol=1e-5)
    stats.precise_bn(model, batches, RawPipe(), estimator="bvar")  # what precise_bvar sets
    assert torch.allclose(model[0].running_var.double(), (sizes * unbiased).sum(0) / sizes.sum(), rtol=1e-5)


def first_conv_out(model, x):
    return model.features[0].conv(x).detach().double()


def test_sampler_pass_estimators_differ_by_the_between_batch_variance():
    """Class-sorted precise pass: pooled variance = within-batch + between-batch variance (law of
    total variance); precise_sampler_bvar keeps only the first, precise_sampler both."""
    cfg, model, data, pipe = tiny_setup(extra=["sampler=sorted"])
    layer = norms.bn_layers(model)[0][1]
    set_vars = {}
    for estimator in moments.ESTIMATORS:
        with stats.preserved(model):
            stats.precise_pass(model, data, pipe, cfg.eval, 16, cfg.seed, cfg.sampler, estimator)
            set_vars[estimator] = layer.running_var.double().clone()
    # by hand: the same sorted batches (build_sampler, seed derived from (seed, tag)), first layer input
    sampler = build_sampler(cfg.sampler, data.train.y, 16, seeded_generator(cfg.seed, "precise_sampler").initial_seed())
    idx = sampler.batches(0)[:cfg.eval.precise_samples // 16]
    assert all(len(set(data.train.y[b].tolist())) == 1 for b in idx)  # one class per batch
    gen = dataclasses.replace(pipe, generator=seeded_generator(cfg.seed, "precise_sampler", "augment"))
    with torch.no_grad():
        outs = [first_conv_out(model, gen.prep(data.train.x[b], train=True)) for b in idx]
    n = outs[0].numel() // outs[0].shape[1]
    total = n * len(outs)
    pooled, _ = torch.var_mean(torch.cat(outs), dim=(0, 2, 3), correction=1)
    within = torch.stack([torch.var(o, dim=(0, 2, 3)) for o in outs]).mean(0)  # unbiased, equal sizes
    between = torch.stack([o.mean((0, 2, 3)) for o in outs]).var(0, correction=0)
    assert torch.allclose(set_vars["pooled"], pooled, rtol=1e-4)
    assert torch.allclose(set_vars["bvar"], within, rtol=1e-4)
    law = set_vars["pooled"] * (total - 1) / total - set_vars["bvar"] * (n - 1) / n
    assert torch.allclose(law, between, rtol=1e-3, atol=1e-6)
    assert (set_vars["bvar"] / set_vars["pooled"]).min() < 0.9  # the classes differ in brightness


def test_batch_sampler_mode_normalizes_each_sampler_batch_of_the_test_set():
    cfg, model, data, pipe = tiny_setup(extra=["sampler=sorted"], n_test=48)
    got, _ = stats.run_mode("batch_sampler", model, data, pipe, cfg.eval, 16, cfg.seed, cfg.sampler)
    sampler = build_sampler(cfg.sampler, data.test.y, 16, seeded_generator(cfg.seed, "batch_sampler").initial_seed())
    with torch.no_grad():
        logits = [(manual_forward(model, pipe.prep(data.test.x[b]), True), data.test.y[b]) for b in sampler.batches(0)]
    assert all(len(set(y.tolist())) == 1 for _, y in logits)
    loss = torch.cat([F.cross_entropy(z, y, reduction="none") for z, y in logits]).mean()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    batch, _ = stats.run_mode("batch", model, data, pipe, cfg.eval, 16, cfg.seed)
    assert batch["loss"] != pytest.approx(got["loss"], rel=1e-3)  # i.i.d. test batches differ


class SpyBN(norms.BatchNorm2d):
    """A bnexp BN layer that notes the ``plain`` flag of every train-mode forward."""
    seen: list

    def _train_forward(self, x):
        self.seen.append(self.plain)
        return super()._train_forward(x)


def test_statistics_passes_use_plain_batch_statistics_and_restore_the_flag():
    from bnexp.measure import probes

    spy = SpyBN(3)
    spy.seen = []
    model = nn.Sequential(spy, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batches = sorted_batches()
    with stats.preserved(model):
        norms.set_plain(model, True)
    assert spy.plain is False  # preserved restores it
    stats.precise_bn(model, batches, RawPipe())
    assert spy.seen == [True] * len(batches) and spy.plain is False
    spy.seen.clear()
    with stats.preserved(model):
        probes.batch_noise(model, {40: batches}, RawPipe())
        probes.discrepancy(model, batches, [torch.zeros(40, dtype=torch.long)] * 4, RawPipe())
    assert spy.seen and all(spy.seen) and spy.plain is False


def test_gen_gap_under_precise_statistics_scores_train_and_test_alike():
    cfg, model, data, pipe = tiny_setup(extra=["eval.modes=[ema,precise]"])
    metrics = train.final_metrics(model, data, pipe, cfg).metrics
    with stats.preserved(model), torch.no_grad():
        stats.precise_bn(model, stats.input_batches(data.train, 64, 16, pipe, cfg.seed, "precise", augment=True), pipe)
        logits = model(pipe.prep(data.train.x))
        acc = (logits.argmax(1) == data.train.y).float().mean().item()
        loss = F.cross_entropy(logits, data.train.y).item()
    assert metrics["train_acc.precise"] == pytest.approx(acc)
    assert metrics["train_loss.precise"] == pytest.approx(loss, rel=1e-5)
    assert metrics["gen_gap.precise"] == pytest.approx(acc - metrics["test_acc.precise"])
    assert metrics["gen_gap"] == pytest.approx(metrics["train_acc"] - metrics["test_acc.ema"])


def test_rescore_precise_reproduces_the_runs_own_precise_score_and_caches(tmp_path, monkeypatch):
    from conftest import TINY
    from bnexp.tools import rescore
    from bnexp.training import assemble as runs

    cfg = make_config([*TINY, "optim.epochs=1", "data.synthetic_train=128", "data.batch_size=32",
                       "data.synthetic_test=64", "eval.precise_samples=64", "eval.modes=[ema,precise]"])
    summary = train.fit(cfg, tmp_path)
    run = runs.load_run(tmp_path, "cpu")
    assert run.config == cfg and not run.model.training
    ema = stats.evaluate(run.model, run.data.test.x, run.data.test.y, run.pipe, 128)
    assert ema["acc"] == pytest.approx(summary["metrics"]["test_acc.ema"])
    rows = rescore.rescore_precise(tmp_path, [64, 32], repeats=2)
    assert [(r["samples"], r["repeat"]) for r in rows] == [(64, 0), (64, 1), (32, 0), (32, 1)]
    assert rows[0]["test_acc"] == pytest.approx(summary["metrics"]["test_acc.precise"])
    assert rows[0]["test_loss"] == pytest.approx(summary["metrics"]["test_loss.precise"], rel=1e-6)
    assert rows[0]["test_loss"] != rows[1]["test_loss"]  # another draw of the 64 images
    monkeypatch.setattr(rescore, "load_run", None)  # cached: the model is not rebuilt
    assert rescore.rescore_precise(tmp_path, [64, 32], repeats=2) == rows
    assert (tmp_path / records.PRECISE_VS_N).exists()
