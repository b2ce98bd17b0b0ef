"""The loss landscape along the gradient, and internal covariate shift, as Santurkar, Tsipras,
Ilyas & Madry (NeurIPS 2018, "How Does Batch Normalization Help Optimization?") measure them.

Plain functions on any ``nn.Module``: ``loss_fn(model, batch) -> scalar tensor`` gives the loss
of ``model`` on ``batch`` in whatever modes the caller set (the probe: BN in train mode, as
training sees it). Each function leaves the parameters as it found them (it moves them and puts
them back); buffers that a forward pass changes (BN running statistics) are the caller's to
restore: call inside ``moments.preserved``, which the probe does. Parameters are copied back,
not moved back, so they come back bit for bit.

* ``along_gradient`` (Sec. 3.1, Fig. 4): with g = grad L(w), for each step size eta the loss
  L(w - eta g) and the gradient change ||grad L(w - eta g) - g||. From these:
  ``loss_range`` = max - min of the losses over the etas (Fig. 4a's shaded band),
  ``grad_change`` max and min (Fig. 4b, "gradient predictiveness": small = predictive) and
  ``beta`` = max over eta of ||grad L(w - eta g) - g|| / ||eta g|| (Fig. 4c, "effective
  beta-smoothness": a lower bound on the Lipschitz constant of the gradient along that path).
* ``covariate_shift`` (Definition 2.1, Fig. 5): for each layer i, G = the gradient of layer i's
  parameters at w; G' = the same gradient after every parameter registered before layer i's
  took its own step w_j - lr * g_j (same batch, plain SGD step); ``l2`` = ||G - G'|| and
  ``cos`` = <G, G'> / (||G|| ||G'||).

``landscape_rows`` and ``covariate_shift_rows`` are the ``smoothness`` and ``ics`` probes'
rows (``bnexp.measure.probes``): cross-entropy on a prepared ``(x, y)`` batch, BN in train mode.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.measure.moments import bn_train_mode

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def gradient(model: nn.Module, loss_fn: LossFn, batch) -> tuple[float, list[torch.Tensor]]:
    """``(loss, [grad per parameter])`` at the model's current parameters (zeros for unused ones)."""
    params = _params(model)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _flat_norm(tensors: Sequence[torch.Tensor]) -> float:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


@contextlib.contextmanager
def _moved(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], step: float):
    """Inside: each p is p + step * d; on exit the saved values are copied back (exactly, not
    by subtracting the step again)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=step)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def along_gradient(model: nn.Module, loss_fn: LossFn, batch, etas: Sequence[float]) -> dict:
    """Loss and gradient along w - eta g for each eta (see the module doc); parameters restored.

    Returns ``{"loss": L(w), "grad_norm": ||g||, "losses": [...], "grad_changes": [...], "loss_range",
    "grad_change_max", "grad_change_min", "beta"}``, the lists in the order of ``etas``."""
    params = _params(model)
    loss0, g = gradient(model, loss_fn, batch)
    g_norm = _flat_norm(g)
    losses, changes = [], []
    for eta in etas:
        with _moved(params, g, -eta):
            loss, g_eta = gradient(model, loss_fn, batch)
        losses.append(loss)
        changes.append(_flat_norm([a - b for a, b in zip(g_eta, g)]))
    ratios = [c / (eta * g_norm) if eta * g_norm > 0 else float("nan") for c, eta in zip(changes, etas)]
    return {"loss": loss0, "grad_norm": g_norm, "losses": losses, "grad_changes": changes,
            "loss_range": max(losses) - min(losses), "grad_change_max": max(changes),
            "grad_change_min": min(changes), "beta": max(ratios)}


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose ICS is measured: every Conv and Linear module, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def covariate_shift(model: nn.Module, loss_fn: LossFn, batch, lr: float,
                    layers: Sequence[tuple[str, nn.Module]] | None = None) -> list[dict]:
    """Santurkar's ICS of each layer (default ``weight_layers``): rows ``{layer, l2, cos}``.

    "Before layer i" means every parameter that comes earlier in ``model.parameters()`` than
    layer i's first one (so BN's gamma and beta of earlier blocks move too). The first layer
    has nothing before it (l2 = 0, cos = 1) and is skipped. Parameters restored."""
    params = _params(model)
    index = {id(p): i for i, p in enumerate(params)}
    _, g = gradient(model, loss_fn, batch)
    rows = []
    for name, layer in layers if layers is not None else weight_layers(model):
        own = [index[id(p)] for p in layer.parameters() if id(p) in index]
        first = min(own, default=0)
        if not own or first == 0:
            continue
        before = params[:first]
        with _moved(before, g[:first], -lr):
            _, g_after = gradient(model, loss_fn, batch)
        G = torch.cat([g[i].flatten() for i in own]).double()
        G2 = torch.cat([g_after[i].flatten() for i in own]).double()
        denom = (G.norm() * G2.norm()).item()
        rows.append({"layer": name, "l2": (G - G2).norm().item(),
                     "cos": (G @ G2).item() / denom if denom > 0 else float("nan")})
    return rows


# ------------------------------------------------------------------ the probes' rows
def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def _fp32(batch):
    """The probe batch in fp32, and no autocast: bf16's rounding (~3 significant digits) would
    swamp the gradient changes of small steps that the smoothness measures divide by eta."""
    x, y = batch
    return x.float(), y


def _row(name: str, value: float, **extra) -> dict:
    return {"layer": "model", "name": name, "value": value, **extra}


def landscape_rows(model: nn.Module, batch, etas: Sequence[float]) -> list[dict]:
    """``smoothness.<loss_range|grad_change_max|grad_change_min|beta|grad_norm>`` rows and one
    ``smoothness.loss`` row per eta (with ``eta``), BN in train mode. Call inside
    ``moments.preserved`` (the forward passes move BN's running statistics)."""
    bn_train_mode(model)
    got = along_gradient(model, _cross_entropy, _fp32(batch), etas)
    keys = ("loss_range", "grad_change_max", "grad_change_min", "beta", "grad_norm")
    return ([_row(f"smoothness.{k}", got[k]) for k in keys]
            + [_row("smoothness.loss", v, eta=eta) for eta, v in zip(etas, got["losses"])])


def covariate_shift_rows(model: nn.Module, batch, lr: float) -> list[dict]:
    """``ics.l2`` / ``ics.cos`` rows per layer, BN in train mode. Call inside ``preserved``."""
    bn_train_mode(model)
    rows = covariate_shift(model, _cross_entropy, _fp32(batch), lr)
    return [{"layer": r["layer"], "name": f"ics.{k}", "value": r[k]} for r in rows for k in ("l2", "cos")]
