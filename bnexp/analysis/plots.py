"""Figure recipes: each takes a DataFrame and column names and returns a matplotlib Figure.

The caller saves (``save_figure`` writes PNG + PDF). Figures are built with the object API
(``matplotlib.figure.Figure``), never pyplot, so nothing here picks a backend or keeps figures
alive: scripts and tests can run headless, notebooks display the returned Figure. Lines are means
over runs (seeds) with a shaded t-based confidence band; accuracies are drawn in percent;
diverged runs are excluded from means and marked with an ``x`` at the top of the axes.
``LABELS`` is the one table of axis labels; ``set_style`` the one place that sets rcParams.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bnexp.analysis.tables import summarize
from bnexp.config import EVAL_MODES as MODES

# display order of records' eval modes: config's list (= the measure.modes registry), then
# ``frozen``, the name fused.json gives the EMA statistics of a FrozenBN run
EVAL_MODES = (*MODES, "frozen")
LABELS: dict[str, str] = {
    "test_acc": "test accuracy (%)", "train_acc": "train accuracy (%)",
    "test_loss": "test loss", "train_loss": "train loss",
    "gen_gap": "generalization gap (train - test, points)",
    **{f"test_acc.{m}": f"test accuracy, {m} stats (%)" for m in EVAL_MODES},
    **{f"test_loss.{m}": f"test loss, {m} stats" for m in EVAL_MODES},
    "test_err": "test error (%)",
    **{f"test_err.{m}": f"test error, {m} stats (%)" for m in EVAL_MODES},
    "epoch": "epoch", "step": "training step", "lr": "learning rate", "seed": "seed",
    "seconds": "epoch time (s)", "images_per_s": "training throughput (images/s)",
    "wall_time_s": "wall time (s)", "train_images_per_s": "training throughput (images/s)",
    "norm": "normalization", "norm.name": "normalization",
    "norm.virtual_batch": "normalization batch size", "norm.momentum": "BN momentum",
    "norm.freeze_after": "BN frozen after (fraction of training)",
    "data.batch_size": "batch size", "data.name": "dataset", "data": "dataset",
    "optim.lr": "learning rate", "model.dropout": "dropout probability",
    "model.dropout_placement": "dropout placement", "model.name": "model",
    "sampler": "batch sampler", "sampler.name": "batch sampler",
    "eval_mode": "eval mode", "eval.precise_samples": "precise-BN samples",
    "finetune.bn": "BN during fine-tuning", "layer": "layer",
}
# Okabe-Ito: distinguishable in colour-blind vision and in greyscale print.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
# Paul Tol's "muted" scheme (with its pale grey): ten categories a colour-blind reader tells apart.
TOL_MUTED = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
             "#AA4499", "#DDDDDD"]


# Legend entry of the arms some of whose seeds did not train (open marker, hatched bar or cell).
UNTRAINED_LABEL = "some seeds did not train"


def set_style() -> None:
    """The house look of every figure (rcParams); the recipes call it, so callers need not."""
    mpl.rcParams.update({
        "figure.figsize": (6.0, 3.8), "figure.dpi": 100, "savefig.dpi": 150,
        "figure.constrained_layout.use": True, "font.size": 9, "axes.titlesize": 10,
        "axes.labelsize": 9, "legend.fontsize": 8, "legend.title_fontsize": 8,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
        "grid.alpha": 0.3, "grid.linewidth": 0.6, "legend.frameon": False,
        "lines.linewidth": 1.6, "lines.markersize": 4.5, "pdf.fonttype": 42,
        "axes.prop_cycle": mpl.cycler(color=PALETTE),
    })


def label(col: str) -> str:
    """Axis label of a column: LABELS, else the column name itself."""
    return LABELS.get(col, col)


def knob_label(col: str) -> str:
    """Label that also names the knob, so a legend title maps back to the override key (a
    column without a LABELS entry, e.g. one a study made up, is its own label)."""
    text = label(col)
    return text if text in (col, col.replace("_", " ")) else f"{text} [{col}]"


def is_percent(col: str) -> bool:
    """Accuracy-like fractions (error rates and the gap too) are drawn and tabulated in percent:
    the metrics ``value_range`` bounds on both sides (a loss, bounded below only, is not)."""
    return None not in value_range(col)


def save_figure(fig: Figure, directory, stem: str) -> list[Path]:
    """Write ``<directory>/<stem>.png`` and ``.pdf``; return both paths (PNG first). The PDF
    carries no creation date, so the same figure gives the same bytes (no spurious git diffs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png, pdf = directory / f"{stem}.png", directory / f"{stem}.pdf"
    fig.savefig(png)
    fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


# ----------------------------------------------------------------------------- recipes
def plot_metric_vs(df: pd.DataFrame, x: str, y: str, hue: str | None = None, logx=None,
                   ci: float = 0.95, hue_order=None, title: str | None = None) -> Figure:
    """Mean of ``y`` against ``x``, one line + CI band per ``hue`` value, over per-run rows.

    ``logx``: None picks log2 for powers of two spanning >= 8x (batch sizes), log10 for other
    positive ranges >= 100x (learning rates); False forces linear; 2 or 10 force that base.
    Non-numeric ``x`` is drawn as categories. Diverged runs: ``x`` markers at the top.
    """
    set_style()
    fig = Figure()
    ax = fig.subplots()
    hue_col, df = _hue_column(df, hue)
    stats = summarize(df, [hue_col, x], [y], ci)
    xs_all, xpos = _positions(stats[x])
    for i, (color, value, g) in enumerate(_groups(stats, hue_col, hue_order)):
        g = g.assign(_x=g[x].map(xpos)).sort_values("_x")
        _line_band(ax, g["_x"], g, y, color, _fmt(value))
        _run_points(ax, g, y, color)
        _mark_diverged(ax, g["_x"][g["n_diverged"] > 0], color, level=i)
        bad = _untrained(g)
        ax.plot(g["_x"][bad], g[f"{y}.mean"][bad] * (100.0 if is_percent(y) else 1.0), ls="none",
                marker="o", ms=7, mfc="white", mec=color, mew=1.5)
    _x_axis(ax, xs_all, xpos, logx)
    _finish(ax, label(x) if x in ("epoch", "step") else knob_label(x), label(y), hue, title,
            diverged=bool(stats["n_diverged"].sum()), untrained="marker" if _untrained(stats).any() else "")
    return fig


def _run_points(ax, g: pd.DataFrame, y: str, color) -> None:
    """Every finished run's value as a small dot beside its group's mean: with few seeds, or
    seeds that split into trained and stalled, the band alone hides where the runs are."""
    scale = 100.0 if is_percent(y) else 1.0
    for xv, values in zip(g["_x"], g.get(f"{y}.values", [()] * len(g))):
        vals = [v * scale for v in (values if isinstance(values, tuple) else ()) if v == v]
        ax.plot([xv] * len(vals), vals, ls="none", marker=".", ms=4, color=color, alpha=0.55, zorder=3)


def plot_curves(curves: pd.DataFrame, x: str = "epoch", y: str = "test_acc", hue: str | None = None,
                ci: float = 0.95, hue_order=None, title: str | None = None,
                legend_outside: bool = False) -> Figure:
    """Per-epoch (or per-step) curves: mean over runs with CI band, one line per ``hue`` value.
    ``legend_outside``: the legend to the right of the axes even when it is short, for curves
    whose bands fill the plot (matplotlib's 'best' then lands on the data)."""
    set_style()
    fig = Figure()
    ax = fig.subplots()
    # epochs without a test score (eval.score_every > 1) are left out, not drawn as gaps
    hue_col, curves = _hue_column(curves.dropna(subset=[y]), hue)
    stats = summarize(curves, [hue_col, x], [y], ci)
    for color, value, g in _groups(stats, hue_col, hue_order):
        g = g.sort_values(x)
        _line_band(ax, g[x], g, y, color, _fmt(value), marker=None)
    _finish(ax, label(x), label(y), hue, title, diverged=False, legend_outside=legend_outside)
    return fig


def plot_bars(df: pd.DataFrame, x: str, y: str, hue: str | None = None, ci: float = 0.95,
              hue_order=None, title: str | None = None) -> Figure:
    """Grouped bars of the mean of ``y`` per ``x`` category and ``hue``; CI error bars, runs as dots."""
    set_style()
    n_bars = df[x].nunique() * (df[hue].nunique() if hue else 1)
    fig = Figure(figsize=(min(11.0, max(5.5, 0.3 * n_bars + 3.0)), 3.6))
    ax = fig.subplots()
    hue_col, df = _hue_column(df, hue)
    stats = summarize(df, [hue_col, x], [y], ci)
    xs_all, xpos = _positions(stats[x], categorical=True)
    groups = _groups(stats, hue_col, hue_order)
    width = 0.8 / max(1, len(groups))
    scale = 100.0 if is_percent(y) else 1.0
    for i, (color, value, g) in enumerate(groups):
        pos = g[x].map(xpos) - 0.4 + width * (i + 0.5)
        if hue is None:  # no groups to tell apart: colour the categories instead
            color = [_colors(pd.Series(xs_all))[xs_all.index(v)] for v in g[x]]
        mean = g[f"{y}.mean"] * scale
        err = np.vstack([mean - g[f"{y}.ci_lo"] * scale, g[f"{y}.ci_hi"] * scale - mean])
        bars = ax.bar(pos, mean, width * 0.9, yerr=np.nan_to_num(err), color=color, alpha=0.85,
                      capsize=2, ecolor="0.2", error_kw={"elinewidth": 1}, label=_fmt(value))
        for bar, bad in zip(bars, _untrained(g)):
            if bad:
                bar.set_hatch("///")
                bar.set_edgecolor("0.15")
        _dots(ax, df[df[hue_col].astype(str) == str(value)], x, y, pos, g, scale, width)
        _mark_diverged(ax, pos[g["n_diverged"] > 0], "0.3" if hue is None else color)
    ticks = [_fmt(v) for v in xs_all]
    crowded = sum(len(t) + 2 for t in ticks) > 8 * fig.get_figwidth()
    ax.set_xticks(range(len(xs_all)), ticks, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.grid(axis="x", visible=False)
    _finish(ax, knob_label(x), label(y), hue, title, diverged=bool(stats["n_diverged"].sum()),
            untrained="hatch" if _untrained(stats).any() else "")
    return fig


def plot_heatmap(df: pd.DataFrame, row: str, col: str, value: str, ci: float = 0.95,
                 title: str | None = None) -> Figure:
    """Grid of the mean of ``value`` over runs per (row, col); cells annotated mean +/- CI, n."""
    set_style()
    stats = summarize(df, [row, col], [value], ci)
    rows, cols = sorted(stats[row].unique(), key=_sort_key), sorted(stats[col].unique(), key=_sort_key)
    fig = Figure(figsize=(max(4.5, 1.1 * len(cols) + 2.5), max(2.8, 0.6 * len(rows) + 1.6)))
    ax = fig.subplots()
    scale = 100.0 if is_percent(value) else 1.0
    grid = np.full((len(rows), len(cols)), np.nan)
    cells = {}
    for _, s in stats.iterrows():
        i, j = _position(rows, s[row]), _position(cols, s[col])
        grid[i, j] = s[f"{value}.mean"] * scale
        cells[i, j] = s
    colormap = mpl.colormaps["viridis"].with_extremes(bad="0.88")  # cells without a finished run
    image = ax.imshow(grid, cmap=colormap, aspect="auto")
    for (i, j), s in cells.items():
        dark = not math.isnan(grid[i, j]) and image.norm(grid[i, j]) < 0.5
        ax.text(j, i, _cell_text(s, value, scale), ha="center", va="center", fontsize=7.5,
                color="white" if dark else "black")
        if s.get("n_untrained", 0):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="0.55", linewidth=0))
    ax.set_xticks(range(len(cols)), [_fmt(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_fmt(r) for r in rows])
    ax.grid(False)
    ax.set_xlabel(knob_label(col))
    ax.set_ylabel(knob_label(row))
    fig.colorbar(image, ax=ax, label=label(value) + ", mean")
    if title:
        ax.set_title(title)
    return fig


def plot_probe(probes: pd.DataFrame, name: str | None = None, x: str = "step", y: str = "value",
               hue: str = "layer", col: str | None = None, ci: float = 0.95,
               title: str | None = None) -> Figure:
    """Probe values (rows of probes.jsonl) against ``x``: one line per ``hue`` (layer) with a CI
    band over runs; one panel per ``col`` value (e.g. ``norm``) sharing the y axis."""
    set_style()
    if name is not None:
        probes = probes[probes["name"] == name]
    panels = sorted(probes[col].unique(), key=_sort_key) if col else [None]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.8 * ncols + 1.8, 3.0 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    order = list(dict.fromkeys(probes[hue]))  # layers in the order the model has them
    colors = _colors(pd.Series(order), order)
    for ax, panel in zip(axes, panels):
        part = probes if col is None else probes[probes[col] == panel]
        stats = summarize(part, [hue, x], [y], ci)
        for color, value in zip(colors, order):
            g = stats[stats[hue] == value].sort_values(x)
            if len(g):
                _line_band(ax, g[x], g, y, color, _fmt(value), marker=None,
                           alpha=0.2 if len(order) <= 3 else 0.1)
        ax.set_xlabel(label(x))
        ax.set_title(f"{col} = {_fmt(panel)}" if col else (title or ""))
    for ax in axes[::ncols]:
        ax.set_ylabel(label(name) if name else label(y))
    _legend(axes[ncols - 1], knob_label(hue), many=len(order) > 4 or len(panels) > 1)
    if title and col:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- helpers
def _hue_column(df: pd.DataFrame, hue: str | None) -> tuple[str, pd.DataFrame]:
    """Group column for lines: ``hue``, or a constant one when no hue is asked for."""
    if hue:
        return hue, df
    return "_all", df.assign(_all="all runs")


def _groups(stats: pd.DataFrame, hue: str, order=None) -> list[tuple]:
    """``(colour, hue value, rows)`` per hue value present, in ``order`` (default: sorted); the
    colours are dealt out to the groups present, in that order."""
    values = order if order is not None else sorted(stats[hue].unique(), key=_sort_key)
    present = [(value, g) for value in values if len(g := stats[stats[hue].astype(str) == str(value)])]
    return [(color, value, g) for color, (value, g) in zip(_colors(stats[hue], order), present)]


def _colors(values: pd.Series, order=None) -> list:
    """Okabe-Ito for up to 7 categories (its yellow is too pale for lines on white); Paul Tol's
    muted set (also colour-blind safe, no two alike) for 8 to 10 named categories; an ordered
    colormap only for many numbers (layers, lr grids), where neighbours in colour are neighbours
    in value."""
    levels = list(order) if order is not None else list(values.dropna().unique())
    n = len(levels)
    if n <= len(PALETTE) - 1:
        return PALETTE[:n]
    numeric = all(isinstance(v, (int, float, np.number)) for v in levels)
    if not numeric and n <= len(TOL_MUTED):
        return TOL_MUTED[:n]
    return [mpl.colormaps["viridis"](v) for v in np.linspace(0.0, 0.9, n)]


def _line_band(ax, xs, g: pd.DataFrame, y: str, color, text: str, marker="o",
               alpha: float = 0.2) -> None:
    """Mean line with markers and a translucent CI band (absent where n < 2). The band is drawn
    within the values the metric can take (an accuracy in [0, 100] %): with 3 seeds that
    disagree, a t interval can reach past them, and the axis should not follow it there."""
    scale = 100.0 if is_percent(y) else 1.0
    lo, hi = value_range(y)
    ax.plot(xs, g[f"{y}.mean"] * scale, color=color, marker=marker, label=text)
    ax.fill_between(xs, g[f"{y}.ci_lo"].clip(lo, hi) * scale, g[f"{y}.ci_hi"].clip(lo, hi) * scale,
                    color=color, alpha=alpha, linewidth=0)


def value_range(col: str) -> tuple[float | None, float | None]:
    """The values a metric can take, as recorded: accuracies and error rates [0, 1], the gap
    (a difference of two of them) [-1, 1], cross-entropy losses [0, inf), anything else
    unbounded (None). A difference of two rates (``excess_err``, one error minus another) is
    in [-1, 1], as the gap is."""
    base = col.split(".")[0]
    if base == "gen_gap" or base.startswith("excess_"):
        return -1.0, 1.0
    if base.endswith(("acc", "err")):
        return 0.0, 1.0
    if base.endswith("loss"):
        return 0.0, None
    return None, None


def _mark_diverged(ax, xs, color, level: int = 0) -> None:
    """An ``x`` near the top edge of the axes (axes-fraction y) above each diverged position;
    each hue group on its own row (``level``) so that marks at the same x stay visible."""
    if len(xs):
        ax.plot(xs, [0.97 - 0.045 * level] * len(xs), ls="none", marker="x", ms=7, mew=2,
                color=color, transform=ax.get_xaxis_transform(), clip_on=False)


def _dots(ax, runs, x, y, pos, g, scale, width) -> None:
    """Each run's value as a small dot on its bar (claims are distributions), spread across the
    bar (deterministic jitter) so that dots neither hide each other nor the error bar."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    where = dict(zip(g[x].astype(str), pos))
    rank = ok.groupby(ok[x].astype(str)).cumcount().to_numpy()
    jitter = width * 0.28 * np.where(rank % 2 == 0, 1, -1) * (0.4 + 0.6 * (rank % 3) / 2)
    xs = ok[x].astype(str).map(where).to_numpy(dtype=float) + jitter
    ax.plot(xs, ok[y] * scale, ls="none", marker="o", ms=2.5, color="black", alpha=0.6)


def _positions(values: pd.Series, categorical: bool = False) -> tuple[list, dict]:
    """Sorted distinct x values and their plot positions (themselves if numeric, else 0..n-1)."""
    xs = sorted(values.dropna().unique(), key=_sort_key)
    numeric = all(isinstance(v, (int, float, np.number)) for v in xs)
    return xs, {v: (v if numeric and not categorical else i) for i, v in enumerate(xs)}


def _x_axis(ax, xs: list, xpos: dict, logx) -> None:
    numeric = all(xpos[v] == v for v in xs)
    base = _log_base(xs, logx) if numeric else None
    if base:
        ax.set_xscale("log", base=base)
        ax.minorticks_off()
    if len(xs) <= 12:
        labels = [_fmt(v) for v in xs]
        crowded = _ticks_crowded(ax, [xpos[v] for v in xs], labels, log=bool(base))
        ax.set_xticks([xpos[v] for v in xs], labels, rotation=35 if crowded else 0,
                      ha="right" if crowded else "center")



# label offsets (points) tried in order: right-above, right-below, left-above, left-below, then
# further out; every spot but the first gets a leader line to its point
LABEL_SPOTS = ((4, 5, "left"), (8, -14, "left"), (-8, 8, "right"), (-8, -14, "right"),
               (10, 18, "left"), (10, -24, "left"), (-10, 18, "right"), (-10, -24, "right"))


def label_points(ax, points: list, fontsize: float = 7) -> list:
    """Annotate each ``(text, x, y)`` of ``points`` beside its point, at the first of
    ``LABEL_SPOTS`` whose box overlaps no label placed before it and no other point (the last
    spot where all do);
    returns the annotations. Needs the axes' limits set: boxes are measured on a drawn canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.get_figure()
    renderer = (fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)).get_renderer()
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    def marker(x, y):  # the point itself, ~5 px each side: a label should not cover another point
        px, py = ax.transData.transform((x, y))
        return Bbox.from_extents(px - 5, py - 5, px + 5, py + 5)

    placed, boxes = [], []
    for i, (text, x, y) in enumerate(points):
        others = [marker(ox, oy) for j, (_, ox, oy) in enumerate(points) if j != i]
        for dx, dy, ha in LABEL_SPOTS:
            far = (dx, dy, ha) != LABEL_SPOTS[0]  # moved off its usual spot: a leader line says whose it is
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha,
                              arrowprops=dict(arrowstyle="-", lw=0.5, color="0.45", shrinkA=0, shrinkB=3)
                              if far else None)
            ann.update_positions(renderer)  # where the offset puts the text, as a draw would
            box = Text.get_window_extent(ann, renderer).expanded(1.05, 1.1)  # the text, not its leader
            if not any(box.overlaps(b) for b in boxes + others) or (dx, dy, ha) == LABEL_SPOTS[-1]:
                break
            ann.remove()
        placed.append(ann)
        boxes.append(box)
    return placed

def _ticks_crowded(ax, positions: list, labels: list, log: bool, fontsize_pt: float = 10.0) -> bool:
    """Whether two neighbouring tick labels would overlap when set flat: the narrowest gap
    between tick positions (on the axis' log or linear scale, as a fraction of the axis width)
    against the wider label of the pair (~0.6 em per character)."""
    pts = [np.log10(p) if log else float(p) for p in positions]
    span = max(pts) - min(pts) if len(pts) > 1 else 0.0
    if span <= 0:
        return False
    fig = ax.get_figure()
    width_pt = ax.get_position().width * fig.get_figwidth() * 72
    order = np.argsort(pts)
    for a, b in zip(order[:-1], order[1:]):
        gap_pt = (pts[b] - pts[a]) / span * width_pt * 0.9  # matplotlib pads the data range ~5% per side
        need_pt = 0.6 * fontsize_pt * (len(labels[a]) + len(labels[b])) / 2 + 4
        if gap_pt < need_pt:
            return True
    return False


def _log_base(xs: list, logx):
    if logx is False or not xs or min(xs) <= 0:
        return None
    if logx in (2, 10):
        return logx
    powers_of_two = all(float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in xs)
    span = max(xs) / min(xs)
    return 2 if powers_of_two and span >= 8 else 10 if span >= 100 else None


def _untrained(stats: pd.DataFrame) -> pd.Series:
    """Groups (rows of ``summarize``) in which some used run did not train (``n_untrained``,
    present when the runs carry ``check_training``'s ``trained``): figures mark them, since the
    report does not compare such an arm."""
    if "n_untrained" not in stats:
        return pd.Series(False, index=stats.index)
    return stats["n_untrained"].fillna(0).astype(int) > 0


def _finish(ax, xlabel, ylabel, hue, title, diverged, untrained: str = "",
            legend_outside: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if diverged:
        ax.margins(y=0.15)  # headroom: the x marks sit at the top edge, above the data
        ax.plot([], [], ls="none", marker="x", mew=2, color="0.3", label="diverged runs")
    if untrained == "marker":
        ax.plot([], [], ls="none", marker="o", ms=7, mfc="white", mec="0.3", mew=1.5,
                label=UNTRAINED_LABEL)
    elif untrained == "hatch":  # an empty patch in axes coordinates: a legend entry, no data
        ax.add_artist(Rectangle((0, 0), 0, 0, facecolor="white", edgecolor="0.15", hatch="///",
                                label=UNTRAINED_LABEL, transform=ax.transAxes))
    handles, _ = ax.get_legend_handles_labels()
    if hue or diverged or untrained:
        _legend(ax, knob_label(hue) if hue else None, many=len(handles) > 4 or legend_outside)


def _legend(ax, title, many: bool) -> None:
    """Inside when it is small, outside on the right when it would cover the data; the
    'diverged runs' entry last (matplotlib would list line handles before bars)."""
    pairs = list(zip(*ax.get_legend_handles_labels()))
    pairs.sort(key=lambda hl: hl[1] in ("diverged runs", UNTRAINED_LABEL))
    handles, labels = zip(*pairs) if pairs else ((), ())
    where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}
    ax.legend(handles, labels, title=title, **where)


def _cell_text(s: pd.Series, value: str, scale: float) -> str:
    mean, lo, n = s[f"{value}.mean"] * scale, s[f"{value}.ci_lo"] * scale, s[f"{value}.n"]
    diverged = f"\n{int(s['n_diverged'])} diverged" if s["n_diverged"] else ""
    if n == 0:
        return (diverged or "\nno run").strip()
    text = f"{mean:.1f}" if scale != 1.0 else f"{mean:.3g}"
    if not math.isnan(lo):
        text += f"\n±{mean - lo:.1f}" if scale != 1.0 else f"\n±{mean - lo:.2g}"
    untrained = f"\n{int(s['n_untrained'])} untrained" if s.get("n_untrained", 0) else ""
    return text + f"\nn={n}{untrained}" + diverged


def _sort_key(v):
    """Numbers by value before strings, eval modes in their usual order (``EVAL_MODES``) before
    other strings; None/NaN last (mixed columns must still sort)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (2, 0, "")
    if isinstance(v, (int, float, np.number)):
        return (0, float(v), "")
    return (1, EVAL_MODES.index(v), "") if v in EVAL_MODES else (1, len(EVAL_MODES), str(v))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"  # a swept key that takes null (``fusion=null``): the value as typed
    if isinstance(v, (float, np.floating)):
        return f"{v:g}"
    return str(v)


def _position(values: list, v) -> int:
    """Index of ``v`` in ``values``, a None/NaN cell included (NaN != NaN defeats list.index)."""
    if _sort_key(v) == (2, 0, ""):
        return next(i for i, u in enumerate(values) if _sort_key(u) == (2, 0, ""))
    return values.index(v)


__all__ = ["LABELS", "set_style", "label", "knob_label", "is_percent", "save_figure",
           "plot_metric_vs", "plot_curves", "plot_bars", "plot_heatmap", "plot_probe"]
