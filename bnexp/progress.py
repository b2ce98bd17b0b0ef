"""Progress on the terminal: one status line for the sweep and the run in this process.

``progress: auto`` shows it only when stderr is a terminal, so CI logs and Slurm log files stay
plain text; ``on`` forces it, ``off`` silences it. The line is redrawn in place with a carriage
return. Anything printed while it is up (log records included) first erases it, and it is
redrawn under each complete line (``guard_streams``), so output scrolls above the line.

Nothing here synchronises with the device: a run's line counts steps on the host and divides
by wall time, so it costs a clock read per step.
"""
from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from typing import Iterable, Iterator, Sized

REFRESH_S = 0.5  # the least time between two redraws of the line from inside a run

_lock = threading.RLock()
_slots: dict[str, str] = {}  # "sweep" and "run" parts of the line, drawn in that order
_shown = False
_auto_muted = False
_out = sys.stderr  # where the line is drawn: the stderr that guard_streams found


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


def set_status(slot: str, text: str | None) -> None:
    """Set (or with None, remove) one part of the status line and redraw it."""
    with _lock:
        guard_streams()
        if text is None:
            _slots.pop(slot, None)
        else:
            _slots[slot] = text
        _draw()


def clear() -> None:
    """Erase the line from the terminal; the next write of a full line redraws it."""
    global _shown
    with _lock:
        if _shown:
            _out.write("\r\x1b[K")
            _out.flush()
            _shown = False


def print_line(text: str) -> None:
    """Print ``text`` as a line of its own (for progress from threads that share a terminal)."""
    with _lock:
        clear()
        print(text, file=_out, flush=True)


def _draw() -> None:
    global _shown
    line = " | ".join(_slots[s] for s in sorted(_slots, key=("sweep", "run").index))
    width = shutil.get_terminal_size().columns - 1
    _out.write("\r" + line[:width] + "\x1b[K")
    _out.flush()
    _shown = bool(line)


class _Guarded:
    """A text stream that erases the status line before its text goes out and redraws the line
    after each complete line, so output scrolls above the status line. Delegates the rest."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        with _lock:
            if _shown and text:
                clear()
            n = self._stream.write(text)
            if text.endswith("\n") and _slots:
                self._stream.flush()
                _draw()
            return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Route ``sys.stdout``/``sys.stderr`` through ``_Guarded``, and the log handlers already
    bound to them (later ones, e.g. Hydra's per-job logging, bind to the guarded streams).
    Idempotent; redoes itself when someone (pytest, a notebook) has replaced the streams."""
    global _out
    with _lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _Guarded):
                if name == "stderr":
                    _out = stream  # the line itself is drawn on the real stderr
                setattr(sys, name, _Guarded(stream))
        raw = {id(sys.stdout._stream): sys.stdout, id(sys.stderr._stream): sys.stderr}
        loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]
        for handler in (h for lg in loggers for h in lg.handlers):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in raw:
                handler.setStream(raw[id(handler.stream)])


class RunProgress:
    """The run's part of the line: ``epoch 3/15 step 120/390 1843 img/s ETA 2m10s``.

    ``track`` wraps an epoch's batches (keeping ``len``) and redraws at most every
    ``REFRESH_S``; ``epoch_done`` shows the epoch's measured images/s; ``close`` removes the
    run's part. When disabled every method is a no-op and ``track`` returns its argument.
    """

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int, batch_size: int):
        self.on = enabled(mode)
        self.epochs, self.steps, self.batch_size = epochs, steps_per_epoch, batch_size
        self.rate: float | None = None  # images/s of the last finished epoch
        self._steps_done, self._seconds = 0, 0.0  # in this process, for the ETA
        if self.on:
            guard_streams()

    def track(self, batches: Iterable, epoch: int) -> Iterable:
        return _Tracked(self, batches, epoch) if self.on else batches

    def epoch_done(self, epoch: int, images_per_s: float) -> None:
        if self.on:
            self.rate = images_per_s
            self._draw(epoch + 1, 0)

    def close(self) -> None:
        if self.on:
            set_status("run", None)
            clear()

    def _draw(self, epoch: int, step: int, live_rate: float | None = None) -> None:
        rate = live_rate or self.rate
        left = (self.epochs - epoch) * self.steps - step
        per_step = self._seconds / self._steps_done if self._steps_done else None
        text = f"epoch {min(epoch + 1, self.epochs)}/{self.epochs}"
        text += f" step {step}/{self.steps}" if step else ""
        text += f" {rate:.0f} img/s" if rate else ""
        text += f" ETA {duration(left * per_step)}" if per_step else ""
        set_status("run", text)


class _Tracked:
    """``batches`` with a redraw of the run's line every ``REFRESH_S`` as they are consumed."""

    def __init__(self, run: RunProgress, batches: Iterable, epoch: int):
        self.run, self.batches, self.epoch = run, batches, epoch

    def __len__(self) -> int:
        return len(self.batches) if isinstance(self.batches, Sized) else self.run.steps

    def __iter__(self) -> Iterator:
        run = self.run
        start = last = time.perf_counter()
        step = 0
        for step, batch in enumerate(self.batches, 1):
            yield batch
            now = time.perf_counter()
            if now - last >= REFRESH_S:
                last = now
                rate = step * run.batch_size / (now - start)
                run._draw(self.epoch, step, rate)
        run._steps_done += step
        run._seconds += time.perf_counter() - start
