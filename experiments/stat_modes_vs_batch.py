"""Which statistics should BN use at test time, and how does that depend on the normalization
batch size?

Ghost BN normalizes sub-batches of NBS = ``norm.virtual_batch`` images (2 ... 128) of a fixed
optimization batch of 128, so only the normalization batch changes. Every model is scored with
its EMA statistics (``ema``), with population statistics recomputed after training (``precise``)
and with the statistics of i.i.d. test batches of NBS images (``batch``); a second set of runs
freezes the BN statistics for the last 20% of training (FrozenBN, ``norm.freeze_after=0.8``,
scored with the statistics it trained with: the ``frozen`` line).

Run::

    make study S=stat_modes_vs_batch ARGS="data=synthetic scale=smoke"   # 24 runs, a few CPU minutes
    make study S=stat_modes_vs_batch                                    # CIFAR-10: 42 runs, one GPU

Expected (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3-4): the error with
population statistics (precise) is flat for NBS >= 16 and rises sharply at NBS 2-4; batch-stat
evaluation is flat in NBS but worse; EMA is close to precise except when training has few steps
per epoch (the EMA then lags the weights); freezing the statistics late in training removes the
train/test inconsistency that hurts small NBS.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bnexp import analysis as A
from common import question, run_study

NBS = "norm.virtual_batch"
FREEZE = "norm.freeze_after"
MODES = ("ema", "precise", "batch")


def mode_lines(runs: pd.DataFrame, metric: str = "test_err") -> pd.DataFrame:
    """One row per (run, eval mode) with ``metric`` and ``eval_mode``: the modes of the runs that
    trained with batch statistics throughout, plus ``frozen``, the ema score of the FrozenBN runs
    (their EMA statistics are the ones they trained with at the end). Runs without BN keep ema."""
    frozen = runs[FREEZE].notna() if FREEZE in runs else pd.Series(False, index=runs.index)
    long = A.eval_modes_long(runs[~frozen], metric)
    long = long[long["eval_mode"].isin(MODES)]
    if frozen.any():
        late = runs[frozen].drop(columns=[metric]).rename(columns={f"{metric}.ema": metric})
        long = pd.concat([long, late.assign(eval_mode="frozen")], ignore_index=True)
    return long


def plot_modes(runs: pd.DataFrame, x: str, metric: str = "test_err", title: str | None = None) -> Figure:
    """``metric`` against ``x`` (log2), one line with a CI band per eval mode (see mode_lines)."""
    long = mode_lines(runs, metric)
    order = [m for m in (*MODES, "frozen") if m in set(long["eval_mode"])]
    return A.plot_metric_vs(long, x, metric, "eval_mode", logx=2, hue_order=order, title=title)


def statements(long: pd.DataFrame, x: str, metric: str = "test_err") -> list[str]:
    """Sentences for the expected shape: precise at the smallest against the largest ``x``; batch
    and ema against precise at the largest, ema against precise and frozen against ema at the
    smallest and largest. Every comparison is paired by seed (see the loop)."""
    xs = sorted(long[x].dropna().unique())
    small, large = xs[0], xs[-1]
    summary = A.summarize(long, ["eval_mode", x], [metric])
    have = set(summary["eval_mode"])
    out = []
    if "precise" in have:
        out.append(f"Precise statistics, {A.label(x)} {small:g} vs {large:g}: "
                   + A.compare_statement(summary, metric, x, small, large, at={"eval_mode": "precise"}))
    pairs = [("batch", "precise", large), ("ema", "precise", large), ("ema", "precise", small),
             ("frozen", "ema", small), ("frozen", "ema", large)]
    for a, b, at in pairs:
        # paired by seed: two modes of the same models, or FrozenBN runs against the plain runs
        # of the same seed (same initialization and batches until the statistics freeze)
        if {a, b} <= have:
            out.append(A.paired_statement(long, metric, "eval_mode", a, b, at={x: at}))
    return out


def steps_note(runs: pd.DataFrame, curves: pd.DataFrame) -> str:
    """Steps per epoch (the ``step`` count after the first epoch) against the EMA's memory of
    about 1 / momentum steps: with few steps per epoch the EMA lags the weights."""
    first = curves[curves["epoch"] == curves["epoch"].min()]["step"] if len(curves) else []
    if not len(first):
        return ""
    momentum = runs["norm.momentum"].dropna()
    memory = f" BN momentum {momentum.iloc[0]:g} makes the EMA average over about " \
        f"{1 / momentum.iloc[0]:.0f} steps." if len(momentum) else ""
    steps, epochs = int(first.max()), int(runs["optim.epochs"].max())
    freeze = runs[FREEZE].dropna() if FREEZE in runs else []
    frozen = (f" FrozenBN runs froze their statistics after step {round(freeze.iloc[0] * steps * epochs)}"
              f" of {steps * epochs}, at the EMA of that moment (Wu & Johnson freeze late in a long "
              "schedule, when the lr is small and the EMA has settled)." if len(freeze) else "")
    return f"Training took {steps} steps per epoch for {epochs} epochs.{memory}{frozen}"


def analyze(study_dir: Path, command: str) -> Path:
    runs, curves = A.collect_runs(study_dir)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    runs = A.with_error(runs)
    fig = plot_modes(runs, NBS, title="ghost BN at optimization batch "
                     + ", ".join(map(str, sorted(runs["data.batch_size"].unique()))))
    figures = [A.save_figure(fig, study_dir / "figures", "test_err_vs_nbs_by_eval_mode")[0]]
    by = [FREEZE, NBS]
    metrics = [f"test_err.{m}" for m in MODES if f"test_err.{m}" in runs]
    labelled = runs.astype({FREEZE: object}).fillna({FREEZE: "none"})
    table = A.format_summary(A.summarize(labelled, by, metrics), by, metrics)
    statement = "\n".join(f"- {s}." for s in statements(mode_lines(runs), NBS))
    notes = (steps_note(runs, curves) + " The `frozen` line is the ema score of the runs with "
             "`norm.freeze_after` set (statistics frozen for the rest of training); the table "
             "lists every mode of both kinds of run, `norm.freeze_after = none` being plain ghost BN.")
    return A.write_report(study_dir, "stat_modes_vs_batch", question(__doc__), command, figures,
                          table, statement, notes)


if __name__ == "__main__":
    run_study("stat_modes_vs_batch", __doc__, analyze)
