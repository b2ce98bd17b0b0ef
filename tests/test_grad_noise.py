"""The grad_noise probe: batch-mates' noise in the weight gradient, against hand computations."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import records
from bnexp.layers.norms import BatchNorm2d, OnlinePopulationNorm2d
from bnexp.measure import grad_noise as gn
from bnexp.measure import modes as stats
from bnexp.measure import probes


def labelled(n, c, hw, classes, g, scale=1.0):
    return (torch.randn(n, c, hw, hw, generator=g) * scale + 0.5, torch.randint(classes, (n,), generator=g))


def share(vectors: torch.Tensor) -> float:
    """sum over components of the unbiased variance over rows / mean squared row norm."""
    v = vectors.double()
    return (v.var(0, correction=1).sum() / v.square().sum(1).mean()).item()


def test_sampling_noise_of_a_linear_softmax_model_is_the_share_by_hand():
    """Softmax regression: the mean-loss gradient of a batch is (1/B) sum_i (p_i - e_y_i) x_i^T for
    the weight and (1/B) sum_i (p_i - e_y_i) for the bias, closed form; its share over R batches
    by torch.var. The probe images' response is sum_p (p_p - e_y_p) x_p^T, the same in every
    batch: the batch-mates' share is 0."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.5, generator=g)
    batches = [labelled(16, 3, 2, 4, g) for _ in range(6)]
    probe = labelled(2, 3, 2, 4, g)
    rows = {r["name"]: r["value"] for r in gn.grad_noise(model, probe, batches)}

    W, b = model[1].weight.detach().double(), model[1].bias.detach().double()

    def closed_form(x, y):
        x = x.flatten(1).double()
        err = torch.softmax(x @ W.T + b, 1) - F.one_hot(y, 4).double()
        return torch.cat([(err.T @ x).flatten(), err.sum(0)])

    per_batch = torch.stack([closed_form(x, y) / len(x) for x, y in batches])
    assert rows["grad_noise.sampling"] == pytest.approx(share(per_batch), rel=1e-5)
    assert rows["grad_noise.sampling"] > 0.01
    assert rows["grad_noise.batchmates"] == 0.0 and rows["grad_noise.ratio"] == 0.0
    # the response to the probe loss is the probe images' own gradient, summed
    x, y = batches[0][0].clone(), batches[0][1].clone()
    where = torch.tensor([0, 8])
    x[where], y[where] = probe
    got = gn.probe_response(model, x, y, where)
    torch.testing.assert_close(got.double(), closed_form(*probe), rtol=1e-5, atol=1e-6)


def test_batchmates_noise_of_one_bn_layer_matches_a_direct_computation():
    """BN (affine) then a linear classifier: per batch, the gradient of the probe images' summed
    loss from autograd on a float64 copy, placed by hand at 0 and B/2; the share by torch.var."""
    g = torch.Generator().manual_seed(1)
    layer = BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=g)
        layer.bias.uniform_(-1.0, 1.0, generator=g)
    model = nn.Sequential(OrderedDict(norm=layer, flat=nn.Flatten(), fc=nn.Linear(12, 5)))
    batches = [labelled(8, 3, 2, 5, g, scale=2.0) for _ in range(5)]
    probe = labelled(2, 3, 2, 5, g)
    running = layer.running_mean.clone(), layer.running_var.clone()
    with stats.preserved(model):
        rows = {r["name"]: r["value"] for r in gn.grad_noise(model, probe, batches)}

    ref = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5)).double()
    ref.load_state_dict({k.replace("norm.", "0.").replace("fc.", "2."): v
                         for k, v in model.state_dict().items()})
    ref.train()
    grads = []
    for x, y in batches:
        x, y = x.clone().double(), y.clone()
        x[[0, 4]], y[[0, 4]] = probe[0].double(), probe[1]
        loss = F.cross_entropy(ref(x)[[0, 4]], y[[0, 4]], reduction="sum")
        grads.append(torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(ref.parameters()))]))
    assert rows["grad_noise.batchmates"] == pytest.approx(share(torch.stack(grads)), rel=1e-4)
    assert rows["grad_noise.batchmates"] > 1e-3
    assert rows["grad_noise.ratio"] == pytest.approx(rows["grad_noise.batchmates"] / rows["grad_noise.sampling"])
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(layer.running_var, running[1])


@pytest.mark.parametrize("norm,noisy", [("none", False), ("ln", False), ("gn", False), ("pn_online", False),
                                        ("bn", True), ("pn", True), ("ghost_bn", True)])
def test_batchmates_noise_is_zero_only_where_a_samples_gradient_is_its_own(norm, noisy):
    """The 4-conv tiny net; pn_online with non-zero running gradient means, so that the constant
    terms its backward gives every batch-mate are in play (they must not count)."""
    from test_stats import tiny_setup

    cfg, model, data, pipe = tiny_setup(norm, ["norm.virtual_batch=4"])
    for m in model.modules():
        if isinstance(m, OnlinePopulationNorm2d):
            with torch.no_grad():
                m.running_grad_mean.uniform_(-0.5, 0.5)
                m.running_grad_zmean.uniform_(-0.5, 0.5)
    x, y = data.train.x, data.train.y
    batches = [(pipe.prep(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]) for i in range(4)]
    probe = (pipe.prep(data.test.x[:1]), data.test.y[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with stats.preserved(model):
        rows = {r["name"]: r["value"] for r in gn.grad_noise(model, probe, batches)}
    assert rows["grad_noise.sampling"] > 1e-3
    if noisy:
        assert rows["grad_noise.batchmates"] > 1e-3, rows
    elif norm == "pn_online":  # fp32 rounding of grad(L) - grad(0 * L): ~7e-8 here
        assert rows["grad_noise.batchmates"] < 1e-6, rows
    else:  # identical gradients in every batch
        assert rows["grad_noise.batchmates"] == 0.0, rows
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_grad_noise_probe_records_its_rows_and_leaves_the_model_and_its_buffers_alone(tmp_path):
    """Through the recorder, on pn_online after a real training step (gradient buffers seeded)."""
    from test_stats import tiny_setup

    cfg, model, data, pipe = tiny_setup("pn_online", ["probes=all", "probes.names=[grad_noise]",
                                                      "probes.noise_batches=3"])
    model.train()
    x, y = pipe.prep(data.train.x[:16], train=True), data.train.y[:16]
    F.cross_entropy(model(x), y).backward()
    layer = next(m for m in model.modules() if isinstance(m, OnlinePopulationNorm2d))
    assert layer.running_grad_mean.abs().sum() > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng, gen = torch.get_rng_state(), pipe.generator.get_state()
    rec = probes.Probes(cfg.probes, model, data, pipe, 32, cfg.seed, tmp_path, lambda: 0.05)
    rows = rec.record(0, 0)
    assert [r["name"] for r in rows] == ["grad_noise.batchmates", "grad_noise.sampling", "grad_noise.ratio"]
    assert rows[0]["value"] < 1e-6 and rows[1]["value"] > 1e-3 and rows[2]["value"] < 1e-3
    assert records.read_jsonl(tmp_path / records.PROBES) == rows
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(pipe.generator.get_state(), gen)
