"""Figures that show a contrast rather than two levels: the per-seed paired differences of each
primary contrast with their interval (a forest plot, on an axis scaled to the effect, not to 0),
and, for outcomes that split seeds into two groups (trained or not), the count k of n per
setting instead of a mean and a band that would span both groups.

Like ``bnexp.analysis.plots``: each recipe takes a DataFrame and returns a Figure; the caller saves.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnexp.analysis.plots import PALETTE, is_percent, knob_label, label, set_style
from bnexp.analysis.tables import select


def paired_rows(runs: pd.DataFrame, metric: str, by: str, contrasts: Sequence[tuple], pair: str = "seed",
                at: dict | None = None) -> pd.DataFrame:
    """One row per (contrast, ``pair`` value): ``contrast`` (its label), ``seed``, ``diff`` (a - b
    of ``metric`` at that seed) and ``untrained`` (a side has a run the training check failed).
    ``contrasts``: ``(a, b, label)`` values of column ``by``; finished runs (status ok) only."""
    rows = select(runs, at)
    rows = rows[rows["status"] == "ok"] if "status" in rows else rows
    out = []
    for a, b, text in contrasts:
        sides = [rows[rows[by].astype(str) == str(v)] for v in (a, b)]
        untrained = any("trained" in s and s["trained"].eq(False).any() for s in sides)
        both = pd.concat([s.groupby(pair)[metric].mean() for s in sides], axis=1).dropna()
        out += [{"contrast": text, pair: k, "diff": float(r.iloc[0] - r.iloc[1]), "metric": metric,
                 "untrained": untrained} for k, r in both.iterrows()]
    return pd.DataFrame(out, columns=["contrast", pair, "diff", "metric", "untrained"])


def plot_forest(df: pd.DataFrame, metric: str, title: str | None = None, ci: float = 0.95) -> Figure:
    """One row per ``contrast`` of ``df`` (``paired_rows``): each seed's difference as a dot, the
    mean with its t interval as a bar, ``k of n`` seeds below 0 written beside it; 0 drawn as the
    reference. A contrast with an arm that did not train is drawn open and says so; the axis is
    scaled to the contrasts of trained arms, and one beyond it is drawn as an arrow at the edge
    (its numbers stay written beside it)."""
    set_style()
    order = list(dict.fromkeys(df["contrast"]))
    fig = Figure(figsize=(8.5, 0.5 * len(order) + 1.4))
    ax = fig.subplots()
    scale, unit = (100.0, " (points)") if is_percent(metric) else (1.0, "")
    fmt = "{:+.1f}" if scale != 1.0 else "{:+.3g}"
    for i, name in enumerate(order):
        g = df[df["contrast"] == name]
        d = g["diff"].to_numpy() * scale
        mean, half = _mean_ci(d, ci)
        y = len(order) - 1 - i
        ax.plot(d, y + 0.18 * _spread(len(d)), ls="none", marker="o", ms=3, color="0.35", alpha=0.8)
        bad = bool(g["untrained"].any())
        color = PALETTE[0]
        ax.errorbar(mean, y, xerr=half if not math.isnan(half) else None, fmt="D", ms=6, capsize=3,
                    color=color, mfc="white" if bad else color, mew=1.5)
        below = int((d < 0).sum())
        ci_text = "" if math.isnan(half) else f" [{fmt.format(mean - half)}, {fmt.format(mean + half)}]"
        ax.annotate(f"{fmt.format(mean)}{ci_text}, {below} of {len(d)} below 0" + (", an arm untrained" if bad else ""),
                    (1.04, y), xycoords=("axes fraction", "data"), va="center", fontsize=7.5)
    _clip_to_trained(ax, df, scale, ci)
    ax.axvline(0.0, color="0.2", lw=0.8)
    ax.set_yticks(range(len(order)), order[::-1])
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"paired difference per seed: {label(metric)}".replace(" (%)", "") + unit)
    if title:
        ax.set_title(title)
    return fig


def _clip_to_trained(ax, df: pd.DataFrame, scale: float, ci: float) -> None:
    """x limits from the trained contrasts (so an untrained arm's 80-point gap cannot flatten
    the 1-point effects), with arrows at the edge for the values beyond them."""
    trained = df[~df["untrained"]] if (~df["untrained"]).any() else df
    ends = [0.0, *(trained["diff"] * scale)]
    for _, g in trained.groupby("contrast"):
        mean, half = _mean_ci(g["diff"].to_numpy() * scale, ci)
        ends += [mean - half, mean + half] if not math.isnan(half) else []
    lo, hi = min(ends), max(ends)
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    order = list(dict.fromkeys(df["contrast"]))
    for i, name in enumerate(order):
        for v in df.loc[df["contrast"] == name, "diff"] * scale:
            if not lo <= v <= hi:
                ax.plot(hi if v > hi else lo, len(order) - 1 - i, marker=">" if v > hi else "<", ms=8,
                        color="0.35", clip_on=False)
    ax.set_xlim(lo, hi)


def _mean_ci(d: np.ndarray, ci: float) -> tuple[float, float]:
    """Mean and half-width of its t interval (NaN below two values)."""
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), math.nan
    return float(d.mean()), float(scipy.stats.t.ppf(0.5 + ci / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))


def _spread(n: int) -> np.ndarray:
    """Vertical offsets in [-1, 1] so that seeds with equal differences do not hide each other."""
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(n)


def plot_counts(runs: pd.DataFrame, x: str, outcome: str, hue: str, title: str | None = None) -> Figure:
    """For a bimodal outcome (``outcome``: a boolean column, e.g. ``trained``): k of n runs per ``x``
    and ``hue`` as bars of k with n written on them, instead of a mean and a band across both groups.
    The runs without ``outcome`` are drawn on top inside the axes: diverged ones hatched ``xx``,
    the other finished ones (stalled) dotted, so every run of a group has its segment."""
    set_style()
    xs = sorted(runs[x].dropna().unique())
    hues = sorted(runs[hue].dropna().unique(), key=str)
    fig = Figure(figsize=(max(5.5, 0.5 * len(xs) * len(hues) + 2.5), 3.4))
    ax = fig.subplots()
    width, marked = 0.8 / max(1, len(hues)), set()
    for j, h in enumerate(hues):
        for i, v in enumerate(xs):
            g = runs[(runs[x] == v) & (runs[hue] == h)]
            k = int(g[outcome].eq(True).sum()) if outcome in g else 0
            div = int(g["status"].eq("diverged").sum()) if "status" in g else 0
            rest = len(g) - k - div  # finished without the outcome: stalled (or failed)
            pos = i - 0.4 + width * (j + 0.5)
            ax.bar(pos, k, width * 0.9, color=PALETTE[j % len(PALETTE)], label=str(h) if i == 0 else None)
            for n, hatch, name, bottom in ((div, "xx", "diverged", k), (rest, "..", "stalled", k + div)):
                if n:
                    ax.bar(pos, n, width * 0.9, bottom=bottom, color="white", edgecolor="0.3", hatch=hatch,
                           label=None if name in marked else name)
                    marked.add(name)
            ax.text(pos, len(g) + 0.05, f"{k}/{len(g)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else str(v) for v in xs])
    ax.set_xlabel(knob_label(x))
    ax.set_ylabel(f"runs ({outcome}: k of n)")
    ax.set_ylim(0, runs.groupby([x, hue]).size().max() * 1.2 + 0.1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title=knob_label(hue), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return fig
