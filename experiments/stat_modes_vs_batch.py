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

from dataclasses import replace

import pandas as pd
from matplotlib.figure import Figure

from bnexp import analysis as A
from bnexp.studies import Study, StudyData
from bnexp.verdicts import Shape, expect
from common import run_study

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


def figures(d: StudyData) -> dict:
    title = "ghost BN at optimization batch " + ", ".join(
        map(str, sorted(d.runs["data.batch_size"].unique())))
    return {"test_err_vs_nbs_by_eval_mode": plot_modes(d.runs, NBS, title=title)}


def labelled(d: StudyData) -> pd.DataFrame:
    """The runs with ``norm.freeze_after`` = "none" for plain ghost BN (a table row label)."""
    return d.runs.astype({FREEZE: object}).fillna({FREEZE: "none"})


def nbs(d: StudyData) -> list:
    return sorted(d.runs[NBS].dropna().unique())


def population_flat_then_rising(d: StudyData):
    """Precise error: above at the smallest NBS than at 16 (rising), flat from 16 to the largest."""
    long, xs = mode_lines(d.runs), nbs(d)
    mid = min(xs, key=lambda x: abs(x - 16))
    at = {"eval_mode": "precise"}
    return expect([(A.welch_diff(long, "test_err", NBS, xs[0], mid, at=at), +1),
                   (A.welch_diff(long, "test_err", NBS, mid, xs[-1], at=at), "flat")])


def batch_worse(d: StudyData):
    long, xs = mode_lines(d.runs), nbs(d)
    return expect([(A.paired_diff(long, "test_err", "eval_mode", "batch", "precise", at={NBS: x}), +1)
                   for x in (xs[0], xs[-1])])


def ema_close(d: StudyData):
    long, xs = mode_lines(d.runs), nbs(d)
    return expect([(A.paired_diff(long, "test_err", "eval_mode", "ema", "precise", at={NBS: xs[-1]}),
                    "flat")])


def frozen_not_worse(d: StudyData):
    long, xs = mode_lines(d.runs), nbs(d)
    return expect([(A.paired_diff(long, "test_err", "eval_mode", "frozen", "ema", at={NBS: xs[0]}), "<=")])


SOURCE = "Wu & Johnson 2021, Rethinking Batch in BatchNorm"
STUDY = Study(
    "stat_modes_vs_batch", __doc__,
    shapes=[Shape("population-stat (precise) error flat for NBS >= 16 and rising at NBS 2-4", SOURCE,
                  population_flat_then_rising),
            Shape("batch-stat evaluation worse than population statistics", SOURCE, batch_worse),
            Shape("EMA close to precise (many steps per epoch)", SOURCE, ema_close),
            Shape("FrozenBN at least as good as batch-stat training at small NBS", SOURCE,
                  frozen_not_worse)],
    prepare=lambda d: replace(d, runs=A.with_error(d.runs)),
    figures=figures, by=(FREEZE, NBS), metrics=tuple(f"test_err.{m}" for m in MODES),
    table_rows=labelled,
    comparisons=lambda d: statements(mode_lines(d.runs), NBS),
    notes=lambda d: (steps_note(d.runs, d.curves) + " The `frozen` line is the ema score of the "
                     "runs with `norm.freeze_after` set (statistics frozen for the rest of "
                     "training); the table lists every mode of both kinds of run, "
                     "`norm.freeze_after = none` being plain ghost BN."))


if __name__ == "__main__":
    run_study(STUDY)
