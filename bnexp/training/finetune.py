"""Fine-tuning a finished run on different data, with a chosen BN treatment.

``finetune.from=<run dir>`` starts from that run's ``model.pt`` and trains on the data of the
current config (a class subset ``data.classes=[5,6,7,8,9]`` or a corruption ``data.shift=noise``).
``fit`` calls ``resolve`` once, first, and ``start`` once, after building the model and before
building the optimizer; nothing else in the loop changes.

What a fine-tune run takes from its source, and why:

* the ``model`` and ``norm`` sections (the architecture the weights belong to). When the
  command line says otherwise, the source's win and the run logs a warning and records the
  differences under ``summary["finetune"]["config_differs"]``; the summary's ``config`` is the
  one actually trained. Exception: ``norm.freeze_after`` is fine-tuning behaviour, so it comes
  from the current config (and must be null unless ``finetune.bn=train``: the BN mode decides
  freezing);
* the input normalization (mean/std): it is part of the trained function. Recomputing it on the
  target would silently undo a contrast or brightness shift before the network sees it.

``finetune.bn``:

* ``train``: BN as in ordinary training (batch statistics, running statistics and affine update);
* ``frozen_stats``: BN normalizes with the source's running statistics and keeps them (FrozenBN,
  the layers' ``frozen`` flag), its affine parameters train;
* ``frozen_all``: as ``frozen_stats``, and BN weight and bias are frozen too (requires_grad False);
* ``adapt``: first re-estimate the statistics on the target training images (AdaBN, Li et al. 2016:
  BN in train mode, momentum off, ``eval.precise_samples`` images at ``eval.precise_batch_size``),
  then fine-tune as ``frozen_stats``, i.e. with population statistics of the target. Wu & Johnson
  2021 (Sec. 5) recommend population statistics of the target domain over batch statistics under
  shift, and frozen statistics avoid the small-batch noise that hurts train-mode BN; re-estimating
  again after training is the run's ``precise`` eval mode.

The head is re-initialised (kept from ``build``'s seeded init) when ``finetune.reinit_head`` is
true, or ``auto`` and the label set differs from the source's (number of classes, dataset,
``data.classes``, or the synthetic label space). When the head is kept, the source model is also
scored on the target before any training: ``test_acc.before_finetune`` (source statistics) and
``test_acc.before_finetune.adapted`` (statistics re-estimated on target training images, no
training): the "eval only" rows of the finetune study.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnexp import records
from bnexp.training.checkpoint import load_model_state
from bnexp.config import Config, ConfigError, DataConfig, parse_config, to_dict
from bnexp.data.datasets import load_data
from bnexp.measure.moments import input_batches, precise_bn, preserved
from bnexp.layers.norms import BatchNorm2d, bn_layers
from bnexp.measure.modes import evaluate

log = logging.getLogger(__name__)
NO_RUNNING_STATS = ("none", "gn", "ln")
HEAD = "head."


@dataclass(frozen=True)
class Source:
    """A finished run to start from: its final weights and the config that made them."""
    run_dir: Path
    state: dict                     # model state_dict (CPU tensors)
    config: Config
    num_classes: int
    mean: Optional[list]            # input normalization, when model.pt stored it
    std: Optional[list]
    config_differs: dict            # "section.key" -> {"given": ..., "source": ...}


@dataclass
class Started:
    """What ``start`` did: ``info`` goes to ``summary["finetune"]``, ``metrics`` into the metrics."""
    info: dict
    metrics: dict


def resolve(cfg: Config) -> tuple[Config, Optional[Source]]:
    """The config to train and the source run, or ``(cfg, None)`` without ``finetune.from``.
    With ``finetune.from``, the config's ``seed`` becomes ``seed + finetune.seed_offset``.

    Raises ``FileNotFoundError`` when the source has no model.pt and ``ConfigError`` for settings
    that contradict the BN mode.
    """
    if cfg.finetune.from_ is None:
        return cfg, None
    run_dir = Path(cfg.finetune.from_)
    state = load_model_state(run_dir)
    try:
        source_cfg = parse_config(state["config"])
    except ConfigError as err:
        raise ConfigError(f"finetune.from={run_dir}: its saved config does not parse ({err})") from err
    _check_bn_mode(cfg, source_cfg)
    norm = dataclasses.replace(source_cfg.norm, freeze_after=cfg.norm.freeze_after)
    differs = _differences(cfg, source_cfg)
    if differs:
        ignored = ", ".join(f"{k}={v['given']} (source: {v['source']})" for k, v in differs.items())
        log.warning("finetune: model/norm come from the source run %s; ignoring %s", run_dir, ignored)
    source = Source(run_dir, state["model"], source_cfg, state["num_classes"], state.get("mean"),
                    state.get("std"), differs)
    # finetune.seed_offset: the fine-tune draws its own randomness, not the source run's seed's
    return dataclasses.replace(cfg, model=source_cfg.model, norm=norm,
                               seed=cfg.seed + cfg.finetune.seed_offset), source


def start(model: nn.Module, source: Source, cfg: Config, data, pipe) -> Started:
    """Load the source weights into ``model`` (built from the resolved config) and set up BN.

    Sets ``data.mean/std`` and ``pipe.mean/std`` to the source's input normalization, scores the
    source model on the target when its head is kept, then applies ``cfg.finetune.bn``. Every
    bnexp BN layer then has ``freeze_after=None`` in the frozen modes, so neither ``model.train()``
    nor ``set_progress`` unfreezes it during training.
    """
    mean, std = source_normalization(source, pipe.device)
    data.mean, data.std, pipe.mean, pipe.std = mean, std, mean, std
    reinit = reinit_head(cfg.finetune.reinit_head, source, cfg.data, data.num_classes)
    load_source_weights(model, source.state, reinit)
    metrics = {} if reinit else score_before(model, data, pipe, cfg)
    if cfg.finetune.bn == "adapt":
        reestimate(model, data, pipe, cfg)
    apply_bn_mode(model, cfg.finetune.bn)
    info = {"from": str(source.run_dir), "bn": cfg.finetune.bn, "head_reinitialised": reinit,
            "source_git_commit": (records.read_summary(source.run_dir) or {}).get("git_commit"),
            "source_study": source.config.study_name,
            "source_overrides": records.read_overrides(source.run_dir),
            "source_data": _data_brief(source.config.data), "config_differs": source.config_differs}
    log.info("finetune from %s: bn=%s, head %s", source.run_dir, cfg.finetune.bn,
             "re-initialised" if reinit else "kept")
    return Started(info, metrics)


def reinit_head(setting, source: Source, target: DataConfig, num_classes: int) -> bool:
    """Whether the head starts fresh; ``ConfigError`` when kept but of the wrong size."""
    changed = num_classes != source.num_classes or _label_space(target) != _label_space(source.config.data)
    reinit = changed if setting == "auto" else bool(setting)
    if not reinit and num_classes != source.num_classes:
        raise ConfigError(f"finetune.reinit_head=false, but the target has {num_classes} classes and "
                          f"the source head {source.num_classes}; use reinit_head=auto or true")
    return reinit


def load_source_weights(model: nn.Module, state: dict, reinit_head: bool) -> None:
    """Copy every source tensor into ``model``; with ``reinit_head`` the ``head.*`` ones are
    skipped and the model keeps its own fresh head. Any other mismatch is an error."""
    keep = {k: v for k, v in state.items() if not (reinit_head and k.startswith(HEAD))}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not (reinit_head and k.startswith(HEAD))]
    if missing or unexpected:
        raise RuntimeError(f"source weights do not fit the model: missing {missing}, unexpected {unexpected}")


def apply_bn_mode(model: nn.Module, mode: str) -> None:
    """Freeze BN statistics (and affine for ``frozen_all``) as ``mode`` says; ``train`` does nothing."""
    if mode == "train":
        return
    layers = bn_layers(model)
    if not layers:
        raise ConfigError(f"finetune.bn={mode} needs BN layers, and this model has none: its norm "
                          "keeps no running statistics (use finetune.bn=train)")
    for name, m in layers:
        if not isinstance(m, BatchNorm2d):
            raise TypeError(f"{name} is a {type(m).__name__}, which has no FrozenBN switch")
        m.freeze_after, m.frozen = None, True
        if mode == "frozen_all":
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)


@torch.no_grad()
def score_before(model: nn.Module, data, pipe, cfg: Config) -> dict:
    """The source model on the target test set, with source statistics and with AdaBN ones
    (re-estimated on target training images); ``model`` is left as it was."""
    model.eval()
    plain = evaluate(model, data.test.x, data.test.y, pipe, cfg.eval.batch_size)
    metrics = {"test_acc.before_finetune": plain["acc"], "test_loss.before_finetune": plain["loss"]}
    if not bn_layers(model):  # nothing to re-estimate: the adapted row would repeat the plain one
        return metrics
    with preserved(model):
        reestimate(model, data, pipe, cfg)
        adapted = evaluate(model, data.test.x, data.test.y, pipe, cfg.eval.batch_size)
    return {**metrics, "test_acc.before_finetune.adapted": adapted["acc"],
            "test_loss.before_finetune.adapted": adapted["loss"]}


def reestimate(model: nn.Module, data, pipe, cfg: Config) -> None:
    """AdaBN: set BN running statistics to the population statistics of the target's training
    images, by the ``precise`` eval mode's pass and settings (``eval.precise_samples`` augmented
    images in batches of ``eval.precise_batch_size``, default ``data.batch_size``). Restores the
    training flags, momentum and FrozenBN flags that pass changes; keeps the new statistics."""
    saved = [(m, m.training, getattr(m, "momentum", None), getattr(m, "frozen", None))
             for m in model.modules()]
    inputs = input_batches(data.train, cfg.eval.precise_samples,
                           cfg.eval.precise_batch_size or cfg.data.batch_size, pipe, cfg.seed,
                           "finetune.adapt", augment=True)
    precise_bn(model, inputs, pipe)
    for m, training, momentum, frozen in saved:
        m.training = training
        if isinstance(m, _BatchNorm):
            m.momentum = momentum
        if frozen is not None:
            m.frozen = frozen


def source_normalization(source: Source, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's input mean/std: stored in model.pt, or recomputed from its data config
    (exact for runs that were not themselves fine-tuned)."""
    if source.mean is not None:
        mean, std = source.mean, source.std
    else:
        bundle = load_data(source.config.data, "cpu", seed=source.config.seed)
        mean, std = bundle.mean, bundle.std
    return (torch.as_tensor(mean, dtype=torch.float32, device=device),
            torch.as_tensor(std, dtype=torch.float32, device=device))


def _check_bn_mode(cfg: Config, source: Config) -> None:
    """The frozen modes need running statistics, and they alone decide freezing."""
    mode = cfg.finetune.bn
    if mode != "train" and cfg.norm.freeze_after is not None:
        raise ConfigError(f"norm.freeze_after={cfg.norm.freeze_after} conflicts with finetune.bn="
                          f"{mode}, which freezes BN from the start; leave it null")
    if mode != "train" and source.norm.name in NO_RUNNING_STATS:
        raise ConfigError(f"finetune.bn={mode} needs BN running statistics, and the source run uses "
                          f"norm={source.norm.name}, which keeps none; use finetune.bn=train")


def _label_space(data: DataConfig) -> tuple:
    """What the labels mean: the dataset, the class subset, and for synthetic data its classes
    and prototypes (``synthetic_seed``). Shifts and subset sizes keep the label space."""
    synthetic = (data.synthetic_classes, data.synthetic_seed) if data.name == "synthetic" else None
    classes = tuple(data.classes) if data.classes is not None else None
    return data.name, classes, synthetic


def _differences(cfg: Config, source: Config) -> dict:
    given, src = to_dict(cfg), to_dict(source)
    return {f"{section}.{key}": {"given": given[section][key], "source": src[section][key]}
            for section in ("model", "norm") for key in given[section]
            if key != "freeze_after" and given[section][key] != src[section][key]}


def _data_brief(data: DataConfig) -> dict:
    return {"name": data.name, "classes": list(data.classes) if data.classes else None,
            "shift": data.shift, "shift_severity": data.shift_severity if data.shift else None}
