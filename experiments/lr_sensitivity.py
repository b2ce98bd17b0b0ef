"""Does BN allow (and need) larger learning rates?

The peak learning rate of SGD (momentum 0.9, cosine schedule, batch 128) is swept on a log grid
from 0.001 up to where training without normalization breaks, for the same network with BN and
without normalization. A run whose loss becomes non-finite is kept as a result (status
``diverged``) and drawn as an ``x`` at its learning rate.

Run::

    make study S=lr_sensitivity ARGS="data=synthetic scale=smoke"   # 7 rates: 42 runs
    make study S=lr_sensitivity                                     # CIFAR-10: 8 rates, 48 runs

Expected (Bjorck et al. 2018, "Understanding Batch Normalization"; Santurkar et al. 2018, "How
Does Batch Normalization Help Optimization?"): at small learning rates both train alike; only
the BN network trains at large ones (the network without normalization diverges or stalls), and
BN's best accuracy, reached at a larger learning rate, is the best overall.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bnexp import analysis as A
from common import question, run_study

LR = "optim.lr"


def best_lr(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per norm, the row of the learning rate with the highest mean ``metric``."""
    ranked = summary.dropna(subset=[f"{metric}.mean"]).sort_values(f"{metric}.mean", ascending=False)
    return ranked.groupby("norm", sort=True).head(1).set_index("norm")


def chance(runs: pd.DataFrame) -> float:
    """Accuracy of guessing: 1 / number of classes of the runs' dataset."""
    row = runs.iloc[0]
    classes = row.get("data.classes")
    if isinstance(classes, str) and classes.startswith("["):
        return 1.0 / len(json.loads(classes))
    return 1.0 / {"cifar10": 10, "cifar100": 100}.get(row["data.name"], row["data.synthetic_classes"])


def stability(runs: pd.DataFrame) -> list[str]:
    """Per norm, the learning rates at which some seed diverged (loss non-finite) and those at
    which every finished seed stalled (final train accuracy below twice chance)."""
    out, stall = [], 2 * chance(runs)
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


def analyze(study_dir: Path, command: str) -> Path:
    runs, curves = A.collect_runs(study_dir)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    fig = A.plot_metric_vs(runs, LR, "test_acc", "norm", logx=10,
                           title="final test accuracy; x = a run that diverged")
    figures = [A.save_figure(fig, study_dir / "figures", "test_acc_vs_lr")[0]]
    if "train_loss" in runs:  # does it train at all: a stalled run keeps the initial ~ln(classes)
        fig = A.plot_metric_vs(runs, LR, "train_loss", "norm", logx=10,
                               title="final training loss (eval mode); x = a run that diverged")
        figures.append(A.save_figure(fig, study_dir / "figures", "train_loss_vs_lr")[0])
    by = ["norm", LR]
    metrics = [m for m in ("test_acc", "train_acc", "train_loss") if m in runs]
    table = A.format_summary(A.summarize(runs, by, metrics), by, metrics)
    statement = "\n".join(f"- {s}." for s in statements(runs))
    notes = ("Means and intervals use the runs that finished; the `diverged` column counts the "
             "others (their loss became non-finite), drawn as x marks above their learning rate. "
             "A run can also fail without diverging: it stalls near chance with a finite loss, "
             "which the training-loss figure shows (a flat line at ln(classes)); both count as "
             "'does not train at this learning rate'. At a learning rate too small for the "
             "number of steps, both networks stall alike.")
    return A.write_report(study_dir, "lr_sensitivity", question(__doc__), command, figures, table,
                          statement, notes)


if __name__ == "__main__":
    run_study("lr_sensitivity", __doc__, analyze)
