"""Plumbing shared by the study scripts: run a study's sweep, then hand its folder to an analysis.

A study script is ``experiments/<name>.py``: its docstring states the question, the command and
the expected outcome with its source; its ``analyze(study_dir, command)`` makes the figures, the
table and the statement through ``bnexp.analysis``; and its last line is::

    if __name__ == "__main__":
        run_study("<name>", __doc__, analyze)

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

ROOT = Path(__file__).resolve().parents[1]


def study_dir(name: str, overrides: Sequence[str]) -> Path:
    """Where the sweep writes: ``<results_dir>/<study_name>`` (both overridable)."""
    opts = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("+", "~")))
    results = Path(opts.get("results_dir", "results"))
    return (results if results.is_absolute() else ROOT / results) / opts.get("study_name", name)


def sweep(name: str, overrides: Sequence[str]) -> str:
    """Run ``bnexp -m study=<name> overrides...`` from the repository root; return the command.

    Finished runs are skipped and interrupted ones resume, so re-running a study is cheap.
    """
    cmd = [sys.executable, "-m", "bnexp", "-m", f"study={name}", *overrides]
    shown = "bnexp -m " + " ".join(shlex.quote(a) for a in cmd[4:])
    print(f"$ {shown}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return shown


def question(doc: str) -> str:
    """The first paragraph of a study script's docstring."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def run_study(name: str, doc: str, analyze: Callable[[Path, str], Path],
              argv: Sequence[str] | None = None,
              prepare: Callable[[list[str]], object] | None = None) -> Path:
    """Parse the command line, run the sweep (after ``prepare(overrides)``, e.g. a first sweep
    that the study's runs start from; both skipped with ``--analyze-only``), then ``analyze``."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=question(doc))
    parser.add_argument("--analyze-only", action="store_true", help="skip the sweep")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to the sweep")
    args = parser.parse_args(argv)
    if args.analyze_only:
        command = "bnexp -m " + " ".join([f"study={name}", *map(shlex.quote, args.overrides)])
    else:
        if prepare is not None:
            prepare(list(args.overrides))
        command = sweep(name, args.overrides)
    report = analyze(study_dir(name, args.overrides), command)
    print(f"report: {report}")
    return report
