"""Cheap, opt-in measurements of what BN does during training, written to ``probes.jsonl``.

Each row is long-format: ``step, epoch, layer, name, value`` (noise rows add ``batch_size``);
``step`` counts the optimizer updates done when the probe ran. Names, per probe:

* ``noise.mean`` / ``noise.var`` (per BN layer and batch size): the spread of batch statistics
  around the population, ``std_B(mu_B) / sqrt(var)`` and ``std_B(var_B) / var`` per channel,
  averaged over channels, from ``noise_batches`` i.i.d. batches of each of ``noise_sizes`` and the
  training batch size (training augmentation, BN in train mode, dropout off). ``mu_B``, ``var_B``
  are what BN normalizes with (biased variance); the population is pooled over all those batches.
  Batches are seeded, the same images at every probe: the curve moves only as the model does.
* ``discrepancy.loss`` / ``.acc`` / ``.logit`` (layer ``model``): the same training images
  (i.i.d. batches of the training batch size) with batch statistics minus with EMA statistics, and
  the mean |logit difference|.
* ``calibration.test_loss`` / ``.test_acc`` / ``.train_loss`` / ``.train_acc`` / ``.gen_gap`` /
  ``.ece`` (layer ``model``): eval mode (EMA) on up to ``CALIBRATION_MAX`` images of each split;
  ECE with 15 equal-width confidence bins (``stats.expected_calibration_error``).
* ``activations.p15`` / ``.p50`` / ``.p85``: percentiles of the input of module ``probes.layer``
  (default: the second norm layer, i.e. the output of the conv feeding it; for norm=none the
  Identity in that place) on a fixed probe batch, BN in train mode (Ioffe & Szegedy 2015, Fig. 1).
* ``variance_shift.ratio`` (per BN layer): running variance / the variance of the layer's input in
  eval mode (dropout off), averaged over channels (Li et al. 2019): about 1 / (1 - p) when dropout
  p before the layer inflated the training-time variance, 1 without a shift.
* ``weight_norm.norm`` (every conv) and ``weight_norm.effective_lr`` = lr / ||w||^2 (convs whose
  output feeds a normalization layer, where the loss is scale-invariant in w).

Probes never change the model or the training run: they run inside ``stats.preserved`` (which also
restores the global RNG) and draw and augment their images with generators of their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import records
from .config import ProbeConfig
from .data import DataBundle, Split
from .norms import bn_layers
from .stats import bn_train_mode, collect_moments, input_batches, preserved, score

PERCENTILES = (0.15, 0.50, 0.85)
PROBE_IMAGES = 512       # training images behind discrepancy and variance_shift
CALIBRATION_MAX = 2048   # images per split behind calibration
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# ------------------------------------------------------------------------------ the probes

def batch_noise(model: nn.Module, batches_by_size: dict, pipe) -> list[dict]:
    """Rows ``{layer, batch_size, name: noise.mean | noise.var, value}``; see the module doc.
    ``batches_by_size``: batch size -> list of prepared batches. Call inside ``preserved``."""
    bn_train_mode(model)
    moments = {size: collect_moments(model, batches, pipe, keep=True)
               for size, batches in batches_by_size.items()}
    rows = []
    for name, _ in bn_layers(model):
        per_size = [moments[size][name] for size in moments]
        means = torch.cat([torch.stack(m.batch_means) for m in per_size]).double()
        variances = torch.cat([torch.stack(m.batch_vars) for m in per_size]).double()
        weights = torch.tensor([m.n // m.batches for m in per_size for _ in m.batch_means],
                               dtype=torch.float64, device=means.device)[:, None]
        pop_mean = (weights * means).sum(0) / weights.sum()
        pop_var = (weights * (variances + (means - pop_mean).square())).sum(0) / weights.sum()
        pop_var = pop_var.clamp_min(1e-12)
        for size, m in zip(moments, per_size):
            mu, var = torch.stack(m.batch_means).double(), torch.stack(m.batch_vars).double()
            rows.append({"layer": name, "batch_size": size, "name": "noise.mean",
                         "value": (mu.std(0) / pop_var.sqrt()).mean().item()})
            rows.append({"layer": name, "batch_size": size, "name": "noise.var",
                         "value": (var.std(0) / pop_var).mean().item()})
    return rows


@torch.no_grad()
def discrepancy(model: nn.Module, batches: list, labels: list, pipe) -> list[dict]:
    """Batch-statistic minus EMA-statistic loss and accuracy on the same images, and the mean
    |logit difference|. Call inside ``preserved``."""
    outputs = []
    for batch_mode in (True, False):
        if batch_mode:
            bn_train_mode(model)
        else:
            model.eval()
        with pipe.amp():
            outputs.append(torch.cat([model(x).float() for x in batches]))
    y = torch.cat(labels)
    loss = [F.cross_entropy(o, y).item() for o in outputs]
    acc = [(o.argmax(1) == y).float().mean().item() for o in outputs]
    return [_row("discrepancy.loss", loss[0] - loss[1]), _row("discrepancy.acc", acc[0] - acc[1]),
            _row("discrepancy.logit", (outputs[0] - outputs[1]).abs().mean().item())]


def calibration(model: nn.Module, train: Split, test: Split, pipe, batch_size: int) -> list[dict]:
    """Eval-mode (EMA) loss, accuracy, generalization gap and test ECE. Call inside ``preserved``."""
    model.eval()
    tr, te = (score(model, _batches(split, batch_size), pipe) for split in (train, test))
    return [_row("calibration.test_loss", te["loss"]), _row("calibration.test_acc", te["acc"]),
            _row("calibration.train_loss", tr["loss"]), _row("calibration.train_acc", tr["acc"]),
            _row("calibration.gen_gap", tr["acc"] - te["acc"]), _row("calibration.ece", te["ece"])]


@torch.no_grad()
def activation_percentiles(model: nn.Module, x: torch.Tensor, pipe, layer: str) -> list[dict]:
    """15/50/85th percentiles (``torch.quantile``, linear) of the input of module ``layer`` on the
    prepared batch ``x``, BN layers in train mode. Call inside ``preserved``."""
    seen = []
    hook = dict(model.named_modules())[layer].register_forward_pre_hook(
        lambda _, args: seen.append(args[0].detach().float().flatten()))
    try:
        bn_train_mode(model)
        with pipe.amp():
            model(x)
    finally:
        hook.remove()
    values = seen[0]
    if values.numel() > 1 << 24:  # torch.quantile's input limit: an even subsample is plenty
        values = values[::-(-values.numel() // (1 << 24))]
    q = torch.quantile(values, torch.tensor(PERCENTILES, device=values.device))
    return [{"layer": layer, "name": f"activations.p{round(100 * p)}", "value": v.item()}
            for p, v in zip(PERCENTILES, q)]


def variance_shift(model: nn.Module, batches: list, pipe) -> list[dict]:
    """Per BN layer, running_var / pooled variance of its input in eval mode (mean over channels).
    Call inside ``preserved``."""
    model.eval()
    moments = collect_moments(model, batches, pipe)
    return [{"layer": name, "name": "variance_shift.ratio",
             "value": (m.running_var.double() / moments[name].pooled()[1].clamp_min(1e-12)).mean().item()}
            for name, m in bn_layers(model)]


def weight_norms(model: nn.Module, lr: float) -> list[dict]:
    """||w|| of every conv, and lr / ||w||^2 for convs that feed a normalization layer."""
    rows = []
    for name, conv, nxt in _convs_and_next(model):
        norm = conv.weight.detach().float().norm().item()
        rows.append({"layer": name, "name": "weight_norm.norm", "value": norm})
        if isinstance(nxt, NORM_TYPES):
            rows.append({"layer": name, "name": "weight_norm.effective_lr", "value": lr / max(norm ** 2, 1e-30)})
    return rows


def default_layer(model: nn.Module) -> str:
    """The module right after the second conv (its norm, or the Identity in its place)."""
    convs = _convs_and_next(model)
    if len(convs) < 2 or convs[1][2] is None:
        raise ValueError("the activations probe needs a second conv followed by a module; set probes.layer")
    return next(name for name, m in model.named_modules() if m is convs[1][2])


def _convs_and_next(model: nn.Module) -> list[tuple]:
    """(name, conv, the next leaf module in registration order or None) for every Conv2d."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return [(n, m, leaves[i + 1][1] if i + 1 < len(leaves) else None)
            for i, (n, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)]


def _batches(split: Split, batch_size: int):
    n = min(len(split), CALIBRATION_MAX)
    return ((split.x[i:i + batch_size], split.y[i:i + batch_size], len(split.y[i:i + batch_size]))
            for i in range(0, n, batch_size))


def _row(name: str, value: float) -> dict:
    return {"layer": "model", "name": name, "value": value}


# ---------------------------------------------------------------------------- the recorder

class Probes:
    """Runs the probes of ``cfg`` when due and appends their rows to ``<run_dir>/probes.jsonl``.

    ``maybe_record(step, epoch)`` goes in the training loop before each update (``step`` = updates
    done so far); ``end_epoch(step, epoch)`` after each epoch. Only one of them records: the first
    when ``every_steps > 0`` (at steps 0, N, 2N, ...), the second otherwise. Both return at once,
    with no device work, when probes are off or not due. Steps already in ``probes.jsonl`` (a
    resumed run) are not recorded twice. ``lr()`` gives the current learning rate.
    """

    def __init__(self, cfg: ProbeConfig, model: nn.Module, data: DataBundle, pipe, train_batch_size: int,
                 seed: int, run_dir: Path, lr: Callable[[], float], eval_batch_size: int = 256):
        self.cfg, self.model, self.data, self.pipe = cfg, model, data, pipe
        self.batch_size, self.seed, self.run_dir, self.lr = train_batch_size, seed, Path(run_dir), lr
        self.eval_batch_size = eval_batch_size
        self.every = cfg.every_steps if cfg.enabled else -1
        done = records.read_jsonl(self.run_dir / records.PROBES) if cfg.enabled else []
        self.last_step = max((row["step"] for row in done), default=-1)
        self.layer: Optional[str] = cfg.layer
        self._subsets: dict = {}

    def maybe_record(self, step: int, epoch: int) -> None:
        if self.every > 0 and step % self.every == 0 and step > self.last_step:
            self.record(step, epoch)

    def end_epoch(self, step: int, epoch: int) -> None:
        if self.every == 0 and step > self.last_step:
            self.record(step, epoch)

    def record(self, step: int, epoch: int) -> list[dict]:
        """Run every probe in ``cfg.names`` now; write and return the rows."""
        rows = []
        with preserved(self.model):
            for name in self.cfg.names:
                rows += getattr(self, f"_{name}")()
        rows = [{"step": step, "epoch": epoch, **row} for row in rows]
        records.write_probes(self.run_dir, rows)
        self.last_step = step
        return rows

    # Each probe on this run's data; the images are drawn once (seeded) and prepared at each call.
    def _images(self, tag: str, n: int, size: int) -> list:
        return list(input_batches(self.data.train, n, size, self.pipe, self.seed, f"probe-{tag}", augment=True))

    def _noise(self) -> list[dict]:
        if not bn_layers(self.model):
            return []
        sizes = sorted({self.batch_size, *self.cfg.noise_sizes})
        batches = {s: self._images(f"noise{s}", s * self.cfg.noise_batches, s) for s in sizes}
        return batch_noise(self.model, batches, self.pipe)

    def _discrepancy(self) -> list[dict]:
        if not bn_layers(self.model):
            return []
        pairs = list(input_batches(self.data.train, max(PROBE_IMAGES, self.batch_size), self.batch_size,
                                   self.pipe, self.seed, "probe-set", augment=True, labels=True))
        return discrepancy(self.model, [x for x, _ in pairs], [y for _, y in pairs], self.pipe)

    def _calibration(self) -> list[dict]:
        return calibration(self.model, self.data.train, self.data.test, self.pipe, self.eval_batch_size)

    def _activations(self) -> list[dict]:
        self.layer = self.layer or default_layer(self.model)
        x = self._images("set", self.batch_size, self.batch_size)[0]
        return activation_percentiles(self.model, x, self.pipe, self.layer)

    def _variance_shift(self) -> list[dict]:
        return variance_shift(self.model, self._images("set", max(PROBE_IMAGES, self.batch_size),
                                                       self.batch_size), self.pipe)

    def _weight_norm(self) -> list[dict]:
        return weight_norms(self.model, self.lr())

