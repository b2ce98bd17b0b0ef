"""The quick tour: does BN beat no normalization and dropout at a small and a large batch, and
which test-time statistics should it use?

Trains the same small CNN (width 16) with BN, without normalization and without normalization
but with dropout (p = 0.3 before the classifier) at batch 8 and 128 (linear lr scaling), five
seeds each, for 20 epochs on 1000 un-augmented real Fashion-MNIST training images, scored on all
10,000 test images (conf/study/demo.yaml, which pins scale=small). BN trains at lr 0.1 (at batch
128); none and dropout at their own lr, chosen on 200 held-out training images from a grid
(`make demo` reuses the committed reference's grid runs: ``reuse_reference_grid``). BN models are
scored with EMA,
precise (population) and test-batch statistics. Only when no real data can be had (no Debian
package, no download: `make demo` first tries `python -m bnexp.data.files fetch fashion_mnist`)
does it fall back to the offline synthetic images at smoke scale (`data=synthetic
scale=smoke`), and it says so in the terminal and in the report. Its figures are those of the
``batch_size`` and ``stat_modes_vs_batch`` studies at a few minutes' scale.

``make demo`` trains into a folder of your own, ``results/scratch/demo/fashion_mnist-small/``
(``results_dir=results/scratch``: git-ignored, so no tracked file changes), and its report and
terminal put each arm's numbers beside the committed reference run of this repository,
``results/demo/fashion_mnist-small/`` (``beside_reference``). ``make study S=demo`` re-makes
that reference itself.

Run::

    make demo                     # fetch the data if needed, then 30 runs, a few minutes on 2 CPU cores
    make study S=demo ARGS="hydra/launcher=basic"   # the reference runs, one after another, in-process

Expected: on 2 CPU cores the sweep finishes in a few minutes. BN trains fastest at both batch
sizes and is well ahead of no normalization at batch 128 (Ioffe & Szegedy 2015), with a visible
generalization gap; dropout without normalization does not close the gap (Wu & He 2018 Fig. 1
for the batch axis). EMA and precise statistics agree; batch statistics are close at batch 128
and worse at batch 8, where test batches of 8 are noisy (Wu & Johnson 2021).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, compare_outcomes, compare_value
from bnexp.analysis.run_study import ROOT, run_study, study_dir
from lr_sensitivity import TARGET, learns_faster
from stat_modes_vs_batch import plot_modes

BATCH = "data.batch_size"
FIGURE = "test_acc_vs_batch"  # the main figure (docs/demo.png)
REAL = "fashion_mnist"
FALLBACK = {"data": "synthetic", "scale": "smoke"}  # offline procedural images, the smoke budget
REFERENCE = ROOT / "results" / "demo"  # the committed runs a newcomer's demo is compared with
SCRATCH = "results/scratch"  # `make demo`'s results_dir: git-ignored (.gitignore), never the reference


def plot_vs_batch(runs, metric: str, title: str):
    """``metric`` against the batch size (log2 x), a line with a CI band per ``norm`` option."""
    order = [n for n in ("bn", "none", "dropout") if n in set(runs["norm"])]
    return A.plot_metric_vs(runs, BATCH, metric, "norm", logx=2, hue_order=order, title=title)


def with_launcher(argv: list[str]) -> list[str]:
    """``launcher=joblib`` (two runs at a time, one torch thread each) unless one is given:
    measured faster than one run with two threads on a 2-core machine (see the report)."""
    has = any(a.split("=", 1)[0].lstrip("+~") in ("launcher", "hydra/launcher") for a in argv)
    return argv if has or "--analyze-only" in argv else ["launcher=joblib", *argv]


def with_data(argv: list[str]) -> list[str]:
    """The demo's own data (Fashion-MNIST) unless ``data=`` is given or no real data can be had:
    then ``data=synthetic``, said on the terminal (the report says it from the runs' config)."""
    if "--analyze-only" in argv or any(a.split("=", 1)[0] == "data" for a in argv):
        return argv
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("data.root=")), None)
    if real_data_available(root):
        return argv
    print(f"demo: no real {REAL} data found (install the Debian package dataset-fashion-mnist "
          "or run `make data`): falling back to the offline synthetic images (data=synthetic "
          "scale=smoke); the report says so", flush=True)
    given = {a.split("=", 1)[0] for a in argv}
    return [f"{k}={v}" for k, v in FALLBACK.items() if k not in given] + list(argv)


def real_data_available(root: str | None) -> bool:
    """``bnexp.data.datasets.dataset_available`` (the data helper's), False where it does not exist yet."""
    try:
        from bnexp.data.datasets import dataset_available
    except ImportError:
        return False
    if root is None:
        import yaml

        root = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["data"].get("root")
    return bool(dataset_available(REAL, root))


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


def figures(d: StudyData) -> dict:
    return {FIGURE: plot_vs_batch(d.runs, "test_acc", title="demo: test accuracy (EMA statistics)"),
            "bn_test_acc_by_eval_mode": plot_modes(d.runs[d.runs["norm"] == "bn"], BATCH, "test_acc",
                                                   title="demo: BN under each test-time statistic")}


def bn_ahead(d: StudyData):
    parts = [compare(d.runs, "test_acc", "norm", "bn", other, want=+1, at={BATCH: b})
             for b in sorted(d.runs[BATCH].dropna().unique()) for other in ("none", "dropout")]
    return parts[0].also(*parts[1:])


def bn_trains_where_others_do_not(d: StudyData):
    """At the largest batch (the fewest steps), each arm at its own lr (BN 0.1; none and dropout
    as chosen on validation): every BN seed learns, and how many of none's (and dropout's) do: a
    type T claim, the outcomes are the evidence."""
    batch = max(d.runs[BATCH].dropna())
    return compare_outcomes(d.runs, "norm", "bn", "none", at={BATCH: batch}).also(
        compare_outcomes(d.runs, "norm", "bn", "dropout", at={BATCH: batch}))


def bn_gap(d: StudyData):
    return compare_value(d.runs[d.runs["norm"] == "bn"], "gen_gap", 0.0, want=+1, name="BN's generalization gap")


def beside_reference(runs, study_dir: Path) -> list[str]:
    """Each arm's mean test accuracy beside the committed reference's (``REFERENCE/<data>-<scale>
    /runs.csv``, its finished runs): one line per (norm, batch). Empty for the reference folder
    itself, or where the repository has no reference for this data and scale."""
    ref_csv = REFERENCE / Path(study_dir).name / "runs.csv"
    if not ref_csv.is_file() or Path(study_dir).resolve() == ref_csv.parent.resolve():
        return []
    ref = pd.read_csv(ref_csv)
    mine, theirs = (r[r["status"] == "ok"].groupby(["norm", BATCH])["test_acc"] for r in (runs, ref))
    mine, theirs = mine.agg(["mean", "count"]), theirs.agg(["mean", "count"])
    out = []
    for (norm, batch), row in mine.iterrows():
        ref_text = (f"committed {100 * theirs.loc[(norm, batch), 'mean']:.1f}% "
                    f"(n={int(theirs.loc[(norm, batch), 'count'])})" if (norm, batch) in theirs.index
                    else "no committed run")
        out.append(f"{norm} at batch {batch:g}: yours {100 * row['mean']:.1f}% (n={int(row['count'])}), {ref_text}")
    return out
def bn_faster(d: StudyData):
    """BN vs none at batch 128 (the primary contrast; batch 8 beside it), each at its own lr
    (none's chosen on validation), scaled by the linear rule, paired by seed, on log2 steps to the
    target."""
    batches = sorted(d.runs[BATCH].dropna().unique(), reverse=True)
    parts = [learns_faster(d.runs, d.curves, "norm", "bn", "none", at={BATCH: b}) for b in batches]
    return parts[0].also(*parts[1:])


def notes(d: StudyData) -> str:
    mine = beside_reference(d.runs, d.study_dir)
    beside = (f"Test accuracy (EMA statistics) beside the committed reference "
              f"({REFERENCE.relative_to(ROOT).as_posix()}/{d.study_dir.name}): " + "; ".join(mine) + ". "
              if mine else "")
    return beside + _notes(d)


def _notes(d: StudyData) -> str:
    wall = d.runs["wall_time_s"].sum()
    data = set(d.runs["data.name"].dropna())
    where = ("**These runs used the offline synthetic images, the fallback when no real "
             "Fashion-MNIST can be had**: the figures show the pipeline, not real data. "
             if data == {"synthetic"} else f"Data: {', '.join(sorted(data))}. ")
    return (where + f"The runs took {wall / 60:.1f} minutes of run time in total (summed over "
            "runs; two run at a time with launcher=joblib). Full-scale versions: "
            "`make study S=batch_size`, `make study S=stat_modes_vs_batch`.")


SOURCE = "Ioffe & Szegedy 2015"
STUDY = Study(
    "demo", __doc__,
    shapes=[Shape("BN ahead of no normalization and of dropout at both batch sizes", SOURCE, bn_ahead, "G"),
            Shape("BN trains in every seed at batch 128 (the fewest steps) where no normalization "
                  "and dropout, each at its own lr, train in fewer", SOURCE + ", Sec. 3.3",
                  bn_trains_where_others_do_not, "T"),
            Shape("BN nets show a visible generalization gap (train - test > 0)", SOURCE, bn_gap, "G"),
            Shape(f"BN learns faster: fewer steps than none to {TARGET:.0%} clean training accuracy, "
                  "at each batch size", "the notes: 'speeding the learning process'", bn_faster, "D")],
    figures=figures, by=("norm", BATCH),
    metrics=("test_acc", "test_acc.precise", "test_acc.batch", "gen_gap"),
    comparisons=lambda d: statements(d.runs), notes=notes)


GRID = "-lr_grid"  # bnexp.jobs.tuning.GRID_SUFFIX: the lr grid's sibling folder


def reuse_reference_grid(argv: list[str], reference: Path = REFERENCE) -> Path | None:
    """Copy the committed reference's lr-grid runs into the folder this demo's grid would use,
    when that folder does not exist yet, so that ``make demo`` chooses none's and dropout's lr
    from the reference's finished validation runs (the tuning skips finished runs) instead of
    training 24 more. Returns the folder copied to (None: nothing copied). A reference re-run
    (``make study S=demo``, whose folder is the reference) runs its grid itself."""
    if "--analyze-only" in argv:
        return None
    mine = study_dir("demo", [a for a in argv if "=" in a])
    grid, source = mine.with_name(mine.name + GRID), reference / (mine.name + GRID)
    if mine.resolve() == (reference / mine.name).resolve() or grid.exists() or not source.is_dir():
        return None
    shutil.copytree(source, grid)
    runs = grid / "runs"
    print(f"demo: none's and dropout's lr come from the committed reference's lr grid "
          f"({len(list(runs.iterdir())) if runs.is_dir() else 0} "
          f"validation runs, copied to {grid.relative_to(ROOT) if grid.is_relative_to(ROOT) else grid}); "
          "`make study S=demo` re-runs that grid", flush=True)
    return grid


def main(argv: list[str]) -> Path:
    argv = with_data(with_launcher(argv))
    reuse_reference_grid(argv)
    report = run_study(STUDY, argv)
    print(f"figures: {report.parent / 'figures'}  (main one: {FIGURE}.png)")
    mine = beside_reference(pd.read_csv(report.parent / "runs.csv"), report.parent)
    if mine:
        print("test accuracy, yours beside the committed reference:\n  " + "\n  ".join(mine))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
