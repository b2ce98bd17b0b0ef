"""Which statistics should BN use at test time, and how does that depend on the normalization
batch size?

Ghost BN normalizes sub-batches of NBS = ``norm.virtual_batch`` images (2 ... 128) of a fixed
optimization batch of 128, so only the normalization batch changes. Every model is scored with
its EMA statistics (``ema``), with population statistics recomputed after training (``precise``)
and with the statistics of i.i.d. test batches of NBS images (``batch``). A second set of runs is
FrozenBN as Wu & Johnson do it (``norm.freeze_after=0.9``, late in the cosine schedule, when the
lr is 2.4% of its peak): at the freeze point the statistics are re-estimated precisely with the
current weights and then used, frozen, in training as at test time; the ``frozen`` line is their
score with those statistics. Its training loss must not rise after the freeze (checked from the
per-epoch training loss around ``frozen_at_step``).

Run::

    make study S=stat_modes_vs_batch ARGS="data=synthetic scale=smoke"   # 24 runs, a few CPU minutes
    make study S=stat_modes_vs_batch ARGS="data=fashion_mnist scale=small launcher=joblib"  # 70 runs
    make study S=stat_modes_vs_batch                                    # CIFAR-10: 42 runs, one GPU

Expected (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3-4): the error with
population statistics (precise) is flat for NBS >= 16 and rises sharply at NBS 2-4; batch-stat
evaluation is flat in NBS but worse; EMA is close to precise except when training has few steps
per epoch (the EMA then lags the weights); FrozenBN, which removes the train/test inconsistency
that hurts small NBS, is at least as good as batch-stat training there, and its training loss
does not rise after the freeze.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
from matplotlib.figure import Figure

from bnexp.analysis import generic as A
from bnexp import records
from bnexp.analysis.forest import paired_rows, plot_forest
from bnexp.analysis.compare import Diff
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import MARGIN, Shape, compare, compare_value, memorization_note
from bnexp.analysis.run_study import run_study

NBS = "norm.virtual_batch"
FREEZE = "norm.freeze_after"
MODES = ("ema", "precise", "batch")
FLAT = 0.02  # "flat", "close", "at least as good": within 2 points of error (2% for a loss)


def mode_lines(runs: pd.DataFrame, metric: str = "test_err") -> pd.DataFrame:
    """One row per (run, eval mode) with ``metric`` and ``eval_mode``: the modes of the runs that
    trained with batch statistics throughout, plus ``frozen``, the ema score of the FrozenBN runs
    (their EMA statistics are the ones they trained with at the end). Runs without BN keep ema."""
    frozen = runs[FREEZE].notna() if FREEZE in runs else pd.Series(False, index=runs.index)
    long = A.eval_modes_long(runs[~frozen], metric)
    long = long[long["eval_mode"].isin(MODES)]
    if frozen.any():
        late = runs[frozen].drop(columns=[metric]).rename(columns={f"{metric}.ema": metric})
        long = pd.concat([long, late.assign(eval_mode="frozen")], ignore_index=True)
    return long


def plot_modes(runs: pd.DataFrame, x: str, metric: str = "test_err", title: str | None = None) -> Figure:
    """``metric`` against ``x`` (log2), one line with a CI band per eval mode (see mode_lines)."""
    long = mode_lines(runs, metric)
    order = [m for m in (*MODES, "frozen") if m in set(long["eval_mode"])]
    return A.plot_metric_vs(long, x, metric, "eval_mode", logx=2, hue_order=order, title=title)


def statements(long: pd.DataFrame, x: str, metric: str = "test_err") -> list[str]:
    """Sentences for the expected shape: precise at the smallest against the largest ``x``; batch
    and ema against precise at the largest, ema against precise and frozen against ema at the
    smallest and largest. Every comparison is paired by seed (see the loop)."""
    xs = sorted(long[x].dropna().unique())
    small, large = xs[0], xs[-1]
    summary = A.summarize(long, ["eval_mode", x], [metric])
    have = set(summary["eval_mode"])
    out = []
    if "precise" in have:
        out.append(f"Precise statistics, {A.label(x)} {small:g} vs {large:g}: "
                   + A.compare_statement(summary, metric, x, small, large, at={"eval_mode": "precise"}))
    pairs = [("batch", "precise", large), ("ema", "precise", large), ("ema", "precise", small),
             ("frozen", "ema", small), ("frozen", "ema", large)]
    for a, b, at in pairs:
        # paired by seed: two modes of the same models, or FrozenBN runs against the plain runs
        # of the same seed (same initialization and batches until the statistics freeze)
        if {a, b} <= have:
            out.append(A.paired_statement(long, metric, "eval_mode", a, b, at={x: at}))
    return out


def steps_note(runs: pd.DataFrame, curves: pd.DataFrame) -> str:
    """Steps per epoch (the ``step`` count after the first epoch) against the EMA's memory of
    about 1 / momentum steps: with few steps per epoch the EMA lags the weights."""
    first = curves[curves["epoch"] == curves["epoch"].min()]["step"] if len(curves) else []
    if not len(first):
        return ""
    momentum = runs["norm.momentum"].dropna()
    memory = f" BN momentum {momentum.iloc[0]:g} makes the EMA average over about " \
        f"{1 / momentum.iloc[0]:.0f} steps." if len(momentum) else ""
    steps, epochs = int(first.max()), int(runs["optim.epochs"].max())
    return f"Training took {steps} steps per epoch for {epochs} epochs.{memory}{ghost_update_note(runs)}"


def ghost_update_note(runs: pd.DataFrame) -> str:
    """Which running-statistics update the ghost BN runs used (``norm.ghost_update``) and what
    the other one would make of the EMA: one update per chunk (Hoffer et al.'s bigBatch code) is
    an effective momentum of 1 - (1 - m)^chunks per step."""
    if "norm.ghost_update" not in runs or NBS not in runs or runs["norm.ghost_update"].dropna().empty:
        return ""
    used = sorted(runs["norm.ghost_update"].dropna().unique())
    momenta = runs["norm.momentum"].dropna() if "norm.momentum" in runs else pd.Series(dtype=float)
    if momenta.empty:  # null momentum: a cumulative average, which the update count does not reweigh
        return f" Ghost BN's running statistics were updated per {' and '.join(used)} (cumulative average)."
    m, batch = float(momenta.iloc[0]), int(runs["data.batch_size"].max())
    smallest = int(runs[NBS].dropna().min())
    chunk = 1 - (1 - m) ** (batch // smallest)
    how = {"step": "once per step with the chunks' size-weighted average (norm.ghost_update=step)",
           "chunk": "once per chunk, in order (norm.ghost_update=chunk, as Hoffer et al.'s code)"}
    return (f" Ghost BN's running statistics were updated {' and '.join(how.get(u, u) for u in used)}"
            + (f"; the per-chunk update of Hoffer et al.'s code (norm.ghost_update=chunk) makes the"
               f" effective momentum 1 - (1 - {m:g})^{batch // smallest} = {chunk:.3f} per step at NBS"
               f" {smallest}, so its EMA would hold little more than the step's last chunks"
               if used == ["step"] else "") + ".")


# ----------------------------------------------------------------------------- FrozenBN's loss
def frozen_steps(study_dir) -> dict:
    """``{run: frozen_at_step}`` from each run's summary.json (None where it never froze)."""
    return {p.name: (records.read_summary(p) or {}).get("frozen_at_step")
            for p in records.iter_run_dirs(study_dir)}


def loss_around_freeze(runs: pd.DataFrame, curves: pd.DataFrame, frozen_at: dict) -> pd.DataFrame:
    """Per FrozenBN run: the training loss of the last epoch before the freeze (``before``), the
    mean over the epochs after it (``after``) and ``rise = (after - before) / before``. Epoch rows
    carry the step count at their end, so an epoch is after the freeze when it started at or
    after ``frozen_at_step``; the epoch holding the freeze step counts as neither."""
    rows = []
    for _, r in runs[runs[FREEZE].notna() & (runs["status"] == "ok")].iterrows():
        at, c = frozen_at.get(r["run"]), curves[curves["run"] == r["run"]].sort_values("epoch")
        if at is None or c.empty:
            continue
        start = c["step"].shift(1, fill_value=0)  # the step count at the start of each epoch
        before, after = c[c["step"] <= at]["train_loss"], c[start >= at]["train_loss"]
        if len(before) and len(after):
            b, a = float(before.iloc[-1]), float(after.mean())
            rows.append({"run": r["run"], "seed": r["seed"], NBS: r[NBS], "trained": r.get("trained"),
                         "frozen_at_step": at, "before": b, "after": a, "rise": (a - b) / b})
    return pd.DataFrame(rows, columns=["run", "seed", NBS, "trained", "frozen_at_step", "before",
                                       "after", "rise"])


def freeze_note(loss: pd.DataFrame) -> str:
    if loss.empty:
        return ""
    by = loss.groupby(NBS)[["before", "after", "rise"]].mean()
    text = "; ".join(f"NBS {int(n)}: {m['before']:.3f} -> {m['after']:.3f} ({100 * m['rise']:+.1f}%)"
                     for n, m in by.iterrows())
    return (f" FrozenBN runs froze at step {int(loss['frozen_at_step'].median())} (median); their "
            f"training loss in the last epoch before the freeze -> mean over the epochs after it "
            f"(mean over seeds): {text}.")


# ----------------------------------------------------------------------------- figures, verdicts
def figures(d: StudyData) -> dict:
    title = "ghost BN at optimization batch " + ", ".join(
        map(str, sorted(d.runs["data.batch_size"].unique())))
    return {"test_err_paired_by_eval_mode": plot_paired_modes(d.runs),
            "test_err_vs_nbs_by_eval_mode": plot_modes(d.runs, NBS, title=title)}


def plot_paired_modes(runs: pd.DataFrame) -> Figure:
    """The headline: at each NBS, EMA and test-batch statistics against precise ones on the same
    models (paired by seed), so the contrast the overlaid bands of ``plot_modes`` hide is seen."""
    long = mode_lines(runs)
    rows = [paired_rows(long, "test_err", "eval_mode", [(m, "precise", f"{m} - precise, NBS {x:g}")], at={NBS: x})
            for x in sorted(long[NBS].dropna().unique()) for m in ("ema", "batch")
            if {m, "precise"} <= set(long["eval_mode"])]
    return plot_forest(pd.concat(rows, ignore_index=True), "test_err",
                       title="test error against precise statistics, same models (below 0: better than precise)")


def labelled(d: StudyData) -> pd.DataFrame:
    """The runs with ``norm.freeze_after`` = "none" for plain ghost BN (a table row label)."""
    return d.runs.astype({FREEZE: object}).fillna({FREEZE: "none"})


def nbs(d: StudyData) -> list:
    return sorted(d.runs[NBS].dropna().unique())


def nearest(xs: list, value: float):
    return min(xs, key=lambda x: abs(x - value))


def paired(long: pd.DataFrame, a: str, b: str, x) -> Diff:
    """``a - b`` of test error between two eval-mode lines at NBS ``x``, paired by seed: two
    modes of the same models, or a FrozenBN run and its unfrozen twin (same initialization and
    batches until the freeze)."""
    return A.paired_diff(long, "test_err", "eval_mode", a, b, at={NBS: x})


def modes(d: StudyData, a: str, b: str, x, want, claim: str = "E", margin: float = MARGIN):
    """The verdict of ``paired``: eval mode ``a`` against ``b`` at NBS ``x``."""
    return compare(mode_lines(d.runs), "test_err", "eval_mode", a, b, at={NBS: x}, want=want,
                   claim=claim, margin=margin, runs=d.runs)


def nbs_lines(d: StudyData, mode: str, x, y, want, margin: float = MARGIN):
    """Test error under ``mode`` at NBS ``x`` against NBS ``y``: the NBS arms share
    initialization and batch order (the seed), so paired."""
    return compare(mode_lines(d.runs), "test_err", NBS, x, y, at={"eval_mode": mode}, want=want,
                   margin=margin, runs=d.runs, names=(f"NBS {x:g}", f"NBS {y:g}"))


def population_flat_then_rising(d: StudyData):
    """Precise error at the smallest NBS above that at 16 (rising); 4 vs 16 and 16 vs the
    largest (flat) beside it."""
    xs = nbs(d)
    mid = nearest(xs, 16)
    primary = memorization_note(nbs_lines(d, "precise", xs[0], mid, +1))
    return primary.also(*[nbs_lines(d, "precise", x, mid, +1) for x in xs[1:] if x <= 4],
                        nbs_lines(d, "precise", mid, xs[-1], 0, FLAT))


def batch_flat_but_worse(d: StudyData):
    """Batch-stat evaluation worse than precise at NBS 16 (the same weights); at 32, and flat
    from the smallest to the largest NBS, beside it."""
    xs = nbs(d)
    return modes(d, "batch", "precise", nearest(xs, 16), +1).also(
        modes(d, "batch", "precise", nearest(xs, 32), +1), nbs_lines(d, "batch", xs[0], xs[-1], 0, FLAT))


def ema_close(d: StudyData):
    xs = nbs(d)
    return modes(d, "ema", "precise", nearest(xs, 16), 0, margin=FLAT).also(
        modes(d, "ema", "precise", xs[-1], 0, margin=FLAT))


def frozen_not_worse(d: StudyData):
    """FrozenBN's error not above its unfrozen twin's (EMA) by more than FLAT at the smallest
    NBS: two trainings (G), paired by seed."""
    xs = nbs(d)
    return modes(d, "frozen", "ema", xs[0], "<=", claim="G", margin=FLAT).also(
        *[modes(d, "frozen", "ema", x, "<=", claim="G", margin=FLAT) for x in xs[1:] if x <= 4])


def frozen_loss_does_not_rise(d: StudyData):
    """Per NBS, the mean relative change of FrozenBN's training loss after the freeze is not
    above FLAT (2%): a trajectory (D); the smallest NBS first."""
    loss = d.extra["freeze_loss"].assign(status="ok")
    parts = [compare_value(g, "rise", 0.0, want="<=", claim="D", margin=FLAT, runs=d.runs,
                           name=f"FrozenBN's relative rise of the training loss after the freeze at NBS {x:g}")
             for x, g in loss.groupby(NBS)]
    return parts[0].also(*parts[1:])


def prepare(d: StudyData) -> StudyData:
    """Error columns; the loss around each freeze (``loss_around_freeze``)."""
    d = replace(d, runs=A.with_error(d.runs))
    d.extra["freeze_loss"] = loss_around_freeze(d.runs, d.curves, frozen_steps(d.study_dir))
    return d


SOURCE = "Wu & Johnson 2021, Rethinking Batch in BatchNorm"
STUDY = Study(
    "stat_modes_vs_batch", __doc__,
    shapes=[Shape("population-stat (precise) error rising at NBS 2-4 against 16 and flat from 16 "
                  "to the largest NBS", SOURCE, population_flat_then_rising, "G"),
            Shape("batch-stat evaluation flat across NBS but worse than population statistics",
                  SOURCE, batch_flat_but_worse, "E"),
            Shape("EMA close to precise (many steps per epoch)", SOURCE, ema_close, "E"),
            Shape("FrozenBN at least as good as batch-stat training (its EMA) at small NBS", SOURCE,
                  frozen_not_worse, "G"),
            Shape("FrozenBN's training loss does not rise after the freeze (mean relative change "
                  "at most +2%)", SOURCE, frozen_loss_does_not_rise, "D")],
    prepare=prepare, figures=figures, by=(FREEZE, NBS), metrics=tuple(f"test_err.{m}" for m in MODES),
    table_rows=labelled,
    comparisons=lambda d: statements(mode_lines(d.runs), NBS),
    notes=lambda d: (steps_note(d.runs, d.curves) + freeze_note(d.extra["freeze_loss"])
                     + " The `frozen` line is the ema score of the runs with `norm.freeze_after` "
                     "set (statistics re-estimated precisely at the freeze and used, frozen, for "
                     "the rest of training); the table lists every mode of both kinds of run, "
                     "`norm.freeze_after = none` being plain ghost BN."))


if __name__ == "__main__":
    run_study(STUDY)
