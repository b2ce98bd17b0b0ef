"""Does BN allow (and need) larger learning rates?

The peak learning rate of SGD (momentum 0.9, cosine schedule, batch 128) is swept on a log grid
from 0.001 up to where training without normalization breaks, for the same network with BN and
without normalization. A second launch (``grid.extra``) trains both at one small lr for longer,
so that "equal at small lr" is read between nets that trained. A run whose loss becomes
non-finite is kept as a result (status ``diverged``) and drawn as an ``x`` at its learning rate.

Run::

    make study S=lr_sensitivity ARGS="data=synthetic scale=smoke"   # 7 rates: 42 + 6 runs
    make study S=lr_sensitivity ARGS="data=fashion_mnist scale=small launcher=joblib"  # 100 + 10 runs
    make study S=lr_sensitivity                                     # CIFAR-10: 8 rates, 48 + 6 runs

Expected (Bjorck et al. 2018, "Understanding Batch Normalization"; Santurkar et al. 2018, "How
Does Batch Normalization Help Optimization?"): at small learning rates both train alike; only
the BN network trains at large ones (the network without normalization diverges or stalls), and
BN's best accuracy, reached at a larger learning rate, is the best overall.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.forest import plot_counts
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.convergence import CHANCE_MULTIPLE, chance
from bnexp.analysis.verdicts import Shape, compare, compare_outcomes
from bnexp.analysis.run_study import run_study

LR = "optim.lr"


def best_lr(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per norm, the row of the learning rate with the highest mean ``metric``."""
    ranked = summary.dropna(subset=[f"{metric}.mean"]).sort_values(f"{metric}.mean", ascending=False)
    return ranked.groupby("norm", sort=True).head(1).set_index("norm")


def stability(runs: pd.DataFrame) -> list[str]:
    """Per norm, the learning rates at which some seed diverged (loss non-finite) and those at
    which every finished seed stalled (final train accuracy below twice chance)."""
    out, stall = [], CHANCE_MULTIPLE * chance(runs.iloc[0])
    for norm, group in runs.groupby("norm", sort=True):
        diverged = sorted(group.loc[group["status"] == "diverged", LR].unique())
        ok = group[group["status"] == "ok"]
        stalled = sorted(lr for lr, g in ok.groupby(LR) if (g["train_acc"] < stall).all())
        out.append(f"{norm}: diverged at {_lrs(diverged)}, stalled (train accuracy < "
                   f"{100 * stall:.0f}%) at {_lrs(stalled)}")
    return out


def _lrs(values) -> str:
    return "lr " + ", ".join(f"{v:g}" for v in values) if len(values) else "no lr"


def statements(runs: pd.DataFrame, metric: str = "test_acc") -> list[str]:
    """Best learning rate per norm, where each diverged, and BN against no normalization at the
    smallest learning rate and at each norm's best one."""
    summary = A.summarize(runs, ["norm", LR], [metric])
    best = best_lr(summary, metric)
    out = [f"{norm}: best mean {metric} {100 * row[f'{metric}.mean']:.1f}% at lr {row[LR]:g}"
           for norm, row in best.iterrows()]
    out += stability(runs)
    if {"bn", "none"} <= set(summary["norm"]):
        spots = dict.fromkeys([summary[LR].min(), *best[LR].tolist()])
        out += [A.compare_statement(summary, metric, "norm", "bn", "none", at={LR: lr}) for lr in spots]
    return out


def long_statements(d: StudyData, metric: str = "test_acc") -> list[str]:
    """BN against none at the longer budget (``grid.extra``), with each arm's train accuracy."""
    long = d.extra.get(LONG)
    if long is None or long.empty or not {"bn", "none"} <= set(long["norm"]):
        return []
    lr, epochs = long[LR].min(), long[EPOCHS].max()
    col = "clean_train_acc" if "clean_train_acc" in long else "train_acc"
    fit = long[long["status"] == "ok"].groupby("norm")[col].mean() * 100
    return [f"At lr {lr:g} for {epochs:g} epochs: " + A.compare_statement(
        A.summarize(long, ["norm", LR], [metric]), metric, "norm", "bn", "none", at={LR: lr})
        + f" (clean train accuracy BN {fit.get('bn', float('nan')):.1f}%, none {fit.get('none', float('nan')):.1f}%)"]


def figures(d: StudyData) -> dict:
    # headline: seeds either train or do not at a given lr (bimodal), so counts, not a mean and a band
    figs = {"trained_vs_lr": plot_counts(d.runs, LR, "trained", "norm", title="seeds that trained (k of n) per "
                                         "learning rate; xx: diverged, dots: stalled"),
            "test_acc_vs_lr": A.plot_metric_vs(d.runs, LR, "test_acc", "norm", logx=10,
                                               title="final test accuracy; x = a run that diverged")}
    if "train_loss" in d.runs:  # does it train at all: a stalled run keeps the initial ~ln(classes)
        figs["train_loss_vs_lr"] = A.plot_metric_vs(
            d.runs, LR, "train_loss", "norm", logx=10,
            title="final training loss (eval mode); x = a run that diverged")
    return figs


EPOCHS = "optim.epochs"
LONG = "long"  # StudyData.extra's key: the runs of grid.extra's longer budget at one small lr


def prepare(d: StudyData) -> StudyData:
    """Sets the runs of the longer budget (``grid.extra``: more epochs at one small lr, so that
    "equal at small lr" is read between nets that trained) apart in ``d.extra[LONG]``; every
    figure, table and the other shapes read the grid, whose runs share one budget."""
    long = is_long(d.runs)
    if long.any():
        d.extra[LONG] = d.runs[long].copy()
        d.runs = d.runs[~long].copy()
    return d


def is_long(runs: pd.DataFrame) -> pd.Series:
    """The runs of grid.extra's longer budget: ``optim.epochs`` at the scale's ``long_epochs``
    and ``optim.lr`` at its ``long_lr`` (recorded per run as ``grid.<scale>.*``), apart from the
    grid's own budget. Records without those columns: none."""
    out = pd.Series(False, index=runs.index)
    if EPOCHS not in runs or "scale_name" not in runs:
        return out
    for scale, rows in runs.groupby("scale_name"):
        cols = [f"grid.{scale}.{k}" for k in ("long_epochs", "long_lr", "epochs")]
        if all(c in rows for c in cols):
            long_epochs, long_lr, epochs = (rows[c].iloc[0] for c in cols)
            out[rows.index] = ((rows[EPOCHS] == long_epochs) & np.isclose(rows[LR], long_lr)
                               & (long_epochs != epochs))
    return out


def equal_at_small_lr(d: StudyData):
    """Primary: BN against none at the longer budget's lr, where both can train (a claim about
    converged nets); also at the grid's smallest lr, at the grid's budget (too few steps to
    train there: an equal-budget reading). Without the longer runs, the grid's smallest lr."""
    small = compare(d.runs, "test_acc", "norm", "bn", "none", want=0, margin=0.02, at={LR: d.runs[LR].min()},
                    note=f"the grid's budget, {d.runs[EPOCHS].max():g} epochs" if EPOCHS in d.runs else "")
    long = d.extra.get(LONG)
    if long is None or long.empty:
        return small
    lr, epochs = long[LR].min(), long[EPOCHS].max()
    return compare(long, "test_acc", "norm", "bn", "none", want=0, margin=0.02, at={LR: lr},
                   note=f"the longer budget, {epochs:g} epochs (grid.extra)").also(small)


def only_bn_at_high_lr(d: StudyData):
    """At the largest lr the docstring's shape: every BN seed learns (finished, train accuracy
    at least twice chance) and no unnormalized seed does (diverged or stalled): a type T claim,
    the per-seed outcomes compared as counts."""
    return compare_outcomes(d.runs, "norm", "bn", "none", at={LR: d.runs[LR].max()})


def best_by_train_loss(runs: pd.DataFrame) -> dict:
    """Per norm, the learning rate of the lowest mean final training loss (eval mode) over
    finished runs: the committed runs have no validation split, and the test set must not pick."""
    ok = runs[runs["status"] == "ok"]
    return ok.groupby(["norm", LR])["train_loss"].mean().groupby("norm").idxmin().map(lambda k: k[1]).to_dict()


def bn_best(d: StudyData):
    best = best_by_train_loss(d.runs)
    runs = d.runs.assign(arm=d.runs["norm"] + " at lr " + d.runs[LR].map("{:g}".format))
    arms = {n: f"{n} at lr {best[n]:g}" for n in ("bn", "none")}
    return compare(runs, "test_acc", "arm", arms["bn"], arms["none"],
                   names=(f"BN at lr {best['bn']:g}", f"no normalization at lr {best['none']:g}"),
                   note="each arm's lr picked by its lowest final training loss (no validation split "
                        "in these runs; the test set does not pick)")


TARGET = 0.9  # the clean training accuracy whose first step "learns faster" compares
STEPS = "log2_steps_to_target"


def log2_steps_to(runs: pd.DataFrame, curves: pd.DataFrame, target: float = TARGET) -> pd.Series:
    """Per run, log2 of ``steps_to.train_acc.<target>`` (the first step at which the clean,
    eval-mode training accuracy reached ``target``; bnexp/training/targets.py). A run that never
    reached it counts as twice its last step: a lower bound, which only shrinks a difference
    in favour of the arm that did reach it. NaN for runs recorded before the metric existed."""
    col = f"steps_to.train_acc.{target:g}"
    if col not in runs or runs[col].isna().all() and "train_acc.clean" not in curves:
        return pd.Series(np.nan, index=runs.index, name=STEPS)
    budget = curves.groupby("run")["step"].max().reindex(runs["run"]).to_numpy()
    return np.log2(runs[col].astype(float).fillna(pd.Series(2.0 * budget, index=runs.index))).rename(STEPS)


def learns_faster(runs: pd.DataFrame, curves: pd.DataFrame, arm: str, a: str, b: str, at=None,
                  names=None, note: str = ""):
    """Claim type D (trajectories at matched steps, no training gate). Primary contrast: ``a``
    vs ``b`` of column ``arm`` on log2 steps to ``TARGET`` clean training accuracy, paired by
    seed: ``a`` lower (the difference is a log2 ratio of steps, so no point margin applies)."""
    runs = runs.assign(**{STEPS: log2_steps_to(runs, curves).to_numpy()})
    return compare(runs, STEPS, arm, a, b, want=-1, claim="D", at=at, margin=0.0, names=names, note=note)


def bn_faster(d: StudyData):
    """BN and none each at its best lr (by lowest final training loss, as ``bn_best``), paired by
    seed on log2 steps to the target."""
    best = best_by_train_loss(d.runs)
    runs = d.runs.assign(arm=d.runs["norm"] + " at lr " + d.runs[LR].map("{:g}".format))
    arms = {n: f"{n} at lr {best[n]:g}" for n in ("bn", "none")}
    return learns_faster(runs, d.curves, "arm", arms["bn"], arms["none"],
                         names=(f"BN at lr {best['bn']:g}", f"no normalization at lr {best['none']:g}"),
                         note="each arm's lr picked by its lowest final training loss")


SOURCE = "Bjorck et al. 2018; Santurkar et al. 2018"
STUDY = Study(
    "lr_sensitivity", __doc__,
    shapes=[Shape("equal accuracy at a small learning rate (read between trained nets where the longer "
                  "budget ran)", SOURCE,
                  equal_at_small_lr, "G"),
            Shape("only BN trains at the largest learning rate", SOURCE, only_bn_at_high_lr, "T"),
            Shape("BN's best accuracy (at its best lr) is the best overall", SOURCE, bn_best, "G"),
            Shape(f"BN learns faster: at its best lr it reaches {TARGET:.0%} clean training accuracy in "
                  "fewer steps than none at its best lr", "the notes: 'speeding the learning process'",
                  bn_faster, "D")],
    figures=figures, by=("norm", LR), metrics=("test_acc", "train_acc", "train_loss"), prepare=prepare,
    comparisons=lambda d: statements(d.runs) + long_statements(d),
    notes=lambda d: (
        "Means and intervals use the runs that finished; the `diverged` column counts the "
        "others (their loss became non-finite), drawn as x marks above their learning rate. "
        "A run can also fail without diverging: it stalls near chance with a finite loss, "
        "which the training-loss figure shows (a flat line at ln(classes)); both count as "
        "'does not train at this learning rate'. At a learning rate too small for the "
        "number of steps, both networks stall alike." + long_note(d)))


def long_note(d: StudyData) -> str:
    """What the longer-budget runs are, where there are any."""
    long = d.extra.get(LONG)
    if long is None or long.empty:
        return ""
    return (f" The {len(long)} runs at lr {long[LR].min():g} for {long[EPOCHS].max():g} epochs "
            "(grid.extra) are read apart from the grid: the first shape's primary contrast and the "
            "last comparison; every figure and the table show the grid's budget.")


if __name__ == "__main__":
    run_study(STUDY)
