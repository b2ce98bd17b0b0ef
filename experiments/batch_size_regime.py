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


def fit_note(runs: pd.DataFrame) -> str:
    """Whether the regime holds: each arm's final training accuracy (``train_acc``: eval mode, up
    to 10,000 un-augmented training images, scored as the test set is) against its test accuracy."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    col = "train_acc"
    if ok.empty or col not in ok:
        return ""
    means = ok.groupby("norm")[[col, "test_acc"]].mean()
    parts = "; ".join(f"{NAMES.get(n, n)} {100 * r[col]:.1f}% train, {100 * r['test_acc']:.1f}% test"
                      for n, r in means.iterrows())
    fits = means[col].max() >= 0.99
    return (f" Final training accuracy (eval mode, un-augmented training images) against test "
            f"accuracy, mean over seeds: {parts}. "
            + ("An arm fits its training set here: the regime the test wants (no memorization) "
               "is not reached." if fits else
               "No arm fits its training set: the regime the test wants (no memorization) holds."))


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
    notes=lambda d: ("Error is 1 - accuracy with EMA statistics; `test_err.precise` recomputes the "
                     "population statistics after training. Differences are paired by seed (the "
                     "arms of a seed share initialization and batch order)." + fit_note(d.runs)))


if __name__ == "__main__":
    run_study(STUDY)
