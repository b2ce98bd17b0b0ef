"""Words and tables for people: a statement with its uncertainty, markdown tables, report.md.

``compare_statement`` turns two groups of runs into one sentence with a Welch interval, and
``paired_statement`` does it for differences paired by seed (the same model or source);
``format_summary`` and ``markdown_table`` render ``summarize`` output without ``tabulate``;
``write_report`` writes a study's report.md. Reads run folders through ``bnexp.records`` only.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pandas as pd

from . import records
from .plots import is_percent
from .tables import mean_ci, select, status_counts, summarize, t_quantile

LOWER_IS_BETTER = ("loss", "gap", "err", "time")  # metric names where smaller wins


# ----------------------------------------------------------------------------- statements
def compare_statement(summary_df: pd.DataFrame, metric: str, by: str, a, b, at: dict | None = None,
                      ci: float = 0.95) -> str:
    """One sentence comparing group ``a`` with group ``b`` of column ``by`` on ``metric``.

    ``summary_df`` is ``summarize`` output (or per-run rows, summarized here over ``by`` and the
    keys of ``at``); ``at`` fixes the other columns. The interval of the difference of means is
    Welch's (unequal variances, Welch-Satterthwaite degrees of freedom) from each group's mean,
    std and n: runs are treated as independent, not paired by seed. Accuracies in points.
    """
    at = dict(at or {})
    if f"{metric}.mean" not in summary_df:
        summary_df = summarize(summary_df, [by, *at], [metric], ci)
    rows = select(summary_df, at)
    ra, rb = (select(rows, {by: v}) for v in (a, b))
    if len(ra) != 1 or len(rb) != 1:
        raise ValueError(f"need exactly one row for {by}={a} and {by}={b} at {at}, "
                         f"got {len(ra)} and {len(rb)}")
    ra, rb = ra.iloc[0], rb.iloc[0]
    diff, half, (na, nb) = welch_difference(ra, rb, metric, ci)
    where = " at " + ", ".join(f"{k}={v}" for k, v in at.items()) if at else ""
    runs = f"n={na} vs {nb}" if na != nb else f"n={na}"
    notes = "".join(f"; {int(r['n_diverged'])} diverged {r[by]} run(s) excluded"
                    for r in (ra, rb) if r.get("n_diverged", 0))
    if math.isnan(diff):
        missing = " and ".join(str(v) for v, n in ((a, na), (b, nb)) if n == 0)
        return f"{a} vs {b} on {metric}{where}: {missing} has no finished run ({runs}{notes})"
    return _verdict(a, b, metric, diff, half, where, runs, f"Welch {ci:.0%} CI", notes)


def paired_statement(runs: pd.DataFrame, metric: str, by: str, a, b, pair: str = "seed",
                     at: dict | None = None, ci: float = 0.95) -> str:
    """One sentence on ``a - b`` of ``metric`` paired on ``pair``: rows of ``by`` = a and = b are
    matched by ``pair`` (e.g. the seed, when both score the same model or start from the same
    source), and the interval is the t interval of the mean of those differences.

    ``runs`` holds per-run rows (only status ``ok`` is used when there is a status column);
    ``at`` fixes other columns. Pairs missing either side are dropped. Accuracies in points.
    """
    rows = select(runs, at)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    sides = [select(rows, {by: v}).groupby(pair)[metric].mean() for v in (a, b)]
    diff = (sides[0] - sides[1]).dropna()
    mean, _, n, half = mean_ci(diff, ci)
    where = " at " + ", ".join(f"{k}={v}" for k, v in at.items()) if at else ""
    if n == 0:
        return f"{a} vs {b} on {metric}{where}: no {pair} has both"
    return _verdict(a, b, metric, mean, half, where, f"paired by {pair}, n={n} pairs", f"{ci:.0%} t CI")


def _verdict(a, b, metric: str, diff: float, half: float, where: str, count: str, method: str,
             notes: str = "") -> str:
    """The sentence for ``a - b = diff +/- half``: who wins (by the metric's direction), or not
    distinguishable when the interval holds 0, or no interval (NaN ``half``: too few runs)."""
    scale, unit = (100.0, " points") if is_percent(metric) else (1.0, "")
    if math.isnan(half):
        return (f"{a} - {b} on {metric} = {diff * scale:+.1f}{unit}{where} "
                f"({count}: too few runs for an interval{notes})")
    if abs(diff) <= half:
        return (f"{a} and {b} are not distinguishable on {metric}{where}: difference "
                f"{diff * scale:+.1f} +/- {half * scale:.1f}{unit} ({count}, {method}{notes})")
    lower_better = any(w in metric for w in LOWER_IS_BETTER)
    win, lose = (a, b) if ((diff < 0) if lower_better else (diff > 0)) else (b, a)
    return (f"{win} beats {lose} on {metric} ({'lower' if lower_better else 'higher'} is better) by "
            f"{abs(diff) * scale:.1f} +/- {half * scale:.1f}{unit}{where} ({count}, {method}{notes})")


def welch_difference(ra: pd.Series, rb: pd.Series, metric: str, ci: float = 0.95):
    """``(mean_a - mean_b, CI half-width, (n_a, n_b))`` from two summary rows (Welch's t)."""
    ma, sa, na = ra[f"{metric}.mean"], ra[f"{metric}.std"], int(ra[f"{metric}.n"])
    mb, sb, nb = rb[f"{metric}.mean"], rb[f"{metric}.std"], int(rb[f"{metric}.n"])
    if na < 2 or nb < 2:
        return ma - mb, math.nan, (na, nb)
    va, vb = sa * sa / na, sb * sb / nb
    if va + vb == 0:
        return ma - mb, 0.0, (na, nb)
    dof = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    return ma - mb, t_quantile(0.5 + ci / 2, dof) * math.sqrt(va + vb), (na, nb)


# ----------------------------------------------------------------------------- tables
def format_summary(summary_df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Display table: ``by`` columns, ``mean ± CI half-width`` per metric (percent for
    accuracies), n of the first metric, and the diverged/failed counts when any."""
    out = summary_df[list(by)].copy()
    for m in metrics:
        scale = 100.0 if is_percent(m) else 1.0
        unit = ("points, " if m.startswith("gen_gap") else "%, ") if scale != 1.0 else ""
        head = f"{m} ({unit}mean ± CI)"
        out[head] = [_pm(r[f"{m}.mean"] * scale, (r[f"{m}.ci_hi"] - r[f"{m}.mean"]) * scale,
                         percent=scale != 1.0) for _, r in summary_df.iterrows()]
    out["n"] = summary_df[f"{metrics[0]}.n"].astype(int) if metrics else summary_df["n_runs"]
    for col in ("n_diverged", "n_failed", "n_incomplete"):
        if col in summary_df and summary_df[col].sum():
            out[col.removeprefix("n_")] = summary_df[col].astype(int)
    return out


def _pm(mean: float, half: float, percent: bool = False) -> str:
    """``mean ± half``: percents and points with one decimal in every row (a column reads
    evenly), other quantities with three significant digits' worth of decimals."""
    if math.isnan(mean):
        return "-"
    digits = 1 if percent or abs(mean) >= 1 else 3
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no ``tabulate`` needed); numbers right-aligned."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in cols]
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report
def write_report(study_dir, name: str, question: str, command: str, figures: list,
                 table: pd.DataFrame, statement: str, notes: str = "") -> Path:
    """Write ``<study_dir>/report.md``: question, command, commits, run counts by status, the
    statement, figures (relative links, PNG shown, PDF linked) and ``table`` as markdown."""
    study_dir = Path(study_dir)
    counts = status_counts(study_dir)
    count_text = ", ".join(f"{'?' if v is None else v} {k}" for k, v in counts.items())
    lines = [f"# {name}", "", f"**Question.** {question}", "",
             "**Command.**", "", "```bash", command, "```", "",
             f"**Code.** {_commits(study_dir)}", "", f"**Runs.** {count_text}.", "",
             "## Result", "", statement, ""]
    if figures:
        lines += ["## Figures", ""]
        for fig in map(Path, figures):
            rel = Path(_relpath(fig, study_dir))
            pdf = fig.with_suffix(".pdf")
            extra = f" ([pdf]({rel.with_suffix('.pdf').as_posix()}))" if pdf.exists() else ""
            lines += [f"![{fig.stem}]({rel.as_posix()}){extra}", ""]
    lines += ["## Table", "", markdown_table(table), ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    path = study_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _commits(study_dir: Path) -> str:
    """The commits the runs recorded, and the one this analysis ran at."""
    runs = sorted({(records.read_summary(d) or {}).get("git_commit") or "unknown"
                   for d in records.iter_run_dirs(study_dir) if records.read_summary(d)})
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    text = f"runs at commit {', '.join(runs) or 'none finished'}; analysis at {head or 'unknown'}"
    if len(runs) > 1:
        text += (f". The runs come from {len(runs)} commits: check that what changed between them "
                 "does not change the numbers, or re-run the study")
    if any(r.endswith("-dirty") for r in runs):
        text += ". '-dirty': the code had uncommitted changes (files outside results/)"
    return text


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
