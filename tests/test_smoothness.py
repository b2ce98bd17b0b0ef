"""The smoothness and ICS probes against closed forms: a quadratic (loss, gradient change and
beta-smoothness along the gradient) and a two-layer linear net whose ICS numpy computes by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnexp.measure import smoothness


class Quadratic(nn.Module):
    """f(w) = 0.5 w^T A w, the batch ignored."""

    def __init__(self, A: np.ndarray, w: np.ndarray):
        super().__init__()
        self.register_buffer("A", torch.tensor(A, dtype=torch.float64))
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def quadratic_loss(model, batch):
    return 0.5 * model.w @ model.A @ model.w


A = np.diag([4.0, 1.0, 0.25])
W = np.array([1.0, -2.0, 3.0])
ETAS = [0.05, 0.1, 0.2, 0.4]


def test_loss_and_gradient_along_the_gradient_of_a_quadratic_match_the_closed_form():
    model = Quadratic(A, W)
    got = smoothness.along_gradient(model, quadratic_loss, None, ETAS)
    g = A @ W
    losses = [0.5 * (W - e * g) @ A @ (W - e * g) for e in ETAS]
    changes = [np.linalg.norm(e * A @ g) for e in ETAS]  # grad(w - eta g) - g = -eta A g
    assert got["loss"] == pytest.approx(0.5 * W @ A @ W)
    assert got["losses"] == pytest.approx(losses)
    assert got["grad_changes"] == pytest.approx(changes)
    assert got["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert got["grad_change_max"] == pytest.approx(max(changes))
    # the ratio is ||A g|| / ||g|| for every eta: between the smallest and largest eigenvalue
    assert got["beta"] == pytest.approx(np.linalg.norm(A @ g) / np.linalg.norm(g))
    assert 0.25 < got["beta"] < 4.0
    assert model.w.detach().numpy() == pytest.approx(W, abs=0)  # put back bit for bit


def test_beta_is_the_eigenvalue_when_the_gradient_is_an_eigenvector():
    model = Quadratic(A, np.array([0.0, 0.0, 2.0]))  # g = 0.25 w: an eigenvector of eigenvalue 0.25
    assert smoothness.along_gradient(model, quadratic_loss, None, ETAS)["beta"] == pytest.approx(0.25)


def two_layer(w1: np.ndarray, w2: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0], bias=False),
                          nn.Linear(w2.shape[1], w2.shape[0], bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w1))
        model[1].weight.copy_(torch.tensor(w2))
    return model


def squared_error(model, batch):
    x, t = batch
    return 0.5 * ((model(x) - t) ** 2).sum()


def test_internal_covariate_shift_of_a_two_layer_linear_net_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    x, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    lr = 0.3
    model = two_layer(w1, w2)
    rows = smoothness.covariate_shift(model, squared_error, (torch.tensor(x), torch.tensor(t)), lr)

    # L = 0.5 ||x W1^T W2^T - t||^2: dL/dW2 = r^T (x W1^T), dL/dW1 = (r W2)^T x, r = residual
    def grads(a, b):
        h = x @ a.T
        r = h @ b.T - t
        return (r @ b).T @ x, r.T @ h
    g1, g2 = grads(w1, w2)
    _, g2_after = grads(w1 - lr * g1, w2)  # layer 2's gradient after layer 1's own step
    assert [r["layer"] for r in rows] == ["1"]  # layer 0 has nothing before it
    assert rows[0]["l2"] == pytest.approx(np.linalg.norm(g2 - g2_after))
    cos = (g2 * g2_after).sum() / (np.linalg.norm(g2) * np.linalg.norm(g2_after))
    assert rows[0]["cos"] == pytest.approx(cos)
    assert model[0].weight.detach().numpy() == pytest.approx(w1, abs=0)


def test_no_covariate_shift_when_the_earlier_layer_has_no_gradient():
    # t equal to the output: zero residual, zero gradients, the step moves nothing
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    x = rng.normal(size=(5, 3))
    model = two_layer(w1, w2)
    t = model(torch.tensor(x)).detach()
    rows = smoothness.covariate_shift(model, squared_error, (torch.tensor(x), t), 0.5)
    assert rows[0]["l2"] == pytest.approx(0.0, abs=1e-12)


def test_recorder_rows_match_a_direct_computation_and_leave_the_model_alone(tmp_path):
    import copy

    import torch.nn.functional as F

    from bnexp import records
    from bnexp.measure import probes
    from bnexp.measure.moments import bn_train_mode
    from test_stats import tiny_setup

    cfg, model, data, pipe = tiny_setup(extra=["probes.enabled=true", "probes.names=[smoothness,ics]",
                                               "probes.etas=[0.1,0.5]"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rec = probes.Probes(cfg.probes, model, data, pipe, 16, cfg.seed, tmp_path, lambda: 0.05)
    rec.record(0, 0)
    rows = records.read_jsonl(tmp_path / records.PROBES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)

    twin = copy.deepcopy(model)  # the same numbers by hand, on a copy in train mode
    bn_train_mode(twin)
    batch = probes._probe_batch(rec)
    loss = lambda m, b: F.cross_entropy(m(b[0]).float(), b[1])  # noqa: E731
    want = smoothness.along_gradient(twin, loss, batch, [0.1, 0.5])
    got = {r["name"]: r["value"] for r in rows if "eta" not in r and r["layer"] == "model"}
    assert got["smoothness.beta"] == pytest.approx(want["beta"], rel=1e-5)
    assert got["smoothness.loss_range"] == pytest.approx(want["loss_range"], rel=1e-4, abs=1e-7)
    assert [r["eta"] for r in rows if r["name"] == "smoothness.loss"] == [0.1, 0.5]
    ics = [r for r in rows if r["name"] == "ics.l2"]
    assert len(ics) == len(smoothness.weight_layers(model)) - 1
    assert all(r["value"] >= 0 for r in ics)
