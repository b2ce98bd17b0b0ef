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
* ``activations.p15`` / ``.p50`` / ``.p85`` (rows add ``unit``): percentiles of one fixed unit's
  pre-activation, the input of the nonlinearity ``probes.layer`` (default: the ReLU after the
  second conv's norm layer, whose input is that norm's output, or the conv output for norm=none)
  in channel ``unit`` (``probes.unit``, else drawn once from the seed), over the images and
  positions of a fixed probe batch, BN in train mode as training sees it (Ioffe & Szegedy 2015,
  Fig. 1: the input distribution of one sigmoid over training).
* ``variance_shift.abs_log`` / ``.max`` (per BN layer): per channel c, r_c = running_var_c /
  var_c, with var_c the variance (about the mean, so the non-zero mean of post-ReLU inputs does not
  count) of the layer's input in eval mode (dropout off) over the probe images (Li et al. 2019);
  ``abs_log`` is the mean over channels of |log r_c| and ``max`` the largest max(r_c, 1 / r_c),
  so channels shifted up and down do not cancel. 0 and 1 without a shift; dropout p before the
  layer on zero-mean inputs gives r_c = 1 / (1 - p).
* ``forward_noise.ratio`` (per normalization position, whatever its norm): the noise batch-mates
  put into a fixed probe image's norm output, over ``noise_batches`` training batches; 0 for
  none/LN/PN, > 0 for batch statistics or ghost noise. Defined in ``bnexp.measure.forward_noise``.
* ``grad_noise.batchmates`` / ``.sampling`` / ``.ratio`` (layer ``model``): the same probe images'
  weight gradient across ``noise_batches`` training batches, the share of it that moves with the
  batch-mates; beside it the minibatch sampling noise of the batch's mean-loss gradient, and their
  ratio. 0 for none/LN/GN/pn_online, > 0 for BN, ghost BN and PN (whose backward is BN's).
  Defined in ``bnexp.measure.grad_noise``.
* ``smoothness.loss_range`` / ``.grad_change_max`` / ``.grad_change_min`` / ``.beta`` /
  ``.grad_norm`` (layer ``model``) and ``smoothness.loss`` (rows add ``eta``): the loss landscape
  along the gradient on a fixed probe batch (one training batch, drawn once), BN in train mode
  as training sees it, in fp32 (no autocast, whatever ``precision``), for each step size of
  ``probes.etas`` (Santurkar et al. 2018, Fig. 4; ``bnexp.measure.smoothness.along_gradient``).
* ``ics.l2`` / ``ics.cos`` (per conv/linear layer but the first): Santurkar's internal covariate
  shift on the same batch at the current lr (Definition 2.1, Fig. 5; ``smoothness.covariate_shift``).
* ``weight_norm.norm`` (every conv) and ``weight_norm.effective_lr`` = lr / ||w||^2 (convs whose
  output feeds a normalization layer, where the loss is scale-invariant in w).

Probes never change the model or the training run: they run inside ``stats.preserved`` (which also
restores the global RNG) and draw and augment their images with generators of their own. The noise
and discrepancy probes use plain batch statistics (``plain_statistics``: no injected noise, no
renorm r/d). ``PROBES`` maps each name of ``probes.names`` to ``probe(recorder) -> rows``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bnexp import records
from bnexp.config import ConfigError, ProbeConfig
from bnexp.data.datasets import DataBundle, Split, seeded_generator
from bnexp.measure import smoothness
from bnexp.measure.forward_noise import forward_noise, probe_count
from bnexp.measure.grad_noise import grad_noise
from bnexp.measure.moments import bn_train_mode, collect_moments, input_batches, plain_statistics, preserved
from bnexp.layers.norms import bn_layers
from bnexp.registry import Registry
from bnexp.measure.modes import evaluate

PERCENTILES = (0.15, 0.50, 0.85)
PROBE_IMAGES = 512       # training images behind discrepancy and variance_shift
CALIBRATION_MAX = 2048   # images per split behind calibration (in whole batches)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
NONLINEARITIES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)
PROBES = Registry("probes.names", "probe(recorder: Probes) -> list[dict]")


# ------------------------------------------------------------------------------ the probes

def batch_noise(model: nn.Module, batches_by_size: dict, pipe) -> list[dict]:
    """Rows ``{layer, batch_size, name: noise.mean | noise.var, value}``; see the module doc.
    ``batches_by_size``: batch size -> list of prepared batches. Call inside ``preserved``."""
    bn_train_mode(model)
    with plain_statistics(model):
        moments = {size: collect_moments(model, batches, pipe, keep=True)
                   for size, batches in batches_by_size.items()}
    rows = []
    for name, _ in bn_layers(model):
        per_size = [moments[size][name] for size in moments]
        means = torch.cat([torch.stack(m.batch_means) for m in per_size]).double()
        variances = torch.cat([torch.stack(m.batch_vars) for m in per_size]).double()
        weights = torch.tensor([n for m in per_size for n in m.batch_counts],
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
    for set_mode in (bn_train_mode, nn.Module.eval):  # batch statistics, then the EMA's
        set_mode(model)
        with plain_statistics(model), pipe.amp():
            outputs.append(torch.cat([model(x).float() for x in batches]))
    y = torch.cat(labels)
    loss = [F.cross_entropy(o, y).item() for o in outputs]
    acc = [(o.argmax(1) == y).float().mean().item() for o in outputs]
    return [_row("discrepancy.loss", loss[0] - loss[1]), _row("discrepancy.acc", acc[0] - acc[1]),
            _row("discrepancy.logit", (outputs[0] - outputs[1]).abs().mean().item())]


def calibration(model: nn.Module, train: Split, test: Split, pipe, batch_size: int) -> list[dict]:
    """Eval-mode (EMA) loss, accuracy, generalization gap and test ECE. Call inside ``preserved``."""
    model.eval()
    n = -(-CALIBRATION_MAX // batch_size) * batch_size  # the cap, rounded up to whole batches
    tr, te = (evaluate(model, split.x[:n], split.y[:n], pipe, batch_size) for split in (train, test))
    return [_row("calibration.test_loss", te["loss"]), _row("calibration.test_acc", te["acc"]),
            _row("calibration.train_loss", tr["loss"]), _row("calibration.train_acc", tr["acc"]),
            _row("calibration.gen_gap", tr["acc"] - te["acc"]), _row("calibration.ece", te["ece"])]


@torch.no_grad()
def activation_percentiles(model: nn.Module, x: torch.Tensor, pipe, layer: str,
                           unit: int) -> list[dict]:
    """15/50/85th percentiles (``torch.quantile``, linear) of channel ``unit`` of the input of
    module ``layer`` on the prepared batch ``x``, BN layers in train mode. Call inside ``preserved``."""
    bn_train_mode(model)
    with pipe.amp():
        values = _layer_input(model, layer, x, lambda a: a.detach()[:, unit].float().flatten())
    if values.numel() > 1 << 24:  # torch.quantile's input limit: an even subsample is plenty
        values = values[::-(-values.numel() // (1 << 24))]
    q = torch.quantile(values, torch.tensor(PERCENTILES, device=values.device))
    return [{"layer": layer, "unit": unit, "name": f"activations.p{round(100 * p)}", "value": v.item()}
            for p, v in zip(PERCENTILES, q)]


def variance_shift(model: nn.Module, batches: list, pipe) -> list[dict]:
    """Per BN layer, ``abs_log`` = mean_c |log r_c| and ``max`` = max_c max(r_c, 1 / r_c), with
    r_c = running_var_c / the pooled variance of channel c of its input in eval mode. Call inside
    ``preserved``."""
    model.eval()
    moments = collect_moments(model, batches, pipe)
    rows = []
    for name, m in bn_layers(model):
        log_ratio = (m.running_var.double() / moments[name].pooled()[1].clamp_min(1e-12)).log()
        rows += [{"layer": name, "name": "variance_shift.abs_log", "value": log_ratio.abs().mean().item()},
                 {"layer": name, "name": "variance_shift.max", "value": log_ratio.abs().max().exp().item()}]
    return rows


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
    """The first nonlinearity after the second conv: its input is that conv's norm output (or
    the conv output through the Identity in its place)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    convs = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    after = leaves[convs[1] + 1:] if len(convs) >= 2 else []
    name = next((n for n, m in after if isinstance(m, NONLINEARITIES)), None)
    if name is None:
        raise ValueError("the activations probe needs a nonlinearity after a second conv; set probes.layer")
    return name


def pick_unit(model: nn.Module, layer: str, x: torch.Tensor, seed: int, unit: Optional[int]) -> int:
    """The channel the activations probe follows: ``unit`` when given (checked against the
    channels of ``layer``'s input), else one drawn from ``seed``. Call inside ``preserved``."""
    model.eval()
    with torch.no_grad():
        channels = _layer_input(model, layer, x[:1], lambda a: a.shape)[1]
    if unit is None:
        return int(torch.randint(channels, (1,), generator=seeded_generator(seed, "probe-unit")))
    if not 0 <= unit < channels:
        raise ConfigError(f"probes.unit={unit} is not a channel of {layer}'s input (0..{channels - 1})")
    return unit


def _layer_input(model: nn.Module, layer: str, x: torch.Tensor, take: Callable):
    """``take(input)`` of the input module ``layer`` receives in ``model(x)``, in the caller's modes."""
    seen = []
    hook = dict(model.named_modules())[layer].register_forward_pre_hook(
        lambda _, args: seen.append(take(args[0])))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def _convs_and_next(model: nn.Module) -> list[tuple]:
    """(name, conv, the next leaf module in registration order or None) for every Conv2d."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return [(n, m, leaves[i + 1][1] if i + 1 < len(leaves) else None)
            for i, (n, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)]


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
        self.unit: Optional[int] = None  # the activations probe's unit, chosen at its first call

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
                rows += PROBES.get(name)(self)
        rows = [{"step": step, "epoch": epoch, **row} for row in rows]
        records.write_probes(self.run_dir, rows)
        self.last_step = step
        return rows

    def images(self, tag: str, n: int, size: int) -> list:
        """This run's training images for probe ``tag``: drawn once (seeded), prepared each call."""
        return list(input_batches(self.data.train, n, size, self.pipe, self.seed, f"probe-{tag}", augment=True))


# Each probe on the recorder's run; the recorder is the one argument (``PROBES.signature``).
@PROBES.register("noise")
def _noise(rec: Probes) -> list[dict]:
    if not bn_layers(rec.model):
        return []
    sizes = sorted({rec.batch_size, *rec.cfg.noise_sizes})
    batches = {s: rec.images(f"noise{s}", s * rec.cfg.noise_batches, s) for s in sizes}
    return batch_noise(rec.model, batches, rec.pipe)


@PROBES.register("forward_noise")
def _forward_noise(rec: Probes) -> list[dict]:
    count, size = probe_count(rec.batch_size), rec.batch_size
    probe = rec.images("forward-noise-probe", count, count)[0]
    return forward_noise(rec.model, probe, rec.images("forward-noise", size * rec.cfg.noise_batches, size),
                         rec.pipe)


@PROBES.register("grad_noise")
def _grad_noise(rec: Probes) -> list[dict]:
    count, size = probe_count(rec.batch_size), rec.batch_size
    probe = _labelled(rec, "forward-noise-probe", count, count)[0]  # forward_noise's probe images
    return grad_noise(rec.model, probe, _labelled(rec, "grad-noise", size * rec.cfg.noise_batches, size))


def _labelled(rec: Probes, tag: str, n: int, size: int) -> list:
    """``Probes.images`` with the labels: ``(x, y)`` batches, drawn once (seeded)."""
    return list(input_batches(rec.data.train, n, size, rec.pipe, rec.seed, f"probe-{tag}", augment=True,
                              labels=True))


@PROBES.register("discrepancy")
def _discrepancy(rec: Probes) -> list[dict]:
    if not bn_layers(rec.model):
        return []
    pairs = list(input_batches(rec.data.train, max(PROBE_IMAGES, rec.batch_size), rec.batch_size,
                               rec.pipe, rec.seed, "probe-set", augment=True, labels=True))
    return discrepancy(rec.model, [x for x, _ in pairs], [y for _, y in pairs], rec.pipe)


@PROBES.register("calibration")
def _calibration(rec: Probes) -> list[dict]:
    return calibration(rec.model, rec.data.train, rec.data.test, rec.pipe, rec.eval_batch_size)


@PROBES.register("activations")
def _activations(rec: Probes) -> list[dict]:
    rec.layer = rec.layer or default_layer(rec.model)
    x = rec.images("set", rec.batch_size, rec.batch_size)[0]
    if rec.unit is None:
        rec.unit = pick_unit(rec.model, rec.layer, x, rec.seed, rec.cfg.unit)
    return activation_percentiles(rec.model, x, rec.pipe, rec.layer, rec.unit)


@PROBES.register("variance_shift")
def _variance_shift(rec: Probes) -> list[dict]:
    return variance_shift(rec.model, rec.images("set", max(PROBE_IMAGES, rec.batch_size), rec.batch_size),
                          rec.pipe)


@PROBES.register("weight_norm")
def _weight_norm(rec: Probes) -> list[dict]:
    return weight_norms(rec.model, rec.lr())


def _probe_batch(rec: Probes):
    """One training batch (augmented as training does), drawn once: the same images every call."""
    return next(iter(input_batches(rec.data.train, rec.batch_size, rec.batch_size, rec.pipe, rec.seed,
                                   "probe-landscape", augment=True, labels=True)))


@PROBES.register("smoothness")
def _smoothness(rec: Probes) -> list[dict]:
    return smoothness.landscape_rows(rec.model, _probe_batch(rec), rec.cfg.etas)


@PROBES.register("ics")
def _ics(rec: Probes) -> list[dict]:
    return smoothness.covariate_shift_rows(rec.model, _probe_batch(rec), rec.lr())
