"""Progress on the terminal through tqdm: a bar for the run in this process and one for the sweep.

``progress: auto`` shows them only when stderr is a terminal, so CI logs and Slurm log files stay
plain text; ``on`` forces them, ``off`` silences them. While a bar is up, the console log
handlers write through ``tqdm.write`` (``route_logs``), so log lines scroll above the bars instead
of breaking them. A sweep whose jobs run in other processes (joblib, submitit) shares the
terminal with them, so it prints its count as a new line whenever it changes (``print_line``).

Nothing here synchronises with the device: the run's bar counts steps on the host and divides
by wall time, so it costs a clock read per step.
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, Sized

from tqdm import tqdm

REFRESH_S = 0.5  # tqdm's mininterval: the least time between two redraws of a bar

_auto_muted = False


def enabled(mode: str) -> bool:
    """Whether to show progress for the ``progress`` setting ``mode`` (auto | on | off)."""
    if mode == "auto":
        return not _auto_muted and sys.stderr.isatty()
    return mode == "on"


def mute_auto() -> None:
    """Make ``auto`` mean off in this process: it shares its terminal with other jobs."""
    global _auto_muted
    _auto_muted = True


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def print_line(text: str) -> None:
    """Print ``text`` as a line of its own on stderr, above any bar of this process."""
    tqdm.write(text, file=sys.stderr)


class _TqdmHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: bars are cleared, the record goes
    out, the bars are redrawn below it (what ``tqdm.contrib.logging`` installs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler.emit does: a broken log must not stop a run
            self.handleError(record)


def route_logs() -> None:
    """Swap the root logger's console handlers (stdout/stderr) for ``_TqdmHandler``s with the same
    stream, level, formatter and filters. Idempotent.

    Not ``tqdm.contrib.logging.logging_redirect_tqdm`` as a context: Hydra re-configures logging
    at the start of every job of a sweep, and a context that restores the handlers it found
    would put back those of a finished job. The next job's configuration replaces these.
    """
    root = logging.getLogger()
    for i, handler in enumerate(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
            routed = _TqdmHandler(handler.stream)
            routed.setLevel(handler.level)
            routed.setFormatter(handler.formatter)
            routed.filters = list(handler.filters)
            root.handlers[i] = routed


class _Bar(tqdm):
    """A bar on stderr whose ``bar_format`` may also use ``{left}`` (`` ETA 3m05s``; empty while
    unknown and at the end) and the fields that ``fields(d)`` returns for tqdm's own
    ``format_dict`` ``d``, recomputed at each redraw."""

    def __init__(self, total: int, initial: int, bar_format: str, leave: bool, fields=lambda d: {}):
        self._fields = fields
        # smoothing=0: the average rate since the bar started (counting from ``initial``), so
        # pauses (evaluation) count in the ETA
        super().__init__(total=total, initial=initial, bar_format=bar_format, file=sys.stderr,
                         leave=leave, mininterval=REFRESH_S, smoothing=0, dynamic_ncols=True,
                         disable=False)

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        done, elapsed = d["n"] - d["initial"], d["elapsed"]
        left = ""
        if done > 0 and elapsed > 0 and d["total"] and d["n"] < d["total"]:
            left = f" ETA {duration((d['total'] - d['n']) * elapsed / done)}"
        return {**d, "left": left, **self._fields(d)}


class RunProgress:
    """The run's bar: ``epoch 3/15 step 120/390 |####    | 1843 img/s ETA 2m10s``.

    ``track`` wraps an epoch's batches (keeping ``len``) and advances the bar per batch (tqdm
    redraws at most every ``REFRESH_S``); ``epoch_done`` shows the epoch's measured images/s;
    ``close`` removes the bar. When disabled every method is a no-op and ``track`` returns its
    argument. The images/s shown are the last finished epoch's, in the first epoch the live
    rate; the ETA is the average step rate since this process started the run, evaluation
    included.
    """

    FORMAT = "epoch {epoch}/{epochs} step {step}/{steps} |{bar:12}| {img_s} img/s{left}{stage}"

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int, batch_size: int):
        self.on = enabled(mode)
        self.epochs, self.steps, self.batch_size = epochs, steps_per_epoch, batch_size
        self.rate: float | None = None  # images/s of the last finished epoch
        self._epoch, self._step = 0, 0
        self.bar: _Bar | None = None
        self._stage = ""  # what runs after the last step (the final evaluation's modes)
        if self.on:
            route_logs()

    def track(self, batches: Iterable, epoch: int) -> Iterable:
        if not self.on:
            return batches
        if self.bar is None:  # started here: a resumed run starts at its first epoch
            self.bar = _Bar(self.epochs * self.steps, epoch * self.steps, self.FORMAT,
                            leave=False, fields=self._fields)
        self._epoch, self._step = epoch, 0
        return _Tracked(self, batches)

    def epoch_done(self, epoch: int, images_per_s: float) -> None:
        if self.on and self.bar is not None:
            self.rate, self._epoch, self._step = images_per_s, epoch, self.steps
            self.bar.n = (epoch + 1) * self.steps
            self.bar.refresh()

    def stage(self, text: str) -> None:
        """Show ``text`` after the bar (``final eval: precise (2/4)``) until the next call."""
        if self.on and self.bar is not None:
            self._stage = f"  {text}" if text else ""
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _fields(self, d: dict) -> dict:
        rate = self.rate
        if rate is None and d["elapsed"]:
            rate = (d["n"] - d["initial"]) * self.batch_size / d["elapsed"]
        return {"epoch": min(self._epoch + 1, self.epochs), "epochs": self.epochs,
                "step": self._step, "steps": self.steps,
                "img_s": f"{rate:.0f}" if rate else "?", "stage": self._stage}


class _Tracked:
    """``batches``, advancing the run's bar by one step as each batch is taken."""

    def __init__(self, run: RunProgress, batches: Iterable):
        self.run, self.batches = run, batches

    def __len__(self) -> int:
        return len(self.batches) if isinstance(self.batches, Sized) else self.run.steps

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            yield batch
            self.run._step += 1
            self.run.bar.update(1)


class SweepBar:
    """The sweep's bar: ``sweep 3/12 runs done |###     | ETA 4m05s``. ``done_before`` runs were
    finished when the sweep started: they count as done but not in the ETA's rate."""

    FORMAT = "sweep {n}/{total} runs done |{bar:12}|{left}"

    def __init__(self, total: int, done_before: int):
        self.bar = _Bar(total, done_before, self.FORMAT, leave=True)

    def set(self, done: int) -> None:
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def sweep_line(done: int, total: int, done_before: int, elapsed: float) -> str:
    """``sweep 3/12 runs done, ETA 4m05s``: the line a sweep prints when its jobs run elsewhere."""
    trained = done - done_before
    eta = f", ETA {duration(elapsed / trained * (total - done))}" if trained and elapsed else ""
    return f"sweep {done}/{total} runs done{eta}"
