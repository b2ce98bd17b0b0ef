"""Norm layers against independent computations (plain torch ops on the same data)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import config
from bnexp.norms import (NORMS, BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, NoisyBatchNorm2d,
                         bn_layers, group_count, make_norm, set_frozen, set_progress)

# Registry entries that keep running statistics, with settings that make them differ from BN
# on a batch of 8 (ghost chunks of 4 plus a remainder, renorm clips active, noise on).
BN_LIKE = {
    "bn": {},
    "ghost_bn": {"virtual_batch": 3},
    "batch_renorm": {"r_max": 1.5, "d_max": 0.5, "renorm_warmup": 0.0, "renorm_ramp": 0.0},
    "noisy_bn": {"noise_mul": 0.2, "noise_add": 0.2},
}


def batch(n=8, c=5, hw=6, seed=0) -> torch.Tensor:
    """Channels with distinct, non-trivial means and scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    return x * torch.linspace(0.5, 3.0, c).view(1, c, 1, 1) + torch.linspace(-2, 2, c).view(1, c, 1, 1)


def with_known_state(layer: nn.Module, seed=1) -> nn.Module:
    """Non-default affine parameters and running statistics, so formulas cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return layer


def reference_bn(x, weight, bias, eps=1e-5):
    """Train-mode BN from torch.var_mean: biased variance normalizes."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def run_pair(a: nn.Module, b: nn.Module, x: torch.Tensor):
    """Outputs and input gradients of two layers on the same input (a fixed upstream gradient)."""
    out = []
    for layer in (a, b):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        out.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    return out


def assert_same_as_bn(layer: nn.Module, x: torch.Tensor, steps=3):
    bn = with_known_state(nn.BatchNorm2d(layer.num_features, momentum=layer.momentum))
    with_known_state(layer)
    for _ in range(steps):
        got, want = run_pair(layer, bn, x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        x = x.flip(0) * 1.3 + 0.2  # a different batch each step
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-6, atol=1e-7)


def test_registry_matches_config_choices():
    assert tuple(NORMS) == config.NORMS


def test_unknown_norm_name_is_an_error_naming_the_setting(norm_cfg):
    with pytest.raises(ValueError, match=r"norm\.name='batchnorm'.*ghost_bn"):
        make_norm(norm_cfg(name="batchnorm"))


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_keeps_shape_and_is_differentiable(name, norm_cfg):
    layer = make_norm(norm_cfg(name=name, virtual_batch=2))(12)
    x = batch(c=12).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (isinstance(layer, BatchNorm2d)) == (name in BN_LIKE)


@pytest.mark.parametrize("name", BN_LIKE)
@pytest.mark.parametrize("active", [False, True], ids=["defaults", "variant_on"])
def test_momentum_convention(name, active, norm_cfg):
    """running = (1-m) * running + m * batch, with the unbiased batch variance (PyTorch's).
    ``variant_on``: BN_LIKE's settings, so ghost chunks, renorm clips and noise are in play:
    ghost BN feeds the mean of its chunks' statistics, renorm and noisy BN the batch's own."""
    m = 0.3
    layer = with_known_state(make_norm(norm_cfg(name=name, momentum=m, **(BN_LIKE[name] if active else {})))(5))
    set_progress(layer, 1.0)  # renorm: past its warmup and ramp
    init_mean, init_var = layer.running_mean.clone(), layer.running_var.clone()
    x = batch()
    layer(x)  # at the defaults ghost/renorm/noisy behave as BN on this batch of 8
    chunks = x.split(3) if active and name == "ghost_bn" else [x]
    stats = [torch.var_mean(c, dim=(0, 2, 3), unbiased=True) for c in chunks]
    var, mean = torch.stack([s[0] for s in stats]).mean(0), torch.stack([s[1] for s in stats]).mean(0)
    torch.testing.assert_close(layer.running_mean, (1 - m) * init_mean + m * mean)
    torch.testing.assert_close(layer.running_var, (1 - m) * init_var + m * var)


@pytest.mark.parametrize("virtual_batch", [8, 32])
def test_ghost_bn_equals_bn_when_virtual_batch_covers_the_batch(virtual_batch):
    assert_same_as_bn(GhostBatchNorm2d(5, virtual_batch, momentum=0.2), batch())


@pytest.mark.parametrize("n, size", [(12, 4), (10, 4), (9, 1 + 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_bn_normalizes_each_chunk_with_its_own_statistics(n, size, channels_last):
    m = 0.25
    layer = with_known_state(GhostBatchNorm2d(5, size, momentum=m))
    init_mean, init_var = layer.running_mean.clone(), layer.running_var.clone()
    x = batch(n)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = layer(xin)
    chunks = x.split(size)  # contiguous chunks, the last one takes the remainder
    want = torch.cat([reference_bn(c, layer.weight, layer.bias) for c in chunks])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    stats = [torch.var_mean(c, dim=(0, 2, 3), unbiased=True) for c in chunks]
    mean = torch.stack([s[1] for s in stats]).mean(0)
    var = torch.stack([s[0] for s in stats]).mean(0)
    torch.testing.assert_close(layer.running_mean, (1 - m) * init_mean + m * mean)
    torch.testing.assert_close(layer.running_var, (1 - m) * init_var + m * var)


def test_ghost_bn_cumulative_average_when_momentum_is_none():
    """momentum=None (as swa_utils.update_bn sets it) averages over the batches seen, like BN."""
    layer = GhostBatchNorm2d(5, 4, momentum=None)
    xs = [batch(8, seed=s) for s in range(3)]
    for x in xs:
        layer(x)
    means = [torch.stack([c.mean((0, 2, 3)) for c in x.split(4)]).mean(0) for x in xs]
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0))


@pytest.mark.parametrize("progress", [0.0, 1.0])
@pytest.mark.parametrize("r_max", [1.0, 1.0 + 1e-9], ids=["plain_bn_path", "renorm_kernel"])
def test_batch_renorm_with_unit_clips_equals_bn(progress, r_max):
    """Clips (1, 0) are BN: exactly 1 takes the plain BN path, 1 + 1e-9 the renorm kernel
    (r within 1e-9 of 1, d exactly 0), whose output, gradients and running stats must agree."""
    layer = BatchRenorm2d(5, r_max=r_max, d_max=0.0, momentum=0.2)
    layer.set_progress(progress)
    assert_same_as_bn(layer, batch())


def test_batch_renorm_matches_the_paper_formula():
    """Ioffe 2017 Alg. 1 written out with detached r and d; gradients must match too."""
    layer = with_known_state(BatchRenorm2d(5, r_max=1.5, d_max=0.5, momentum=0.2))
    layer.set_progress(1.0)
    ref = with_known_state(nn.BatchNorm2d(5))
    mu, sigma = ref.running_mean.clone(), (ref.running_var + 1e-5).sqrt()
    x = batch() * 2  # far from the running statistics: clips bind
    xr = x.clone().requires_grad_()
    var, mean = torch.var_mean(xr, dim=(0, 2, 3), unbiased=False)
    sigma_b = (var + 1e-5).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mean - mu) / sigma).clamp(-0.5, 0.5).detach()
    assert (r == 1.5).any() and (d.abs() == 0.5).any() and ((d.abs() < 0.5) | (r < 1.5)).any()
    x_hat = (xr - mean.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    want = x_hat * ref.weight.view(1, -1, 1, 1) + ref.bias.view(1, -1, 1, 1)
    upstream = torch.cos(torch.arange(want.numel(), dtype=want.dtype)).view_as(want)
    want.backward(upstream)
    xl = x.clone().requires_grad_()
    got = layer(xl)
    got.backward(upstream)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.running_mean, 0.8 * mu + 0.2 * x.mean((0, 2, 3)))


def test_batch_renorm_schedule():
    layer = BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup=0.1, ramp=0.4)
    assert layer.current_clips() == (1.0, 0.0)  # before any set_progress: the start of training
    for fraction, want in [(0.05, (1.0, 0.0)), (0.1, (1.0, 0.0)), (0.3, (2.0, 2.5)),
                           (0.5, (3.0, 5.0)), (0.9, (3.0, 5.0))]:
        set_progress(layer, fraction)
        assert layer.current_clips() == pytest.approx(want)


def test_noisy_bn_without_noise_equals_bn():
    assert_same_as_bn(NoisyBatchNorm2d(5, 0.0, 0.0, momentum=0.2), batch())


def test_noisy_bn_noise_is_per_sample_and_channel_with_the_asked_std():
    torch.manual_seed(0)
    layer = NoisyBatchNorm2d(64, noise_mul=0.2, noise_add=0.3)  # weight 1, bias 0
    x = batch(n=64, c=64, hw=4)
    z = reference_bn(x, torch.ones(64), torch.zeros(64))
    y = layer(x).detach()
    # per (sample, channel): y = a * z + b over H x W; recover a and b by least squares
    zc, yc = z - z.mean((2, 3), keepdim=True), y - y.mean((2, 3), keepdim=True)
    a = (zc * yc).sum((2, 3)) / zc.square().sum((2, 3))
    b = y.mean((2, 3)) - a * z.mean((2, 3))
    torch.testing.assert_close(yc, a[..., None, None] * zc, rtol=1e-4, atol=1e-4)
    assert a.mean().item() == pytest.approx(1.0, abs=0.02) and b.mean().item() == pytest.approx(0.0, abs=0.03)
    for dim in (0, 1):  # independent draws across samples and across channels
        assert a.std(dim).mean().item() == pytest.approx(0.2, rel=0.1)
        assert b.std(dim).mean().item() == pytest.approx(0.3, rel=0.1)
    layer.eval()
    torch.testing.assert_close(layer(x), F.batch_norm(x, layer.running_mean, layer.running_var,
                                                      layer.weight, layer.bias, False, 0.0, 1e-5))


@pytest.mark.parametrize("name", BN_LIKE)
def test_frozen_bn_uses_running_stats_in_train_mode_and_unfreezes(name, norm_cfg):
    model = nn.Sequential(make_norm(norm_cfg(name=name, freeze_after=0.5, **BN_LIKE[name]))(5))
    layer = with_known_state(model[0])
    x = batch()
    set_progress(model, 0.4)
    assert not layer.frozen
    layer(x)
    stats = [t.clone() for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
    set_progress(model, 0.5)
    assert layer.frozen
    eval_out = F.batch_norm(x, stats[0], stats[1], layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(model(x), eval_out)
    for before, after in zip(stats, (layer.running_mean, layer.running_var, layer.num_batches_tracked)):
        assert torch.equal(before, after)
    set_progress(model, 0.1)  # a schedule that goes back (e.g. a new fine-tuning run) unfreezes
    assert not layer.frozen
    layer(x)
    assert not torch.equal(stats[0], layer.running_mean)


def test_set_frozen_by_hand_and_progress_without_freeze_after_keeps_it():
    model = nn.Sequential(BatchNorm2d(5), nn.GroupNorm(1, 5), GhostBatchNorm2d(5, 2))
    assert set_frozen(model, True) == ["0", "2"]
    set_progress(model, 0.9)  # freeze_after=None: the hand-set flag stands
    assert model[0].frozen and model[2].frozen
    set_frozen(model, False)
    assert not model[0].frozen and not model[2].frozen


def test_set_progress_rejects_fractions_outside_unit_interval():
    with pytest.raises(ValueError, match="fraction"):
        set_progress(nn.Sequential(BatchNorm2d(3)), 1.5)


@pytest.mark.parametrize("name", BN_LIKE)
def test_bf16_autocast_keeps_fp32_statistics(name, norm_cfg):
    """Under bf16 autocast the layer sees bf16 conv outputs; its running stats stay fp32 and
    close to an fp32 run, and its output keeps the input dtype."""
    cfg = norm_cfg(name=name, momentum=0.5, **BN_LIKE[name])
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    nets = [nn.Sequential(conv, make_norm(cfg)(6)) for _ in range(2)]
    for net in nets:
        set_progress(net, 1.0)
    xs = [batch(c=3, seed=s) * 2 + 1 for s in range(4)]
    for x in xs:
        torch.manual_seed(1)
        nets[0](x)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nets[1](x)
        assert y.dtype == torch.bfloat16
    fp32, bf16 = nets[0][1], nets[1][1]
    for buf in ("running_mean", "running_var"):
        assert getattr(bf16, buf).dtype == torch.float32
        torch.testing.assert_close(getattr(bf16, buf), getattr(fp32, buf), rtol=1e-2, atol=1e-2)


def test_bn_layers_lists_every_layer_with_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Sequential(GhostBatchNorm2d(4, 2), nn.BatchNorm2d(4)),
                          nn.BatchNorm2d(4, track_running_stats=False))
    assert [name for name, _ in bn_layers(model)] == ["1", "3.0", "3.1"]


def test_group_count_is_the_largest_divisor_not_above_groups(norm_cfg):
    assert [group_count(c, 8) for c in (32, 12, 7, 3)] == [8, 6, 7, 3]
    gn = make_norm(norm_cfg(name="gn", groups=8))(12)
    ln = make_norm(norm_cfg(name="ln"))(12)
    assert (gn.num_groups, ln.num_groups) == (6, 1)
    x = batch(c=12)
    want = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), want, rtol=1e-4, atol=1e-5)
