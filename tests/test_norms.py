"""Norm layers against independent computations (plain torch ops on the same data)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import config
from bnexp.layers.norms import (NORMS, BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, NoisyBatchNorm2d,
                         PopulationNorm2d, bn_layers, group_count, make_norm, set_frozen,
                         set_plain, set_progress)
from bnexp.layers.ghost_noise import ghost_noise_injection
from bnexp.registry import Registry

# Registry entries that keep running statistics, with settings that make them differ from BN
# on a batch of 8 (ghost chunks of 4 plus a remainder, renorm clips active, noise on).
BN_LIKE = {
    "bn": {},
    "ghost_bn": {"virtual_batch": 3},
    "batch_renorm": {"r_max": 1.5, "d_max": 0.5, "renorm_warmup": 0.0, "renorm_r_ramp": 0.0,
                     "renorm_d_ramp": 0.0, "virtual_batch": 3},
    "noisy_bn": {"noise_mul": 0.2, "noise_add": 0.2, "noise_mean": 0.5, "noise_scale": 1.5},
    "pn": {},
    "pn_online": {},
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
        layer.num_batches_tracked.fill_(1)  # buffers from a batch already seen (PN has started)
    return layer


def reference_bn(x, weight, bias, eps=1e-5):
    """Train-mode BN from torch.var_mean: biased variance normalizes."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def chunk_weighted_moments(chunks):
    """Unbiased variance and mean of each chunk (torch.var_mean), averaged with weights n_g / N."""
    n = sum(len(c) for c in chunks)
    stats = [torch.var_mean(c, dim=(0, 2, 3), unbiased=True) for c in chunks]
    var = sum(len(c) / n * v for c, (v, _) in zip(chunks, stats))
    mean = sum(len(c) / n * mu for c, (_, mu) in zip(chunks, stats))
    return var, mean


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
    assert isinstance(NORMS, Registry) and NORMS.setting == "norm.name"
    assert NORMS.names() == config.NORMS


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
    ghost BN and batch renorm feed their chunks' statistics weighted by chunk size, the others
    the batch's own."""
    m = 0.3
    layer = with_known_state(make_norm(norm_cfg(name=name, momentum=m, **(BN_LIKE[name] if active else {})))(5))
    set_progress(layer, 1.0)  # renorm: past its warmup and ramp
    init_mean, init_var = layer.running_mean.clone(), layer.running_var.clone()
    x = batch()
    layer(x)  # at the defaults ghost/renorm/noisy behave as BN on this batch of 8
    chunks = x.split(3) if active and name in ("ghost_bn", "batch_renorm") else [x]
    var, mean = chunk_weighted_moments(chunks)
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
    var, mean = chunk_weighted_moments(chunks)  # the remainder chunk counts for its size
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


def test_ghost_bn_remainder_chunk_weighs_by_its_size():
    """Chunks of 4, 4 and 1: the single-sample remainder gets weight 1/9, not 1/3. The running
    mean is then exactly the batch mean; the variance the size-weighted chunk variances."""
    layer = GhostBatchNorm2d(3, 4, momentum=1.0)
    x = batch(9, c=3)
    x[8] += 10.0  # the remainder sample is far off: an equal-weight average would show it
    layer(x)
    torch.testing.assert_close(layer.running_mean, x.mean((0, 2, 3)))
    chunks = x.split(4)
    want = sum(len(c) / 9 * torch.var(c, dim=(0, 2, 3), unbiased=True) for c in chunks)
    torch.testing.assert_close(layer.running_var, want)


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


@pytest.mark.parametrize("n, size", [(12, 4), (10, 4)], ids=["even", "remainder"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_renorm_renormalizes_each_ghost_chunk(n, size, channels_last, norm_cfg):
    """Ioffe 2017 per normalization batch, by hand: each chunk's r_g and d_g come from its own
    torch.var_mean against the running statistics as they were before the batch (detached);
    the running statistics take the chunks' moments weighted by chunk size, the remainder too."""
    m = 0.2
    cfg = norm_cfg(name="batch_renorm", momentum=m, virtual_batch=size, r_max=1.5, d_max=0.5,
                   renorm_warmup=0.0, renorm_r_ramp=0.0, renorm_d_ramp=0.0)
    layer = with_known_state(make_norm(cfg)(5))  # through the registry: it passes virtual_batch
    set_progress(layer, 1.0)
    mu, var0 = layer.running_mean.clone(), layer.running_var.clone()
    sigma, w, b = (var0 + 1e-5).sqrt(), layer.weight.detach(), layer.bias.detach()
    x = batch(n) * 2
    x[:size] += 3.0  # the first chunk far off: its r and d differ from the others'
    xr = x.clone().requires_grad_()
    outs, corrections = [], []
    for c in xr.split(size):
        var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
        sigma_b = (var + 1e-5).sqrt()
        r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
        d = ((mean - mu) / sigma).clamp(-0.5, 0.5).detach()
        corrections.append((r, d))
        col = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        x_hat = (c - col(mean)) / col(sigma_b) * col(r) + col(d)
        outs.append(x_hat * col(w) + col(b))
    want = torch.cat(outs)
    (r0, d0), (r1, d1) = corrections[:2]
    assert not torch.allclose(r0, r1) and not torch.allclose(d0, d1)  # one r, d per chunk
    upstream = torch.cos(torch.arange(want.numel(), dtype=want.dtype)).view_as(want)
    want.backward(upstream)
    xl = x.clone().contiguous(memory_format=torch.channels_last) if channels_last else x.clone()
    xl.requires_grad_()
    got = layer(xl)
    got.backward(upstream)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-4, atol=1e-5)
    var, mean = chunk_weighted_moments(x.split(size))
    torch.testing.assert_close(layer.running_mean, (1 - m) * mu + m * mean)
    torch.testing.assert_close(layer.running_var, (1 - m) * var0 + m * var)


def test_batch_renorm_schedule_ramps_r_and_d_over_their_own_spans(norm_cfg):
    """Ioffe 2017: r's clip and d's clip leave 1 and 0 together after the warmup and reach
    r_max and d_max at different times. Hand computation, warmup 0.1, r over 0.4, d over 0.2."""
    cfg = norm_cfg(name="batch_renorm", r_max=3.0, d_max=5.0, renorm_warmup=0.1,
                   renorm_r_ramp=0.4, renorm_d_ramp=0.2)
    layer = make_norm(cfg)(3)
    assert layer.current_clips() == (1.0, 0.0)  # before any set_progress: the start of training
    for fraction, want in [(0.05, (1.0, 0.0)), (0.1, (1.0, 0.0)), (0.15, (1.25, 1.25)),
                           (0.2, (1.5, 2.5)), (0.3, (2.0, 5.0)), (0.4, (2.5, 5.0)),
                           (0.5, (3.0, 5.0)), (0.9, (3.0, 5.0))]:
        set_progress(layer, fraction)
        assert layer.current_clips() == pytest.approx(want), fraction
    instant = BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup=0.2, r_ramp=0.0, d_ramp=0.5)
    set_progress(instant, 0.45)  # a ramp of 0 opens at once; d is half way
    assert instant.current_clips() == pytest.approx((3.0, 2.5))


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



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gn_on_channels_last_gives_plain_group_norms_numbers_and_layout(norm_cfg, precision):
    """The channels_last shortcut (a contiguous copy on CPU) against the definition of GN, in
    forward and backward, and the output keeps the input's memory format."""
    from bnexp.layers.norms import GroupNorm
    gn = make_norm(norm_cfg(name="gn", groups=4))(12)
    assert isinstance(gn, GroupNorm) and type(make_norm(norm_cfg(name="ln"))(12)) is nn.GroupNorm
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5), gn.bias.uniform_(-0.5, 0.5)
    x = batch(c=12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ref = batch(c=12).clone().requires_grad_(True)  # NCHW: the other code path
    g = torch.randn_like(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y, want = gn(x), F.group_norm(ref, 4, gn.weight, gn.bias, gn.eps)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    xs = ref.detach().view(len(ref), 4, -1)
    by_hand = ((xs - xs.mean(-1, keepdim=True)) / torch.sqrt(xs.var(-1, unbiased=False, keepdim=True)
                                                             + gn.eps)).view_as(ref)
    by_hand = by_hand * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)
    tol = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16" else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y.float(), by_hand, **tol)
    torch.testing.assert_close(y, want)
    (y.float() * g).sum().backward()
    (want.float() * g).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


# --- noisy BN: Santurkar et al. 2018, Algorithm 1 -------------------------------------------------

def per_sample_affine(z: torch.Tensor, y: torch.Tensor):
    """(a, b) with y = a * z + b per (sample, channel) over H x W, by least squares."""
    zc, yc = z - z.mean((2, 3), keepdim=True), y - y.mean((2, 3), keepdim=True)
    a = (zc * yc).sum((2, 3)) / zc.square().sum((2, 3))
    return a, y.mean((2, 3)) - a * z.mean((2, 3))


def test_noisy_bn_per_step_shift_and_scale_are_uniform_per_channel():
    """Without jitter every sample of a channel gets the same (sigma_t, mu_t); over many steps
    and channels they are U(1, n_sigma) and U(-n_mu, n_mu) (KS test), and redrawn each step."""
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    layer = NoisyBatchNorm2d(16, noise_mean=0.5, noise_scale=1.25)  # weight 1, bias 0
    scales, shifts = [], []
    for step in range(200):
        x = batch(n=8, c=16, hw=3, seed=step)
        a, b = per_sample_affine(reference_bn(x, torch.ones(16), torch.zeros(16)), layer(x).detach())
        torch.testing.assert_close(a, a[:1].expand_as(a), rtol=1e-4, atol=1e-4)  # shared by samples
        torch.testing.assert_close(b, b[:1].expand_as(b), rtol=1e-4, atol=1e-4)
        scales.append(a[0])
        shifts.append(b[0])
    scales, shifts = torch.cat(scales).numpy(), torch.cat(shifts).numpy()
    assert stats.kstest(scales, stats.uniform(loc=1.0, scale=0.25).cdf).pvalue > 0.01
    assert stats.kstest(shifts, stats.uniform(loc=-0.5, scale=1.0).cdf).pvalue > 0.01
    assert scales.min() >= 1.0 - 1e-4 and scales.max() <= 1.25 + 1e-4
    assert abs(shifts).max() <= 0.5 + 1e-4


def test_noisy_bn_per_sample_jitter_has_the_stated_spread_around_the_step_draws():
    """With jitter, per channel and step the samples' scales spread with std noise_mul and their
    shifts with std noise_add around that step's (sigma_t, mu_t); the step draws spread too."""
    torch.manual_seed(1)
    layer = NoisyBatchNorm2d(32, noise_mul=0.1, noise_add=0.2, noise_mean=1.0, noise_scale=2.0)
    x = batch(n=256, c=32, hw=3)
    a, b = per_sample_affine(reference_bn(x, torch.ones(32), torch.zeros(32)), layer(x).detach())
    assert a.std(0).mean().item() == pytest.approx(0.1, rel=0.1)
    assert b.std(0).mean().item() == pytest.approx(0.2, rel=0.1)
    # channel means over 256 samples estimate (sigma_t, mu_t): U(1, 2) and U(-1, 1) have stds
    # 1/sqrt(12) and 2/sqrt(12), far above the jitter's 0.1/16 and 0.2/16
    assert a.mean(0).std().item() == pytest.approx(12 ** -0.5, rel=0.35)
    assert b.mean(0).std().item() == pytest.approx(2 * 12 ** -0.5, rel=0.35)


def test_noisy_bn_noise_follows_the_affine_map():
    """The noise acts on the BN layer's output ("after BatchNorm layers"), after gamma and beta."""
    torch.manual_seed(2)
    layer = with_known_state(NoisyBatchNorm2d(5, noise_mean=0.5, noise_scale=1.5))
    x = batch()
    a, b = per_sample_affine(reference_bn(x, layer.weight, layer.bias).detach(), layer(x).detach())
    torch.testing.assert_close(a, a[:1].expand_as(a), rtol=1e-4, atol=1e-4)
    assert ((a >= 1 - 1e-4) & (a <= 1.5 + 1e-4)).all() and (b.abs() <= 0.5 + 1e-4).all()


# --- momentum=None: PyTorch's cumulative average ------------------------------------------------

@pytest.mark.parametrize("name", BN_LIKE)
def test_momentum_none_is_the_cumulative_average(name, norm_cfg):
    """After k batches the buffers are the plain average of the k batch statistics (ghost BN:
    of its size-weighted chunk statistics), whatever they held before, as nn.BatchNorm2d."""
    layer = with_known_state(make_norm(norm_cfg(name=name, momentum=None, **BN_LIKE[name]))(5))
    layer.num_batches_tracked.zero_()
    set_progress(layer, 1.0)
    xs = [batch(8, seed=s) * (1 + s) for s in range(3)]
    for x in xs:
        layer(x)
    size = BN_LIKE[name].get("virtual_batch", 8)
    moments = [chunk_weighted_moments(x.split(size)) for x in xs]
    torch.testing.assert_close(layer.running_mean, sum(m for _, m in moments) / 3)
    torch.testing.assert_close(layer.running_var, sum(v for v, _ in moments) / 3)
    assert int(layer.num_batches_tracked) == 3


def test_config_accepts_null_momentum_and_keeps_the_range_otherwise(norm_cfg):
    norm_cfg(momentum=None).check()
    for bad in (0.0, 1.5):
        with pytest.raises(config.ConfigError, match=r"norm\.momentum"):
            norm_cfg(momentum=bad).check()


# --- PN: population normalization ---------------------------------------------------------------

def test_pn_train_forward_is_eval_bn_with_the_same_buffers_and_buffers_update_as_bn():
    pn = with_known_state(PopulationNorm2d(5, momentum=0.2))
    bn = with_known_state(nn.BatchNorm2d(5, momentum=0.2))
    for step in range(4):
        x = batch(seed=step) * (1 + step) + step
        want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-5)
        got = pn(x)
        bn(x)  # train mode: the running-statistics update PN must copy
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pn.running_mean, bn.running_mean)
        torch.testing.assert_close(pn.running_var, bn.running_var)


def test_pn_backward_is_bns_backward_through_the_batch_statistics():
    """Straight-through: the input gradient is train-mode BN's (through the batch statistics);
    gamma's gradient pairs the upstream gradient with PN's own normalized output."""
    pn, bn = with_known_state(PopulationNorm2d(5)), with_known_state(nn.BatchNorm2d(5))
    z_pop = F.batch_norm(batch() * 2 + 1, pn.running_mean, pn.running_var, None, None, False, 0.0, 1e-5)
    (y, gx, gw, gb), (_, wx, _, wb) = run_pair(pn, bn, batch() * 2 + 1)
    upstream = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, (upstream * z_pop).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, wb, rtol=1e-5, atol=1e-5)


def test_pn_starts_as_bn_with_buffers_set_to_the_first_batch():
    """Step 0 (num_batches_tracked == 0): normalize with the batch, buffers <- its statistics."""
    pn = PopulationNorm2d(5, momentum=0.1)
    x = batch() * 3 + 2
    y = pn(x)
    torch.testing.assert_close(y, reference_bn(x, pn.weight, pn.bias), rtol=1e-5, atol=1e-5)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(pn.running_mean, mean)
    torch.testing.assert_close(pn.running_var, var)


def test_pn_before_its_first_batch_leaves_its_buffers_alone_under_momentum_zero():
    """A statistics pass or probe (momentum 0) on a PN that has not started normalizes with the
    batch and starts nothing: the first training batch afterwards still takes the start."""
    pn = PopulationNorm2d(5, momentum=0.1)
    pn.momentum = 0.0
    x = batch() * 3 + 2
    torch.testing.assert_close(pn(x), reference_bn(x, pn.weight, pn.bias), rtol=1e-5, atol=1e-5)
    assert int(pn.num_batches_tracked) == 0 and torch.equal(pn.running_mean, torch.zeros(5))
    pn.momentum = 0.1
    y = batch(seed=4) * 2 - 1
    pn(y)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(pn.running_mean, mean)
    torch.testing.assert_close(pn.running_var, var)


def test_pn_without_an_input_gradient_ignores_batch_mates_bit_for_bit():
    """Under no_grad the forward is eval-mode BN with no straight-through rounding: a sample's
    output is the same bits whatever its batch-mates (the forward_noise probe reads exactly 0)."""
    pn = with_known_state(PopulationNorm2d(5, momentum=0.0))
    x, mates = batch(), batch(seed=7) * 4 - 3
    want = F.batch_norm(x, pn.running_mean, pn.running_var, pn.weight, pn.bias, False, 0.0, 1e-5)
    with torch.no_grad():
        alone, mixed = pn(x), pn(torch.cat([x[:2], mates[2:]]))
    assert torch.equal(alone[:2], mixed[:2])
    torch.testing.assert_close(alone, want, rtol=1e-5, atol=1e-5)


# --- ghost noise injection (Kosson et al. 2024) ---------------------------------------------------

def test_gni_with_the_whole_batch_as_ghost_batch_is_the_identity():
    x = batch(n=6)
    whole = torch.arange(6).expand(6, 6)
    torch.testing.assert_close(ghost_noise_injection(x, 6, indices=whole), x, rtol=1e-6, atol=1e-6)


def test_gni_shift_and_scale_are_the_ghost_batch_statistics_against_the_batchs():
    """Given ghost batches, y_i = (x_i - (mu_g - mu)) / sqrt((var_g + eps) / (var + eps)), from
    torch.var_mean over each ghost batch directly; the noise carries no gradient."""
    x = batch(n=8).requires_grad_()
    idx = torch.randint(8, (8, 3), generator=torch.Generator().manual_seed(0))
    y = ghost_noise_injection(x, 3, indices=idx)
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=False)
    want, scales = [], []
    for i in range(8):
        gvar, gmean = torch.var_mean(x.detach()[idx[i]], dim=(0, 2, 3), unbiased=False)
        scale = ((gvar + 1e-3) / (var + 1e-3)).sqrt()
        want.append((x.detach()[i] - (gmean - mean).view(-1, 1, 1)) / scale.view(-1, 1, 1))
        scales.append(scale)
    torch.testing.assert_close(y.detach(), torch.stack(want), rtol=1e-5, atol=1e-5)
    upstream = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream / torch.stack(scales)[..., None, None], rtol=1e-5, atol=1e-6)


def test_gni_shift_spreads_as_ghost_batch_means_drawn_with_replacement():
    """The injected shift (recovered from the output) spreads like means of N samples drawn with
    replacement from the batch, computed directly from the per-sample means."""
    torch.manual_seed(0)
    x = batch(n=32, c=4, hw=4) + torch.randn(32, 4, 1, 1) * 2  # samples with distinct means
    shifts = []
    for _ in range(100):
        a, b = per_sample_affine(x, ghost_noise_injection(x, 8))
        shifts.append(-b / a)  # y = (x - shift) / scale
    got = torch.stack(shifts).flatten(0, 1).std(0)
    inst = x.mean((2, 3))
    g = torch.Generator().manual_seed(1)
    direct = torch.stack([inst[torch.randint(32, (8,), generator=g)].mean(0) - inst.mean(0)
                          for _ in range(3200)]).std(0)
    torch.testing.assert_close(got, direct, rtol=0.1, atol=0.0)
    torch.testing.assert_close(got, inst.var(0, unbiased=False).div(8).sqrt(), rtol=0.1, atol=0.0)


GNI_NORMS = NORMS.names()  # every norm: ghost noise composes with each


def gni_pair(name, norm_cfg, santurkar=True):
    """The same layer (same parameters and buffers) without and with ghost noise of 4;
    ``santurkar=False``: noisy BN without its own noise, so that GNI is the only noise."""
    opts = {**BN_LIKE.get(name, {}), "virtual_batch": 4, "groups": 2}
    if name == "noisy_bn" and not santurkar:
        opts.update(noise_mul=0.0, noise_add=0.0, noise_mean=0.0, noise_scale=1.0)
    plain, noisy = (make_norm(norm_cfg(name=name, ghost_noise=g, **opts))(6) for g in (None, 4))
    if isinstance(plain, nn.BatchNorm2d):
        with_known_state(plain)
    noisy.load_state_dict(plain.state_dict())
    return plain, noisy


@pytest.mark.parametrize("name", GNI_NORMS)
def test_gni_composes_with_every_norm_between_normalization_and_affine(name, norm_cfg):
    """Normalized output (affine undone) with GNI = a per-(sample, channel) shift and scale of the
    one without; the conv before ``none`` keeps its bias (the layer is still an nn.Identity)."""
    plain, noisy = gni_pair(name, norm_cfg, santurkar=False)
    assert type(noisy) is not nn.Identity and isinstance(noisy, nn.Identity) == (name == "none")
    x = batch(n=12, c=6, seed=3).requires_grad_()
    torch.manual_seed(0)
    want = plain(x)
    got = noisy(x)
    weight = getattr(plain, "weight", None)
    w = torch.ones(6) if weight is None else weight.detach()
    bias = torch.zeros(6) if weight is None else plain.bias.detach()
    z_plain, z_noisy = [(t.detach() - bias.view(1, -1, 1, 1)) / w.view(1, -1, 1, 1) for t in (want, got)]
    a, b = per_sample_affine(z_plain, z_noisy)  # normalized output: a per-(sample, channel) affine map
    torch.testing.assert_close(z_noisy, a[..., None, None] * z_plain + b[..., None, None], rtol=1e-4, atol=1e-4)
    assert (a - 1).abs().max() > 1e-3 and b.abs().max() > 1e-3
    got.square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", GNI_NORMS)
def test_gni_is_off_in_eval_mode_and_under_set_plain(name, norm_cfg):
    plain, noisy = gni_pair(name, norm_cfg)
    x = batch(n=12, c=6, seed=4)
    for layer in (plain, noisy):
        layer.eval()
    torch.testing.assert_close(noisy(x), plain(x))
    for layer in (plain, noisy):
        layer.train()
        set_plain(layer, True)
    torch.manual_seed(0)
    want = plain(x)
    torch.manual_seed(0)
    torch.testing.assert_close(noisy(x), want)


# --- set_plain: plain batch statistics for every layer that has extras --------------------------

@pytest.mark.parametrize("name", NORMS)
def test_set_plain_gives_plain_batch_statistics(name, norm_cfg):
    """Under set_plain every layer's train forward is its plain form: BN with the batch's
    statistics for bn/noisy/pn, per-chunk BN for ghost BN and batch renorm, GroupNorm or identity else."""
    opts = {**BN_LIKE.get(name, {}), "virtual_batch": 4}
    model = nn.Sequential(make_norm(norm_cfg(name=name, ghost_noise=4, **opts))(6))
    layer = model[0]
    if isinstance(layer, nn.BatchNorm2d):
        with_known_state(layer)
    set_progress(model, 1.0)
    assert set_plain(model, True) == ["0"]
    x = batch(n=10, c=6, seed=5)
    got = model(x)
    if name in ("ghost_bn", "batch_renorm"):  # per chunk, renorm's r and d off
        want = torch.cat([reference_bn(c, layer.weight, layer.bias) for c in x.split(4)])
    elif isinstance(layer, nn.BatchNorm2d):
        want = reference_bn(x, layer.weight, layer.bias)
    elif isinstance(layer, nn.GroupNorm):
        want = F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
    else:
        want = x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    set_plain(model, False)
    assert not layer.plain
