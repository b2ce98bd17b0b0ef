"""The quick tour: does BN beat no normalization and dropout at a small and a large batch, and
which test-time statistics should it use?

Trains the same small CNN with BN, without normalization and without normalization but with
dropout (p = 0.3 before the classifier) at batch 8 and 128 (linear lr scaling), three seeds
each, for 4 epochs on the offline synthetic dataset; BN models are scored with EMA, precise
(population) and test-batch statistics. Its figures are those of the ``batch_size`` and
``stat_modes_vs_batch`` studies at smoke scale.

Run::

    make demo                     # = make study S=demo: 18 runs, a few minutes on 2 CPU cores
    make study S=demo ARGS="hydra/launcher=basic"   # the same runs one after another, in-process

Expected: on 2 CPU cores the sweep finishes in a few minutes. BN trains fastest at both batch
sizes and is well ahead of no normalization at batch 128 (Ioffe & Szegedy 2015); dropout
without normalization does not close the gap (Wu & He 2018 Fig. 1 for the batch axis). EMA and
precise statistics agree; batch statistics are close at batch 128 and worse at batch 8, where
test batches of 8 are noisy (Wu & Johnson 2021). Four epochs on synthetic data are a smoke
test: the figures show the pipeline, the studies answer the questions.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bnexp import analysis as A
from batch_size import plot_vs_batch
from common import question, run_study
from stat_modes_vs_batch import plot_modes

BATCH = "data.batch_size"
FIGURE = "test_acc_vs_batch"  # the main figure (docs/demo.png)


def with_launcher(argv: list[str]) -> list[str]:
    """``launcher=joblib`` (two runs at a time, one torch thread each) unless one is given:
    measured faster than one run with two threads on a 2-core machine (see the report)."""
    has = any(a.split("=", 1)[0].lstrip("+~") in ("launcher", "hydra/launcher") for a in argv)
    return argv if has or "--analyze-only" in argv else ["launcher=joblib", *argv]


def statements(runs) -> list[str]:
    """BN against no normalization and dropout at each batch size; BN's batch-stat evaluation
    against its EMA statistics at each batch size."""
    out = []
    summary = A.summarize(runs, ["norm", BATCH], ["test_acc"])
    for batch in sorted(runs[BATCH].dropna().unique()):
        out += [A.compare_statement(summary, "test_acc", "norm", "bn", other, at={BATCH: batch})
                for other in ("none", "dropout") if {"bn", other} <= set(summary["norm"])]
    bn = A.eval_modes_long(runs[runs["norm"] == "bn"], "test_acc")
    if {"batch", "ema"} <= set(bn["eval_mode"]):
        # two modes of the same models: differences paired by seed
        out += [f"bn at batch {b}: " + A.paired_statement(bn, "test_acc", "eval_mode", "batch", "ema",
                                                          at={BATCH: b})
                for b in sorted(bn[BATCH].dropna().unique())]
    return out


def analyze(study_dir: Path, command: str) -> Path:
    runs, curves = A.collect_runs(study_dir)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    figs = {FIGURE: plot_vs_batch(runs, "test_acc", title="demo: test accuracy (EMA statistics)"),
            "bn_test_acc_by_eval_mode": plot_modes(runs[runs["norm"] == "bn"], BATCH, "test_acc",
                                                   title="demo: BN under each test-time statistic")}
    figures = [A.save_figure(fig, study_dir / "figures", stem)[0] for stem, fig in figs.items()]
    by = ["norm", BATCH]
    metrics = [m for m in ("test_acc", "test_acc.precise", "test_acc.batch", "gen_gap") if m in runs]
    table = A.format_summary(A.summarize(runs, by, metrics), by, metrics)
    wall = runs["wall_time_s"].sum()
    notes = (f"The runs took {wall / 60:.1f} minutes of run time in total (summed over runs; "
             "two run at a time with launcher=joblib). Full-scale versions: "
             "`make study S=batch_size`, `make study S=stat_modes_vs_batch`.")
    return A.write_report(study_dir, "demo", question(__doc__), command, figures, table,
                          "\n".join(f"- {s}." for s in statements(runs)), notes)


def main(argv: list[str]) -> Path:
    report = run_study("demo", __doc__, analyze, with_launcher(argv))
    print(f"figures: {report.parent / 'figures'}  (main one: {FIGURE}.png)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
