"""Typed, frozen views of each config section.

The defaults live in ``conf/config.yaml`` (one place, with comments); these dataclasses give the
sections types and check them once, at the door. ``parse_config`` takes the plain ``dict`` that the
entry point resolves from Hydra and raises ``ConfigError`` naming the setting and the allowed values
for unknown keys, unknown choices and values out of range. Builders then take their own section.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A setting is unknown or has a value outside what bnexp accepts."""


DATASETS = ("synthetic", "cifar10", "cifar100", "fashion_mnist", "mnist")  # = bnexp.data.datasets.SPECS
SHIFTS = ("noise", "blur", "contrast", "brightness", "pixelate")  # = bnexp.data.corruptions.CORRUPTIONS
SAMPLERS = ("iid", "pk", "sorted", "dirichlet")
MODELS = ("vgg", "resnet")
NORMS = ("bn", "none", "gn", "ln", "ghost_bn", "batch_renorm", "noisy_bn", "pn", "pn_online")
DROPOUT_PLACEMENTS = ("before_norm", "after_norm", "classifier")
MODEL_INITS = ("kaiming", "lsuv")  # = bnexp.layers.init.INITS
GHOST_UPDATES = ("step", "chunk")  # = bnexp.layers.batchnorms.GHOST_UPDATES
SCHEDULES = ("cosine", "step", "constant")
EVAL_MODES = ("ema", "precise", "precise_bvar", "precise_sampler", "precise_sampler_bvar", "batch",
              "batch_sorted", "batch_sampler", "adapted")
PROBES = ("noise", "forward_noise", "grad_noise", "discrepancy", "calibration", "activations", "variance_shift",
          "weight_norm", "smoothness", "ics")
AFFINE = ("both", "gamma", "beta", "none")  # norm.affine: which of gamma, beta are learned
FINETUNE_BN = ("train", "frozen_stats", "frozen_all", "adapt")
LOGGERS = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class DataConfig:
    name: str
    # None: CIFAR and downloads use the folder ``data``; Fashion-MNIST is first looked for in the
    # Debian package's folder (bnexp.data.files). A folder: torchvision's layout under it, only.
    root: Optional[str]
    download: bool
    verify_checksums: bool
    batch_size: int
    train_size: Optional[int]
    test_size: Optional[int]
    classes: Optional[tuple[int, ...]]
    shift: Optional[str]
    shift_severity: int
    augment: bool
    synthetic_train: int
    synthetic_test: int
    synthetic_classes: int
    synthetic_seed: int
    label_noise: float
    # images carved from the training subset as a validation split (0 = none); a default, so
    # configs saved before the key existed still parse
    val_size: int = 0

    def check(self) -> None:
        _choice("data.name", self.name, DATASETS)
        _fail_if(not isinstance(self.val_size, int) or self.val_size < 0,
                 f"data.val_size={self.val_size!r} must be an integer >= 0 (0 = no validation split)")
        _positive(self, "data", "batch_size")
        _positive(self, "data", "train_size", "test_size", optional=True)
        if self.shift is not None:
            _choice("data.shift", self.shift, SHIFTS)
        _range("data.shift_severity", self.shift_severity, 1, 5)
        _positive(self, "data", "synthetic_train", "synthetic_test")
        _range("data.synthetic_classes", self.synthetic_classes, 2, 100)
        _fail_if(not 0.0 <= self.label_noise < 1.0, f"data.label_noise={self.label_noise} must be in [0, 1)")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"data.classes={list(self.classes)} has repeated labels")


@dataclass(frozen=True)
class SamplerConfig:
    name: str
    p: int       # pk: classes per group
    k: int       # pk: examples per class per group
    groups: int  # pk: P x K groups per batch, contiguous (batch = groups * p * k)
    alpha: float

    def check(self) -> None:
        _choice("sampler.name", self.name, SAMPLERS)
        _positive(self, "sampler", "p", "k", "groups")
        if self.groups != 1 and self.name != "pk":
            raise ConfigError(f"sampler.groups={self.groups} applies to sampler=pk only (class-sorted "
                              "groups: sampler=pk sampler.p=1); other samplers need sampler.groups=1")
        _fail_if(self.alpha <= 0, f"sampler.alpha={self.alpha} must be > 0")

    def check_batch(self, batch_size: int) -> None:
        """A P x K batch must add up: ``groups * p * k == batch_size`` (other samplers: no rule)."""
        if self.name == "pk" and self.p * self.k * self.groups != batch_size:
            raise ConfigError(
                f"sampler=pk needs sampler.p * sampler.k == data.batch_size / sampler.groups, got "
                f"{self.p} * {self.k} = {self.p * self.k} != {batch_size} / {self.groups}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    width: int
    depth: int
    dropout: float
    dropout_placement: str
    init: str = "kaiming"  # a default, so configs saved before the key existed still parse

    def check(self) -> None:
        _choice("model.name", self.name, MODELS)
        _choice("model.init", self.init, MODEL_INITS)
        _positive(self, "model", "width", "depth")
        _fail_if(not 0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _choice("model.dropout_placement", self.dropout_placement, DROPOUT_PLACEMENTS)


@dataclass(frozen=True)
class NormConfig:
    name: str
    # PyTorch convention: running = (1 - momentum) * running + momentum * batch; None: the
    # cumulative average over the batches seen (PyTorch's momentum=None)
    momentum: Optional[float]
    eps: float
    groups: int
    virtual_batch: int
    r_max: float
    d_max: float
    renorm_warmup: float
    renorm_r_ramp: float
    renorm_d_ramp: float
    noise_mean: float   # noisy_bn: n_mu, per-unit per-step shift mu_t ~ U(-n_mu, n_mu)
    noise_scale: float  # noisy_bn: n_sigma, per-unit per-step scale sigma_t ~ U(1, n_sigma)
    noise_mul: float    # noisy_bn: std of the per-sample jitter of the scale around sigma_t
    noise_add: float    # noisy_bn: std of the per-sample jitter of the shift around mu_t
    ghost_noise: Optional[int]  # ghost noise injection: ghost batch size N (None: off)
    freeze_after: Optional[float]
    # ghost_bn's running statistics: one update per step (chunk average) or per chunk (Hoffer's
    # bigBatch); a default, so configs saved before the key existed still parse
    ghost_update: str = "step"
    # which affine parameters learn: both | gamma | beta | none; the others stay at gamma = 1,
    # beta = 0 (buffers). A default, so configs saved before the key existed still parse
    affine: str = "both"

    def check(self) -> None:
        _choice("norm.name", self.name, NORMS)
        _choice("norm.ghost_update", self.ghost_update, GHOST_UPDATES)
        _choice("norm.affine", self.affine, AFFINE)
        if self.momentum is not None and not 0.0 < self.momentum <= 1.0:
            raise ConfigError(
                f"norm.momentum={self.momentum} must be in (0, 1] or null (PyTorch convention: "
                "running = (1 - momentum) * running + momentum * batch; Keras' 0.99 is 0.01 here; "
                "null: cumulative average)")
        _fail_if(self.eps <= 0, f"norm.eps={self.eps} must be > 0")
        _positive(self, "norm", "groups", "virtual_batch")
        _positive(self, "norm", "ghost_noise", optional=True)
        _fail_if(self.r_max < 1.0 or self.d_max < 0.0,
                 f"norm.r_max={self.r_max} must be >= 1 and norm.d_max={self.d_max} >= 0")
        _fail_if(self.noise_mean < 0 or self.noise_scale < 1,
                 f"norm.noise_mean={self.noise_mean} must be >= 0 and "
                 f"norm.noise_scale={self.noise_scale} >= 1 (U(-n_mu, n_mu), U(1, n_sigma))")
        _fail_if(self.noise_mul < 0 or self.noise_add < 0,
                 "norm.noise_mul and norm.noise_add are standard deviations: must be >= 0")
        for key in ("renorm_warmup", "renorm_r_ramp", "renorm_d_ramp"):
            value = getattr(self, key)
            _fail_if(not 0.0 <= value <= 1.0, f"norm.{key}={value} must be a fraction in [0, 1]")
        _fail_if(self.freeze_after is not None and not 0.0 <= self.freeze_after <= 1.0,
                 f"norm.freeze_after={self.freeze_after} must be a fraction of training in [0, 1]")


@dataclass(frozen=True)
class OptimConfig:
    name: str
    lr: float
    scale_lr: bool
    ref_batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    epochs: int
    schedule: str
    warmup_epochs: float
    milestones: tuple[float, ...]
    gamma: float
    label_smoothing: float
    grad_clip: Optional[float]
    # end training after the first epoch whose clean training accuracy (train_acc.clean, recorded
    # when eval.targets is on) is >= stop_at; optim.epochs is then the cap (None: train all epochs)
    stop_at: Optional[float] = None

    def check(self) -> None:
        _choice("optim.name", self.name, ("sgd",))
        _fail_if(self.stop_at is not None and not 0.0 < self.stop_at <= 1.0,
                 f"optim.stop_at={self.stop_at} must be an accuracy in (0, 1] or null (train every epoch)")
        _fail_if(not self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _positive(self, "optim", "ref_batch_size")
        _fail_if(not 0.0 <= self.momentum < 1.0, f"optim.momentum={self.momentum} must be in [0, 1)")
        _fail_if(self.weight_decay < 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _positive(self, "optim", "epochs")
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _fail_if(not 0.0 <= self.warmup_epochs <= self.epochs,
                 f"optim.warmup_epochs={self.warmup_epochs} must be in [0, optim.epochs]")
        _fail_if(not 0.0 <= self.label_smoothing < 1.0,
                 f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _fail_if(self.grad_clip is not None and self.grad_clip <= 0,
                 f"optim.grad_clip={self.grad_clip} must be > 0 or null")
        _fail_if(not self.gamma > 0, f"optim.gamma={self.gamma} must be > 0 (the step schedule "
                 "multiplies the lr by gamma at each milestone; <= 0 would make it zero or negative)")
        _fail_if(any(not 0.0 < m < 1.0 for m in self.milestones),
                 f"optim.milestones={list(self.milestones)} must be fractions of training in (0, 1)")

    def effective_lr(self, batch_size: int) -> float:
        """The peak learning rate, after the linear scaling rule when ``scale_lr`` is on."""
        return self.lr * batch_size / self.ref_batch_size if self.scale_lr else self.lr


@dataclass(frozen=True)
class EvalConfig:
    modes: tuple[str, ...]
    default_mode: str
    every_epoch: bool
    batch_size: int
    precise_samples: int
    precise_batch_size: Optional[int]
    adapt_samples: Optional[int]
    # running averages at more momenta, kept beside BN's own and scored as modes ema_m<m>
    # (bnexp/layers/ema_shadows.py); a default, so configs saved before the key existed still parse
    ema_momenta: tuple[Optional[float], ...] = ()
    # the test set is scored (and the per-epoch probes run) after every k-th epoch and after the
    # last; a default, so configs saved before the key existed still parse
    score_every: int = 1
    # robustness: the trained model scored on corrupted test sets (bnexp/measure/robustness.py);
    # defaults, so configs saved before the keys existed still parse
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    # steps to target (bnexp/training/targets.py): accuracies whose first step is recorded
    targets: tuple[float, ...] = (0.5, 0.8, 0.9, 0.99)

    def check(self) -> None:
        _fail_if(any(not 0.0 < t <= 1.0 for t in self.targets),
                 f"eval.targets={list(self.targets)} must be accuracies in (0, 1]")
        _positive(self, "eval", "score_every")
        for name in self.corruptions:
            _choice("eval.corruptions", name, SHIFTS)
        for severity in self.severities:
            _range("eval.severities", severity, 1, 5)
        for m in self.ema_momenta:
            _fail_if(m is not None and not 0.0 < m <= 1.0, f"eval.ema_momenta: {m} must be in (0, 1] or "
                     "null (the cumulative average), as norm.momentum")
        for mode in self.modes:
            _choice("eval.modes", mode, EVAL_MODES)
        _choice("eval.default_mode", self.default_mode, EVAL_MODES)
        _positive(self, "eval", "batch_size", "precise_samples")
        _positive(self, "eval", "precise_batch_size", "adapt_samples", optional=True)


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool
    every_steps: int
    names: tuple[str, ...]
    noise_sizes: tuple[int, ...]
    noise_batches: int
    layer: Optional[str]
    unit: Optional[int]
    # smoothness: the step sizes eta of w - eta * g; a default, so configs saved before it parse
    etas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)

    def check(self) -> None:
        _fail_if(not self.etas or any(not e > 0 for e in self.etas),
                 f"probes.etas={list(self.etas)} must be a non-empty list of step sizes > 0")
        for name in self.names:
            _choice("probes.names", name, PROBES)
        _fail_if(self.every_steps < 0,
                 f"probes.every_steps={self.every_steps} must be >= 0 (0 = once per epoch)")
        for size in self.noise_sizes:
            _range("probes.noise_sizes", size, 2, 1 << 20)
        _range("probes.noise_batches", self.noise_batches, 2, 1 << 20)
        _fail_if(self.unit is not None and (not isinstance(self.unit, int) or self.unit < 0),
                 f"probes.unit={self.unit!r} must be a channel index >= 0 or null")


@dataclass(frozen=True)
class FinetuneConfig:
    # YAML key `from` (a Python keyword) maps to this field; see parse_config.
    from_: Optional[str]
    bn: str
    reinit_head: Any  # "auto" | True | False
    # the fine-tune runs at seed + seed_offset (``seed`` may also name the source run); a default,
    # so configs saved before the key existed still parse
    seed_offset: int = 0

    def check(self) -> None:
        _choice("finetune.bn", self.bn, FINETUNE_BN)
        _fail_if(not isinstance(self.seed_offset, int) or self.seed_offset < 0,
                 f"finetune.seed_offset={self.seed_offset!r} must be an integer >= 0")
        _fail_if(self.reinit_head not in ("auto", True, False),
                 f"finetune.reinit_head={self.reinit_head!r}: allowed values are auto, true, false")


@dataclass(frozen=True)
class Config:
    seed: int
    device: str
    precision: str
    channels_last: bool
    compile: bool
    threads: int
    checkpoint: bool
    rerun_failed: bool
    progress: str
    logger: str
    results_dir: str
    study_name: str
    scale_name: str
    grid: dict
    data: DataConfig
    sampler: SamplerConfig
    model: ModelConfig
    norm: NormConfig
    optim: OptimConfig
    eval: EvalConfig
    probes: ProbeConfig
    finetune: FinetuneConfig

    def check(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("progress", self.progress, ("auto", "on", "off"))
        _choice("logger", self.logger, LOGGERS)
        _fail_if(self.threads < 0, f"threads={self.threads} must be >= 0 (0 = torch's default)")
        for section in SECTIONS:
            getattr(self, section).check()
        self.sampler.check_batch(self.data.batch_size)
        _fail_if(self.optim.stop_at is not None and not self.eval.targets,
                 f"optim.stop_at={self.optim.stop_at} reads train_acc.clean, which eval.targets=[] turns "
                 "off: give eval.targets a level, or set optim.stop_at=null")


SECTIONS = {
    "data": DataConfig, "sampler": SamplerConfig, "model": ModelConfig, "norm": NormConfig,
    "optim": OptimConfig, "eval": EvalConfig, "probes": ProbeConfig, "finetune": FinetuneConfig,
}
_RENAMED = {("finetune", "from"): "from_"}
_YAML_KEYS = {(section, attr): key for (section, key), attr in _RENAMED.items()}
_hints = functools.cache(typing.get_type_hints)  # a dataclass's field types, resolved once


def parse_config(raw: dict) -> Config:
    """Build and check a ``Config`` from a plain, fully resolved dict (Hydra's composed config).

    Every value must have its field's type (an int is accepted as a float); a wrong one raises
    ``ConfigError`` naming the setting, the value and the type, before any range check runs.
    """
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    top = {f.name for f in fields(Config)} - set(SECTIONS)
    _reject_unknown(raw, top | set(SECTIONS))
    hints = _hints(Config)
    kwargs = {k: _typed(k, raw[k], hints[k]) for k in top if k in raw}
    _require("", kwargs, top)
    for name, cls in SECTIONS.items():
        kwargs[name] = _section(name, cls, raw.get(name) or {})
    cfg = Config(**kwargs)
    cfg.check()
    return cfg


def to_dict(cfg: Config) -> dict:
    """The inverse of ``parse_config``: plain JSON-able dict with the YAML key names."""
    out = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as in the YAML
    for (section, key), attr in _RENAMED.items():
        out[section][key] = out[section].pop(attr)
    return out


def check_override_key(dotted: str, groups=()) -> None:
    """Raise ``ConfigError`` when ``dotted`` (``optim.lrr``, ``sed``) names no setting and no
    config group of ``groups``. The entry point checks plain command-line overrides with this
    before Hydra composes, so they fail listing the allowed keys, as in ``parse_config``.
    Keys below other top-level keys (``grid.*``) are free."""
    section, _, rest = dotted.partition(".")
    if section in SECTIONS and rest:
        _section_attr(section, rest.split(".")[0])
    elif not rest:
        _reject_unknown([section], {f.name for f in fields(Config)} | set(groups))


def _section(name: str, cls: type, raw: dict):
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        attr = _section_attr(name, key)
        values[attr] = _typed(f"{name}.{key}", value, hints[attr])
    # a field with a default was added later: configs saved before it parse with the default
    _require(name + ".", values, {f.name for f in fields(cls) if f.default is dataclasses.MISSING})
    return cls(**values)


def _section_attr(name: str, key: str) -> str:
    """The dataclass field of YAML key ``key`` in section ``name``; unknown keys are an error."""
    attr = _RENAMED.get((name, key), key)
    known = {f.name for f in fields(SECTIONS[name])}
    if attr not in known:
        allowed = sorted(_YAML_KEYS.get((name, f), f) for f in known)
        raise ConfigError(f"unknown setting {name}.{key}; allowed keys in {name}: {', '.join(allowed)}")
    return attr


def _typed(key: str, value, hint):
    """``value`` as field type ``hint`` wants it (lists become tuples, ints in float fields
    floats), or ``ConfigError`` naming the setting, the value and the expected type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, float) and not math.isfinite(value):
        # every float setting is a rate, size or scale: nan/inf would pass the range checks
        # (nan compares False) and turn into a diverged or silently odd run
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if hint is Any:
        return tuple(value) if isinstance(value, list) else value
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        try:
            return _typed(key, value, inner)
        except ConfigError:
            if typing.get_origin(inner) is tuple:
                raise  # it names the item at fault
            raise _wrong_type(key, value, hint) from None
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, value, hint)
        item = args[0] if args else Any
        return tuple(_typed(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, origin or hint):
        raise _wrong_type(key, value, hint)
    return value


def _wrong_type(key: str, value, hint) -> ConfigError:
    return ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(hint)}, "
                       f"got {type(value).__name__}")


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple or hint is tuple:
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "a boolean (true/false)",
             str: "a string (quote digits: key='1')", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _reject_unknown(keys, allowed: set) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}; allowed top-level keys: {', '.join(sorted(allowed))}")


def _require(prefix: str, values: dict, needed: set) -> None:
    missing = sorted(needed - set(values))
    if missing:
        raise ConfigError(f"missing setting {prefix}{missing[0]} (conf/config.yaml defines every key)")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not an option; allowed values: {', '.join(map(str, allowed))}")


def _fail_if(failed: bool, message: str) -> None:
    if failed:
        raise ConfigError(message)


def _positive(section_cfg, section: str, *keys: str, optional: bool = False) -> None:
    """Each field ``keys`` of ``section_cfg`` is a positive integer (or None, when ``optional``)."""
    for key in keys:
        value = getattr(section_cfg, key)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{key}={value!r} must be a positive integer")


def _range(key: str, value, lo, hi) -> None:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key}={value!r} must be an integer in [{lo}, {hi}]")


def config_diff(a: dict, b: dict, ignore=()) -> dict[str, tuple]:
    """``{dotted key: (value in a, value in b)}`` for every leaf whose values differ between two
    nested config dicts (a key missing on one side reads as None), leaving out ``ignore``'s keys
    and everything under them. Tuples compare as lists (a parsed config against its YAML)."""
    fa, fb = _flatten(a), _flatten(b)
    ignored = tuple(ignore)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and not any(k == i or k.startswith(i + ".") for i in ignored)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out
