"""What do non-i.i.d. minibatches do to BN?

Batches of 32 are drawn i.i.d., as P x K batches (P classes x K images: 4x8 and 2x16 on the
10-class datasets, 16x2 on CIFAR-100) or class-sorted (one class per batch), for BN, batch
renormalization and group norm. Every model is scored after every epoch with its EMA statistics,
with precise population statistics recomputed from an i.i.d. pass over the training set, and
with the statistics of i.i.d. test batches (``batch``); GN has no statistics to choose (ema only).

Run::

    make study S=noniid ARGS="data=synthetic scale=smoke"   # 4 samplers x 3 norms x 3 seeds
    make study S=noniid                                     # CIFAR-10, 36 runs
    make study S=noniid ARGS="data=cifar100"                # samplers iid, pk16x2, sorted

Expected (Ioffe 2017, "Batch Renormalization"; Irpan 2017, "On the perils of batch norm"): BN
evaluated with its EMA statistics collapses when trained on P x K batches, because every batch
normalizes with the statistics of a few classes, which the population statistics do not match;
batch renorm, GN, and BN with precise statistics from an i.i.d. loader recover most of the
i.i.d. accuracy.
"""
from __future__ import annotations


import pandas as pd

from bnexp import analysis as A
from bnexp.studies import Study, StudyData
from bnexp.verdicts import Shape, expect
from common import run_study

NORMS = ("bn", "batch_renorm", "gn")
MODES = ("ema", "precise", "batch")
STATS = "norm / eval mode"  # one bar or line per (norm, eval mode) pair
# the curves show the literature's contenders only (all pairs make 7 overlapping bands)
CURVES = ("bn / ema", "bn / precise", "batch_renorm / ema", "gn / ema")


def by_stats(df: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Rows per (run [, epoch], eval mode) with ``metric`` and a ``STATS`` label ``norm / mode``.
    Modes a model does not have (GN: all but ema) and unfinished runs are dropped; a diverged run
    stays as one ema row (figures mark it), since which modes it would have had is unknown."""
    long = A.eval_modes_long(df, metric)
    diverged = (long["status"] == "diverged") & (long["eval_mode"] == "ema")
    long = long[long["eval_mode"].isin(MODES) & (long[metric].notna() | diverged)]
    return long.assign(**{STATS: long["norm"] + " / " + long["eval_mode"]})


def stats_order(long: pd.DataFrame) -> list[str]:
    present = set(long[STATS])
    return [f"{n} / {m}" for n in NORMS for m in MODES if f"{n} / {m}" in present]


def samplers(runs: pd.DataFrame) -> tuple[list, list]:
    """(non-i.i.d. P x K presets, all samplers) in the order iid, pk..., others."""
    names = sorted(runs["sampler"].dropna().unique(),
                   key=lambda s: (s != "iid", not s.startswith("pk"), s))
    return [s for s in names if s.startswith("pk")], names


def with_train_mode_acc(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Adds ``train_acc.train_mode``: the running accuracy of each run's last epoch, measured
    with the batch statistics of its own (non-i.i.d.) training batches. Near chance there means
    the model did not train; high there but low on test means the test statistics failed."""
    if not len(curves) or "train_acc" not in curves:
        return runs
    last = curves.sort_values("epoch").groupby("run")["train_acc"].last()
    return runs.assign(**{"train_acc.train_mode": runs["run"].map(last)})


def diagnosis(runs: pd.DataFrame) -> str:
    """Per non-i.i.d. sampler, BN's train-mode accuracy, its ema - precise gap and the EMA /
    population variance ratio: which of 'did not train' and 'wrong test statistics' happened."""
    bn = runs[(runs["norm"] == "bn") & (runs["status"] == "ok")]
    cols = ["train_acc.train_mode", "test_acc.ema", "test_acc.precise", "precise.ema_var_ratio"]
    if bn.empty or not set(cols) <= set(bn):
        return ""
    means = bn.groupby("sampler")[cols].mean()
    parts = [f"{s}: train-mode accuracy {100 * m.iloc[0]:.0f}%, ema - precise "
             f"{100 * (m.iloc[1] - m.iloc[2]):+.1f} points, EMA / population variance "
             f"{m.iloc[3]:.2f}" for s, m in means.iterrows() if s != "iid"]
    return ("BN, mean over seeds, by sampler: " + "; ".join(parts) + ". A collapse of the EMA "
            "statistics shows as a large negative ema - precise gap with a variance ratio well "
            "below 1 (the EMA of per-batch variances misses the spread of the class-skewed "
            "batch means); a train-mode accuracy near chance means the model did not train on "
            "those batches at all, which no choice of test statistics repairs.")


def statements(long: pd.DataFrame, metric: str = "test_acc") -> list[str]:
    """BN with EMA statistics under each non-i.i.d. sampler against i.i.d. batches; then, under
    each P x K sampler, what recovers: precise statistics, batch renorm, GN."""
    summary = A.summarize(long, [STATS, "sampler"], [metric])
    have = set(summary[STATS])
    pk, names = samplers(long)
    out = []
    if "bn / ema" in have and "iid" in names:
        out += [f"bn / ema, sampler {s} vs iid: "
                + A.compare_statement(summary, metric, "sampler", s, "iid", at={STATS: "bn / ema"})
                for s in names if s != "iid"]
    for s in pk:
        for rescue in ("bn / precise", "batch_renorm / ema", "gn / ema"):
            if {rescue, "bn / ema"} <= have and rescue.startswith("bn /"):  # the same BN models
                out.append(A.paired_statement(long, metric, STATS, rescue, "bn / ema",
                                              at={"sampler": s}))
            elif {rescue, "bn / ema"} <= have:
                out.append(A.compare_statement(summary, metric, STATS, rescue, "bn / ema",
                                               at={"sampler": s}))
    return out


def prepare(d: StudyData) -> StudyData:
    d.runs = with_train_mode_acc(d.runs, d.curves)
    d.extra["long"] = by_stats(d.runs)
    return d


def figures(d: StudyData) -> dict:
    long = d.extra["long"]
    pk, _ = samplers(d.runs)
    figs = {"test_acc_by_sampler_and_eval_mode": A.plot_bars(
        long, "sampler", "test_acc", STATS, hue_order=stats_order(long),
        title="final test accuracy per batch sampler (bars: mean, 95% CI; dots: runs)")}
    for sampler in pk if len(d.curves) else []:
        steps = by_stats(d.curves[d.curves["sampler"] == sampler])
        steps = steps[steps[STATS].isin(CURVES)]
        figs[f"test_acc_curves_{sampler}"] = A.plot_curves(
            steps, "step", "test_acc", STATS, hue_order=stats_order(steps),
            title=f"test accuracy during training, sampler {sampler}")
    return figs


def table(d: StudyData) -> pd.DataFrame:
    """Norm x sampler, samplers in the order iid, pk..., others."""
    runs, by = d.runs, ["norm", "sampler"]
    metrics = [m for m in ("train_acc.train_mode", *(f"test_acc.{m}" for m in MODES),
                           "precise.ema_var_ratio") if m in runs]
    summary = A.summarize(runs, by, metrics)
    summary["sampler"] = pd.Categorical(summary["sampler"], samplers(runs)[1], ordered=True)
    summary["norm"] = pd.Categorical(summary["norm"], [n for n in NORMS if n in set(runs["norm"])])
    return A.format_summary(summary.sort_values(["norm", "sampler"]), by, metrics)


def notes(d: StudyData) -> str:
    return ("Precise statistics are recomputed from i.i.d. batches of training images, whatever "
            "sampler trained the model; `batch` normalizes i.i.d. test batches of "
            f"{int(d.runs['eval.batch_size'].iloc[0])}. GN has no batch statistics: ema only. "
            + diagnosis(d.runs))


def bn_ema_degrades(d: StudyData):
    pk, _ = samplers(d.runs)
    at = {STATS: "bn / ema"}
    return expect([(A.welch_diff(d.extra["long"], "test_acc", "sampler", s, "iid", at=at), -1)
                   for s in pk])


def gn_unaffected(d: StudyData):
    pk, _ = samplers(d.runs)
    at = {STATS: "gn / ema"}
    return expect([(A.welch_diff(d.extra["long"], "test_acc", "sampler", s, "iid", at=at), "flat")
                   for s in pk])


def recovered(d: StudyData):
    long, (pk, _) = d.extra["long"], samplers(d.runs)
    parts = [(A.paired_diff(long, "test_acc", STATS, "bn / precise", "bn / ema", at={"sampler": s}), +1)
             for s in pk]  # the same BN models
    parts += [(A.welch_diff(long, "test_acc", STATS, "batch_renorm / ema", "bn / ema",
                            at={"sampler": s}), +1) for s in pk]
    return expect(parts)


SOURCE = "Ioffe 2017, Batch Renormalization; Irpan 2017"
STUDY = Study(
    "noniid", __doc__,
    shapes=[Shape("BN with EMA statistics degrades under P x K batches", SOURCE, bn_ema_degrades),
            Shape("GN is unaffected by the batch structure", SOURCE, gn_unaffected),
            Shape("precise statistics and batch renorm recover accuracy over BN with EMA", SOURCE,
                  recovered)],
    prepare=prepare, figures=figures, table=table,
    comparisons=lambda d: statements(d.extra["long"]), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
