"""What do non-i.i.d. minibatches do to BN?

Batches of 32 are drawn i.i.d., as P x K batches (P classes x K images: 4x8 and 2x16 on the
10-class datasets, 16x2 on CIFAR-100) or class-sorted (one class per batch), for BN, batch
renormalization and group norm. Every model is scored after every epoch with its EMA statistics,
with precise population statistics recomputed from an i.i.d. pass over the training set, and
with the statistics of i.i.d. test batches (``batch``); GN has no statistics to choose (ema only).

Run::

    make study S=noniid ARGS="data=synthetic scale=smoke"   # 4 samplers x 3 norms x 3 seeds
    make study S=noniid                                     # CIFAR-10 (data=cifar100: iid, pk16x2, sorted)

Expected (Ioffe 2017, "Batch Renormalization"; Irpan 2017, "On the perils of batch norm"): BN
evaluated with its EMA statistics collapses when trained on P x K batches, because every batch
normalizes with the statistics of a few classes, which the population statistics do not match;
batch renorm, GN, and BN with precise statistics from an i.i.d. loader recover most of the
i.i.d. accuracy.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bnexp import analysis as A
from common import question, run_study

NORMS = ("bn", "batch_renorm", "gn")
MODES = ("ema", "precise", "batch")
STATS = "norm / eval mode"  # one bar or line per (norm, eval mode) pair


def by_stats(df: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Rows per (run [, epoch], eval mode) with ``metric`` and a ``STATS`` label ``norm / mode``.
    Modes a model does not have (GN: all but ema) are dropped; diverged runs stay (marked)."""
    long = A.eval_modes_long(df, metric)
    long = long[long["eval_mode"].isin(MODES)
                & ~(long[metric].isna() & (long["status"] == "ok"))]
    return long.assign(**{STATS: long["norm"] + " / " + long["eval_mode"]})


def stats_order(long: pd.DataFrame) -> list[str]:
    present = set(long[STATS])
    return [f"{n} / {m}" for n in NORMS for m in MODES if f"{n} / {m}" in present]


def samplers(runs: pd.DataFrame) -> tuple[list, list]:
    """(non-i.i.d. P x K presets, all samplers) in the order iid, pk..., others."""
    names = sorted(runs["sampler"].dropna().unique(), key=lambda s: (s != "iid", not s.startswith("pk"), s))
    return [s for s in names if s.startswith("pk")], names


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
            if {rescue, "bn / ema"} <= have:
                out.append(A.compare_statement(summary, metric, STATS, rescue, "bn / ema",
                                               at={"sampler": s}))
    return out


def analyze(study_dir: Path, command: str) -> Path:
    runs, curves = A.collect_runs(study_dir)
    runs.to_csv(study_dir / "runs.csv", index=False)
    curves.to_csv(study_dir / "curves.csv", index=False)
    long = by_stats(runs)
    pk, names = samplers(runs)
    fig = A.plot_bars(long, "sampler", "test_acc", STATS, hue_order=stats_order(long),
                      title="final test accuracy per batch sampler (bars: mean, 95% CI; dots: runs)")
    figures = [A.save_figure(fig, study_dir / "figures", "test_acc_by_sampler_and_eval_mode")[0]]
    if len(curves) and pk:
        steps = by_stats(curves[curves["sampler"] == pk[0]])
        fig = A.plot_curves(steps, "step", "test_acc", STATS, hue_order=stats_order(steps),
                            title=f"test accuracy during training, sampler {pk[0]}")
        figures.append(A.save_figure(fig, study_dir / "figures", f"test_acc_curves_{pk[0]}")[0])
    by, metrics = ["norm", "sampler"], [f"test_acc.{m}" for m in MODES if f"test_acc.{m}" in runs]
    summary = A.summarize(runs, by, metrics)
    summary["sampler"] = pd.Categorical(summary["sampler"], names, ordered=True)
    summary["norm"] = pd.Categorical(summary["norm"], [n for n in NORMS if n in set(runs["norm"])])
    table = A.format_summary(summary.sort_values(["norm", "sampler"]), by, metrics)
    statement = "\n".join(f"- {s}." for s in statements(long))
    notes = ("Precise statistics are recomputed from i.i.d. batches of training images, whatever "
             "sampler trained the model; `batch` normalizes i.i.d. test batches of "
             f"{int(runs['eval.batch_size'].iloc[0])}. GN has no batch statistics: ema only.")
    return A.write_report(study_dir, "noniid", question(__doc__), command, figures, table,
                          statement, notes)


if __name__ == "__main__":
    run_study("noniid", __doc__, analyze)
