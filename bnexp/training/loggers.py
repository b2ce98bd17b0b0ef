"""Experiment tracking: a run's per-epoch metrics, probes and summary sent to a tracker as well.

The records in the run folder (``metrics.jsonl``, ``probes.jsonl``, ``summary.json``) stay the
source of truth; a logger is a view for the tools researchers already watch. The ``logger``
setting names one entry of ``LOGGERS``, each ``logger(run_dir, first_step) -> Logger``:

* ``none``: nothing (the default).
* ``tensorboard``: event files in ``<run>/tensorboard/``, written offline with
  ``torch.utils.tensorboard.SummaryWriter``; ``tensorboard --logdir results/<study>/runs`` shows
  every run of a study. Tags are bnexp's own names: each numeric column of ``metrics.jsonl``
  (``train_loss``, ``test_acc``, ``test_acc.<mode>`` with ``eval.every_epoch``, ``lr``, ...) at
  its ``step``; ``probes/<name>/<layer>[/<key>=<value>]`` (``probe_tag``) at the probe's step;
  ``final/<metric>`` for every metric of the summary (the eval modes among them) at the last
  step; the ``status`` and the resolved config as text; and the run's hparams (``hparams``: its
  command-line settings) with the ``final/<metric>`` scalars as their metrics, so TensorBoard's
  HParams tab compares the runs of a sweep side by side.
* ``wandb``: Weights & Biases (``pip install 'bnexp[wandb]'``), offline unless ``WANDB_MODE``
  says otherwise, its files in ``<run>/wandb/`` (``wandb sync`` uploads them later). The config
  (the resolved one of ``.hydra/config.yaml``, and the summary's), each ``metrics.jsonl`` row at
  its step, the probe rows as a table, ``final/<metric>`` and ``status`` in the run summary.

``first_step`` is the step a resumed run starts from: TensorBoard hides the events an
interrupted attempt wrote after it (``purge_step``), so a resumed run reads as one.
Probe rows are logged once, at the end of the run (``log_probes`` with every row of
``probes.jsonl``): an interrupted attempt never got there, so none is logged twice.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import yaml

from bnexp.registry import Registry

TENSORBOARD_DIR = "tensorboard"  # inside the run folder

LOGGERS = Registry("logger", "logger(run_dir: Path, first_step: int) -> Logger")


class Logger:
    """What ``train.fit`` calls: one ``log_epoch`` per finished epoch (a ``metrics.jsonl`` row and
    its step), ``log_probes`` and ``log_summary`` once at the end, then ``close``. This base
    logs nothing: it is ``logger=none``."""

    def __init__(self, run_dir: Path, first_step: int):
        pass

    def log_epoch(self, row: dict, step: int) -> None:
        pass

    def log_probes(self, rows: Iterable[dict]) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


LOGGERS.register("none")(Logger)


def make(name: str, run_dir: Path, first_step: int = 0) -> Logger:
    """The logger ``name`` for ``run_dir``; ``ConfigError`` listing the options for an unknown one."""
    return LOGGERS.get(name)(Path(run_dir), first_step)


@LOGGERS.register("tensorboard")
class TensorBoard(Logger):
    """Scalars and text through ``SummaryWriter`` (imported here: ``logger=none`` never loads it)."""

    def __init__(self, run_dir: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the earlier attempt's events at steps >= it; its row at first_step
        # (the epoch of the checkpoint resumed from) is still part of the run
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR),
                                    purge_step=first_step + 1 if first_step > 0 else None)
        self.last_step = first_step

    def log_epoch(self, row: dict, step: int) -> None:
        for key, value in row.items():
            if key not in ("epoch", "step") and _is_number(value):
                self.writer.add_scalar(key, value, step)
        self.last_step = step

    def log_probes(self, rows: Iterable[dict]) -> None:
        for row in rows:
            if _is_number(row.get("value")):
                self.writer.add_scalar(probe_tag(row), row["value"], row["step"])

    def log_summary(self, summary: dict) -> None:
        for key, value in (summary.get("metrics") or {}).items():
            if _is_number(value):
                self.writer.add_scalar(f"final/{key}", value, self.last_step)
        self.writer.add_text("status", str(summary.get("status")), self.last_step)
        # the resolved config, so the event files alone say what was run
        self.writer.add_text("config", "```\n" + json.dumps(summary.get("config"), indent=1) + "\n```",
                             self.last_step)
        self._log_hparams(summary)

    def _log_hparams(self, summary: dict) -> None:
        """The HParams plugin's experiment, session start and end, in this run's own event file
        (``add_hparams`` would open a sub-run of its own): its metrics are the ``final/`` tags."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {f"final/{k}": v for k, v in (summary.get("metrics") or {}).items() if _is_number(v)}
        writer = self.writer._get_file_writer()
        for part in hparams_summary(hparams(summary), metrics):
            writer.add_summary(part, self.last_step)

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandB(Logger):
    """Weights & Biases through ``wandb`` (imported here: an optional extra). Offline by default:
    a sweep must not stop for a login, and the run folder stays the record."""

    def __init__(self, run_dir: Path, first_step: int):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("logger=wandb needs the wandb package: pip install 'bnexp[wandb]'") from err
        config_yaml = run_dir / ".hydra" / "config.yaml"
        config = yaml.safe_load(config_yaml.read_text()) if config_yaml.is_file() else {}
        self.run = wandb.init(dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                              project=os.environ.get("WANDB_PROJECT", "bnexp"), name=run_dir.name,
                              config=config, reinit="create_new",
                              # no copy of the terminal (run.log has it), no banner per run of a sweep
                              settings=wandb.Settings(console="off", quiet=True))

    def log_epoch(self, row: dict, step: int) -> None:
        self.run.log({k: v for k, v in row.items() if k not in ("epoch", "step") and _is_number(v)}
                     | {"epoch": row.get("epoch")}, step=step)

    def log_probes(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if rows:  # their steps are behind the run's last one: a table, not step-indexed scalars
            import wandb

            columns = sorted({k for r in rows for k in r})
            self.run.log({"probes": wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                      for r in rows])})

    def log_summary(self, summary: dict) -> None:
        self.run.config.update({"hparams": hparams(summary), "resolved": summary.get("config") or {}},
                               allow_val_change=True)
        final = {f"final/{k}": v for k, v in (summary.get("metrics") or {}).items() if _is_number(v)}
        self.run.summary.update({**final, "status": str(summary.get("status"))})

    def close(self) -> None:
        self.run.finish()


def hparams(summary: dict) -> dict:
    """The run's command-line settings (its ``overrides``: the sweep's swept keys among them) as
    ``{key: number | str | bool}``, the launcher and bookkeeping keys left out; ``null`` and
    lists as their text."""
    out = {}
    for line in summary.get("overrides") or []:
        key, _, text = str(line).partition("=")
        key = key.lstrip("+~")
        if key in _NOT_HPARAMS:
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[key] = value if isinstance(value, (int, float, str, bool)) else text
    return out


_NOT_HPARAMS = {"launcher", "hydra/launcher", "progress", "logger", "checkpoint", "results_dir",
                "data.root", "data.download", "rerun_failed", "study_name"}


def probe_tag(row: dict) -> str:
    """``probes/<name>/<layer>``, then ``/<key>=<value>`` for each further column of the row
    (``batch_size`` of the noise probe, ...), so that no two series of a run share a tag."""
    extra = sorted(set(row) - _PROBE_COLUMNS)
    return f"probes/{row['name']}/{row['layer']}" + "".join(f"/{k}={row[k]}" for k in extra)


_PROBE_COLUMNS = {"step", "epoch", "layer", "name", "value"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
