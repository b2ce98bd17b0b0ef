"""Does BN's edge hold as the batch gets small?

The true (optimization = normalization) batch is swept over 8 ... 512 with the linear scaling
rule (``optim.scale_lr=true``: lr = 0.1 x batch / 128) for BN, group norm (8 groups), no
normalization and ghost BN with normalization batches of 32 (plain BN at batch <= 32); every
model is scored with its EMA statistics (the default eval mode).

Run::

    make study S=batch_size ARGS="data=synthetic scale=smoke"   # batch 8, 32, 128: 36 runs
    make study S=batch_size                                     # CIFAR-10: 48 runs, one GPU

Expected (Wu & He 2018, "Group Normalization", Fig. 1): BN's error rises as the batch shrinks
(noisy statistics), GN's stays flat, so GN wins at small batch and BN at large; no normalization
is worst at the large batches, whose scaled learning rates it cannot take; ghost BN 32 keeps
BN's small-batch regime at every batch.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
from matplotlib.figure import Figure

from bnexp import analysis as A
from bnexp.studies import Study, StudyData
from bnexp.verdicts import Shape, expect
from common import run_study

BATCH = "data.batch_size"
NORMS = ("bn", "ghost_bn", "batch_renorm", "gn", "ln", "none", "dropout")  # legend order


def plot_vs_batch(runs: pd.DataFrame, metric: str = "test_err", title: str | None = None) -> Figure:
    """``metric`` against the batch size (log2 x), one line with a CI band per ``norm`` option."""
    present = list(runs["norm"].dropna().unique())
    order = [n for n in NORMS if n in present] + sorted(n for n in present if n not in NORMS)
    return A.plot_metric_vs(runs, BATCH, metric, "norm", logx=2, hue_order=order, title=title)


def statements(runs: pd.DataFrame, metric: str = "test_err") -> list[str]:
    """Sentences for the expected shape: each norm from the largest to the smallest batch; GN
    against BN at the smallest batch; BN against no normalization at the largest."""
    batches = sorted(runs[BATCH].dropna().unique())
    small, large = batches[0], batches[-1]
    summary = A.summarize(runs, ["norm", BATCH], [metric])
    norms = [n for n in NORMS if n in set(summary["norm"])]
    out = [f"{n}, batch {small} vs {large}: "
           + A.compare_statement(summary, metric, BATCH, small, large, at={"norm": n}) for n in norms]
    for a, b, at in (("gn", "bn", small), ("bn", "none", large), ("bn", "none", small)):
        if {a, b} <= set(norms):
            out.append(A.compare_statement(summary, metric, "norm", a, b, at={BATCH: at}))
    return out


def steps_note(curves: pd.DataFrame) -> str:
    """Steps per epoch at each batch size: a fixed number of epochs gives small batches more
    (smaller) steps, which decides short runs as much as the noise of the batch statistics."""
    if not len(curves) or "step" not in curves:
        return ""
    first = curves[curves["epoch"] == curves["epoch"].min()].groupby(BATCH)["step"].max()
    steps = ", ".join(f"{int(s)} at batch {b}" for b, s in first.items())
    return f" Every run trains for the same epochs: steps per epoch were {steps}."


def title(runs: pd.DataFrame) -> str:
    lr = runs["optim.lr"].dropna()
    text = f"lr {lr.iloc[0]:g} x batch / 128" if len(lr) else ""
    if "norm.virtual_batch" in runs and (runs["norm"] == "ghost_bn").any():
        vb = int(runs["norm.virtual_batch"].iloc[0])
        text += f"; ghost_bn normalizes {vb} images: = bn at batch <= {vb}"
    return text


def ends(d: StudyData) -> tuple:
    batches = sorted(d.runs[BATCH].dropna().unique())
    return batches[0], batches[-1]


def bn_rises(d: StudyData):
    small, large = ends(d)
    return expect([(A.welch_diff(d.runs, "test_err", BATCH, small, large, at={"norm": "bn"}), +1)])


def gn_flat(d: StudyData):
    small, large = ends(d)
    return expect([(A.welch_diff(d.runs, "test_err", BATCH, small, large, at={"norm": "gn"}), "flat")])


def gn_small_bn_large(d: StudyData):
    small, large = ends(d)
    return expect([(A.welch_diff(d.runs, "test_err", "norm", "gn", "bn", at={BATCH: small}), -1),
                   (A.welch_diff(d.runs, "test_err", "norm", "bn", "gn", at={BATCH: large}), -1)])


SOURCE = "Wu & He 2018, Group Normalization, Fig. 1"
STUDY = Study(
    "batch_size", __doc__,
    shapes=[Shape("BN's error rises as the batch shrinks", SOURCE, bn_rises),
            Shape("GN's error stays flat across batch sizes", SOURCE, gn_flat),
            Shape("GN wins at the smallest batch, BN at the largest", SOURCE, gn_small_bn_large)],
    prepare=lambda d: replace(d, runs=A.with_error(d.runs)),
    figures=lambda d: {"test_err_vs_batch": plot_vs_batch(d.runs, title=title(d.runs))},
    by=("norm", BATCH), metrics=("test_err", "test_err.precise", "gen_gap"),
    comparisons=lambda d: statements(d.runs),
    notes=lambda d: ("Error is 1 - accuracy with EMA statistics. `test_err.precise` (population "
                     "statistics recomputed after training) separates a poor EMA estimate from a "
                     "poorly trained model; it is missing where the model has no BN layer (gn, none)."
                     + steps_note(d.curves)))


if __name__ == "__main__":
    run_study(STUDY)
