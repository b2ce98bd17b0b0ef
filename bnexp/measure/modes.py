"""Which statistics BN uses at test time: the eval modes, precise BN, and model-state hygiene.

Eval modes (``MODES``; named the same in configs, records and legends):

* ``ema``: eval mode, the running averages kept during training (PyTorch momentum convention).
* ``precise``: population statistics recomputed over ``precise_samples`` training images drawn
  i.i.d. (a seeded random subset, shuffled) in batches of ``precise_batch_size`` (default: the
  training batch size), with the training augmentation; only the BN layers in train mode (dropout
  off, so the estimate is of the network that is evaluated), plain batch statistics (no injected
  noise, no renorm correction: ``norms.set_plain``), running statistics not updated. Mean and the
  pooled variance of all values seen (see ``LayerMoments``).
* ``precise_bvar``: the same pass, variance = the mean of the per-normalization-batch variances
  (per ghost chunk for ghost BN, weighted by size), what ``swa_utils.update_bn`` estimates.
* ``precise_sampler`` / ``precise_sampler_bvar``: the two estimators from a pass whose batches the
  training sampler draws (its structure, e.g. P x K, at the training batch size): whole batches
  until ``precise_samples`` images are reached.
* ``batch``: each BN layer normalizes with the plain mean and biased variance of the current test
  batch (``F.batch_norm(training=True)``; ghost chunks, renorm corrections and noise are off).
  Test batches are a seeded shuffle cut into batches of exactly ``eval.batch_size``; the last one
  is topped up with images from the start of the shuffle, which are not scored twice.
* ``batch_sorted``: as ``batch`` on a class-sorted test stream: the test set sorted by label,
  cut into batches of ``eval.batch_size`` (mostly one class each; test-time adaptation's
  non-i.i.d. stream, Niu et al. 2023).
* ``batch_sampler``: test batches drawn by the training sampler over the test labels (its
  structure at the training batch size, e.g. P x K); each layer normalizes as in training with
  plain statistics (per ghost chunk for ghost BN). Images of the sampler's dropped remainder
  (fewer than one batch) are not scored.
* ``adapted``: AdaBN: precise statistics re-estimated on (up to ``adapt_samples``) test images,
  no augmentation, then eval mode.

Every mode runs inside ``preserved(model)`` (which undoes all it changed, RNG included), so modes
never contaminate each other or the training run. A model without BN layers has no statistics to
choose: every mode but ``ema`` is skipped (with the reason) and ``ema`` is plain eval. Under bf16
autocast all statistics here are computed and kept in fp32 (float64 sums).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bnexp import records
from bnexp.layers import ema_shadows
from bnexp.config import EvalConfig, SamplerConfig
from bnexp.data.datasets import DataBundle, Split, seeded_generator
from bnexp.measure.moments import (  # noqa: F401  (re-exported: callers have always found these in stats)
    LayerMoments, bn_train_mode, collect_moments, input_batches, precise_bn, preserved, sampler_batches,
    sampler_indices)
from bnexp.layers.norms import bn_layers, set_plain
from bnexp.registry import Registry

ECE_BINS = 15
MODES = Registry("eval.modes", "mode(model, data, pipe, cfg: EvalConfig, batch_size: int, seed: int, "
                               "sampler: SamplerConfig | None) -> (scores, info)")


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


# ------------------------------------------------------------------------ batch mode

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

@MODES.register("ema")
def _ema(model, data, pipe, cfg, batch_size, seed, sampler=None):
    model.eval()
    return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), {}


def precise_pass(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, batch_size: int,
                 seed: int, sampler: Optional[SamplerConfig] = None, estimator: str = "pooled") -> list[dict]:
    """The precise modes' pass over the training images (see the module doc): i.i.d. without
    ``sampler``, else drawn by ``sampler`` at ``batch_size``; sets the running statistics with
    ``estimator`` and returns ``precise_bn``'s table. Call inside ``preserved``."""
    if sampler is None:
        inputs = input_batches(data.train, cfg.precise_samples, cfg.precise_batch_size or batch_size,
                               pipe, seed, "precise", augment=True)
    else:
        inputs = sampler_batches(data.train, sampler, cfg.precise_samples, batch_size, pipe, seed,
                                 "precise_sampler", augment=True)
    return precise_bn(model, inputs, pipe, estimator)


def _precise_mode(name: str, loader: str, estimator: str) -> None:
    def mode(model, data, pipe, cfg, batch_size, seed, sampler=None):
        if loader == "sampler" and sampler is None:
            raise ValueError(f"eval mode {name} draws its pass with the training sampler: pass sampler=")
        table = precise_pass(model, data, pipe, cfg, batch_size, seed,
                             sampler if loader == "sampler" else None, estimator)
        info = {"pass": "precise" if loader == "iid" else "precise_sampler", "layers": table}
        return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), info
    MODES.register(name)(mode)


_precise_mode("precise", "iid", "pooled")
_precise_mode("precise_bvar", "iid", "bvar")
_precise_mode("precise_sampler", "sampler", "pooled")
_precise_mode("precise_sampler_bvar", "sampler", "bvar")


def sorted_batches(split: Split, batch_size: int) -> Iterator[tuple]:
    """``split`` sorted by label (stable: the original order within a class), cut into batches
    of ``batch_size`` (the last one shorter): a class-sorted test stream, ``(x, y, counted)``."""
    order = torch.sort(split.y.cpu(), stable=True).indices.to(split.x.device)
    for start in range(0, len(split), batch_size):
        b = order[start:start + batch_size]
        yield split.x.index_select(0, b), split.y.index_select(0, b), len(b)


def use_batch_statistics(model: nn.Module) -> None:
    """Eval mode, every BN layer normalizing with the plain statistics of its input batch (its
    affine kept). An instance ``forward``: call inside ``preserved``, which removes it."""
    model.eval()
    for _, m in bn_layers(model):
        m.forward = functools.partial(F.batch_norm, running_mean=None, running_var=None, weight=m.weight,
                                      bias=m.bias, training=True, momentum=0.0, eps=m.eps)


@MODES.register("batch")
def _batch(model, data, pipe, cfg, batch_size, seed, sampler=None):
    use_batch_statistics(model)
    return score(model, batch_mode_batches(data.test, cfg.batch_size, seed), pipe), {}


@MODES.register("batch_sorted")
def _batch_sorted(model, data, pipe, cfg, batch_size, seed, sampler=None):
    use_batch_statistics(model)
    return score(model, sorted_batches(data.test, cfg.batch_size), pipe), {}


@MODES.register("batch_sampler")
def _batch_sampler(model, data, pipe, cfg, batch_size, seed, sampler=None):
    if sampler is None:
        raise ValueError("eval mode batch_sampler draws test batches with the training sampler: pass sampler=")
    bn_train_mode(model)  # each layer normalizes as in training (ghost chunks), momentum 0
    set_plain(model, True)  # restored by ``preserved``
    batches = ((data.test.x.index_select(0, b), data.test.y.index_select(0, b), len(b))
               for b in (i.to(data.test.x.device) for i in
                         sampler_indices(sampler, data.test.y, batch_size, seed, "batch_sampler")))
    return score(model, batches, pipe), {}


@MODES.register("adapted")
def _adapted(model, data, pipe, cfg, batch_size, seed, sampler=None):
    inputs = input_batches(data.test, min(cfg.adapt_samples or len(data.test), len(data.test)),
                           cfg.precise_batch_size or batch_size, pipe, seed, "adapted", augment=False)
    precise_bn(model, inputs, pipe)
    return evaluate(model, data.test.x, data.test.y, pipe, cfg.batch_size), {}


def run_mode(mode: str, model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig,
             train_batch_size: int, seed: int, sampler: Optional[SamplerConfig] = None) -> tuple[dict, dict]:
    """Test loss/acc/ece of ``model`` under ``mode`` and the mode's details; the model is unchanged.
    ``sampler``: the training sampler's section, for the ``*_sampler`` modes."""
    with preserved(model):
        return MODES.get(mode)(model, data, pipe, cfg, train_batch_size, seed, sampler)


def evaluate_modes(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, train_batch_size: int,
                   seed: int, modes: Optional[Iterable[str]] = None, run_dir=None,
                   sampler: Optional[SamplerConfig] = None,
                   on_mode: Callable[[str, int, int], None] = lambda mode, i, n: None) -> ModeResults:
    """Evaluate ``model`` on the test set under each of ``modes`` (default ``cfg.modes``) and the
    default mode; the model is left exactly as it was.

    ``metrics``: ``test_acc.<mode>``, ``test_loss.<mode>``, ``ece.<mode>`` for each mode that
    applies, and with ``ema`` the same for each of the model's shadow EMAs (``ema_m0p01``, ...:
    ``ema_shadows``); ``test_acc``, ``test_loss``, ``ece`` of ``cfg.default_mode`` (of ``ema``, i.e. plain
    eval, when that mode was skipped); per precise pass (``precise`` for the i.i.d. one,
    ``precise_sampler``) ``<pass>.var_ratio`` (mean-of-batch-variances / pooled variance),
    ``<pass>.ema_var_ratio`` (EMA / pooled) and ``<pass>.ema_mean_shift`` (|EMA - pooled mean| /
    pooled std), each a mean over layers and channels. With ``run_dir``, the passes' per-layer
    tables (rows with a ``pass`` key) go to ``<run_dir>/precise_stats.json``. ``on_mode(mode, i,
    n)`` is called before the i-th (1-based) of the n modes is scored (to tell the user).
    """
    wanted = list(dict.fromkeys([*(cfg.modes if modes is None else modes), cfg.default_mode]))
    has_bn = bool(bn_layers(model))
    metrics, skipped, tables = {}, {}, {}
    for i, mode in enumerate(wanted, 1):
        if mode != "ema" and not has_bn:
            skipped[mode] = "no BatchNorm layers: no statistics to choose (same as ema)"
            continue
        on_mode(mode, i, len(wanted))
        result, info = run_mode(mode, model, data, pipe, cfg, train_batch_size, seed, sampler)
        _put_scores(metrics, mode, result)
        if "layers" in info:
            tables[info["pass"]] = info["layers"]
        if mode == "ema":  # the EMAs at eval.ema_momenta, on the same weights
            for name, k in ema_shadows.shadow_modes(model):
                with preserved(model):
                    ema_shadows.swapped(model, k)
                    _put_scores(metrics, name, _ema(model, data, pipe, cfg, train_batch_size, seed)[0])
    source = cfg.default_mode if cfg.default_mode not in skipped else "ema"
    if f"test_acc.{source}" not in metrics:
        _put_scores(metrics, "ema", run_mode("ema", model, data, pipe, cfg, train_batch_size, seed)[0])
    for key in ("test_acc", "test_loss", "ece"):
        metrics[key] = metrics[f"{key}.{source}"]
    _precise_summary(metrics, tables, run_dir)
    return ModeResults(metrics, skipped, {"default_mode": cfg.default_mode, "test_acc_from": source})


def validation_metrics(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, train_batch_size: int,
                       seed: int, sampler: Optional[SamplerConfig] = None) -> dict:
    """``{"val_acc", "val_loss"}`` of ``model`` on ``data.val`` (``data.val_size``) under
    ``cfg.default_mode``, scored exactly as that mode scores the test set (``ema``, plain eval,
    where the model has no BN layers, as in ``evaluate_modes``); ``{}`` without a validation
    split. The model is left as it was."""
    if data.val is None:
        return {}
    mode = cfg.default_mode if bn_layers(model) else "ema"
    result, _ = run_mode(mode, model, dataclasses.replace(data, test=data.val), pipe, cfg,
                         train_batch_size, seed, sampler)
    return {"val_acc": result["acc"], "val_loss": result["loss"]}


def _put_scores(metrics: dict, mode: str, result: dict) -> None:
    metrics.update({f"test_acc.{mode}": result["acc"], f"test_loss.{mode}": result["loss"],
                    f"ece.{mode}": result["ece"]})


def _precise_summary(metrics: dict, tables: dict, run_dir) -> None:
    for name, table in tables.items():
        for key in ("var_ratio", "ema_var_ratio", "ema_mean_shift"):
            metrics[f"{name}.{key}"] = sum(row[key] for row in table) / max(len(table), 1)
    if run_dir is not None and tables:
        rows = [{"pass": name, **row} for name, table in tables.items() for row in table]
        records.write_json_atomic(Path(run_dir) / records.PRECISE_STATS, rows)
