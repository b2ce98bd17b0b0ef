"""Does BN's small-batch penalty appear once the net cannot memorize its training set?

The regime test of batch_size (conf/study/batch_size_regime.yaml): batch_size's small design
lets every arm memorize 3,000 un-augmented images, and there the normalization batch costs BN
little. Here the same net, optimization batch (64), lr (0.1) and budget in steps (1.3x) train on
20,000 augmented images (random crop and flip), which no arm fits: ghost BN at normalization
batch (NBS) 2 and 32, and GN (batch-independent) as the reference, paired by seed. batch_size's
report states this study's answer.

Run::

    make study S=batch_size_regime ARGS="data=synthetic scale=smoke"                    # 9 runs
    make study S=batch_size_regime ARGS="data=fashion_mnist scale=small launcher=joblib"  # 9 runs

Expected (Wu & He 2018, "Group Normalization", Fig. 1: ImageNet error 34.7% at 2 images per
worker vs 23.6% at 32; Wu & Johnson 2021, Sec. 5): on data the net cannot memorize, BN at NBS 2
has a clearly higher error than at 32, and GN beats BN at NBS 2.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.convergence import clean_train_acc
from bnexp.analysis.forest import paired_rows, plot_forest
from bnexp.analysis.run_study import run_study
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare

SMALL, LARGE, REF = "ghost_bn2", "ghost_bn32", "gn"
NAMES = {SMALL: "BN at normalization batch 2", LARGE: "BN at normalization batch 32", REF: "GN"}
CONTRASTS = [(SMALL, LARGE, "BN at NBS 2 - BN at NBS 32"), (REF, SMALL, "GN - BN at NBS 2"),
             (REF, LARGE, "GN - BN at NBS 32")]


def verdict(runs: pd.DataFrame, a: str, b: str, want: int):
    """``a - b`` of test error between two norm presets, paired by seed."""
    return compare(runs, "test_err", "norm", a, b, want=want, names=(NAMES[a], NAMES[b]))


def penalty(d: StudyData):
    return verdict(d.runs, SMALL, LARGE, +1)


def gn_wins_small(d: StudyData):
    return verdict(d.runs, REF, SMALL, -1)


MEMORIZED = 0.99  # a run at or above this clean training accuracy fits its training set


def regime_holds(runs: pd.DataFrame) -> bool | None:
    """Whether no finished run fits its training set (the regime the test wants): every run's
    clean training accuracy (the better of EMA and precise statistics, on up to 10,000
    un-augmented training images) below ``MEMORIZED``; None without finished runs."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    acc = clean_train_acc(ok)
    return None if acc.dropna().empty else bool((acc < MEMORIZED).all())


def fit_note(runs: pd.DataFrame) -> str:
    """Whether the regime holds: each arm's final clean training accuracy (``clean_train_acc``)
    against its test accuracy, and ``regime_holds``'s conclusion."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    col = "clean_train_acc"
    if ok.empty or clean_train_acc(ok).dropna().empty:
        return ""
    ok = ok.assign(**{col: clean_train_acc(ok)})
    means = ok.groupby("norm")[[col, "test_acc"]].mean()
    parts = "; ".join(f"{NAMES.get(n, n)} {100 * r[col]:.1f}% train, {100 * r['test_acc']:.1f}% test"
                      for n, r in means.iterrows())
    return (f" Final clean training accuracy (eval mode, the better of EMA and precise statistics, "
            f"un-augmented training images) against test accuracy, mean over seeds: {parts}. "
            + ("No run fits its training set (every run below 99%): the regime the test wants (no "
               "memorization) holds." if regime_holds(runs) else
               "A run fits its training set (>= 99%): the regime the test wants (no memorization) "
               "is not reached, and the verdicts do not answer the regime question."))


SOURCE = "Wu & He 2018, Group Normalization, Fig. 1; Wu & Johnson 2021, Sec. 5"
STUDY = Study(
    "batch_size_regime", __doc__,
    shapes=[Shape("Once the net cannot memorize, BN's error at normalization batch 2 is above its error at 32",
                  SOURCE, penalty, "G"),
            Shape("Once the net cannot memorize, GN beats BN at normalization batch 2", SOURCE, gn_wins_small, "G")],
    prepare=lambda d: replace(d, runs=A.with_error(d.runs)),
    figures=lambda d: {"test_err_paired": plot_forest(
        paired_rows(d.runs, "test_err", "norm", CONTRASTS), "test_err",
        title="test error, paired by seed (below 0: the first arm is better)")},
    by=("norm",), metrics=("test_err", "test_err.precise", "train_acc", "train_loss", "gen_gap"),
    converged=None,
    comparisons=lambda d: [f"{what}: " + A.sentence(A.paired_diff(d.runs, "test_err", "norm", a, b))
                           for a, b, what in CONTRASTS if {a, b} <= set(d.runs["norm"])],
    notes=lambda d: ("Error is 1 - accuracy with EMA statistics; `test_err.precise` recomputes the "
                     "population statistics after training. Differences are paired by seed (the "
                     "arms of a seed share initialization and batch order)." + fit_note(d.runs)))


if __name__ == "__main__":
    run_study(STUDY)
