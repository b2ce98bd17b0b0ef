"""Run folders of a study as pandas tables, and their aggregation over seeds.

Reads only what ``bnexp.records`` defines (never the training code). ``collect_runs`` gives one
row per run folder; columns are named exactly as the knobs are on the command line (``norm``,
``data.batch_size``, ``optim.lr``) and as the metrics are in ``summary.json`` (``test_acc``,
``test_acc.ema``). ``summarize`` aggregates over seeds with t-based confidence intervals;
``status_counts`` compares the folders with the sweep that ``multirun.yaml`` defines.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import scipy.stats
from omegaconf import OmegaConf, open_dict

from bnexp import records, sweep

STATUS_ORDER = ("done", "diverged", "failed", "incomplete", "pending")
SUMMARY_SCALARS = ("wall_time_s", "train_images_per_s", "git_commit", "device", "precision", "steps",
                   "stopped_early")
REACHED = "stop_at_reached"  # the summary's first epoch row at optim.stop_at (None: never, or no stop_at)


# ----------------------------------------------------------------------------- reading runs
def collect_runs(study_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` of every run folder below ``study_dir``.

    ``runs``: one row per folder with ``run`` (folder name), ``status`` (ok | diverged | failed |
    incomplete: no summary.json yet), one column per override key as the run recorded it
    (``_run_overrides``; ``+``/``~`` prefixes dropped), every final metric, the scalar summary
    fields (``wall_time_s``, ``git_commit``, and ``device`` / ``precision`` as resolved:
    ``cpu (2 cores, 1 threads)`` / ``bf16`` rather than the config's ``auto``) and every flattened
    resolved-config key. Override columns win over both, and summary fields over config keys.
    ``runs.attrs`` lists ``override_keys`` and ``metric_keys``. ``curves``: one row per (run,
    epoch) of metrics.jsonl, with ``run``, ``status`` and the override columns.
    """
    rows, curves, override_keys, metric_keys = [], [], {}, {}
    for run_dir in records.iter_run_dirs(study_dir):
        summary = records.read_summary(run_dir) or {}
        overrides = _run_overrides(run_dir, summary)
        override_keys.update(dict.fromkeys(overrides))
        head = {"run": run_dir.name, "status": summary.get("status", "incomplete"), **overrides}
        metrics = dict(summary.get("metrics") or {})
        metric_keys.update(dict.fromkeys(metrics))
        scalars = {k: summary.get(k) for k in SUMMARY_SCALARS if k not in overrides}
        if REACHED in summary:  # optim.stop_at: where the run reached it (NaN: it never did)
            reached = summary[REACHED] or {}
            scalars.update({f"{REACHED}.{k}": reached.get(k) for k in ("epoch", "step")})
        config = flatten(summary.get("config") or _read_hydra_config(run_dir))
        # the summary's device/precision say what ran (cpu, bf16), the config's what was asked (auto)
        config = {k: v for k, v in config.items()
                  if k not in overrides and not (k in scalars and scalars[k] is not None)}
        rows.append({**head, **metrics, **scalars, **config})
        curves.extend({**head, **row} for row in records.read_jsonl(run_dir / records.METRICS))
    runs = _typed(pd.DataFrame(rows, columns=None if rows else ["run", "status"]))
    runs.attrs.update(override_keys=list(override_keys), metric_keys=list(metric_keys))
    curves_df = _typed(pd.DataFrame(curves, columns=None if curves else ["run", "status"]))
    return runs, curves_df


def collect_probes(study_dir) -> pd.DataFrame:
    """Every run's probes.jsonl (step, epoch, layer, name, value) with run, status and overrides."""
    rows = []
    for run_dir in records.iter_run_dirs(study_dir):
        summary = records.read_summary(run_dir) or {}
        head = {"run": run_dir.name, "status": summary.get("status", "incomplete"),
                **_run_overrides(run_dir, summary)}
        rows.extend({**head, **row} for row in records.read_jsonl(run_dir / records.PROBES))
    return _typed(pd.DataFrame(rows, columns=None if rows else ["run", "status"]))


def swept_columns(runs: pd.DataFrame, exclude: Iterable[str] = ("seed",)) -> list[str]:
    """Override keys whose value differs between runs (the axes of the sweep), seed excluded."""
    keys = runs.attrs.get("override_keys") or []
    return [k for k in keys if k in runs and k not in exclude
            and runs[k].astype(str).nunique(dropna=False) > 1]


def eval_modes_long(runs: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Runs x eval modes: the ``<metric>.<mode>`` columns stacked into ``metric`` with an
    ``eval_mode`` column, so one plot can draw a line or bar per eval mode. Empty when none."""
    modes = [c for c in runs.columns if c.startswith(metric + ".")]
    if not modes:
        return pd.DataFrame(columns=["run", "status", "eval_mode", metric])
    keep = [c for c in runs.columns if c not in modes and c != metric]
    long = runs.drop(columns=[metric], errors="ignore").melt(id_vars=keep, value_vars=modes,
                                                             var_name="eval_mode", value_name=metric)
    long["eval_mode"] = long["eval_mode"].str.removeprefix(metric + ".")
    return long


def with_error(df: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """A copy of ``df`` with an error-rate column ``1 - acc`` next to ``metric`` and each of its
    ``<metric>.<mode>`` columns, named with ``acc`` replaced by ``err`` (``test_err.precise``):
    papers on batch size plot error, records keep accuracy. Missing values stay missing."""
    cols = [c for c in df.columns if c == metric or c.startswith(metric + ".")]
    errors = {c.replace("acc", "err", 1): 1.0 - pd.to_numeric(df[c]) for c in cols}
    out = df.assign(**errors)
    out.attrs = dict(df.attrs)
    return out


def select(df: pd.DataFrame, where: dict | None = None) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal the values in ``where`` (keys may contain dots)."""
    mask = pd.Series(True, index=df.index)
    for key, value in (where or {}).items():
        mask &= _equals(df[key], value)
    return df[mask]


def flatten(tree: Any, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys; lists become JSON strings (hashable cells)."""
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


def _run_overrides(run_dir: Path, summary: dict) -> dict:
    """The run's overrides: a finished run's own (its summary; runs finished before
    ``launch.hydra_subdir`` may have had ``.hydra/`` rewritten by a re-run sweep);
    ``.hydra/overrides.yaml`` for a run without a summary."""
    if "overrides" in summary:
        return _parse_overrides(summary["overrides"])
    return _parse_overrides(records.read_overrides(run_dir))


def _parse_overrides(lines: list[str]) -> dict:
    """``{key: typed value}`` for override strings, parsed with Hydra's own grammar."""
    out = {}
    for ov in _parser().parse_overrides(list(lines)):
        key = ov.key_or_group + (f"@{ov.package}" if ov.package else "")
        value = ov.value()
        out[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


@functools.lru_cache(maxsize=1)
def _parser():
    """Hydra's override parser (building it costs more than parsing a run's overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _read_hydra_config(run_dir: Path) -> dict:
    """The run's composed config from .hydra/config.yaml, resolved where OmegaConf can."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation needing Hydra's runtime: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as numbers (ints with missing values become floats); bools stay bools."""
    for col in df.columns:
        values = df[col].dropna()
        if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            df[col] = pd.to_numeric(df[col])
    return df.copy()  # one block per dtype again: column-by-column assignment fragments the frame


def _equals(column: pd.Series, value) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return column.isna()
    mask = column == value
    return mask if mask.any() else column.astype(str) == str(value)


# ----------------------------------------------------------------------------- sweep status
def sweep_definitions(study_dir) -> list[Path]:
    """The sweep definitions of a folder: every ``-m`` command's record (``sweeps/*.yaml``,
    written by ``bnexp.jobs.launch.record_sweep``) and multirun.yaml (the last command's; the
    only one in folders swept before the records existed)."""
    study_dir = Path(study_dir)
    last = study_dir / "multirun.yaml"
    return sorted((study_dir / records.SWEEP_RECORDS).glob("*.yaml")) + ([last] if last.exists() else [])


def expected_run_names(study_dir) -> list[str] | None:
    """Folder names of every run that any sweep command into the folder defined (the union over
    ``sweep_definitions``, in order, each once; a study with per-arm lrs launches each definition
    once per chosen lr, ``lr_choice.json``'s ``sweeps``); None if unknowable (no definition, or
    one that cannot be expanded)."""
    names: dict[str, None] = {}
    for path in sweep_definitions(study_dir):
        found = _expected_in(study_dir, path)
        if found is None:
            return None
        names.update(dict.fromkeys(found))
    return list(names) if names else None


def _expected_in(study_dir, path: Path) -> list[str] | None:
    """Folder names of every run one sweep definition defines: the last folder of each job's
    ``hydra.sweep.subdir`` (``bnexp.sweep.job_subdirs``, the list the sweep itself counts while it
    runs); None if unknowable."""
    try:
        cfg = OmegaConf.load(path)
        return [Path(sub).name for task in _launches(study_dir, list(cfg.hydra.overrides.task))
                for sub in sweep.job_subdirs(_with_task(cfg, task))]
    except Exception:  # e.g. glob() sweeps need the config repository; say "unknown", not 0
        return None


override_dirname = sweep.override_dirname  # bnexp.analysis.generic's API has always had it


def _launches(study_dir, task: list[str]) -> list[list[str]]:
    """The task overrides of each launch into ``study_dir``: ``[task]``, or with an
    ``lr_choice.json`` one per entry of its ``sweeps``: ``study=<name>``, its ``base`` (the
    overrides every launch shared, recorded since grid.tune.extra) and the entry; from older
    files, ``task`` less the keys any entry sets, and the entry."""
    path = Path(study_dir) / "lr_choice.json"
    if not path.exists():
        return [task]
    choice = json.loads(path.read_text())
    sweeps = choice["sweeps"]
    if "base" in choice:
        study = [t for t in task if t.split("=", 1)[0] == "study"]
        return [study + list(choice["base"]) + list(extra) for extra in sweeps]
    touched = {line.split("=", 1)[0] for extra in sweeps for line in extra}
    base = [t for t in task if t.split("=", 1)[0].lstrip("+~") not in touched]
    return [base + list(extra) for extra in sweeps]


def _with_task(cfg, task: list[str]):
    """A copy of the sweep's config whose command-line overrides are ``task``."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
    return cfg


def status_counts(study_dir) -> dict:
    """``{done, diverged, failed, incomplete, pending}`` run counts of a study folder.

    ``done`` counts status ok; ``incomplete`` folders have no summary (running or killed);
    ``pending`` counts runs of the sweep with no folder yet, None when multirun.yaml is missing
    or cannot be expanded.
    """
    counts = dict.fromkeys(STATUS_ORDER, 0)
    names = set()
    for run_dir in records.iter_run_dirs(study_dir):
        status = (records.read_summary(run_dir) or {}).get("status", "incomplete")
        key = "done" if status == "ok" else status
        counts[key] = counts.get(key, 0) + 1
        names.add(run_dir.name)
    expected = expected_run_names(study_dir)
    counts["pending"] = None if expected is None else len(set(expected) - names)
    return counts


# ----------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` (> 0, may be fractional) degrees of freedom (scipy)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(scipy.stats.t.ppf(p, df))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (scipy)."""
    return float(scipy.stats.t.cdf(t, df))


def mean_ci(values, ci: float = 0.95) -> tuple[float, float, int, float]:
    """``(mean, std, n, half_width)`` of finite ``values``; std and half-width NaN when n < 2."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0, math.nan
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, math.nan, 1, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    if std == 0.0:  # scipy's interval is NaN for constant samples; the spread is exactly 0
        return mean, 0.0, n, 0.0
    with quiet():
        low, _ = scipy.stats.ttest_1samp(vals, 0.0).confidence_interval(ci)
    return mean, std, n, mean - float(low)


@contextlib.contextmanager
def quiet():
    """Silences scipy's "precision loss" warning for nearly equal samples (seeds that agree to
    ~1e-16): the interval it returns is still right, and a report should not print it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _finite(values) -> tuple:
    """The finite numbers among ``values`` (missing and non-finite dropped), as a tuple."""
    return tuple(float(v) for v in pd.to_numeric(values, errors="coerce") if math.isfinite(v))


def summarize(runs: pd.DataFrame, by: list[str], metrics: list[str], ci: float = 0.95,
              include_diverged: bool = False) -> pd.DataFrame:
    """One row per group of ``by`` with ``<metric>.{mean,std,n,ci_lo,ci_hi}`` for each metric.

    Aggregates over every column not in ``by`` (seeds). Only ``ok`` runs enter the statistics
    (``diverged`` too with ``include_diverged``); ``n_runs``, ``n_diverged``, ``n_failed`` and
    ``n_incomplete`` count the group's folders so a figure can mark what is missing. The interval
    is mean +/- t_{(1+ci)/2, n-1} * std / sqrt(n) (std with n - 1); NaN when n < 2.
    ``<metric>.values`` keeps the group's values (a tuple), so that an interval between two
    groups (Welch's, ``bnexp.analysis.report``) can be computed from the samples themselves. With a
    ``trained`` column (``bnexp.analysis.verdicts.check_training``), ``n_untrained`` counts the group's
    used runs that did not train.
    """
    by = [by] if isinstance(by, str) else list(by)
    status = runs["status"] if "status" in runs else pd.Series("ok", index=runs.index)
    used = ("ok", "diverged") if include_diverged else ("ok",)
    out = []
    for key, group in runs.groupby(by, dropna=False, sort=True) if by else [((), runs)]:
        st = status.loc[group.index]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(n_runs=len(group), **{f"n_{s}": int((st == s).sum())
                                         for s in ("diverged", "failed", "incomplete")})
        kept = group[st.isin(used)]
        if "trained" in kept:
            row["n_untrained"] = int((kept["trained"].eq(False)).sum())
        for m in metrics:
            values = _finite(kept[m]) if m in kept else ()
            mean, std, n, half = mean_ci(values, ci)
            row.update({f"{m}.mean": mean, f"{m}.std": std, f"{m}.n": n,
                        f"{m}.ci_lo": mean - half, f"{m}.ci_hi": mean + half, f"{m}.values": values})
        out.append(row)
    return pd.DataFrame(out)
