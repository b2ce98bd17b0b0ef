"""The Hydra entry point: ``bnexp [overrides]`` runs once, ``bnexp -m [overrides]`` sweeps.

This is the only module that sees a DictConfig. It resolves the config, parses it into frozen
dataclasses, and hands them to ``train.fit``. Whatever happens inside a run becomes a record: a
bad setting or an exception is written as a ``failed`` summary, and inside a sweep the process
carries on so that one bad run never loses the others.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import launch, records
from .config import ConfigError, parse_config

log = logging.getLogger("bnexp")


def run(cfg: DictConfig) -> dict | None:
    """Run one job of a (possibly multi-) run; returns its summary, or None when skipped.

    The run folder is locked while the job works in it (``launch.run_lock``): a run that another
    live process is training is skipped, and so, in a sweep, is a finished one (a failed one too,
    unless ``rerun_failed``), whose records are left untouched. Hydra has already rewritten its
    ``.hydra/`` by then; see README "Sweeps" for why that is harmless.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    raw = OmegaConf.to_container(cfg, resolve=True)
    with launch.run_lock(run_dir) as held:
        if not held:
            log.info("skip %s: another process is training it (lock held by %s)", run_dir.name,
                     launch.lock_holder(run_dir))
            return None
        if sweeping and records.is_finished(run_dir, rerun_failed=bool(raw.get("rerun_failed"))):
            _log_skip(run_dir, raw, list(hc.job.config.override_dirname.exclude_keys))
            return None
        launcher = OmegaConf.to_container(hc.launcher, resolve=True)
        return _run_locked(run_dir, raw, sweeping, launcher, int(hc.job.get("num") or 0))


def _log_skip(run_dir: Path, raw: dict, ignore: list[str]) -> None:
    summary = records.read_summary(run_dir)
    log.info("skip %s: already finished (%s)", run_dir.name, summary["status"])
    drift = launch.config_drift(summary.get("config") or {}, raw, ignore)
    if drift:
        log.warning("%s finished with a config that differs from today's composition in %s "
                    "(conf/ changed since?); its records keep the config it ran with. Delete the "
                    "folder to train it again.", run_dir.name, ", ".join(drift[:5]))


def _run_locked(run_dir: Path, raw: dict, sweeping: bool, launcher: dict, job_num: int) -> dict | None:
    try:
        config = parse_config(raw)
    except ConfigError as err:
        return _record_failure(run_dir, raw, f"bad setting: {err}", sweeping, err)
    from .train import fit  # imported late: a bad setting should fail before torch is loaded

    gpus = launch.visible_gpus() if config.device != "cpu" else 0  # CPU runs touch no GPU
    launch.apply_placement(launch.place_job(launcher, job_num, config.threads,
                                            launch.available_cores(), gpus))
    try:
        summary = fit(config, run_dir)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # every failure is a result: record it, keep the sweep going
        log.error("run failed:\n%s", traceback.format_exc())
        return _record_failure(run_dir, raw, traceback.format_exc(), sweeping, err)
    log.info("%s: %s  %s", run_dir, summary["status"], _headline(summary["metrics"]))
    return summary


def _record_failure(run_dir: Path, raw: dict, error: str, sweeping: bool, err: Exception) -> dict:
    summary = {"status": "failed", "metrics": {}, "config": raw, "error": error,
               "finished_at": time.time()}
    records.write_json_atomic(run_dir / records.SUMMARY, summary)
    if not sweeping:  # a single run reports the problem through its exit status too
        print(f"bnexp: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1)
    log.error("run %s failed: %s (recorded; the sweep continues)", run_dir.name, str(err).splitlines()[0])
    return summary


def _headline(metrics: dict) -> str:
    keys = ("train_acc", "test_acc", "test_acc.precise", "test_acc.batch")
    return "  ".join(f"{k} {100 * metrics[k]:.1f}%" for k in keys if metrics.get(k) is not None)


@hydra.main(config_path="pkg://bnexp.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
