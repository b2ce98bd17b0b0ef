"""pn_online (PN with an online backward) against hand computations with plain tensor ops."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp.layers.norms import BatchNorm2d, OnlinePopulationNorm2d, PopulationNorm2d, set_plain

EPS = 1e-5


def batch(n=8, c=5, hw=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    return x * torch.linspace(0.5, 3.0, c, dtype=torch.float64).view(1, c, 1, 1) + 1.5


def upstream(y: torch.Tensor, seed=9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=y.dtype)


def known(layer: nn.Module, seed=1) -> nn.Module:
    """Non-default affine, running statistics and (pn_online) gradient buffers; started."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        layer.num_batches_tracked.fill_(1)
        if isinstance(layer, OnlinePopulationNorm2d):
            layer.running_grad_mean.copy_(torch.randn(c, generator=g))
            layer.running_grad_zmean.copy_(torch.randn(c, generator=g))
    return layer


def view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(1, -1, 1, 1)


def step(layer: nn.Module, x: torch.Tensor, seed=9):
    """One forward and backward with a fixed upstream gradient: (output, input gradient)."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(upstream(y, seed))
    return y.detach(), x.grad


# --- (a) the forward is PN's, the input gradient the formula -----------------------------------

def test_forward_is_pns_and_eval_bn_and_the_input_gradient_is_the_formula_by_hand():
    layer = known(OnlinePopulationNorm2d(5, momentum=0.2))
    pn = known(PopulationNorm2d(5, momentum=0.2))
    x = batch()
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    a, b = layer.running_grad_mean.clone(), layer.running_grad_zmean.clone()
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()

    y, gx = step(layer, x)
    y_pn, gx_pn = step(pn, x)

    sigma = (var + EPS).sqrt()
    z = (x - view(mean)) / view(sigma)
    torch.testing.assert_close(y, z * view(gamma) + view(beta))
    torch.testing.assert_close(y, y_pn)
    g = upstream(y) * view(gamma)  # dL/dz
    torch.testing.assert_close(gx, (g - view(a) - z * view(b)) / view(sigma))
    # gamma and beta: the ordinary gradients of y = gamma * z + beta
    torch.testing.assert_close(layer.weight.grad, (upstream(y) * z).sum((0, 2, 3)))
    torch.testing.assert_close(layer.bias.grad, upstream(y).sum((0, 2, 3)))
    # the formula is not PN's gradient (BN's through the batch statistics): it can fail
    assert (gx - gx_pn).abs().max() > 1e-2


def test_without_an_input_gradient_the_output_is_pns_bit_for_bit_and_eval_bn():
    """PN's no-grad forward: eval-mode BN, then the affine map (no straight-through rounding)."""
    layer, pn = known(OnlinePopulationNorm2d(5, momentum=0.2)), known(PopulationNorm2d(5, momentum=0.2))
    x = batch()
    want = F.batch_norm(x, layer.running_mean.clone(), layer.running_var.clone(), layer.weight,
                        layer.bias, False, 0.0, EPS)
    with torch.no_grad():
        got, got_pn = layer(x), pn(x)
    assert torch.equal(got, got_pn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- (b) per-sample independence ---------------------------------------------------------------

def tiny_net(norm: type) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4, momentum=0.1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), norm(4, momentum=0.1)).double()
    for m in net:
        if isinstance(m, BatchNorm2d):
            m.train()
            with torch.no_grad():
                m.running_var.fill_(2.0)
                m.running_mean.fill_(0.3)
            m.num_batches_tracked.fill_(1)
            if isinstance(m, OnlinePopulationNorm2d):
                m.running_grad_mean.fill_(0.05)
                m.running_grad_zmean.fill_(-0.02)
    return net


def sample0_gradient(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d(loss of sample 0) / d(input of sample 0), on a copy of ``net`` (buffers as given)."""
    x = x.clone().requires_grad_()
    out = copy.deepcopy(net)(x)
    (out[0] * upstream(out[0])).sum().backward()
    return x.grad[0]


@pytest.mark.parametrize("norm,independent", [(OnlinePopulationNorm2d, True), (PopulationNorm2d, False),
                                              (BatchNorm2d, False)])
def test_sample0s_input_gradient_ignores_its_batch_mates_only_for_pn_online(norm, independent):
    """Two layers deep: sample 0's gradient with batch-mates A and with batch-mates B."""
    net = tiny_net(norm)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    others = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64) * 3 - 1
    first = sample0_gradient(net, x)
    second = sample0_gradient(net, torch.cat([x[:1], others[1:]]))
    if independent:
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)
    else:
        assert (first - second).abs().max() > 1e-3 * first.abs().max()


# --- (c) the gradient buffers: an EMA with the layer's momentum, untouched by probes -------------

def bn_by_hand(x: torch.Tensor):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return (x - view(mean)) / view((var + EPS).sqrt())


@pytest.mark.parametrize("momentum", [0.3, None])
def test_gradient_buffers_start_at_the_first_batch_and_then_follow_the_running_average(momentum):
    layer = OnlinePopulationNorm2d(5, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, 5))
    gamma = layer.weight.detach().clone()
    a = b = mean = var = None
    for t in range(3):
        x = batch(seed=t) * (1 + t)
        if t == 0:  # BN with the batch's statistics; every buffer takes the batch's values
            z = bn_by_hand(x)
        else:
            z = (x - view(mean)) / view((var + EPS).sqrt())
        y, gx = step(layer, x, seed=10 + t)
        g = upstream(y, 10 + t) * view(gamma)
        if t > 0:  # the input gradient used the buffers from before this batch
            torch.testing.assert_close(gx, (g - view(a) - z * view(b)) / view((var + EPS).sqrt()))
        m = 1.0 if t == 0 else (momentum if momentum is not None else 1.0 / (t + 1))
        batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
        a = g.mean((0, 2, 3)) if t == 0 else (1 - m) * a + m * g.mean((0, 2, 3))
        b = (g * z).mean((0, 2, 3)) if t == 0 else (1 - m) * b + m * (g * z).mean((0, 2, 3))
        mean = batch_mean if t == 0 else (1 - m) * mean + m * batch_mean
        var = batch_var if t == 0 else (1 - m) * var + m * batch_var
        torch.testing.assert_close(layer.running_grad_mean, a)
        torch.testing.assert_close(layer.running_grad_zmean, b)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def buffers(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items() if k.startswith(("running", "num"))}


def test_a_momentum_zero_pass_updates_no_buffer_and_a_plain_pass_no_gradient_buffer():
    """A probe (momentum 0) after the start and before it; a plain statistics pass (BN, whose
    running statistics move as BN's at a non-zero momentum; the gradient buffers do not)."""
    grad_buffers = ("running_grad_mean", "running_grad_zmean")
    layer = known(OnlinePopulationNorm2d(5, momentum=0.3))
    layer.momentum = 0.0
    before = buffers(layer)
    step(layer, batch(seed=3))
    after = buffers(layer)
    assert all(torch.equal(before[k], after[k]) for k in (*grad_buffers, "running_mean", "running_var"))
    layer.momentum = 0.3
    set_plain(layer, True)
    step(layer, batch(seed=4))
    set_plain(layer, False)
    assert all(torch.equal(before[k], layer.state_dict()[k]) for k in grad_buffers)
    assert not torch.equal(before["running_mean"], layer.running_mean)
    fresh = OnlinePopulationNorm2d(5, momentum=0.0).double()
    step(fresh, batch())
    assert not fresh._started() and not fresh.running_grad_mean.any() and not fresh.running_grad_zmean.any()


def test_the_gradient_buffers_are_in_the_state_dict_and_reset_with_the_statistics():
    layer = known(OnlinePopulationNorm2d(5))
    copy_ = OnlinePopulationNorm2d(5).double()
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_.running_grad_zmean, layer.running_grad_zmean) and copy_._started()
    layer.reset_running_stats()
    assert not layer.running_grad_mean.any() and not layer.running_grad_zmean.any() and not layer._started()
