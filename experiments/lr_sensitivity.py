"""Does BN allow (and need) larger learning rates?

The peak learning rate of SGD (momentum 0.9, cosine schedule, batch 128) is swept on a log grid
from 0.001 up to where training without normalization breaks, for the same network with BN and
without normalization. A run whose loss becomes non-finite is kept as a result (status
``diverged``) and drawn as an ``x`` at its learning rate.

Run::

    make study S=lr_sensitivity ARGS="data=synthetic scale=smoke"   # 7 rates: 42 runs
    make study S=lr_sensitivity ARGS="data=fashion_mnist scale=small launcher=joblib"  # 48 runs
    make study S=lr_sensitivity                                     # CIFAR-10: 8 rates, 48 runs

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
from bnexp.analysis.verdicts import (CHANCE_MULTIPLE, NOT_SHOWN, NOT_TESTED, PARTLY, SHOWN, Shape, Verdict,
                            chance, expect, learned, on_learned_runs)
from common import run_study

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


def figures(d: StudyData) -> dict:
    # headline: seeds either train or do not at a given lr (bimodal), so counts, not a mean and a band
    figs = {"trained_vs_lr": plot_counts(d.runs, LR, "trained", "norm",
                                         title="seeds that trained (k of n) per learning rate; hatched: diverged"),
            "test_acc_vs_lr": A.plot_metric_vs(d.runs, LR, "test_acc", "norm", logx=10,
                                               title="final test accuracy; x = a run that diverged")}
    if "train_loss" in d.runs:  # does it train at all: a stalled run keeps the initial ~ln(classes)
        figs["train_loss_vs_lr"] = A.plot_metric_vs(
            d.runs, LR, "train_loss", "norm", logx=10,
            title="final training loss (eval mode); x = a run that diverged")
    return figs


def equal_at_small_lr(d: StudyData):
    return expect([(A.welch_diff(d.runs, "test_acc", "norm", "bn", "none", at={LR: d.runs[LR].min()}),
                    "flat")])


def only_bn_at_high_lr(d: StudyData):
    """At the largest lr, the docstring's shape: the BN net trains and the unnormalized one
    diverges or stalls (the notes' "does not train at this learning rate"). Shown when every BN
    seed also passed the training check (a finished model); partly when every BN seed learned
    (finished, not stalled: train accuracy at least twice chance, as ``stability`` reads it) but
    some had not flattened within the budget."""
    arms = d.arms.set_index(["norm", LR])
    top = d.runs[LR].max()
    if ("bn", top) not in arms.index or ("none", top) not in arms.index:
        return Verdict(NOT_TESTED, reason=f"no finished bn and none runs at lr {top:g}")
    at_top, floor = d.runs[d.runs[LR] == top], CHANCE_MULTIPLE * chance(d.runs.iloc[0])
    n_learned = learned(at_top).groupby(at_top["norm"]).sum().astype(int).to_dict()
    bn, none = arms.loc[("bn", top)], arms.loc[("none", top)]
    evidence = (f"at lr {top:g}: bn trained in {bn['trained']} of {bn['runs']} runs and learned "
                f"(train accuracy >= {100 * floor:.0f}%) in {n_learned.get('bn', 0)}; none trained in "
                f"{none['trained']} of {none['runs']} ({none['why not'] or 'all trained'}), learned "
                f"in {n_learned.get('none', 0)}")
    if n_learned.get("none", 0) == none["runs"]:
        return Verdict(NOT_SHOWN, evidence, "the unnormalized net learned there too")
    if bn["trained"] == bn["runs"]:
        return Verdict(SHOWN, evidence)
    if n_learned.get("bn", 0) == bn["runs"]:
        return Verdict(PARTLY, evidence, "bn learned there in every seed, but not every seed's "
                       f"loss had flattened ({bn['why not']})")
    return Verdict(NOT_SHOWN, evidence, "bn did not learn there either")


def bn_best(d: StudyData):
    summary = A.summarize(d.runs, ["norm", LR], ["test_acc"])
    best = best_lr(summary, "test_acc")
    runs = d.runs.assign(arm=d.runs["norm"] + " at lr " + d.runs[LR].map("{:g}".format))
    arms = {n: f"{n} at lr {best.loc[n, LR]:g}" for n in ("bn", "none")}
    return expect([(A.welch_diff(runs, "test_acc", "arm", arms["bn"], arms["none"]), +1)])


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


def learns_faster(runs: pd.DataFrame, curves: pd.DataFrame, arm: str, a: str, b: str, at=None):
    """Claim type D (trajectories at matched steps). Primary contrast: ``a`` vs ``b`` of column
    ``arm`` on log2 steps to ``TARGET`` clean training accuracy, paired by seed: ``a`` lower."""
    runs = runs.assign(**{STEPS: log2_steps_to(runs, curves).to_numpy()})
    return expect([(A.paired_diff(runs, STEPS, arm, a, b, at=at), -1)])


@on_learned_runs
def bn_faster(d: StudyData):
    """BN and none each at its best lr (by mean test accuracy, as ``bn_best``), paired by seed;
    a claim about trajectories, so read on the runs that learned when only unflattened losses
    keep an arm out (``on_learned_runs``)."""
    best = best_lr(A.summarize(d.runs, ["norm", LR], ["test_acc"]), "test_acc")
    runs = d.runs.assign(arm=d.runs["norm"] + " at lr " + d.runs[LR].map("{:g}".format))
    arms = {n: f"{n} at lr {best.loc[n, LR]:g}" for n in ("bn", "none")}
    return learns_faster(runs, d.curves, "arm", arms["bn"], arms["none"])


SOURCE = "Bjorck et al. 2018; Santurkar et al. 2018"
STUDY = Study(
    "lr_sensitivity", __doc__,
    shapes=[Shape("equal accuracy at the smallest learning rate", SOURCE, equal_at_small_lr),
            Shape("only BN trains at the largest learning rate", SOURCE, only_bn_at_high_lr),
            Shape("BN's best accuracy (at its best lr) is the best overall", SOURCE, bn_best),
            Shape(f"BN learns faster: at its best lr it reaches {TARGET:.0%} clean training accuracy in "
                  "fewer steps than none at its best lr", "the notes: 'speeding the learning process'",
                  bn_faster)],
    figures=figures, by=("norm", LR), metrics=("test_acc", "train_acc", "train_loss"),
    comparisons=lambda d: statements(d.runs),
    notes=lambda d: (
        "Means and intervals use the runs that finished; the `diverged` column counts the "
        "others (their loss became non-finite), drawn as x marks above their learning rate. "
        "A run can also fail without diverging: it stalls near chance with a finite loss, "
        "which the training-loss figure shows (a flat line at ln(classes)); both count as "
        "'does not train at this learning rate'. At a learning rate too small for the "
        "number of steps, both networks stall alike."))


if __name__ == "__main__":
    run_study(STUDY)
