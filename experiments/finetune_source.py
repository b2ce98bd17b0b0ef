"""How good are the source models that the finetune study starts from (trained and tested on clean images)?

Phase 1 of the finetune study (`make study S=finetune` runs it first, with the same overrides
minus the target's; see experiments/finetune.py). Sweep (conf/study/finetune_source.yaml): BN
nets trained on clean images, seeds {0, 1, 2}; each run folder is named
`runs/<dataset>-<scale>-clean-seed<seed>`, the path conf/study/finetune.yaml's `finetune.from`
points at.

    make study S=finetune_source ARGS="data=synthetic scale=smoke"   # 3 runs, about a CPU minute
    make study S=finetune_source                                     # CIFAR-10: 3 runs, one GPU

Expected: ordinary BN training; test accuracy with EMA and precise statistics within about a
point of each other (many steps per epoch at batch 128, Wu & Johnson 2021). How much the sources
lose on the shifted target, before any fine-tuning, is in the finetune report's "eval only" rows.
"""
from __future__ import annotations

from pathlib import Path

from bnexp import analysis as A
from common import question, run_study


def analyze(study_dir: Path, command: str) -> Path:
    runs, curves = A.collect_runs(study_dir)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    if "test_acc" not in runs:
        return A.write_report(study_dir, "finetune_source", question(__doc__), command, [],
                              runs[["run", "status"]], "No finished run yet.")
    modes = A.eval_modes_long(runs, "test_acc")
    figs = {"test_acc_by_eval_mode": A.plot_bars(modes, "eval_mode", "test_acc",
                                                 title="source models on the clean test set"),
            "test_acc_curves": A.plot_curves(curves, "epoch", "test_acc",
                                             title="source training (mean over seeds, 95% CI)")}
    epochs = sorted(curves["epoch"].unique())
    figs["test_acc_curves"].axes[0].set_xticks(epochs, [str(e + 1) for e in epochs])  # completed
    paths = [A.save_figure(fig, study_dir / "figures", stem)[0] for stem, fig in figs.items()]
    metrics = [m for m in ("test_acc", "test_acc.precise", "train_acc", "gen_gap") if m in runs]
    summary = A.summarize(runs.assign(source="clean"), ["source"], metrics)
    text = A.paired_statement(modes, "test_acc", "eval_mode", "precise", "ema") + "."  # same model
    return A.write_report(study_dir, "finetune_source", question(__doc__), command, paths,
                          A.format_summary(summary, ["source"], metrics), text)


if __name__ == "__main__":
    run_study("finetune_source", __doc__, analyze)
