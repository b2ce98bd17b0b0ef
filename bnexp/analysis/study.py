"""One analysis path for every study: a script declares a ``Study``; ``analyze`` does the rest.

pycls keeps one metrics table and one plotting path for every sweep; here every
``experiments/<name>.py`` states only what is particular to it, as a ``Study``: its name and
docstring (the question), its expected shapes (``bnexp.analysis.verdicts.Shape``: claim, source, verdict
function), its figure recipes, the summary table's group keys and metrics, and its comparisons.
``analyze(study, study_dir, command)`` then runs the same steps for all of them:

1. collect the run folders, keeping exactly the runs of the sweep the folder holds
   (``sweep_runs``: other data or scale, or runs of an earlier sweep, are excluded with a warning);
2. write runs.csv, curves.csv (and probes.csv);
3. the "no run yet" guard (``Study.requires``);
4. what every run reached (``bnexp.analysis.convergence.check_training``: outcome, clean
   training accuracy, converged); it gates nothing, every verdict reports it;
5. ``Study.prepare``: derived columns and training-side steps (re-scoring, fusion);
6. figures, summary table, comparisons, notes; one verdict per expected shape
   (``bnexp.analysis.verdicts``) -> verdicts.json and the answer at the top of report.md.

Analysis side: never imports the training code (a script's ``prepare`` may, lazily).
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from importlib import resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from bnexp import lr_choice
from bnexp.analysis.plots import save_figure
from bnexp.analysis.compare import format_summary
from bnexp.analysis.report import write_report
from bnexp.analysis.tables import (
    collect_probes,
    collect_runs,
    expected_run_names,
    summarize,
    sweep_definitions,
    swept_columns,
)
from bnexp.analysis.convergence import CONVERGED, check_training, training_text
from bnexp.analysis.verdicts import Shape

log = logging.getLogger(__name__)


@dataclass
class StudyData:
    """What a study's functions read: the sweep's runs (one row per run), per-epoch curves,
    probe rows, the folder, the command, and ``extra`` (tables a ``prepare`` step computes,
    e.g. re-scored or fused rows). ``arms`` is the training check (one row per arm)."""
    study_dir: Path
    command: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    probes: pd.DataFrame
    arms: pd.DataFrame = field(default_factory=pd.DataFrame)
    excluded: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """What is particular to one study (see the module docstring for what is shared).

    ``figures(data) -> {stem: Figure}``; ``comparisons(data)`` -> sentences (a list, shown as
    bullets, or one paragraph); ``notes(data) -> str``; ``prepare(data) -> data`` runs after the
    training check; ``table(data)`` replaces the default table (``summarize`` of
    ``table_rows(data)``, else of the runs, over ``by`` and the ``metrics`` present);
    ``requires``: a column that must exist in the runs with a finished run, or a predicate;
    ``arm``: the columns of one arm (default: the swept override keys but the seed);
    ``converged``: the clean training accuracy at which a run counts as converged (None where the
    design cannot memorize its training set and declares no criterion: ``convergence``).
    """
    name: str
    doc: str
    shapes: Sequence[Shape] = ()
    figures: Callable[[StudyData], dict] = lambda data: {}
    by: Sequence[str] = ()
    metrics: Sequence[str] = ()
    comparisons: Callable[[StudyData], object] | None = None
    notes: Callable[[StudyData], str] | None = None
    prepare: Callable[[StudyData], StudyData] | None = None
    table: Callable[[StudyData], pd.DataFrame] | None = None
    table_rows: Callable[[StudyData], pd.DataFrame] | None = None
    requires: str | Callable[[StudyData], bool] = "test_acc"
    arm: Sequence[str] | None = None
    converged: float | None = CONVERGED

    @property
    def question(self) -> str:
        """The first paragraph of the script's docstring."""
        return " ".join(self.doc.strip().split("\n\n")[0].split())


# ----------------------------------------------------------------------------- the shared path
def analyze(study: Study, study_dir, command: str) -> Path:
    """Steps 1-6 of the module docstring for ``study`` on ``study_dir``; returns report.md."""
    data = load(study_dir, command)
    if not _has(data, study.requires):
        return write_report(data.study_dir, study.name, study.question, data.command, [],
                            data.runs[["run", "status"]], "No finished run yet.",
                            _excluded_note(data), runs=data.runs)
    arm = list(study.arm) if study.arm is not None else swept_columns(data.runs)
    data.runs, data.arms = check_training(data.runs, arm, study.converged)
    checked = data.runs  # every run of the folder: Methods and provenance describe them all, even
    data = study.prepare(data) if study.prepare else data  # where prepare sets some apart
    verdicts = write_verdicts(data.study_dir, [shape.verdict(data) for shape in study.shapes])
    figures = [save_figure(fig, data.study_dir / "figures", stem)[0]
               for stem, fig in study.figures(data).items()]
    statement = _paragraph(study.comparisons(data) if study.comparisons else "")
    notes = " ".join(t for t in (study.notes(data) if study.notes else "", _excluded_note(data),
                                 lr_choice.note(data.study_dir) or _lr_note(data.runs, arm)) if t)
    return write_report(data.study_dir, study.name, study.question, data.command, figures,
                        summary_table(study, data), statement, notes,
                        training_text(data.arms, study.converged), verdicts, runs=checked, arm=arm)


def _lr_note(runs: pd.DataFrame, arm: list) -> str:
    """How the learning rates of a study without ``lr_choice.json`` were set: an axis of its sweep,
    one lr for every arm, or one per arm from its config; set by hand either way, never chosen on
    the test set."""
    if "optim.lr" not in runs or runs["optim.lr"].dropna().empty:
        return ""
    lrs = sorted(runs["optim.lr"].dropna().unique())
    if "optim.scale_lr" in runs and runs["optim.scale_lr"].astype(str).str.lower().eq("true").any():
        return (f"Learning rate: optim.lr {', '.join(f'{x:g}' for x in lrs)} scaled by the linear rule "
                "(x data.batch_size / optim.ref_batch_size), set by hand, not tuned.")
    if "optim.lr" in arm:
        return (f"Learning rates: an axis of the sweep ({', '.join(f'{x:g}' for x in lrs)}), set in the "
                "study's config, not tuned.")
    if len(lrs) == 1:
        return f"Learning rate: {lrs[0]:g} for every arm (the study's optim.lr, set by hand, not tuned)."
    per = runs.dropna(subset=["optim.lr"]).groupby(arm, dropna=False)["optim.lr"].agg(
        lambda v: ", ".join(f"{x:g}" for x in sorted(v.unique())))
    text = "; ".join(f"{' / '.join(map(str, k)) if isinstance(k, tuple) else k} {v}" for k, v in per.items())
    return (f"Learning rates per arm, set in the study's config (by hand or the linear scaling rule, "
            f"not tuned on data): {text}.")


def write_verdicts(study_dir: Path, verdicts: list[dict]) -> list[dict]:
    """Write ``<study_dir>/verdicts.json`` (one object per expected shape, the schema of
    ``bnexp.analysis.verdicts``: NaN written as null); returns ``verdicts``."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v

    verdicts = [clean(v) for v in verdicts]
    (Path(study_dir) / "verdicts.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    return verdicts


def load(study_dir, command: str) -> StudyData:
    """Steps 1-2: the sweep's runs, curves and probes of ``study_dir``, written as CSVs."""
    study_dir = Path(study_dir)
    runs, curves = collect_runs(study_dir)
    probes = collect_probes(study_dir)
    runs, excluded = sweep_runs(study_dir, runs)
    keep = set(runs["run"])
    curves, probes = (df[df["run"].isin(keep)] if "run" in df else df for df in (curves, probes))
    study_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    if len(probes):
        probes.to_csv(study_dir / "probes.csv", index=False)
    return StudyData(study_dir, command, runs, curves, probes, excluded=excluded)


def summary_table(study: Study, data: StudyData) -> pd.DataFrame:
    """The report's table: the study's own, else ``summarize`` over ``by`` and its metrics."""
    if study.table is not None:
        return study.table(data)
    rows = study.table_rows(data) if study.table_rows else data.runs
    metrics = [m for m in study.metrics if m in rows]
    return format_summary(summarize(rows, list(study.by), metrics), list(study.by), metrics)


def _has(data: StudyData, requires) -> bool:
    if callable(requires):
        return bool(requires(data))
    ok = data.runs["status"] == "ok" if "status" in data.runs else []
    return requires in data.runs and bool(len(data.runs[ok]))


def _paragraph(comparisons) -> str:
    if isinstance(comparisons, str):
        return comparisons
    return "\n".join(f"- {s}." for s in comparisons)


# ----------------------------------------------------------------------------- which runs
def sweep_setting(study_dir: Path) -> dict:
    """``{"data.name": ..., "scale_name": ...}`` of the sweep a folder holds: from its last sweep
    definition (multirun.yaml, the sweep's composed config), else from a ``<data>-<scale>``
    folder name, read so only when both parts name a config (``fashion_mnist-small``; not
    ``my-runs`` or ``lr-sweep``, whose runs it would all exclude)."""
    paths = sweep_definitions(study_dir)
    if paths:
        cfg = OmegaConf.load(paths[-1])
        found = {k: OmegaConf.select(cfg, k, default=None) for k in ("data.name", "scale_name")}
        return {k: v for k, v in found.items() if v is not None}
    data, sep, scale = Path(study_dir).name.rpartition("-")
    known = sep and data in _config_names("data") and scale in _config_names("scale")
    return {"data.name": data, "scale_name": scale} if known else {}


def _config_names(group: str) -> set[str]:
    """The options of a config group (``conf/<group>/*.yaml``, shipped as ``bnexp.conf``)."""
    return {p.name.removesuffix(".yaml") for p in resources.files("bnexp.conf").joinpath(group).iterdir()
            if p.name.endswith(".yaml")}


def sweep_runs(study_dir: Path, runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``(runs of the folder's sweep, {run: why excluded})``. A run is excluded when its config
    has another dataset or scale than the folder's sweep, or when no sweep command launched into
    the folder lists it (``expected_run_names``: the union over every command's record, not only
    the last multirun.yaml; unless they list none of the folders: then the expansion is not
    trusted). Each exclusion is warned about."""
    setting = sweep_setting(study_dir)
    expected = expected_run_names(study_dir)
    why = {}
    if expected is not None and not set(expected) & set(runs["run"]):
        expected = None  # no folder matches: the expansion went wrong, do not drop everything
    for _, r in runs.iterrows():
        wrong = [f"{k}={r.get(k)} (sweep: {v})" for k, v in setting.items()
                 if k in runs and str(r.get(k)) != str(v)]
        if wrong:
            why[r["run"]] = ", ".join(wrong)
        elif expected is not None and r["run"] not in expected:
            why[r["run"]] = "not a run of any sweep command recorded here (multirun.yaml, sweeps/)"
    for run, reason in why.items():
        warnings.warn(f"{study_dir}: run {run} excluded from the report: {reason}", stacklevel=2)
    kept = runs[~runs["run"].isin(list(why))].reset_index(drop=True)
    kept.attrs = dict(runs.attrs)
    return kept, why


def _excluded_note(data: StudyData) -> str:
    if not data.excluded:
        return ""
    items = "; ".join(f"`{run}`: {why}" for run, why in data.excluded.items())
    return (f"{len(data.excluded)} run folder(s) here are not runs of this sweep and are not "
            f"analyzed (the run counts above include them): {items}.")
