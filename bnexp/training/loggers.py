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
  step; the ``status`` and the resolved config as text.

``first_step`` is the step a resumed run starts from: TensorBoard hides the events an
interrupted attempt wrote after it (``purge_step``), so a resumed run reads as one.
Probe rows are logged once, at the end of the run (``log_probes`` with every row of
``probes.jsonl``): an interrupted attempt never got there, so none is logged twice.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

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

    def close(self) -> None:
        self.writer.close()


def probe_tag(row: dict) -> str:
    """``probes/<name>/<layer>``, then ``/<key>=<value>`` for each further column of the row
    (``batch_size`` of the noise probe, ...), so that no two series of a run share a tag."""
    extra = sorted(set(row) - _PROBE_COLUMNS)
    return f"probes/{row['name']}/{row['layer']}" + "".join(f"/{k}={row[k]}" for k in extra)


_PROBE_COLUMNS = {"step", "epoch", "layer", "name", "value"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
