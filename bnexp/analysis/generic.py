"""Analysis of a study folder: collect -> tables -> figures -> a statement -> report.md.

The public face of the analysis half (pandas + matplotlib). It reads run folders through
``bnexp.records`` only and never imports the training code. The building blocks live in
``bnexp.analysis.tables`` (collect, summarize, sweep status), ``bnexp.analysis.plots`` (figure recipes, LABELS,
style) and ``bnexp.analysis.report`` (statements, markdown, report.md) and are re-exported here, so a study
script needs one import::

    from bnexp.analysis import generic as A
    runs, curves = A.collect_runs("results/batch_size")
    fig = A.plot_metric_vs(runs, x="data.batch_size", y="test_acc", hue="norm")
    A.save_figure(fig, "results/batch_size/figures", "acc_vs_batch")

A study script declares a ``Study`` (``bnexp.analysis.study``), whose ``analyze`` is the one path every
study takes. ``analyze`` here is the generic pipeline behind ``bnexp-analyze RESULTS_DIR``: it does not know the
study, so it plots the default metric against the first numeric swept key, coloured by the next.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import pandas as pd
from omegaconf import OmegaConf

from bnexp.analysis.plots import (LABELS, is_percent, knob_label, label, label_points, plot_bars, plot_curves,
                                  plot_heatmap, plot_metric_vs, plot_probe, save_figure, set_style)
from bnexp.analysis.compare import (LOWER_IS_BETTER, Diff, compare_statement, format_summary, markdown_table,
                                   paired_diff, paired_statement, sentence, welch_diff)
from bnexp.analysis.report import write_report
from bnexp.analysis.study import Study, StudyData, load, sweep_runs
from bnexp.analysis.tables import (collect_probes, collect_runs, eval_modes_long, expected_run_names, flatten, mean_ci,
                     override_dirname, select, status_counts, summarize, sweep_definitions, swept_columns,
                     t_cdf, t_quantile, with_error)
from bnexp.analysis.convergence import check_training
from bnexp.analysis.verdicts import Shape, Verdict, compare, compare_outcomes, compare_value

MAX_CURVE_GROUPS = 8  # more lines than this on one curve plot stop being readable
MAX_PROBE_FIGURES = 4
GENERIC_REPORT = "report.generic.md"  # beside a named study's own report.md, never over it


def analyze(study_dir, metric: str | None = None, x: str | None = None, hue: str | None = None,
            question: str | None = None, command: str | None = None, force: bool = False) -> Path:
    """Write runs.csv, curves.csv (probes.csv), figures/*.png|pdf and report.md; return the report.

    ``metric`` defaults to ``test_acc``; ``x`` to the first numeric swept override key (else the
    first swept key), ``hue`` to the next swept key. ``command`` defaults to the sweep's command
    line rebuilt from multirun.yaml. A named study's own report.md (``curated_report``) is kept:
    this generic one then goes to report.generic.md, unless ``force``.
    """
    report = "report.md" if force or not curated_report(study_dir) else GENERIC_REPORT
    data = load(study_dir, command or sweep_command(study_dir))
    study_dir, runs = data.study_dir, data.runs
    question = question or f"Generic analysis of {study_dir.name}: how do the swept settings change the metrics?"
    if "test_acc" not in runs and metric is None and not runs.attrs.get("metric_keys"):
        return write_report(study_dir, study_dir.name, question, data.command, [],
                            runs[["run", "status"]], "No finished run has metrics yet.", runs=runs,
                            filename=report)
    swept = swept_columns(runs)
    metric = metric or ("test_acc" if "test_acc" in runs else runs.attrs["metric_keys"][0])
    x, hue = default_axes(runs, swept, x, hue)
    # beside a named study's figures, the generic ones go to a folder of their own
    fig_dir = study_dir / "figures" / ("generic" if report == GENERIC_REPORT else "")
    figures = default_figures(runs, data.curves, data.probes, fig_dir, metric, x, hue, swept)
    by = list(dict.fromkeys(c for c in (x, hue, *swept) if c))
    metrics = [metric] + [m for m in runs.attrs["metric_keys"]
                          if m.startswith(metric + ".") or m == "gen_gap" != metric]
    summary = summarize(runs, by, metrics)
    notes = ""
    if len(by) > 2:
        notes = (f"Figures average over the swept keys not on their axes ({', '.join(by[2:])}); "
                 "the table keeps every combination.")
    return write_report(study_dir, study_dir.name, question, data.command, figures,
                        format_summary(summary, by, metrics), generic_statement(runs, by, metric), notes,
                        runs=runs, filename=report)


def curated_report(study_dir) -> bool:
    """Whether ``study_dir/report.md`` is a named study's (``experiments/<name>.py``) report: its
    title is the study's name, where the generic report's is the folder's name."""
    path = Path(study_dir) / "report.md"
    if not path.is_file():
        return False
    first = path.read_text().split("\n", 1)[0]
    return first.strip() != f"# {Path(study_dir).name}"


def default_axes(runs: pd.DataFrame, swept: list[str], x=None, hue=None) -> tuple:
    """``(x, hue)``: the given ones, else the first numeric swept key and the next swept key."""
    if x is None and swept:
        numeric = [c for c in swept if pd.api.types.is_numeric_dtype(runs[c])]
        x = (numeric or swept)[0]
    if hue is None:
        hue = next((c for c in swept if c != x), None)
    return x, hue


def default_figures(runs, curves, probes, fig_dir: Path, metric: str, x, hue, swept) -> list[Path]:
    """Metric vs x (line or bars), heatmap of x by hue, eval modes, curves, probes; PNG paths."""
    figs = {}
    numeric_x = x is not None and pd.api.types.is_numeric_dtype(runs[x])
    if x is not None:
        plot = plot_metric_vs if numeric_x else plot_bars
        figs[f"{metric}_vs_{x}"] = plot(runs, x, metric, hue)
    if x is not None and hue is not None:
        figs[f"{metric}_heatmap"] = plot_heatmap(runs, row=hue, col=x, value=metric)
    modes = eval_modes_long(runs, metric)
    if len(modes) and x is not None:
        # one line per eval mode AND arm: a mode some arms lack (precise BN without BN) must not
        # average over another set of arms than the modes beside it
        keys = [c for c in swept if c != x and c in modes]
        modes = modes[~((modes["status"] == "ok") & modes[metric].isna())]  # a mode the arm lacks
        line = "eval_mode"
        if keys:
            modes = _with_config_column(modes, keys)
            modes = modes.assign(eval_mode_arm=modes["eval_mode"].astype(str) + ", " + modes["config"])
            line = "eval_mode_arm"
        figs[f"{metric}_by_eval_mode"] = (plot_metric_vs(modes, x, metric, line) if numeric_x
                                          else plot_bars(modes, line, metric, x))
    if len(curves) and metric in curves:
        keys = [c for c in swept if c in curves]
        curves = _with_config_column(curves, keys) if keys else curves
        hue_c = "config" if keys and curves["config"].nunique() <= MAX_CURVE_GROUPS else x
        figs[f"{metric}_curves"] = plot_curves(curves, "epoch", metric, hue_c)
    for name in list(dict.fromkeys(probes["name"]))[:MAX_PROBE_FIGURES] if len(probes) else []:
        panel = x if x in probes and probes[x].nunique() <= 4 else None
        figs[f"probe_{name}"] = plot_probe(probes, name, col=panel)
    return [save_figure(fig, fig_dir, stem.replace(".", "-"))[0] for stem, fig in figs.items()]


def generic_statement(runs: pd.DataFrame, by: list[str], metric: str) -> str:
    """Best group, its margin over the runner-up (Welch CI), and how many runs diverged."""
    n_div = int((runs["status"] == "diverged").sum())
    tail = f" {n_div} of {len(runs)} runs diverged (excluded from means, marked x in figures)." if n_div else ""
    scale, unit = (100.0, " %") if is_percent(metric) else (1.0, "")
    if not by:
        mean, _, n, half = mean_ci(runs.loc[runs["status"] == "ok", metric])
        return f"{metric} = {mean * scale:.2f} +/- {half * scale:.2f} over n={n} runs.{tail}"
    summary = summarize(_with_config_column(runs, by), ["config"], [metric])
    summary = summary.dropna(subset=[f"{metric}.mean"])
    if summary.empty:
        return f"No run finished with {metric}.{tail}"
    lower = any(w in metric for w in LOWER_IS_BETTER)
    summary = summary.sort_values(f"{metric}.mean", ascending=lower)
    top = summary.iloc[0]
    half = top[f"{metric}.ci_hi"] - top[f"{metric}.mean"]
    text = (f"{'Lowest' if lower else 'Highest'} mean {metric}: {top['config']} "
            f"({top[f'{metric}.mean'] * scale:.1f} +/- {half * scale:.1f}{unit}, n={top[f'{metric}.n']}).")
    if len(summary) > 1:
        runner_up = summary["config"].iloc[1]
        text += " Against the runner-up: " + compare_statement(
            summary, metric, "config", top["config"], runner_up) + "."
    return text + tail


def _with_config_column(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Adds ``config``: the combination of ``keys`` as ``k=v, k=v`` (one label per group)."""
    text = df[keys].astype(str)
    return df.assign(config=text.apply(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1))


def sweep_command(study_dir) -> str:
    """``bnexp -m <overrides>`` as the sweep was launched, one line per distinct command recorded
    (``sweep_definitions``: the seeds added by a second command too), else a hint."""
    paths = sweep_definitions(study_dir)
    if not paths:
        return f"(no multirun.yaml in {study_dir}: command unknown)"
    lines = ("bnexp -m " + " ".join(str(t) for t in OmegaConf.load(p).hydra.overrides.task) for p in paths)
    return "\n".join(dict.fromkeys(lines))


def _study_dirs(path: Path, depth: int = 2) -> list[Path]:
    """``path`` when it holds a sweep, else the sweep folders below it, ``depth`` levels down:
    ``results/`` holds ``<study>/``, which holds one ``<data>-<scale>/`` per sweep."""
    def is_sweep(p: Path) -> bool:
        return (p / "multirun.yaml").exists() or (p / "runs").is_dir()

    if is_sweep(path):
        return [path]
    found = [p for p in sorted(path.iterdir()) if p.is_dir() and is_sweep(p)]
    if depth > 1:
        found += [s for p in sorted(path.iterdir()) if p.is_dir() and not is_sweep(p)
                  for s in _study_dirs(p, depth - 1) if s != p]
    return sorted(found) or [path]


def main(argv: list[str] | None = None) -> int:
    """``bnexp-analyze RESULTS_DIR`` (report per study) / ``bnexp-analyze --status RESULTS_DIR``."""
    parser = argparse.ArgumentParser(prog="bnexp-analyze", description=main.__doc__)
    parser.add_argument("results_dir", type=Path,
                        help="a sweep folder (results/<study>/<data>-<scale>), a study folder or results/")
    parser.add_argument("--status", action="store_true",
                        help="print done/diverged/failed/incomplete/pending counts and exit")
    parser.add_argument("--metric", help="metric to plot and rank (default test_acc)")
    parser.add_argument("--x", help="x-axis column (default: first numeric swept override key)")
    parser.add_argument("--hue", help="line colour column (default: next swept override key)")
    parser.add_argument("--force", action="store_true",
                        help=f"overwrite a named study's report.md (default: write {GENERIC_REPORT} beside it)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"{args.results_dir} is not a directory")
    failed = 0
    for study in _study_dirs(args.results_dir):
        try:  # each folder on its own: one that cannot be analysed is one line, the rest go on
            if args.status:
                counts = status_counts(study)
                print(f"{study}: " + " ".join(f"{k}={'?' if v is None else v}" for k, v in counts.items()))
            else:
                matplotlib.use("Agg")  # the CLI only writes files; never open a window
                print(analyze(study, args.metric, args.x, args.hue, force=args.force))
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            failed += 1
            print(f"{study}: analysis failed: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["LABELS", "LOWER_IS_BETTER", "Diff", "Shape", "Study", "StudyData", "Verdict", "analyze",
           "check_training", "collect_probes", "collect_runs", "compare", "compare_outcomes",
           "compare_statement", "compare_value", "curated_report", "default_axes",
           "default_figures", "eval_modes_long", "expected_run_names", "flatten",
           "format_summary", "generic_statement", "is_percent", "knob_label", "label", "label_points", "main",
           "markdown_table", "mean_ci", "override_dirname", "paired_diff", "paired_statement",
           "plot_bars", "plot_curves", "plot_heatmap", "plot_metric_vs", "plot_probe", "save_figure",
           "select", "sentence", "set_style", "status_counts", "summarize", "sweep_command",
           "sweep_runs", "swept_columns", "t_cdf", "t_quantile", "welch_diff", "with_error",
           "write_report"]

if __name__ == "__main__":
    sys.exit(main())
