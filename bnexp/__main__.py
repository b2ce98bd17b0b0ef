"""The Hydra entry point: ``bnexp [overrides]`` runs once, ``bnexp -m [overrides]`` sweeps.

The command line is checked (``check_command_line``: an unknown key fails listing the allowed
ones), then Hydra composes the config and calls the task function, which hands each job to
``bnexp.jobs.job.run`` (the job's lifecycle: lock, skip, parse, train, record). The task function
returns the run's ``objective`` (``test_acc``), the value Hydra's sweepers (Optuna) optimize, or
for a run without one a text (``task_value``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnexp import records
from bnexp.config import ConfigError
from bnexp.jobs.resolvers import register_resolvers
from bnexp.jobs.job import check_overrides, run

# conf/ interpolates ${bnexp_hydra_subdir:}; registered on import, not in main(), because joblib and
# submitit workers import this module to unpickle the task function and compose nothing themselves
register_resolvers()


def objective(summary: dict | None) -> float:
    """The value a sweeper optimizes for a run: ``test_acc`` (``eval.default_mode``'s) of an ``ok``
    run, NaN for a failed or diverged run or one without a record (the task function hands
    the sweeper ``task_value`` instead of the NaN)."""
    value = (summary or {}).get("metrics", {}).get("test_acc")
    if (summary or {}).get("status") != "ok" or value is None:
        return math.nan
    return float(value)


@hydra.main(config_path="pkg://bnexp.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | str:
    """The task function: one run, its ``objective`` returned (a skipped run's from its record).
    A single run that fails exits 2 for a bad setting, 1 otherwise, with one line on stderr."""
    try:
        summary = run(cfg)
    except Exception as err:  # only a single run gets here (a sweep records and goes on)
        print(f"bnexp: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    if summary is None:  # skipped in a sweep: finished before, or locked by another process
        summary = records.read_summary(Path(HydraConfig.get().runtime.output_dir))
    return task_value(summary)


def task_value(summary: dict | None) -> float | str:
    """What the task function hands the sweeper: ``objective`` of an ``ok`` run; for a run
    without one (failed, diverged, locked) a one-line str saying so, which is not a number.

    Not NaN: Optuna's Hydra sweeper tells a float as a COMPLETE trial; Optuna refuses a NaN
    value there, and the sweeper's fallback, telling the trial FAIL *with* that value, raises
    ``ValueError: Values were told`` and aborts the search. A value ``float()`` cannot cast
    is told FAIL without a value: the trial fails and the search goes on."""
    value = objective(summary)
    if not math.isnan(value):
        return value
    status = (summary or {}).get("status") or "unrecorded"
    return f"no objective: the run is {status}"


def main() -> None:
    check_command_line(sys.argv[1:])
    _hydra_main()


def check_command_line(argv: list[str]) -> None:
    """Exit 2 naming the allowed keys when a plain override of the command line sets a key that
    ``conf/config.yaml`` does not have (``check_overrides``). Command lines that run nothing or
    compose another primary config are left to Hydra."""
    if any(a in argv for a in ("--version", "--config-name", "-cn", "--config-path", "-cp",
                               "--config-dir", "-cd", "--shell-completion", "-sc")):
        return  # another primary config, or no run at all
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = _argparse_error
    try:
        args, _ = parser.parse_known_args(argv)
    except Exception:  # malformed: Hydra reports it with its own message
        return
    if args.help or args.hydra_help or args.info:
        return
    try:
        check_overrides(args.overrides)
    except ConfigError as err:
        print(f"bnexp: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _argparse_error(message: str):
    raise ValueError(message)


if __name__ == "__main__":
    main()
