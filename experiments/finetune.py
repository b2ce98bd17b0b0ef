"""What should BN do when a trained model is fine-tuned on shifted data?

Two sweeps. First the sources (conf/study/finetune_source.yaml, experiments/finetune_source.py):
BN nets trained on clean images, one per seed. Then the targets (conf/study/finetune.yaml, with
the `finetune=shift` preset): each source is fine-tuned on the same classes under reduced contrast
(CIFAR-10-C, severity 3) on a small target training set (5000 images; smoke 1000), for
`finetune.bn` {train: BN as usual, frozen_stats: source statistics kept, affine trains,
frozen_all: statistics and affine frozen, adapt: statistics re-estimated on the target (AdaBN),
then kept} x fine-tune batch {2, 8, 128} (lr 0.005 at batch 128, scaled linearly with the batch;
the preset's 0.02 diverged in every frozen mode at batch 128, see conf/study/finetune.yaml) x
seeds {0, 1, 2}.
The head is kept, so each run also scores its source on the target before any training: with the
source statistics, and with statistics re-estimated on target training images (the "eval only"
rows). Target accuracy is the test accuracy on shifted test images with the run's EMA statistics.

    make study S=finetune ARGS="data=synthetic scale=smoke"   # 3 sources + 36 fine-tunes, ~4 CPU minutes
    make study S=finetune ARGS="data=fashion_mnist scale=small launcher=joblib"  # 3 + 36 runs
    make study S=finetune                                     # CIFAR-10, one GPU

Every override goes to both sweeps except those that define the target (`data.shift*`,
`data.batch_size`, `data.train_size`, `finetune.*`), which go to the second only. A source is
found by dataset, scale and seed (`finetune.from`); a source trained under other settings is
reused with a config-drift warning: delete `<results_dir>/finetune_source/<data>-<scale>` to
retrain.

Expected (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 5; Ioffe 2017, Batch
Renormalization; Li et al. 2016, AdaBN): under covariate shift, re-estimating the BN statistics on
the target helps even without training (the "eval only, stats re-estimated" row above the
"source stats" row); fine-tuning with train-mode BN at a tiny batch (2) hurts, because the
batch statistics of 2 images are noise and the EMA collected from them is a poor population
estimate, while frozen or re-estimated statistics do not depend on the batch.
"""
from __future__ import annotations

import math

from pathlib import Path

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData, analyze
from bnexp.analysis.convergence import chance
from bnexp.analysis.verdicts import Shape, compare
import finetune_source
from bnexp.analysis.run_study import run_study, study_dir, sweep

MODE, BATCH = "finetune.bn", "data.batch_size"
TARGET_ONLY = ("data.shift", "data.batch_size", "data.train_size", "finetune")
# row labels sort as they should read: the two eval-only rows, then the four fine-tune modes
ROWS = {"train": "fine-tune: train (batch stats)", "frozen_stats": "fine-tune: frozen_stats",
        "frozen_all": "fine-tune: frozen_all (+ affine)", "adapt": "fine-tune: adapt (AdaBN, frozen)"}
EVAL_ONLY = {"test_acc.before_finetune": "eval only: source stats",
             "test_acc.before_finetune.adapted": "eval only: stats re-estimated"}


def source_overrides(overrides: list[str]) -> list[str]:
    """The overrides that also apply to the source sweep: all but those defining the target."""
    def key(ov: str) -> str:
        return ov.split("=", 1)[0].lstrip("+~")

    return [ov for ov in overrides if not key(ov).startswith(TARGET_ONLY)]


def make_sources(overrides: list[str]) -> None:
    """Phase 1: the source sweep (finished sources are skipped) and its report."""
    given = source_overrides(overrides)
    command = sweep("finetune_source", given)
    analyze(finetune_source.STUDY, study_dir("finetune_source", given), command)


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table for the heatmap: ``row`` (BN mode, or an eval-only row), ``data.batch_size``,
    ``test_acc``, ``status``. Every fine-tune run is kept whatever its status: ``summarize``
    averages the ok ones and counts the diverged and failed ones, which the heatmap prints in
    their cell. Eval-only values depend on the seed alone (the AdaBN pass runs at a fixed batch,
    before any training), so one per seed and column is taken from whichever run recorded it."""
    cols = ["run", "status", "seed", BATCH, "row", "test_acc"] + (["trained"] if "trained" in runs else [])
    parts = [runs.assign(row=runs[MODE].map(ROWS))[cols]]
    for col, name in EVAL_ONLY.items():
        if col in runs:  # the source model, before training: whether a fine-tune trained is moot
            scored = runs.dropna(subset=[col]).drop_duplicates(["seed", BATCH])
            parts.append(scored.assign(row=name, test_acc=scored[col], status="ok",
                                       trained=float("nan"))[cols])
    return pd.concat(parts, ignore_index=True)


def gain_figure(long: pd.DataFrame, runs: pd.DataFrame):
    """Bars of the accuracy gain over the source model with source statistics, paired by seed
    (every run of a seed starts from the same source), per BN treatment and fine-tune batch."""
    source = runs.groupby("seed")["test_acc.before_finetune"].mean()  # NaNs skipped
    rows = long[long["row"] != EVAL_ONLY["test_acc.before_finetune"]]
    rows = rows.assign(gain_acc=rows["test_acc"] - rows["seed"].map(source))
    fig = A.plot_bars(rows, "row", "gain_acc", BATCH,
                      title="gain over the source model with source statistics (same seed)")
    ax = fig.axes[0]
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xlabel("BN treatment")
    ax.set_ylabel("target accuracy gain (points)")
    legend = ax.get_legend()  # keep its entries ("some seeds did not train" too), retitled
    ax.legend(legend.legend_handles, [t.get_text() for t in legend.get_texts()],
              title="fine-tune batch", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.set_figwidth(fig.get_figwidth() + 1.2)
    return fig


def statements(long: pd.DataFrame) -> str:
    """Each claim of the expected shape, paired by seed: every run of a seed starts from the same
    source model, so seed-to-seed differences between sources cancel."""
    small, large = long[BATCH].min(), long[BATCH].max()
    pairs = [("Before fine-tuning", EVAL_ONLY["test_acc.before_finetune.adapted"],
              EVAL_ONLY["test_acc.before_finetune"], {BATCH: large}),
             (f"At fine-tune batch {small}", ROWS["train"], ROWS["frozen_stats"], {BATCH: small}),
             (f"At fine-tune batch {small}", ROWS["adapt"], ROWS["frozen_stats"], {BATCH: small}),
             (f"At fine-tune batch {large}", ROWS["train"], ROWS["frozen_stats"], {BATCH: large})]
    text = []
    for lead, a, b, at in pairs:
        if {a, b} <= set(long["row"]):
            text.append(f"{lead}: " + A.paired_statement(long, "test_acc", "row", a, b, at=at) + ".")
    train = long[long["row"] == ROWS["train"]]
    if train[BATCH].nunique() > 1:
        train = train.assign(batch=train[BATCH].map(lambda b: f"batch {b}"))
        text.append("Train-mode BN: " + A.paired_statement(
            train, "test_acc", "batch", f"batch {small}", f"batch {large}") + ".")
    return " ".join(text)


def shift_cost(runs: pd.DataFrame, sources: pd.DataFrame) -> str:
    """What the shift costs the sources before fine-tuning (clean minus shifted test accuracy,
    same model), in words: the room that re-estimating statistics or fine-tuning has."""
    if "test_acc" not in sources or "test_acc.before_finetune" not in runs:
        return ""
    clean = sources.set_index("seed")["test_acc"]
    shifted = runs[runs[MODE] == "train"].groupby("seed")["test_acc.before_finetune"].mean()
    mean, _, n, half = A.mean_ci((clean - shifted).dropna())
    return (f"The shift costs the sources {100 * mean:.1f} +/- {100 * half:.1f} points of test "
            f"accuracy before fine-tuning (clean minus shifted, same model, n={n}): the room "
            "that re-estimated statistics or fine-tuning can recover.")


def source_dir(study_dir: Path) -> Path:
    """The sources' folder of the same data and scale: ``<results>/finetune_source/<data>-<scale>``."""
    return study_dir.parent.parent / "finetune_source" / study_dir.name


def prepare(d: StudyData) -> StudyData:
    d.command = f"{A.sweep_command(source_dir(d.study_dir))}   # phase 1: sources\n{d.command}"
    d.extra["long"] = cells(d.runs)
    d.extra["sources"], _ = A.collect_runs(source_dir(d.study_dir))
    return d


def figures(d: StudyData) -> dict:
    heat = A.plot_heatmap(d.extra["long"], "row", BATCH, "test_acc",
                          title="target accuracy after fine-tuning (shifted test set)")
    heat.axes[0].set_ylabel("BN treatment")
    heat.axes[0].set_xlabel("fine-tune batch size [data.batch_size]")
    figs = {"target_acc_heatmap": heat}
    if "test_acc.before_finetune" in d.runs:
        figs["gain_over_source"] = gain_figure(d.extra["long"], d.runs)
    return figs


def notes(d: StudyData) -> str:
    runs, sources = d.runs, d.extra["sources"]
    cfg = runs[runs["status"] == "ok"].iloc[0]
    return (shift_cost(runs, sources) + " "
            f"Target: data.shift={cfg['data.shift']} (severity {cfg['data.shift_severity']}), "
            f"{cfg['data.train_size']} target training images, {cfg['optim.epochs']} epochs, lr "
            f"{cfg['optim.lr']:g} at batch 128 scaled linearly. Sources (clean test set, EMA stats): "
            f"{100 * sources['test_acc'].mean():.1f}% mean over {len(sources)} seeds. Eval-only "
            "rows do not depend on the fine-tune batch: each column repeats them. "
            + first_epoch_loss(d.curves, 1.0 / chance(cfg)))


def first_epoch_loss(curves: pd.DataFrame, classes: float) -> str:
    """Mean first-epoch training loss per BN mode at the largest fine-tune batch (the largest
    lr under linear scaling), against chance (ln of the class count): a mode whose first steps
    blow the model up shows it here, where the final accuracy alone reads as a poor result."""
    if not {"epoch", "train_loss", MODE, BATCH} <= set(curves) or curves.empty:
        return ""
    large = curves[(curves[BATCH] == curves[BATCH].max()) & (curves["epoch"] == curves["epoch"].min())]
    per_mode = large.groupby(MODE)["train_loss"].agg(["mean", "max"])
    parts = [f"{mode} {r['mean']:.2f} (max {r['max']:.2f})" for mode, r in per_mode.iterrows()]
    return (f"First-epoch training loss at fine-tune batch {curves[BATCH].max()}, mean over seeds: "
            + ", ".join(parts) + f"; chance is ln {classes:g} = {math.log(classes):.2f}.")


def adapted_helps(d: StudyData):
    """The source model scored with statistics re-estimated on the target against its source
    statistics: the same weights (E), paired by seed."""
    long = d.extra["long"]
    return compare(long, "test_acc", "row", EVAL_ONLY["test_acc.before_finetune.adapted"],
                   EVAL_ONLY["test_acc.before_finetune"], at={BATCH: long[BATCH].max()}, want=+1, claim="E",
                   names=("the source model with statistics re-estimated on the target",
                          "with its source statistics"))


def tiny_batch_train_hurts(d: StudyData):
    """Fine-tuning with train-mode BN at the smallest batch against frozen and re-estimated
    statistics: two trainings from the same source (G), paired by seed."""
    long = d.extra["long"]
    at = {BATCH: long[BATCH].min()}
    words = {"train": "fine-tuned with train-mode BN", "frozen_stats": "with frozen statistics",
             "adapt": "with statistics re-estimated on the target (AdaBN) and frozen"}
    parts = [compare(long, "test_acc", "row", ROWS["train"], ROWS[other], at=at, want=-1, runs=d.runs,
                     names=(words["train"], words[other])) for other in ("frozen_stats", "adapt")]
    return parts[0].also(*parts[1:])


SOURCE = "Wu & Johnson 2021, Sec. 5; Li et al. 2016, AdaBN"
STUDY = Study(
    "finetune", __doc__,
    shapes=[Shape("re-estimating the statistics on the target helps even without training", SOURCE,
                  adapted_helps, "E"),
            Shape("train-mode BN at a tiny fine-tune batch (2) hurts against frozen or "
                  "re-estimated statistics", SOURCE, tiny_batch_train_hurts, "G")],
    prepare=prepare, figures=figures,
    table=lambda d: A.format_summary(A.summarize(d.extra["long"], ["row", BATCH], ["test_acc"]),
                                     ["row", BATCH], ["test_acc"]),
    comparisons=lambda d: statements(d.extra["long"]), notes=notes)


if __name__ == "__main__":
    run_study(STUDY, before_sweep=make_sources)
