"""One job of a run or sweep, from a composed config to its records (its lifecycle).

``run`` is what the entry point (``bnexp``) and ``bnexp.api.run`` do with a composed DictConfig:
resolve it, lock the run folder, skip a finished run in a sweep, parse the config into frozen
dataclasses, place the job on cores/GPUs and hand it to ``train.fit``. Whatever happens inside a
run becomes a record: a bad setting or an exception is written as a ``failed`` summary, and inside
a sweep the process carries on so that one bad run never loses the others. ``check_overrides``
checks override keys before anything is composed (the command line and ``api`` both call it).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnexp import records
from bnexp.config import ConfigError, check_override_key, parse_config, to_dict
from bnexp.jobs import launch

log = logging.getLogger("bnexp")


class RunLocked(RuntimeError):
    """A single run's folder is locked by another live process: nothing was run."""


def run(cfg: DictConfig) -> dict | None:
    """Run one job of a (possibly multi-) run; returns its summary, or None when skipped.

    The run folder is locked while the job works in it (``launch.run_lock``). In a sweep, a run
    that another live process is training is skipped, and so is a finished one (a failed one
    too, unless ``rerun_failed``), whose records are left untouched, ``.hydra/`` included
    (``launch.hydra_subdir`` tells Hydra not to write it; ``summary.json`` keeps the run's own
    ``overrides`` and ``choices`` as well). A single run raises what stopped it (after recording a
    ``failed`` summary; ``RunLocked`` when its folder is locked, with nothing written).
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    raw = OmegaConf.to_container(cfg, resolve=True)
    if sweeping and launch.launcher_kind(dict(hc.launcher)) == "joblib":
        launch.die_with_parent()  # a kill -9 of the sweep must not leave this worker training
    with launch.run_lock(run_dir) as held:
        if not held:
            return _locked_out(run_dir, sweeping)
        if sweeping and records.is_finished(run_dir, rerun_failed=bool(raw.get("rerun_failed"))):
            _log_skip(run_dir, raw, list(hc.job.config.override_dirname.exclude_keys))
            return None
        launcher = OmegaConf.to_container(hc.launcher, resolve=True)
        return _run_locked(run_dir, raw, sweeping, launcher, int(hc.job.get("num") or 0),
                           _provenance(hc))


def _provenance(hc) -> dict:
    """The run's command-line/sweep overrides and the config-group options it composed
    (``norm: dropout``), for its summary; Hydra's own groups (``hydra/...``) left out."""
    choices = OmegaConf.to_container(hc.runtime.choices, resolve=True)
    return {"overrides": list(hc.overrides.task),
            "choices": {k: v for k, v in choices.items() if not k.startswith("hydra/")}}


def _locked_out(run_dir: Path, sweeping: bool) -> None:
    holder = launch.lock_holder(run_dir)
    if sweeping:
        log.info("skip %s: another process is training it (lock held by %s)", run_dir.name, holder)
        return None
    raise RunLocked(f"{run_dir} is locked by another live process ({holder}): it is training "
                    "there; nothing was run")


def _log_skip(run_dir: Path, raw: dict, ignore: list[str]) -> None:
    summary = records.read_summary(run_dir)
    log.info("skip %s: already finished (%s)", run_dir.name, summary["status"])
    drift = launch.config_drift(_canonical(summary.get("config") or {}), _canonical(raw), ignore)
    if drift:
        log.warning("%s finished with a config that differs from today's composition in %s "
                    "(conf/ changed since?); its records keep the config it ran with. Delete the "
                    "folder to train it again.", run_dir.name, ", ".join(drift[:5]))


def _canonical(raw: dict) -> dict:
    """``raw`` as the run reads it (``to_dict(parse_config(raw))``): a key added to conf/ with a
    default since the run was recorded is not a difference; ``raw`` when it no longer parses."""
    try:
        return to_dict(parse_config(raw))
    except ConfigError:
        return raw


def _run_locked(run_dir: Path, raw: dict, sweeping: bool, launcher: dict, job_num: int,
                provenance: dict) -> dict | None:
    started = time.time()
    try:
        config = parse_config(raw)
    except ConfigError as err:
        return _record_failure(run_dir, raw, err, sweeping, started, provenance)
    from bnexp.training.fit import fit  # imported late: a bad setting should fail before torch is loaded

    try:
        gpus = launch.visible_gpus() if config.device != "cpu" else 0  # CPU runs touch no GPU
        launch.apply_placement(launch.place_job(launcher, job_num, config.threads,
                                                launch.available_cores(), gpus))
        summary = fit(config, run_dir, provenance)
    except Exception as err:  # every failure is a result: record it, keep the sweep going
        return _record_failure(run_dir, raw, err, sweeping, started, provenance)
    log.info("%s: %s  %s", run_dir, summary["status"], _headline(summary["metrics"]))
    return summary


def _record_failure(run_dir: Path, raw: dict, err: Exception, sweeping: bool, started: float,
                    provenance: dict) -> dict:
    """Write a ``failed`` summary for ``err`` (called while it is being handled); a single run
    then re-raises ``err``. Expected errors (a bad setting, missing data, no CUDA) keep their
    traceback in run.log only and are recorded as their message; anything else is recorded with
    its traceback."""
    expected = _is_expected(err)
    if expected:
        _log_to_file_only(f"run failed:\n{traceback.format_exc()}")
    else:
        log.error("run failed:\n%s", traceback.format_exc())
    error = f"{type(err).__name__}: {err}" if expected else traceback.format_exc()
    summary = {"status": "failed", "metrics": {}, "config": raw, "error": error,
               **records.provenance(started, **provenance)}
    if not sweeping and isinstance(err, ConfigError) and _drop_scratch_folder(run_dir, raw):
        raise err  # a rejected setting is not a result of a single run: no folder left behind
    from bnexp.training.checkpoint import ResumeRefused

    if isinstance(err, ResumeRefused):  # the folder holds another config's run: leave it as it is
        if not sweeping:
            raise err
        log.error("run %s not resumed: %s", run_dir.name, err)
        return summary
    try:
        records.write_json_atomic(run_dir / records.SUMMARY, summary)
    except OSError as write_err:  # a full disk: say so, and let the sweep go on
        log.error("run %s: its failed summary could not be written either (%s)", run_dir.name, write_err)
    if not sweeping:  # a single run reports the problem to its caller (the CLI: exit status)
        raise err
    log.error("run %s failed: %s (recorded; the sweep continues)", run_dir.name, str(err).splitlines()[0])
    return summary


def _drop_scratch_folder(run_dir: Path, raw: dict) -> bool:
    """Delete the automatic ``<results_dir>/scratch/<time>/`` folder of a single run that was
    rejected before it trained; True when done. Only a folder holding nothing but what this
    attempt wrote (``.hydra/``, ``run.log``, the lock) goes; a folder the user named stays."""
    scratch = (Path(str(raw.get("results_dir") or "results")) / "scratch").absolute()
    if run_dir.absolute().parent != scratch:
        return False
    if any(p.name not in (".hydra", "run.log", launch.LOCK) for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _is_expected(err: Exception) -> bool:
    """A bad setting (``ConfigError``, ``runtime.DeviceError`` among them), unusable data or
    checkpoint, or an ``OSError`` (disk full, permissions): recorded as its one-line message."""
    if isinstance(err, (ConfigError, OSError)):  # OSError: a full disk, a folder not writable
        return True
    from bnexp.data.datasets import DataError  # torch is loaded by now: only fit raises this
    from bnexp.training.checkpoint import CheckpointError

    return isinstance(err, (DataError, CheckpointError))


def _log_to_file_only(message: str) -> None:
    """Log ``message`` at ERROR to the file handlers (run.log) only, not to the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _headline(metrics: dict) -> str:
    keys = ("train_acc", "test_acc", "test_acc.precise", "test_acc.batch")
    return "  ".join(f"{k} {100 * metrics[k]:.1f}%" for k in keys if metrics.get(k) is not None)


def check_overrides(overrides: list[str]) -> None:
    """Raise ``ConfigError`` naming the allowed keys when a plain override (``optim.lrr=0.1``,
    ``sed=1``) sets a key that ``conf/config.yaml`` does not have. Hydra's own message ("Key
    'lrr' is not in struct") does not list them. ``+key``/``~key``, ``hydra.*``, group options
    and ``grid.*`` are left to Hydra, and so are overrides it would reject itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # malformed: Hydra reports it with its own message
        return
    groups = _config_groups()
    for ov in parsed:
        if ov.type == OverrideType.CHANGE and not ov.is_hydra_override() and ov.package is None:
            check_override_key(ov.key_or_group, groups)
        if ov.key_or_group in groups and ov.type != OverrideType.DEL:
            _check_group_option(ov)
        if ov.key_or_group in ("results_dir", "hydra.run.dir", "hydra.sweep.dir") \
                and not ov.is_sweep_override():
            _check_writable(ov.key_or_group, ov.get_value_element_as_str())


def _check_writable(key: str, value: str) -> None:
    """``ConfigError`` when folder ``value`` cannot be created or written (the nearest existing
    folder on its path is a file, or not writable): Hydra would fail creating the run folder
    with a traceback. Values with interpolations are left to Hydra."""
    if "${" in value:
        return
    path = Path(value).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"{key}={value} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value} is not writable: no write permission in {existing}")


def _check_group_option(ov) -> None:
    """``ConfigError`` naming the group and its options when ``norm=batchnorm`` (or a sweep
    ``norm=bn,batchnorm``) picks an option the group does not have: Hydra's own
    ``MissingConfigException`` prints a page and is not a ``ConfigError``."""
    try:
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
    except Exception:  # a range/interval sweep or an unusual value: Hydra judges it
        return
    allowed = _group_options(ov.key_or_group)
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{ov.key_or_group}={value} is not an option; allowed values: "
                              f"{', '.join(sorted(allowed))}")


def _group_options(group: str) -> set[str]:
    """The options of config group ``group``: its YAML files, without the suffix."""
    from importlib.resources import files

    return {p.name[:-len(".yaml")] for p in files("bnexp.conf").joinpath(group).iterdir()
            if p.name.endswith(".yaml")}


def _config_groups() -> set[str]:
    """The config groups of ``bnexp.conf``: its sub-folders that hold YAML files."""
    from importlib.resources import files

    return {p.name for p in files("bnexp.conf").iterdir()
            if p.is_dir() and any(q.name.endswith(".yaml") for q in p.iterdir())}
