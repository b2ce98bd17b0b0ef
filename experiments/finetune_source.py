"""How good are the source models that the finetune study starts from (trained and tested on clean images)?

Phase 1 of the finetune study (`make study S=finetune` runs it first, with the same overrides
minus the target's; see experiments/finetune.py). Sweep (conf/study/finetune_source.yaml): BN
nets trained on clean images, seeds {0, 1, 2}; each run folder is named
`<dataset>-<scale>/runs/<dataset>-<scale>-clean-seed<seed>`, the path conf/study/finetune.yaml's `finetune.from`
points at.

    make study S=finetune_source ARGS="data=synthetic scale=smoke"   # 3 runs, about a CPU minute
    make study S=finetune_source                                     # CIFAR-10: 3 runs, one GPU

Expected: ordinary BN training; test accuracy with EMA and precise statistics within about a
point of each other (many steps per epoch at batch 128, Wu & Johnson 2021). How much the sources
lose on the shifted target, before any fine-tuning, is in the finetune report's "eval only" rows.
"""
from __future__ import annotations

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare
from bnexp.analysis.run_study import run_study


def figures(d: StudyData) -> dict:
    modes = A.eval_modes_long(d.runs, "test_acc")
    figs = {"test_acc_by_eval_mode": A.plot_bars(modes, "eval_mode", "test_acc",
                                                 title="source models on the clean test set"),
            "test_acc_curves": A.plot_curves(d.curves, "epoch", "test_acc",
                                             title="source training (mean over seeds, 95% CI)")}
    epochs = sorted(d.curves["epoch"].unique())
    figs["test_acc_curves"].axes[0].set_xticks(epochs, [str(e + 1) for e in epochs])  # completed
    return figs


def precise_vs_ema(d: StudyData):
    modes = A.eval_modes_long(d.runs, "test_acc")  # two modes of the same model: paired
    return A.paired_diff(modes, "test_acc", "eval_mode", "precise", "ema")


STUDY = Study(
    "finetune_source", __doc__,
    shapes=[Shape("EMA and precise statistics within about a point of each other", "Wu & Johnson 2021",
                  lambda d: compare(A.eval_modes_long(d.runs, "test_acc"), "test_acc", "eval_mode", "precise",
                                    "ema", want=0, claim="E", runs=d.runs), "E")],
    figures=figures, by=("source",), metrics=("test_acc", "test_acc.precise", "train_acc", "gen_gap"),
    table_rows=lambda d: d.runs.assign(source="clean"),
    comparisons=lambda d: A.sentence(precise_vs_ema(d)) + ".", arm=())


if __name__ == "__main__":
    run_study(STUDY)
