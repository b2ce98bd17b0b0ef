"""``fit()``: build the model, train it, evaluate it, and record everything in the run folder."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import finetune, loggers, records
from .checkpoint import clear_last, load_last, save_last, save_model
from .config import Config, OptimConfig, to_dict
from .data import DataBundle, Pipeline, Split, load_data, spec
from .models import build_model
from .norms import make_norm, set_progress
from .probes import Probes
from .progress import RunProgress
from .runtime import (device_name, resolve_device, resolve_precision, seed_everything,
                      set_threads)
from .sampling import build_sampler
from .stats import ModeResults, evaluate_modes, run_mode

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


def train_epoch(model, optimizer, scheduler, data: DataBundle, batches, pipe: Pipeline,
                cfg: Config, first_step: int, total_steps: int,
                probe: Callable[[int], None] = lambda step: None) -> dict:
    """One pass over ``batches``. Returns running loss/acc, or ``diverged`` on a non-finite loss.
    ``probe(step)`` runs before each update (``Probes.maybe_record``: a no-op unless due)."""
    model.train()
    device = pipe.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, idx in enumerate(batches):
        probe(first_step + i)
        set_progress(model, (first_step + i) / total_steps)
        idx = idx.to(device, non_blocking=True)
        x = pipe.prep(data.train.x.index_select(0, idx), train=True)
        y = data.train.y.index_select(0, idx)
        with pipe.amp():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
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


def build(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The model of ``cfg`` for the input shape of ``cfg.data`` (``data.SPECS``: the shape
    ``load_data`` checks its images against) on ``device``, seeded, in channels_last when asked."""
    shape = spec(cfg.data.name)
    model = build_model(cfg.model, make_norm(cfg.norm), num_classes, shape.channels, shape.size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def fit(cfg: Config, run_dir: Path, provenance: dict | None = None) -> dict:
    """Train one model as ``cfg`` says and write its records into ``run_dir``; return the summary.

    A non-finite training loss ends the run with status ``diverged`` (a result, not an error).
    Exceptions propagate; the entry point records them as ``failed``.
    """
    run_dir = Path(run_dir)
    started = time.time()
    cfg, source = finetune.resolve(cfg)  # with finetune.from: the source run's model/norm sections
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, device, seed=cfg.seed)
    sampler = build_sampler(cfg.sampler, data.train.y.cpu(), cfg.data.batch_size, cfg.seed)
    model = build(cfg, data.num_classes, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    pipe = Pipeline(device, precision, data.mean, data.std, cfg.channels_last, cfg.data.augment, generator, data.pad, data.flip)
    # source weights, source input normalization, BN mode; before the optimizer sees the params
    tuned = finetune.start(model, source, cfg, data, pipe) if source else None
    optimizer = make_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, len(sampler)))
    forward = torch.compile(model) if cfg.compile else model
    probes = Probes(cfg.probes, model, data, pipe, cfg.data.batch_size, cfg.seed, run_dir,
                    lambda: optimizer.param_groups[0]["lr"], cfg.eval.batch_size)
    total_steps = cfg.optim.epochs * len(sampler)
    log.info("%s on %s, %s, %d train / %d test images, %d steps per epoch", cfg.model.name,
             device_name(device), precision, len(data.train.y), len(data.test.y), len(sampler))

    resumed = load_last(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        generator=generator) if cfg.checkpoint else None
    history = resumed["history"] if resumed else []
    timing = resumed["timing"] if resumed else {"train_seconds": 0.0, "train_images": 0, "wall": 0.0}
    step = resumed["step"] if resumed else 0
    start_epoch = resumed["epoch"] + 1 if resumed else 0
    prior_wall = timing["wall"]  # wall time spent before an interruption counts too
    if resumed:
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    else:  # a fresh start must not append to the rows of an attempt killed before its checkpoint
        (run_dir / records.METRICS).unlink(missing_ok=True)
    bar = RunProgress(cfg.progress, cfg.optim.epochs, len(sampler), cfg.data.batch_size)
    tracker = loggers.make(cfg.logger, run_dir, step)
    status, diverged_at = "ok", None
    for epoch in range(start_epoch, cfg.optim.epochs):
        tic = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        result = train_epoch(forward, optimizer, scheduler, data, bar.track(sampler.batches(epoch), epoch),
                             pipe, cfg, step, total_steps, probe=lambda at: probes.maybe_record(at, epoch))
        step = result["step"]
        if result["diverged"]:
            status, diverged_at = "diverged", {"epoch": epoch, "step": step}
            log.warning("non-finite loss in epoch %d (by step %d): run diverged", epoch, step)
            break
        seconds = time.perf_counter() - tic
        timing["train_seconds"] += seconds
        timing["train_images"] += result["images"]
        # the default eval mode every epoch; every mode when eval.every_epoch (see stats)
        test = evaluate_modes(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed,
                              modes=cfg.eval.modes if cfg.eval.every_epoch else ()).metrics
        row = {"epoch": epoch, "step": step, "lr": lr, "train_loss": result["loss"],
               "train_acc": result["acc"], "test_loss": test["test_loss"], "test_acc": test["test_acc"],
               "seconds": seconds, "images_per_s": result["images"] / seconds, **test}
        history.append(row)
        records.write_epoch(run_dir, row)
        tracker.log_epoch(row, step)
        probes.end_epoch(step, epoch)
        log.info("epoch %d/%d  loss %.3f  train %.1f%%  test %.1f%%  %.0f img/s", epoch + 1,
                 cfg.optim.epochs, row["train_loss"], 100 * row["train_acc"], 100 * row["test_acc"],
                 row["images_per_s"])
        bar.epoch_done(epoch, row["images_per_s"])
        if cfg.checkpoint:
            timing["wall"] = prior_wall + time.time() - started
            save_last(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      generator=generator, epoch=epoch, step=step, history=history, timing=timing)
    bar.close()

    final = final_metrics(model, data, pipe, cfg, run_dir) if status != "diverged" else None
    metrics, skipped = (final.metrics, final.skipped) if final else ({}, {})
    if tuned:  # the source model scored on the target before fine-tuning (test_acc.before_finetune)
        metrics.update(tuned.metrics)
    summary = {
        "status": status, "metrics": metrics, "config": to_dict(cfg),
        "train_images_per_s": (timing["train_images"] / timing["train_seconds"]
                               if timing["train_seconds"] else None),
        "skipped_modes": skipped, "default_mode": cfg.eval.default_mode,
        "frozen_after": cfg.norm.freeze_after, "error": None, "diverged_at": diverged_at,
        "resumed": bool(resumed), "finetune": tuned.info if tuned else None,
        # provenance: the entry point's ``overrides`` and ``choices``, commit, versions, times
        **records.provenance(started, device=device_name(device), precision=precision,
                             wall_time_s=prior_wall + time.time() - started, **(provenance or {})),
    }
    if cfg.checkpoint:
        save_model(run_dir, model, to_dict(cfg), data.num_classes, mean=pipe.mean, std=pipe.std)
    records.write_json_atomic(run_dir / records.SUMMARY, summary)
    tracker.log_probes(records.read_jsonl(run_dir / records.PROBES))
    tracker.log_summary(summary)
    tracker.close()
    clear_last(run_dir)
    return summary


def final_metrics(model, data: DataBundle, pipe: Pipeline, cfg: Config, run_dir=None) -> ModeResults:
    """The test set under every eval mode (``stats.evaluate_modes``: ``test_acc`` is the default
    mode's), train loss/accuracy on up to ``TRAIN_EVAL_MAX`` un-augmented training images scored
    under the same statistics as ``test_acc``, and ``gen_gap = train_acc - test_acc``.

    Same statistics on both sides, so the gap measures memorization and not, say, the variance
    shift of dropout before BN (which lowers EMA-scored train and test accuracy alike).
    """
    modes = evaluate_modes(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed, run_dir=run_dir)
    n = min(len(data.train.y), TRAIN_EVAL_MAX)
    train_as_test = dataclasses.replace(data, test=Split(data.train.x[:n], data.train.y[:n]))
    train, _ = run_mode(modes.extra["test_acc_from"], model, train_as_test, pipe, cfg.eval,
                        cfg.data.batch_size, cfg.seed)
    metrics = {"train_acc": train["acc"], "train_loss": train["loss"], **modes.metrics}
    metrics["gen_gap"] = train["acc"] - metrics["test_acc"]
    return modes._replace(metrics=metrics)
