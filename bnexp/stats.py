"""Which statistics BN uses at test time: the eval modes, precise BN, and model-state hygiene.

Eval modes (named the same in configs, records and legends):

* ``ema``: eval mode, the running averages kept during training (PyTorch momentum convention).
* ``precise``: population statistics recomputed over ``precise_samples`` training images drawn
  i.i.d. (a seeded random subset, shuffled) in batches of ``precise_batch_size`` (default: the
  training batch size), with the training augmentation; only the BN layers in train mode (dropout
  off, so the estimate is of the network that is evaluated), running statistics not updated. The
  pooled estimator is used; see ``LayerMoments``.
* ``batch``: each BN layer normalizes with the plain mean and biased variance of the current test
  batch (``F.batch_norm(training=True)``; ghost chunks, renorm corrections and noise are off).
  Test batches are a seeded shuffle cut into batches of exactly ``eval.batch_size``; the last one
  is topped up with images from the start of the shuffle, which are not scored twice.
* ``adapted``: AdaBN: precise statistics re-estimated on (up to ``adapt_samples``) test images,
  no augmentation, then eval mode.

Every mode runs inside ``preserved(model)``: parameters, buffers, training flags, BN momentum and
FrozenBN flags, and the global RNG state are exactly as before afterwards, so modes never
contaminate each other or the training run. A model without BN layers has no statistics to
choose: ``precise``, ``batch`` and ``adapted`` are skipped (with the reason) and ``ema`` is plain
eval. Under bf16 autocast all statistics here are computed and kept in fp32 (float64 sums).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import records
from .config import EvalConfig
from .data import DataBundle, Pipeline, Split, seeded_generator
from .norms import bn_layers

ECE_BINS = 15
PRECISE_STATS = "precise_stats.json"


class ModeResults(NamedTuple):
    metrics: dict   # test_acc.<mode>, test_loss.<mode>, ece.<mode>, test_acc/test_loss/ece, precise.*
    skipped: dict   # mode -> why it does not apply
    extra: dict     # default_mode, and the mode whose numbers are behind plain test_acc


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model: nn.Module, batches: Iterable, pipe) -> dict:
    """Loss, accuracy and ECE of ``model`` as it is (the caller sets modes) over ``batches``.

    ``batches`` yields ``(x_uint8, y, counted)``: the whole batch goes through the model together
    (it matters in batch-stat modes) but only its first ``counted`` images are scored.
    """
    loss_sum, correct, bins, n = None, None, None, 0
    for xb, yb, counted in batches:
        with pipe.amp():
            logits = model(pipe.prep(xb)).float()[:counted]
        yb = yb[:counted]
        loss = F.cross_entropy(logits, yb, reduction="sum")
        hits = (logits.argmax(1) == yb).sum()
        b = calibration_bins(logits, yb)
        loss_sum, correct = (loss, hits) if loss_sum is None else (loss_sum + loss, correct + hits)
        bins = b if bins is None else bins + b
        n += counted
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "ece": float("nan")}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "ece": ece_from_bins(bins)}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pipe, batch_size: int) -> dict:
    """Loss, accuracy and ECE of ``model`` as it is over (x, y), in consecutive batches."""
    return score(model, ((x[i:i + batch_size], y[i:i + batch_size], len(y[i:i + batch_size]))
                         for i in range(0, len(y), batch_size)), pipe)


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """[3, bins] fp64 sums per confidence bin: count, confidence, correct. Bin b holds the
    max-softmax confidences in (b / bins, (b + 1) / bins] (Guo et al. 2017)."""
    conf, pred = logits.float().softmax(1).max(1)
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    rows = torch.stack([torch.ones_like(conf), conf, (pred == labels).float()]).double()
    return torch.zeros(3, bins, dtype=torch.float64, device=logits.device).index_add_(1, index, rows)


def ece_from_bins(bins: torch.Tensor) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size."""
    count, conf, correct = bins
    return ((conf - correct).abs().sum() / count.sum().clamp_min(1)).item()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    return ece_from_bins(calibration_bins(logits, labels, bins))


# ------------------------------------------------------------------- state hygiene

@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Undo, on exit, every change to ``model`` (parameters, buffers, training flags, BN momentum
    and ``frozen`` flags, instance ``forward`` overrides) and to the global RNG state."""
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    flags = [(m, m.training) for m in model.modules()]
    attrs = [(m, {k: m.__dict__[k] for k in ("momentum", "frozen", "forward") if k in m.__dict__})
             for m in model.modules()]
    param = next(model.parameters(), None)
    cuda = [param.device.index or 0] if param is not None and param.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield model
    finally:
        with torch.no_grad():
            for t, saved in zip((*model.parameters(), *model.buffers()), tensors):
                t.copy_(saved)
        for m, training in flags:
            m.training = training
        for m, saved in attrs:
            m.__dict__.pop("forward", None)
            m.__dict__.update(saved)


def bn_train_mode(model: nn.Module) -> list:
    """Eval mode except the BN layers: train mode, unfrozen, momentum 0 (running stats untouched).
    Use inside ``preserved``. Returns ``bn_layers(model)``."""
    model.eval()
    layers = bn_layers(model)
    for _, m in layers:
        m.train()
        m.momentum = 0.0
        if hasattr(m, "frozen"):
            m.frozen = False
    return layers


def _batch_stat_forward(m: nn.Module) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    return forward


# ------------------------------------------------------------------------ precise BN

class LayerMoments:
    """Streaming per-channel moments of one BN layer's input, batch by batch (float64).

    ``pooled()``: mean and *unbiased* variance over all N * H * W values seen, i.e.
    ``torch.var_mean(all_inputs, dim=(0, 2, 3), correction=1)`` whatever the batching (Chan et al.'s
    parallel update); unbiased because PyTorch's ``running_var`` is. ``mean_batch_var()``: the mean
    over batches of each batch's unbiased variance, what a cumulative average of batch statistics
    (``swa_utils.update_bn``) gives; it misses the between-batch variance of the batch means, so it
    is smaller than pooled under non-i.i.d. batches. ``keep=True`` also keeps each batch's mean and
    biased variance (``batch_means``, ``batch_vars``), for the noise probe.
    """

    def __init__(self, keep: bool = False):
        self.n, self.batches, self.keep = 0, 0, keep
        self.mean = self.m2 = self.var_sum = None
        self.batch_means, self.batch_vars = [], []

    def add(self, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), correction=0)
        nb = x.numel() // x.shape[1]
        if self.mean is None:
            self.mean, self.m2, self.var_sum = (torch.zeros_like(mean, dtype=torch.float64) for _ in range(3))
        if self.keep:
            self.batch_means.append(mean)
            self.batch_vars.append(var)
        var, mean, total = var.double(), mean.double(), self.n + nb
        delta = mean - self.mean
        self.mean += delta * (nb / total)
        self.m2 += var * nb + delta.square() * (self.n * nb / total)
        self.var_sum += var * (nb / max(nb - 1, 1))
        self.n, self.batches = total, self.batches + 1

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / max(self.n - 1, 1)

    def mean_batch_var(self) -> torch.Tensor:
        return self.var_sum / max(self.batches, 1)


@torch.no_grad()
def collect_moments(model: nn.Module, inputs: Iterable[torch.Tensor], pipe,
                    keep: bool = False) -> dict[str, LayerMoments]:
    """Run prepared ``inputs`` through ``model`` as it is and return each BN layer's input moments."""
    moments = {name: LayerMoments(keep) for name, _ in bn_layers(model)}
    hooks = [m.register_forward_pre_hook(lambda _, args, acc=moments[name]: acc.add(args[0]))
             for name, m in bn_layers(model)]
    try:
        for x in inputs:
            with pipe.amp():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return moments


def precise_bn(model: nn.Module, inputs: Iterable[torch.Tensor], pipe) -> list[dict]:
    """Set every BN layer's running mean/var to the pooled statistics of its input over ``inputs``
    (BN layers in train mode, momentum 0, dropout off); return per-layer estimator summaries.

    Changes the model (modes, momentum, running stats): call it inside ``preserved``.
    """
    layers = bn_train_mode(model)
    ema = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}
    moments = collect_moments(model, inputs, pipe)
    model.eval()
    table = []
    for name, m in layers:
        mean, var = moments[name].pooled()
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        ema_mean, ema_var = (t.double() for t in ema[name])
        var = var.clamp_min(1e-12)
        table.append({"layer": name, "channels": len(mean), "batches": moments[name].batches,
                      "values_per_channel": moments[name].n, "pooled_var": var.mean().item(),
                      "var_ratio": (moments[name].mean_batch_var() / var).mean().item(),
                      "ema_var_ratio": (ema_var / var).mean().item(),
                      "ema_mean_shift": ((ema_mean - mean).abs() / var.sqrt()).mean().item()})
    return table


def sample_indices(n_total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices in [0, n_total): a random subset, or whole permutations back to back (CPU)."""
    reps = -(-n // n_total)
    return torch.cat([torch.randperm(n_total, generator=generator) for _ in range(reps)])[:n]


def input_batches(split: Split, n: int, batch_size: int, pipe, seed: int, tag: str,
                  augment: bool, labels: bool = False) -> Iterator:
    """Prepared i.i.d. batches of ``split``: a seeded random draw of ``n`` images cut into
    ``ceil(n / batch_size)`` batches of near-equal size (4096 at 128 is 32 x 128; 50 at 16 is
    13, 13, 12, 12), so every image counts and no batch is tiny. Augmented with a generator of
    their own: training's augmentation stream is untouched. ``labels``: yield ``(x, y)``."""
    idx = sample_indices(len(split), max(n, 1), seeded_generator(seed, tag)).to(split.x.device)
    if augment:
        pipe = dataclasses.replace(pipe, generator=seeded_generator(seed, tag, "augment",
                                                                    device=pipe.generator.device))
    for b in idx.tensor_split(-(-len(idx) // batch_size)):
        x = pipe.prep(split.x.index_select(0, b), train=augment)
        yield (x, split.y.index_select(0, b)) if labels else x


def batch_mode_batches(split: Split, batch_size: int, seed: int) -> Iterator[tuple]:
    """Seeded shuffle of ``split`` in batches of exactly ``batch_size`` (the last topped up with
    images from the start of the shuffle, not counted): ``(x, y, counted)`` for ``score``."""
    n = len(split)
    perm = torch.randperm(n, generator=seeded_generator(seed, "batch_eval")).to(split.x.device)
    for start in range(0, n, batch_size):
        b = perm[start:start + batch_size]
        counted = len(b)
        if counted < batch_size and n > batch_size:
            b = torch.cat([b, perm[:batch_size - counted]])
        yield split.x.index_select(0, b), split.y.index_select(0, b), counted


# ---------------------------------------------------------------------------- the modes

def _ema(model, data, pipe, cfg, batch_size, seed):
    model.eval()
    return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), {}


def _precise(model, data, pipe, cfg, batch_size, seed):
    inputs = input_batches(data.train, cfg.precise_samples, cfg.precise_batch_size or batch_size,
                           pipe, seed, "precise", augment=True)
    table = precise_bn(model, inputs, pipe)
    return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), {"layers": table}


def _adapted(model, data, pipe, cfg, batch_size, seed):
    inputs = input_batches(data.test, min(cfg.adapt_samples or len(data.test), len(data.test)),
                           cfg.precise_batch_size or batch_size, pipe, seed, "adapted", augment=False)
    precise_bn(model, inputs, pipe)
    return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), {}


def _batch(model, data, pipe, cfg, batch_size, seed):
    model.eval()
    for _, m in bn_layers(model):
        m.forward = _batch_stat_forward(m)  # removed again by ``preserved``
    return score(model, batch_mode_batches(data.test, cfg.batch_size, seed), pipe), {}


MODES = {"ema": _ema, "precise": _precise, "batch": _batch, "adapted": _adapted}


def run_mode(mode: str, model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig,
             train_batch_size: int, seed: int) -> tuple[dict, dict]:
    """Test loss/acc/ece of ``model`` under ``mode`` and the mode's details; the model is unchanged."""
    with preserved(model):
        return MODES[mode](model, data, pipe, cfg, train_batch_size, seed)


def evaluate_modes(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, train_batch_size: int,
                   seed: int, modes: Optional[Iterable[str]] = None, run_dir=None) -> ModeResults:
    """Evaluate ``model`` on the test set under each of ``modes`` (default ``cfg.modes``) and the
    default mode; the model is left exactly as it was.

    ``metrics``: ``test_acc.<mode>``, ``test_loss.<mode>``, ``ece.<mode>`` for each mode that
    applies; ``test_acc``, ``test_loss``, ``ece`` of ``cfg.default_mode`` (of ``ema``, i.e. plain
    eval, when that mode was skipped); ``precise.var_ratio`` (mean-of-batch-variances / pooled
    variance), ``precise.ema_var_ratio`` (EMA / pooled) and ``precise.ema_mean_shift`` (|EMA -
    pooled mean| / pooled std), each a mean over layers and channels. With ``run_dir``, precise's
    per-layer table goes to ``<run_dir>/precise_stats.json``.
    """
    wanted = list(dict.fromkeys([*(cfg.modes if modes is None else modes), cfg.default_mode]))
    has_bn = bool(bn_layers(model))
    metrics, skipped = {}, {}
    for mode in wanted:
        if mode != "ema" and not has_bn:
            skipped[mode] = "no BatchNorm layers: no statistics to choose (same as ema)"
            continue
        result, info = run_mode(mode, model, data, pipe, cfg, train_batch_size, seed)
        for key in ("acc", "loss", "ece"):
            metrics[f"test_{key}.{mode}" if key != "ece" else f"ece.{mode}"] = result[key]
        if "layers" in info:
            _precise_summary(metrics, info["layers"], run_dir)
    source = cfg.default_mode if cfg.default_mode not in skipped else "ema"
    if f"test_acc.{source}" not in metrics:
        result, _ = run_mode("ema", model, data, pipe, cfg, train_batch_size, seed)
        metrics.update({"test_acc.ema": result["acc"], "test_loss.ema": result["loss"], "ece.ema": result["ece"]})
    for key in ("test_acc", "test_loss", "ece"):
        metrics[key] = metrics[f"{key}.{source}"]
    return ModeResults(metrics, skipped, {"default_mode": cfg.default_mode, "test_acc_from": source})


def _precise_summary(metrics: dict, table: list[dict], run_dir) -> None:
    for key in ("var_ratio", "ema_var_ratio", "ema_mean_shift"):
        metrics[f"precise.{key}"] = sum(row[key] for row in table) / max(len(table), 1)
    if run_dir is not None:
        records.write_json_atomic(run_dir / PRECISE_STATS, table)
