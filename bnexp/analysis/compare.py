"""Comparing groups of runs: a difference with its interval (``Diff``, which a sentence and a
``bnexp.analysis.verdicts`` shape verdict both read), the sentence that states it, and the
display tables (``format_summary``, ``markdown_table``) a report prints."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import scipy.stats

from bnexp.analysis.plots import is_percent
from bnexp.analysis.tables import quiet, select, summarize

LOWER_IS_BETTER = ("loss", "gap", "err", "time")  # metric names where smaller wins


# ----------------------------------------------------------------------------- differences
@dataclass(frozen=True)
class Diff:
    """``a - b`` of ``metric`` with its confidence interval ``[lo, hi]``: what a statement
    (one sentence) and a shape verdict (``bnexp.analysis.verdicts``) both read. ``missing`` says why there
    is no number; ``untrained`` names the sides with a seed that did not learn: they are compared
    all the same, at equal budget, and the sentence says so (STUDIES.md retired the old rule that
    an arm that did not train is not compared)."""
    a: object
    b: object
    metric: str
    where: str = ""
    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    count: str = ""
    method: str = ""
    notes: str = ""
    missing: str = ""
    untrained: tuple = ()

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2  # t intervals are symmetric

    @property
    def sign(self) -> int | None:
        """+1 / -1 when the interval lies above / below 0, 0 when it holds 0, None when there is
        nothing to read (a side missing, or too few runs for an interval)."""
        if self.missing or math.isnan(self.lo):
            return None
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def numbers(self) -> str:
        """``a - b on m = +3.0 points [+1.2, +4.8] (paired by seed, n=3 pairs)``: the evidence."""
        if self.missing:
            return sentence(self)
        scale, unit = (100.0, " points") if is_percent(self.metric) else (1.0, "")
        fmt = "{:+.1f}" if scale != 1.0 else "{:+.3g}"
        ci = "" if math.isnan(self.lo) else \
            f" [{fmt.format(self.lo * scale)}, {fmt.format(self.hi * scale)}]"
        return (f"{self.a} - {self.b} on {self.metric}{self.where} = "
                f"{fmt.format(self.mean * scale)}{unit}{ci} ({self.count}, {self.method})")


def welch_diff(summary_df: pd.DataFrame, metric: str, by: str, a, b, at: dict | None = None,
               ci: float = 0.95) -> Diff:
    """``a - b`` between two groups of runs, Welch's interval (``scipy.stats.ttest_ind`` with
    ``equal_var=False``): runs are treated as independent, not paired by seed.

    ``summary_df`` is ``summarize`` output (or per-run rows, summarized here over ``by`` and the
    keys of ``at``); ``at`` fixes the other columns.
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
    notes = "".join(f"; {int(r['n_diverged'])} diverged {r[by]} run(s) excluded"
                    for r in (ra, rb) if r.get("n_diverged", 0))
    missing = " and ".join(str(v) for v, n in ((a, na), (b, nb)) if n == 0)
    untrained = tuple(r[by] for r in (ra, rb) if r.get("n_untrained", 0) > 0)
    return Diff(a, b, metric, _where(at), diff, diff - half, diff + half,
                f"n={na} vs {nb}" if na != nb else f"n={na}", f"Welch {ci:.0%} CI", notes,
                f"{missing} has no finished run" if missing else "", untrained)


def paired_diff(runs: pd.DataFrame, metric: str, by: str, a, b, pair: str = "seed",
                at: dict | None = None, ci: float = 0.95) -> Diff:
    """``a - b`` paired on ``pair``: rows of ``by`` = a and = b matched by ``pair`` (the seed,
    when both score the same model or share initialization and batch order), the interval that
    of the mean difference (``scipy.stats.ttest_rel``). ``runs`` holds per-run rows (only status
    ``ok`` is used when there is a status column); pairs missing either side are dropped."""
    rows = select(runs, at)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    sides = [select(rows, {by: v}) for v in (a, b)]
    untrained = tuple(v for v, side in zip((a, b), sides)
                      if "trained" in side and (side["trained"].eq(False)).any())
    both = pd.concat([side.groupby(pair)[metric].mean() for side in sides], axis=1).dropna()
    n = len(both)
    diff = (both.iloc[:, 0] - both.iloc[:, 1]) if n else pd.Series(dtype=float)
    mean, half = (float(diff.mean()) if n else math.nan), math.nan
    if n >= 2:
        with quiet():
            half = 0.0 if diff.std() == 0 else float(
                mean - scipy.stats.ttest_rel(both.iloc[:, 0], both.iloc[:, 1]).confidence_interval(ci)[0])
    return Diff(a, b, metric, _where(at), mean, mean - half, mean + half,
                f"paired by {pair}, n={n} pairs", f"{ci:.0%} t CI",
                missing="" if n else f"no {pair} has both", untrained=untrained)


def welch_difference(ra: pd.Series, rb: pd.Series, metric: str, ci: float = 0.95):
    """``(mean_a - mean_b, CI half-width, (n_a, n_b))`` from two ``summarize`` rows: Welch's
    interval of ``scipy.stats.ttest_ind(equal_var=False)`` on the rows' ``<metric>.values``."""
    va, vb = ra[f"{metric}.values"], rb[f"{metric}.values"]
    na, nb = len(va), len(vb)
    diff = ra[f"{metric}.mean"] - rb[f"{metric}.mean"]
    if na < 2 or nb < 2:
        return diff, math.nan, (na, nb)
    if ra[f"{metric}.std"] == 0 and rb[f"{metric}.std"] == 0:
        return diff, 0.0, (na, nb)
    with quiet():
        low, _ = scipy.stats.ttest_ind(va, vb, equal_var=False).confidence_interval(ci)
    return diff, diff - float(low), (na, nb)


def _where(at: dict | None) -> str:
    return " at " + ", ".join(f"{k}={v}" for k, v in at.items()) if at else ""


# ----------------------------------------------------------------------------- statements
def compare_statement(summary_df: pd.DataFrame, metric: str, by: str, a, b, at: dict | None = None,
                      ci: float = 0.95) -> str:
    """One sentence comparing group ``a`` with group ``b`` of column ``by`` on ``metric``
    (``welch_diff``: Welch's interval, runs independent). Accuracies in points."""
    return sentence(welch_diff(summary_df, metric, by, a, b, at, ci))


def paired_statement(runs: pd.DataFrame, metric: str, by: str, a, b, pair: str = "seed",
                     at: dict | None = None, ci: float = 0.95) -> str:
    """One sentence on ``a - b`` of ``metric`` paired on ``pair`` (``paired_diff``)."""
    return sentence(paired_diff(runs, metric, by, a, b, pair, at, ci))


def sentence(d: Diff) -> str:
    """The sentence for ``d``: a side missing, who wins (by the metric's direction), not
    distinguishable when the interval holds 0 (no "best" claim), or no interval (too few runs);
    with a side that did not learn in every seed, marked "at equal budget"."""
    if d.untrained:
        names = " and ".join(map(str, d.untrained))
        d = replace(d, notes=f"{d.notes}; at equal budget: {names} did not learn in every seed")
    scale, unit = (100.0, " points") if is_percent(d.metric) else (1.0, "")
    if d.missing:
        return f"{d.a} vs {d.b} on {d.metric}{d.where}: {d.missing} ({d.count}{d.notes})"
    if math.isnan(d.half):
        return (f"{d.a} - {d.b} on {d.metric} = {d.mean * scale:+.1f}{unit}{d.where} "
                f"({d.count}: too few runs for an interval{d.notes})")
    if d.sign == 0:
        return (f"{d.a} and {d.b} are not distinguishable on {d.metric}{d.where}: difference "
                f"{d.mean * scale:+.1f} +/- {d.half * scale:.1f}{unit} ({d.count}, {d.method}{d.notes})")
    lower_better = any(w in d.metric for w in LOWER_IS_BETTER)
    win, lose = (d.a, d.b) if ((d.mean < 0) if lower_better else (d.mean > 0)) else (d.b, d.a)
    return (f"{win} beats {lose} on {d.metric} ({'lower' if lower_better else 'higher'} is better) by "
            f"{abs(d.mean) * scale:.1f} +/- {d.half * scale:.1f}{unit}{d.where} ({d.count}, "
            f"{d.method}{d.notes})")


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
