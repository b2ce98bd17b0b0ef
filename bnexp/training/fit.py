"""``fit()``: build the model, train it, evaluate it, and record everything in the run folder.

``fit`` reads as the methods section: ``set_up`` (data, sampler, model, input pipeline,
optimizer, schedule, probes), ``resume`` (from ``last.pt``), ``run_epoch`` for each epoch (train,
evaluate, record, checkpoint), ``summarize`` (every eval mode, ``summary.json``). FrozenBN
(``norm.freeze_after``) is done as Wu & Johnson 2021 do it: right before the first step whose
training fraction reaches ``freeze_after`` (the step at which ``set_progress`` freezes the
layers), the running statistics are re-estimated precisely and frozen (``stats.freeze_precisely``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bnexp import records
from bnexp.layers import init as weight_init
from bnexp.training import finetune, targets
from bnexp.training import loggers
from bnexp.training.assemble import build, make_pipeline
from bnexp.training.checkpoint import clear_last, load_last, nonfinite_tensors, save_last, save_model
from bnexp.config import Config, OptimConfig, to_dict
from bnexp.data.datasets import DataBundle, Pipeline, Split, load_data
from bnexp.layers.norms import set_progress
from bnexp.measure.probes import Probes
from bnexp.training.progress import RunProgress
from bnexp.runtime import (device_name, resolve_device, resolve_precision, seed_everything,
                      set_threads)
from bnexp.data.sampling import BatchSampler, build_sampler
from bnexp.measure.moments import freeze_precisely
from bnexp.measure.affine import record_affine
from bnexp.measure.modes import ModeResults, evaluate_modes, run_mode, validation_metrics
from bnexp.measure.robustness import record_corruptions

log = logging.getLogger(__name__)
CHECK_EVERY = 50  # steps between non-finite checks: each check is a host sync on CUDA
TRAIN_EVAL_MAX = 10_000  # training images scored (as the test set is) for the final train_acc / gen_gap


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """SGD; weight decay skips norm affine parameters and biases (1-d tensors), as is standard."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per update, the same numbers as the default (foreach) path, ~1 ms less
    # per step on CPU (5% of a batch-8 step)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.SGD(groups, lr=cfg.effective_lr(batch_size), momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused or None)


def lr_factor(cfg: OptimConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup, then cosine / step / constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
        return 1.0

    return factor


def train_epoch(model, optimizer, scheduler, train: Split, batches, pipe: Pipeline, first_step: int,
                total_steps: int, label_smoothing: float = 0.0, grad_clip: Optional[float] = None,
                before_step: Callable[[int], None] = lambda step: None) -> dict:
    """One pass over ``batches`` (index tensors into ``train``). Returns running loss/acc, or
    ``diverged`` on a non-finite loss. ``before_step(step)`` runs before each update, ``step``
    counting the updates done (probes, FrozenBN's freeze); then ``set_progress`` tells the norm
    layers the training fraction."""
    model.train()
    device = pipe.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, idx in enumerate(batches):
        before_step(first_step + i)
        set_progress(model, (first_step + i) / total_steps)
        idx = idx.to(device, non_blocking=True)
        x = pipe.prep(train.x.index_select(0, idx), train=True)
        y = train.y.index_select(0, idx)
        with pipe.amp():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        if (i + 1) % CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            return {"diverged": True, "step": first_step + i + 1}
    if not torch.isfinite(loss_sum):
        return {"diverged": True, "step": first_step + len(batches)}
    return {"diverged": False, "loss": loss_sum.item() / seen, "acc": correct.item() / seen,
            "step": first_step + len(batches), "images": seen}


def freeze_step(freeze_after: Optional[float], total_steps: int) -> Optional[int]:
    """The first step s < ``total_steps`` with s / total_steps >= ``freeze_after`` (the test
    ``set_progress`` applies), or None when training never gets there."""
    if freeze_after is None:
        return None
    s = max(math.ceil(freeze_after * total_steps) - 1, 0)
    while s / total_steps < freeze_after:  # ceil of a rounded product can be one off
        s += 1
    return s if s < total_steps else None


@dataclass
class Session:
    """Everything ``set_up`` builds for one run; the steps of ``fit`` share it."""
    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    data: DataBundle
    sampler: BatchSampler
    model: torch.nn.Module
    forward: torch.nn.Module  # the model, or its torch.compile wrapper
    pipe: Pipeline
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    probes: Probes
    tuned: Optional[finetune.Started]
    total_steps: int
    freeze_at: Optional[int]
    tracker: Optional[loggers.Logger] = None  # logger=...: set once resume knows the first step


@dataclass
class Progress:
    """What a resumed run takes over from ``last.pt``: epoch rows, timing, steps done."""
    history: list = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"train_seconds": 0.0, "train_images": 0, "wall": 0.0})
    step: int = 0
    start_epoch: int = 0
    resumed: bool = False
    started: float = 0.0  # time.time() of this attempt
    prior_wall: float = 0.0  # wall time spent before an interruption counts too


def fit(cfg: Config, run_dir: Path, provenance: dict | None = None) -> dict:
    """Train one model as ``cfg`` says and write its records into ``run_dir``; return the summary.

    A non-finite training loss, weight or buffer (checked after each epoch) or final test
    output ends the run with status ``diverged`` (a result, not an error).
    Exceptions propagate; the entry point records them as ``failed``.
    """
    started = time.time()
    run = set_up(cfg, Path(run_dir))
    progress = resume(run, started)
    run.tracker = loggers.make(run.cfg.logger, run.run_dir, progress.step)
    bar = RunProgress(run.cfg.progress, run.cfg.optim.epochs, len(run.sampler), run.cfg.data.batch_size)
    diverged_at = None
    for epoch in range(progress.start_epoch, run.cfg.optim.epochs):
        if stop_reached(run.cfg.optim.stop_at, progress.history):  # checked first: a resumed run too
            break
        diverged_at = run_epoch(run, progress, epoch, bar)
        if diverged_at:
            break
    try:
        return summarize(run, progress, diverged_at, provenance, bar)
    finally:
        bar.close()


def stop_reached(stop_at: Optional[float], history: list) -> Optional[dict]:
    """``{"epoch", "step", "train_acc.clean"}`` of the first epoch row whose clean training
    accuracy is >= ``stop_at`` (optim.stop_at; None: never, or no stop_at)."""
    if stop_at is None:
        return None
    row = next((r for r in history if (r.get("train_acc.clean") or 0.0) >= stop_at), None)
    return None if row is None else {k: row[k] for k in ("epoch", "step", "train_acc.clean")}


def stop_record(cfg: Config, history: list) -> dict:
    """The summary's ``stop_at_reached`` (the first epoch row at optim.stop_at, None: never or no
    stop_at) and ``stopped_early`` (True when training ended there, before optim.epochs)."""
    reached = stop_reached(cfg.optim.stop_at, history)
    return {"stop_at_reached": reached,
            "stopped_early": reached is not None and reached["epoch"] + 1 < cfg.optim.epochs}


def set_up(cfg: Config, run_dir: Path) -> Session:
    """Seeds, data, sampler, model, input pipeline, optimizer, schedule and probes of ``cfg``."""
    cfg, source = finetune.resolve(cfg)  # with finetune.from: the source run's model/norm sections
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, device, seed=cfg.seed)
    sampler = build_sampler(cfg.sampler, data.train.y.cpu(), cfg.data.batch_size, cfg.seed)
    model = build(cfg, data.num_classes, device)
    if cfg.norm.name == "gn" and any(g != cfg.norm.groups for g in (groups_used(model) or {}).values()):
        log.info("norm.groups=%d does not divide every width: groups used per width %s (the largest "
                 "divisor <= norm.groups; recorded as norm_groups_used)", cfg.norm.groups, groups_used(model))
    pipe = make_pipeline(cfg, data, device, precision)
    weight_init.apply(model, cfg.model.init, lambda: pipe.prep(data.train.x[:weight_init.LSUV_BATCH]))
    # source weights, source input normalization, BN mode; before the optimizer sees the params
    tuned = finetune.start(model, source, cfg, data, pipe) if source else None
    optimizer = make_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, len(sampler)))
    probes = Probes(cfg.probes, model, data, pipe, cfg.data.batch_size, cfg.seed, run_dir,
                    lambda: optimizer.param_groups[0]["lr"], cfg.eval.batch_size)
    total_steps = cfg.optim.epochs * len(sampler)
    log.info("%s on %s, %s, %d train / %d test images, %d steps per epoch", cfg.model.name,
             device_name(device), precision, len(data.train.y), len(data.test.y), len(sampler))
    return Session(cfg, run_dir, device, precision, data, sampler, model,
                   torch.compile(model) if cfg.compile else model, pipe, optimizer,
                   scheduler, probes, tuned, total_steps, freeze_step(cfg.norm.freeze_after, total_steps))


def resume(run: Session, started: float) -> Progress:
    """Restore an interrupted run from ``last.pt`` (when ``checkpoint``), else start fresh."""
    saved = load_last(run.run_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                      generator=run.pipe.generator, config=to_dict(run.cfg)) if run.cfg.checkpoint else None
    if not saved:  # a fresh start must not append to the rows of an attempt killed before its checkpoint
        (run.run_dir / records.METRICS).unlink(missing_ok=True)
        return Progress(started=started)
    log.info("resuming %s after epoch %d", run.run_dir, saved["epoch"] + 1)
    return Progress(saved["history"], saved["timing"], saved["step"], saved["epoch"] + 1, True,
                    started, saved["timing"]["wall"])


def run_epoch(run: Session, progress: Progress, epoch: int, bar: RunProgress) -> Optional[dict]:
    """Train one epoch, evaluate, append its row to metrics.jsonl, probe, checkpoint. Returns
    ``{"epoch", "step", "reason"}`` when the loss or, after the epoch, a weight or buffer (BN's
    running statistics) went non-finite (the run diverged), else None."""
    cfg, tic, lr = run.cfg, time.perf_counter(), run.optimizer.param_groups[0]["lr"]
    result = train_epoch(run.forward, run.optimizer, run.scheduler, run.data.train,
                         bar.track(run.sampler.batches(epoch), epoch), run.pipe, progress.step,
                         run.total_steps, cfg.optim.label_smoothing, cfg.optim.grad_clip,
                         before_step=lambda at: before_step(run, at, epoch))
    progress.step = result["step"]
    if result["diverged"]:
        log.warning("non-finite loss in epoch %d (by step %d): run diverged", epoch, progress.step)
        return {"epoch": epoch, "step": progress.step, "reason": "non-finite training loss"}
    # the loss is computed before each update: the last updates can blow the weights up unseen
    if bad := nonfinite_tensors(run.model.state_dict()):
        reason = f"non-finite weights or buffers after epoch {epoch + 1}: {', '.join(bad[:3])}" + \
            (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        log.warning("%s: run diverged", reason)
        return {"epoch": epoch, "step": progress.step, "reason": reason}
    seconds = time.perf_counter() - tic
    progress.timing["train_seconds"] += seconds
    progress.timing["train_images"] += result["images"]
    # the default eval mode (every mode when eval.every_epoch) every eval.score_every epochs
    scored = (epoch + 1) % cfg.eval.score_every == 0 or epoch + 1 == cfg.optim.epochs
    test = evaluate_modes(run.model, run.data, run.pipe, cfg.eval, cfg.data.batch_size, cfg.seed,
                          modes=cfg.eval.modes if cfg.eval.every_epoch else (),
                          sampler=cfg.sampler).metrics if scored else {"test_loss": None, "test_acc": None}
    if scored:  # data.val_size: the validation split, scored as the test set is
        test.update(validation_metrics(run.model, run.data, run.pipe, cfg.eval, cfg.data.batch_size,
                                       cfg.seed, cfg.sampler))
    row = {"epoch": epoch, "step": progress.step, "lr": lr, "train_loss": result["loss"],
           "train_acc": result["acc"], "test_loss": test["test_loss"], "test_acc": test["test_acc"],
           "seconds": seconds, "images_per_s": result["images"] / seconds, **test}
    if cfg.eval.targets:  # steps to target: clean (eval-mode, un-augmented) training accuracy
        row["train_acc.clean"] = targets.clean_train_acc(run.model, run.data, run.pipe, cfg.eval.batch_size)
    progress.history.append(row)
    records.write_epoch(run.run_dir, row)
    run.tracker.log_epoch(row, progress.step)
    if scored:
        run.probes.end_epoch(progress.step, epoch)
    log.info("epoch %d/%d  loss %.3f  train %.1f%%  test %s  %.0f img/s", epoch + 1, cfg.optim.epochs,
             row["train_loss"], 100 * row["train_acc"],
             "-" if row["test_acc"] is None else f"{100 * row['test_acc']:.1f}%", row["images_per_s"])
    bar.epoch_done(epoch, row["images_per_s"])
    if cfg.checkpoint:
        progress.timing["wall"] = progress.prior_wall + time.time() - progress.started
        save_last(run.run_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                  generator=run.pipe.generator, epoch=epoch, step=progress.step, history=progress.history,
                  timing=progress.timing, config=to_dict(cfg))
    return None


def before_step(run: Session, step: int, epoch: int) -> None:
    """Before update ``step``: FrozenBN's precise re-estimate and freeze when due, then probes."""
    if step == run.freeze_at:
        ev = run.cfg.eval
        freeze_precisely(run.model, run.data.train, run.pipe, ev.precise_samples,
                         ev.precise_batch_size or run.cfg.data.batch_size, run.cfg.seed)
        log.info("FrozenBN: statistics re-estimated precisely and frozen before step %d", step)
    run.probes.maybe_record(step, epoch)


def summarize(run: Session, progress: Progress, diverged_at: Optional[dict],
              provenance: Optional[dict], bar: Optional[RunProgress] = None) -> dict:
    """Score every eval mode, save model.pt, write summary.json (the commit point), drop last.pt.
    Non-finite test outputs of the final evaluation make the run ``diverged`` too."""
    cfg = run.cfg

    def announce(mode: str, i: int, n: int) -> None:  # the final evaluation can take a while
        log.info("final evaluation: %s (%d/%d)", mode, i, n)
        if bar is not None:
            bar.stage(f"final eval: {mode} ({i}/{n})")

    final = None if diverged_at else final_metrics(run.model, run.data, run.pipe, cfg, run.run_dir, announce)
    metrics, skipped = (final.metrics, final.skipped) if final else ({}, {})
    if final:
        metrics.update(targets.steps_to(progress.history, cfg.eval.targets))
    if final and not math.isfinite(metrics.get("test_loss") or 0.0):
        diverged_at = {"epoch": progress.history[-1]["epoch"] if progress.history else cfg.optim.epochs - 1,
                       "step": progress.step,
                       "reason": "non-finite outputs in the final evaluation (test_loss)"}
        log.warning("%s: run diverged", diverged_at["reason"])
    status = "diverged" if diverged_at else "ok"
    if run.tuned:  # the source model scored on the target before fine-tuning (test_acc.before_finetune)
        metrics.update(run.tuned.metrics)
    timing = progress.timing
    summary = {
        "status": status, "metrics": metrics, "config": to_dict(cfg),
        "train_images_per_s": (timing["train_images"] / timing["train_seconds"]
                               if timing["train_seconds"] else None),
        "skipped_modes": skipped, "default_mode": cfg.eval.default_mode,
        "frozen_after": cfg.norm.freeze_after,
        # the step before which FrozenBN re-estimated and froze the statistics (None: it did not)
        "frozen_at_step": run.freeze_at if run.freeze_at is not None and progress.step > run.freeze_at else None,
        "error": None, "diverged_at": diverged_at,
        **stop_record(cfg, progress.history), "steps": progress.step,
        "resumed": progress.resumed, "finetune": run.tuned.info if run.tuned else None,
        # norm.groups as each GroupNorm width used it (the largest divisor <= norm.groups)
        "norm_groups_used": groups_used(run.model),
        # provenance: the entry point's ``overrides`` and ``choices``, commit, versions, times
        **records.provenance(progress.started, device=device_name(run.device), precision=run.precision,
                             wall_time_s=progress.prior_wall + time.time() - progress.started,
                             **(provenance or {})),
    }
    if cfg.checkpoint:
        save_model(run.run_dir, run.model, to_dict(cfg), run.data.num_classes, mean=run.pipe.mean, std=run.pipe.std)
    records.write_json_atomic(run.run_dir / records.SUMMARY, summary)
    run.tracker.log_probes(records.read_jsonl(run.run_dir / records.PROBES))
    run.tracker.log_summary(summary)
    run.tracker.close()
    clear_last(run.run_dir)
    return summary


def groups_used(model: torch.nn.Module) -> Optional[dict]:
    """``{channels: groups}`` of the model's GroupNorm layers (None without any): the record of
    what ``norm.groups`` became where it does not divide a layer's width."""
    used = {str(m.num_channels): m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    return used or None


def final_metrics(model, data: DataBundle, pipe: Pipeline, cfg: Config, run_dir=None,
                  on_mode=lambda mode, i, n: None) -> ModeResults:
    """The test set under every eval mode (``stats.evaluate_modes``: ``test_acc`` is the default
    mode's), train loss/accuracy on up to ``TRAIN_EVAL_MAX`` un-augmented training images scored
    under the same statistics as ``test_acc``, and ``gen_gap = train_acc - test_acc``; when the
    ``precise`` mode was scored, also ``train_acc.precise``, ``train_loss.precise`` and
    ``gen_gap.precise`` (train and test both under the precise statistics).

    Same statistics on both sides, so the gap measures memorization and not, say, the variance
    shift of dropout before BN (which lowers EMA-scored train and test accuracy alike).
    """
    modes = evaluate_modes(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed, run_dir=run_dir,
                           sampler=cfg.sampler, on_mode=on_mode)
    n = min(len(data.train.y), TRAIN_EVAL_MAX)
    train_as_test = dataclasses.replace(data, test=Split(data.train.x[:n], data.train.y[:n]))
    source = modes.extra["test_acc_from"]
    scored = {mode: run_mode(mode, model, train_as_test, pipe, cfg.eval, cfg.data.batch_size,
                             cfg.seed, cfg.sampler)[0]
              for mode in dict.fromkeys([source, "precise"]) if f"test_acc.{mode}" in modes.metrics}
    metrics = {"train_acc": scored[source]["acc"], "train_loss": scored[source]["loss"], **modes.metrics,
               **record_affine(model, run_dir),
               **record_corruptions(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed, run_dir)}
    metrics["gen_gap"] = scored[source]["acc"] - metrics["test_acc"]
    metrics.update(validation_metrics(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed, cfg.sampler))
    if "precise" in scored:
        metrics.update({"train_acc.precise": scored["precise"]["acc"],
                        "train_loss.precise": scored["precise"]["loss"],
                        "gen_gap.precise": scored["precise"]["acc"] - metrics["test_acc.precise"]})
    return modes._replace(metrics=metrics)

