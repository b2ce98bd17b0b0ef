"""Eval statistic modes against independent computations: precise BN vs torch.var_mean, batch mode
vs F.batch_norm by hand, ECE vs a hand-made table, and every mode leaving the model untouched."""
from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import norms, stats, train
from bnexp.train import Pipeline
from bnexp.data import DataBundle, Split, load_data, normalize, seeded_generator
from bnexp.models import build_model
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
    bn = [(m.momentum, getattr(m, "frozen", None)) for _, m in norms.bn_layers(model)]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], bn, torch.get_rng_state())


@pytest.mark.parametrize("norm", ["bn", "ghost_bn", "batch_renorm", "noisy_bn"])
def test_every_mode_leaves_the_model_exactly_as_it_found_it(norm):
    cfg, model, data, pipe = tiny_setup(norm, ["model.dropout=0.3", "model.dropout_placement=before_norm",
                                               "norm.noise_mul=0.2", "norm.virtual_batch=4"])
    model.train()
    norms.set_frozen(model, True)
    before, gen_state = model_state(model), pipe.generator.get_state()
    results = {}
    for mode in stats.MODES:
        results[mode], _ = stats.run_mode(mode, model, data, pipe, cfg.eval, 16, cfg.seed)
        after = model_state(model)
        assert after[0].keys() == before[0].keys()
        assert all(torch.equal(after[0][k], before[0][k]) for k in before[0]), mode
        assert after[1:3] == before[1:3], mode
        assert torch.equal(after[3], before[3]), mode
        assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(pipe.generator.get_state(), gen_state)  # training's augmentation stream untouched
    # the modes really are different computations
    assert len({round(r["loss"], 6) for r in results.values()}) == 4
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
    assert set(out.skipped) == {"precise", "batch", "adapted"}
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
    assert 0 < out.metrics["precise.var_ratio"] and (tmp_path / stats.PRECISE_STATS).exists()


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
    model = train.build(cfg, data.num_classes, torch.device("cpu"))
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
