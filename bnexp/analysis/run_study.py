"""The command line of every study script: run the study's sweep, then hand its folder to the analysis.

Why here, on the analysis side, and not in ``bnexp.jobs``: the sweep runs in a child process
(``python -m bnexp -m study=<name> ...``, the same command a person types), so this module
imports nothing of jobs/ or training/; what it composes is only the config (Hydra), which the
analysis may read.

A study script is ``experiments/<name>.py``: its docstring states the question, the command and
the expected outcome with its source; it declares ``STUDY = Study("<name>", __doc__, ...)``
(``bnexp.analysis.study``: expected shapes, figure recipes, table, comparisons); and its last lines are::

    from bnexp.analysis.run_study import run_study
    ...

    if __name__ == "__main__":
        run_study(STUDY)

Each (study, data, scale) has its own folder, ``<results_dir>/<study_name>/<data>-<scale>/``
(``hydra.sweep.dir`` in conf/config.yaml), so runs of other data or scale never share a report.

Usage of every script (``make study S=<name> ARGS="..."`` calls it)::

    python experiments/<name>.py [hydra overrides ...]    # sweep, then analysis
    python experiments/<name>.py --analyze-only [overrides]  # re-make figures and report
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from bnexp.analysis.study import Study, analyze

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where sweeps run


def study_dir(name: str, overrides: Sequence[str]) -> Path:
    """Where the sweep of study ``name`` with ``overrides`` writes: ``hydra.sweep.dir`` of the
    config Hydra composes for them (``<results_dir>/<study_name>/<data.name>-<scale_name>``),
    relative paths taken from the repository root, where the sweep runs."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="bnexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"study={name}", *overrides],
                      return_hydra_config=True)
    path = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")))
    return path if path.is_absolute() else ROOT / path


def sweep(name: str, overrides: Sequence[str]) -> str:
    """Run ``bnexp -m study=<name> overrides...`` from the repository root; return the command.

    Finished runs are skipped and interrupted ones resume, so re-running a study is cheap. A
    study that declares ``grid.tune`` first runs its lr grid and then one sweep per chosen lr
    (``bnexp.jobs.tuning``); the lr grid's runs are skipped and resumed likewise.
    """
    # the grid and the sweeps run in a process of their own (bnexp.jobs.tuning): analysis/
    # starts the jobs wing as a command, it never imports it
    subprocess.run([sys.executable, "-m", "bnexp.jobs.tuning", name, *overrides], cwd=ROOT, check=True)
    return "bnexp -m " + " ".join(shlex.quote(a) for a in [f"study={name}", *overrides])


def run_study(study: Study, argv: Sequence[str] | None = None,
              before_sweep: Callable[[list[str]], object] | None = None) -> Path:
    """Parse the command line, run the sweep (after ``before_sweep(overrides)``, e.g. a first
    sweep that the study's runs start from; both skipped with ``--analyze-only``), then the
    shared analysis (``bnexp.analysis.study.analyze``) of the sweep's folder."""
    parser = argparse.ArgumentParser(prog=f"experiments/{study.name}.py", description=study.question)
    parser.add_argument("--analyze-only", action="store_true", help="skip the sweep")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to the sweep")
    args = parser.parse_args(argv)
    if args.analyze_only:
        command = "bnexp -m " + " ".join([f"study={study.name}", *map(shlex.quote, args.overrides)])
    else:
        if before_sweep is not None:
            before_sweep(list(args.overrides))
        command = sweep(study.name, args.overrides)
    import matplotlib

    matplotlib.use("Agg")  # the analysis only writes files; never open a window
    report = analyze(study, study_dir(study.name, args.overrides), command)
    print(f"report: {report}")
    return report
