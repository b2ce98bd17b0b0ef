"""How the jobs of a sweep share a machine and a study folder: where each job runs
(``place_job``), one live trainer per run folder (``run_lock``), a skipped run's ``.hydra/``
left as it was (``hydra_subdir``), what changed in conf/ since a run finished (``config_drift``),
and the sweep's progress (``SweepProgress``). Besides the entry point, this is the one module
that reads Hydra's config, because Hydra hands its callbacks the DictConfig.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from bnexp import records, sweep
from bnexp.config import config_diff
from bnexp.training import progress

log = logging.getLogger("bnexp")
LOCK = ".lock"


@dataclass(frozen=True)
class Placement:
    """Where one job runs. ``threads`` 0 = leave torch's default; ``gpu`` None = leave CUDA's."""

    threads: int
    gpu: int | None
    parallel: bool  # other jobs of the sweep may be running at the same time


def launcher_kind(launcher: dict) -> str:
    """``basic`` (one job after another in this process), ``joblib`` or ``submitit``."""
    target = str(launcher.get("_target_", ""))
    return next((kind for kind in ("joblib", "submitit") if kind in target), "basic")


def place_job(launcher: dict, job_num: int, threads: int, cores: int, gpus: int) -> Placement:
    """The placement of job ``job_num`` under ``launcher`` (Hydra's ``hydra.launcher`` as a dict).

    ``threads`` > 0 (set in the config) always wins. joblib runs ``n_jobs`` jobs at once on this
    machine (-1 = one per core, -2 = all but one, as in joblib), so each gets ``cores // n_jobs``
    threads, and at least 1; submitit jobs get the ``cpus_per_task`` they asked for. The basic
    launcher runs one job at a time: it keeps all cores and the current GPU; otherwise, with k
    visible GPUs, job i uses ``cuda:(i % k)``. When the jobs that run side by side ask for more
    threads than there are cores (n_jobs > cores, or an explicit ``threads``), the placement
    stands but a warning says the sweep oversubscribes. The config is not changed: the record of
    a run is the same whichever launcher ran it.
    """
    kind = launcher_kind(launcher)
    if kind == "basic":
        return Placement(threads, None, False)
    side_by_side = 1  # jobs sharing this machine's cores; a submitit job has its own allocation
    if kind == "joblib":
        n_jobs = int(launcher.get("n_jobs") or 1)
        side_by_side = max(cores + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs
        if threads <= 0:
            threads = max(cores // side_by_side, 1)
    elif threads <= 0:
        threads = int(launcher.get("cpus_per_task") or 0)
    if side_by_side * threads > cores:
        fix = "hydra.launcher.n_jobs" if side_by_side > cores else "threads"
        log.warning("the sweep oversubscribes the cores: %d jobs at once x %d torch threads > %d "
                    "cores, so the jobs slow each other down; lower %s", side_by_side, threads,
                    cores, fix)
    gpu = job_num % gpus if gpus > 1 else None
    return Placement(threads, gpu, True)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: what Slurm or taskset gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply_placement(placement: Placement) -> None:
    """Set torch's threads and current CUDA device; mutes ``progress: auto`` in parallel jobs,
    whose terminal is shared with other jobs (their log lines still go out)."""
    import torch

    if placement.threads > 0:
        torch.set_num_threads(placement.threads)
    if placement.gpu is not None:
        torch.cuda.set_device(placement.gpu)
    if placement.parallel:
        progress.mute_auto()


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``run_dir`` for the ``with`` block; yields whether it was got.

    Non-blocking: when another live process holds it, yields False at once (the caller skips
    the run). A ``flock``: the kernel drops it when its holder dies, however it dies (SIGKILL,
    power loss), so a stale lock cannot block a re-run. The file stays after release: deleting
    a lock file races with its next holder.
    """
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)  # who holds it, for a human looking at a busy run
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def lock_holder(run_dir: Path) -> str:
    """``host pid`` of the last process that took the run's lock (for log lines)."""
    try:
        return (Path(run_dir) / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


def hydra_subdir() -> str | None:
    """``hydra.output_subdir`` for the job Hydra is about to run (conf/config.yaml:
    ``${bnexp_hydra_subdir:}``): ``.hydra`` as usual, None for a sweep job whose folder holds a
    finished run (``ok`` or ``diverged``), which the job will skip.

    Hydra writes a job's ``.hydra/`` before the task function sees the job, and it resolves this
    key after it has set the job's ``runtime.output_dir``, so this is the one place a skip can
    keep the run's own ``config.yaml`` and ``overrides.yaml``. A ``failed`` run's ``.hydra/`` is
    written again (with ``rerun_failed`` it trains again; its summary keeps its overrides).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ".hydra"
    hc = HydraConfig.get()
    run_dir = OmegaConf.select(hc, "runtime.output_dir", default=None, throw_on_missing=False)
    if hc.mode != RunMode.MULTIRUN or not run_dir:
        return ".hydra"
    return None if records.is_finished(Path(run_dir), rerun_failed=True) else ".hydra"


def config_drift(recorded: dict, current: dict, ignore=()) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out ``ignore`` (keys that
    do not change what a run computes: Hydra's override_dirname ``exclude_keys``)."""
    return sorted(config_diff(recorded, current, ignore))


_watchdog: threading.Thread | None = None


def die_with_parent(poll_s: float = 0.5) -> None:
    """Kill this process (SIGKILL) as soon as its parent is gone: joblib's worker processes
    would otherwise train on as orphans after a ``kill -9`` of the sweep. A daemon thread
    watches ``os.getppid()`` (it changes when the parent dies); started once per process.
    (``prctl(PR_SET_PDEATHSIG)`` fires when the parent *thread* that started the worker ends,
    which for loky's workers may be a thread of the live sweep: not used.)"""
    global _watchdog
    if _watchdog is not None:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    _watchdog = threading.Thread(target=watch, daemon=True, name="bnexp-die-with-parent")
    _watchdog.start()


# ------------------------------------------------------------------------------ sweep outcome

class SweepOutcome(Callback):
    """Hydra callback: at the end of a ``-m`` sweep, one line counting the runs that failed in
    it, and exit status 1 when every run that ran failed (a sweep of failures is no success).
    Runs skipped as finished before are not counted. Listed first under ``hydra.callbacks``:
    Hydra calls ``on_multirun_end`` in reverse order, so its exit comes after the others'."""

    def __init__(self) -> None:
        self._start: float | None = None

    def __getstate__(self) -> dict:
        return {"_start": None}  # launchers pickle callbacks into their workers: send them inert

    def on_multirun_start(self, config, **kwargs) -> None:
        self._start = time.time()

    def on_multirun_end(self, config, **kwargs) -> None:
        if self._start is None:
            return
        dirs = sweep_run_dirs(config) or list(records.iter_run_dirs(Path(str(config.hydra.sweep.dir))))
        ran = [records.read_summary(d) for d in dirs if _finished_since(d, self._start)]
        failed = sum(1 for summary in ran if (summary or {}).get("status") == "failed")
        if failed:
            print(f"bnexp: {failed} of {len(ran)} runs of the sweep failed (their summary.json "
                  "and run.log say why)", file=sys.stderr)
        if ran and failed == len(ran):
            raise SystemExit(1)


# ------------------------------------------------------------------------------ sweep progress

class SweepProgress(Callback):
    """Hydra callback: ``sweep 3/12 runs done, ETA 4m05s`` while a ``-m`` sweep runs.

    With the basic launcher the jobs run in this process: the count is kept in ``on_job_end`` and
    shown in a tqdm bar above the run's own (``progress.SweepBar``), and each job's console log
    goes through tqdm (``on_job_start``: Hydra has just configured the job's logging). Other
    launchers run jobs elsewhere, so a thread polls the sweep's run folders for new
    ``summary.json`` files and prints a line each time the count changes. Honours ``progress``
    (auto: only on a terminal).
    """

    def __init__(self) -> None:
        self._state: dict | None = None

    def __getstate__(self) -> dict:
        return {"_state": None}  # launchers pickle callbacks into their workers: send them inert

    def on_multirun_start(self, config, **kwargs) -> None:
        record_sweep(config)
        if not progress.enabled(str(config.get("progress", "auto"))):
            return
        dirs = sweep_run_dirs(config)
        if not dirs:
            return
        rerun_failed = bool(config.get("rerun_failed", False))
        skipped = {d for d in dirs if records.is_finished(d, rerun_failed)}
        state = {"dirs": dirs, "skipped": skipped, "start": time.time(), "stop": threading.Event(),
                 "inline": launcher_kind(dict(config.hydra.launcher)) == "basic"}
        self._state = state
        if state["inline"]:
            progress.route_logs()
            state["bar"] = progress.SweepBar(len(dirs), len(skipped))
        else:
            state["thread"] = threading.Thread(target=self._poll, daemon=True, name="bnexp-sweep-progress")
            state["thread"].start()

    def on_job_start(self, config, **kwargs) -> None:
        if self._state and self._state["inline"]:
            progress.route_logs()

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        if self._state and self._state["inline"]:
            self._state["bar"].set(self._count())

    def on_multirun_end(self, config, **kwargs) -> None:
        with contextlib.suppress(Exception):  # Hydra's multirun.yaml, committed with a study
            drop_host_paths(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")
        if self._state:
            self._state["stop"].set()
            if self._state["inline"]:
                self._state["bar"].close()
            else:
                self._state["thread"].join(timeout=5.0)
                self._poll_once()  # the last runs may have ended since the last poll

    def _count(self) -> int:
        start, skipped = self._state["start"], self._state["skipped"]
        return len(skipped) + sum(1 for d in self._state["dirs"] if d not in skipped
                                  and _finished_since(d, start))

    def _poll(self) -> None:
        while not self._state["stop"].wait(2.0):
            self._poll_once()

    def _poll_once(self) -> None:
        s, done = self._state, self._count()
        if done != s.get("shown"):
            s["shown"] = done
            progress.print_line(progress.sweep_line(done, len(s["dirs"]), len(s["skipped"]),
                                                    time.time() - s["start"]))


def _finished_since(run_dir: Path, start: float) -> bool:
    try:
        return (Path(run_dir) / records.SUMMARY).stat().st_mtime >= start
    except OSError:
        return False


def record_sweep(config) -> Path | None:
    """Saves this command's sweep definition as ``<sweep dir>/sweeps/<time>.yaml``.

    Hydra's multirun.yaml holds the last ``-m`` command only (each one into the folder overwrites
    it: adding seeds with a second command would drop the first command's runs from the
    report); the analysis reads the union of these records (``tables.sweep_definitions``).
    Saved unresolved, as Hydra saves multirun.yaml. Never stops a sweep.
    """
    try:
        folder = Path(str(config.hydra.sweep.dir)) / records.SWEEP_RECORDS
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = folder / f"{stamp}.yaml", 1
        while path.exists():
            path, n = folder / f"{stamp}-{n}.yaml", n + 1
        OmegaConf.save(config, path)
        drop_host_paths(path)
        return path
    except Exception as err:  # a convenience record: the runs themselves are the record
        log.warning("could not record the sweep's definition (%s)", err)
        return None


def drop_host_paths(path: Path) -> None:
    """``hydra.runtime.cwd: .`` in a saved sweep config (multirun.yaml, a record): the folder it
    was launched from is this machine's, and studies commit these files."""
    text = Path(path).read_text()
    Path(path).write_text(re.sub(r"(?m)^(  runtime:\n(?:    .*\n)*?    cwd: ).*$", r"\1.", text))


def sweep_run_dirs(config) -> list[Path]:
    """The run folders a basic-sweeper ``-m`` sweep of ``config`` will use, in job order:
    ``hydra.sweep.dir`` / each job's subdir (``bnexp.sweep.job_subdirs``, the list analysis
    uses too). Empty when that cannot be known (another sweeper, a swept config group in a
    custom subdir)."""
    try:
        return [Path(str(config.hydra.sweep.dir)) / sub for sub in sweep.job_subdirs(config)]
    except Exception as err:  # progress is a convenience: never let it stop a sweep
        log.debug("sweep progress off: cannot list the sweep's run folders (%s)", err)
        return []
