"""When is the EMA of batch statistics a poor estimate of the population statistics?

Sweep (conf/study/ema_vs_precise.yaml): seeds, at a large batch (CIFAR-10: 1024, 48 steps per
epoch; smoke: 256 on 2000 images, 7 steps per epoch), linear lr scaling with warmup. Each run
keeps BN's own EMA (momentum 0.1) and, beside it, shadow EMAs at momenta 0.01 and 0.4 and the
cumulative average (`eval.ema_momenta`; `norm.momentum=null` is PyTorch's name for it, a
control: every batch weighs the same). Train-mode BN never reads its running statistics, so the
momentum does not change the weights: one run scores every momentum on one set of weights
(bnexp/layers/ema_shadows.py; tests/test_ema_shadows.py checks each shadow against a run trained at that
momentum). Every epoch the model is scored with each EMA and with precise statistics (population
statistics recomputed over `eval.precise_samples` training images).

Then, after the sweep, this script re-scores each saved model (`model.pt`) with precise BN at N
= 256, 1k, 4k, 16k samples (smoke: 64 ... 2000; `grid.<scale>.precise_n`), `repeats` independent
draws each (`bnexp.tools.rescore.rescore_precise`), and writes `<run>/precise_vs_n.json`. Why after the
sweep and not as a swept `eval.precise_samples`: N only changes how the finished model is
evaluated, so sweeping it would retrain an identical model per N; re-scoring one model at every
N also puts all N on the same weights, so the curve shows the estimator alone. It uses the same
code path as the run's own precise mode (`bnexp.measure.modes.run_mode`); draw r = 0 at the run's own N
reproduces its `test_acc.precise`. The report also gives (1 - m)^t, the weight the EMA still puts
on its initial buffers (mean 0, variance 1) after t steps.

    make study S=ema_vs_precise ARGS="data=synthetic scale=smoke"   # 3 runs, a few CPU minutes
    make study S=ema_vs_precise ARGS="data=fashion_mnist scale=small launcher=joblib"  # 4 runs
    make study S=ema_vs_precise                                     # CIFAR-10: 3 runs, one GPU

Expected (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3): with few steps per
epoch the EMA lags the weights (small momentum: the average still holds statistics of much older
weights, worst early in training) or is noisy (large momentum: it averages only the last few
batches), so its test error is above the precise one; precise BN matches the population once N is
about 1k samples or more (its error flat in N from there), and is worse only at very small N.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.plots import PALETTE
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, compare_value
from bnexp.analysis.run_study import run_study

MOMENTUM = "norm.momentum"
SCORES = ("test_acc", "test_err", "test_loss", "ece")  # per eval mode: <score>.<mode>


# ----------------------------------------------------------------------------- re-scoring at N
def precise_vs_n(run_dir: Path, sizes: list[int], repeats: int, threads: int = 0) -> list[dict]:
    """Test loss/accuracy of the run's saved model with precise BN over N training images, for
    each N in ``sizes`` and draws ``r < repeats``: ``bnexp.tools.rescore.rescore_precise`` (draw r uses
    seed ``run seed + 1000 r``; rows ``samples, repeat, test_acc, test_loss``; cached in
    ``<run_dir>/precise_vs_n.json``), with ``threads`` torch threads (0: torch's default)."""
    # the training side of bnexp: a study script may import it (bnexp.analysis.generic may not)
    from bnexp.runtime import set_threads
    from bnexp.tools.rescore import rescore_precise

    set_threads(threads)
    return rescore_precise(run_dir, [int(n) for n in sizes], "auto", repeats=repeats)


def rescore(study_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """``precise_vs_n`` of every finished reference-momentum run; one row per (run, N), the
    accuracy averaged over the draws, with the draws' spread in ``test_acc_draw_std``."""
    ref = runs[(runs["status"] == "ok") & (runs[MOMENTUM] == reference_momentum(runs))]
    rows = []
    for _, r in ref.iterrows():
        spec = _grid_spec(r)
        draws = pd.DataFrame(precise_vs_n(study_dir / "runs" / r["run"], spec["precise_n"], spec["repeats"],
                                          int(r.get("threads") or 0)))
        per_n = draws.groupby("samples")["test_acc"].agg(["mean", "std"]).reset_index()
        rows += [{"run": r["run"], "status": "ok", "seed": r["seed"], "eval.precise_samples": int(n),
                  "test_acc": m, "draw_std_points": 100 * s} for n, m, s in per_n.itertuples(index=False)]
    out = A.with_error(pd.DataFrame(rows))
    largest = out[out["eval.precise_samples"] == out["eval.precise_samples"].max()]
    population = out["seed"].map(largest.set_index("seed")["test_err"])
    return out.assign(excess_err=out["test_err"] - population)


def _grid_spec(run: pd.Series) -> dict:
    """``precise_n`` and ``repeats`` of the run's scale, from its resolved config columns."""
    scale = run["scale_name"]
    return {"precise_n": json.loads(run[f"grid.{scale}.precise_n"]),
            "repeats": int(run[f"grid.{scale}.repeats"])}


def momentum_label(m) -> str:
    """``momentum 0.1``, or ``cumulative average`` for ``norm.momentum=null`` (NaN here)."""
    return "cumulative average" if pd.isna(m) else f"momentum {m:g}"


def reference_momentum(runs: pd.DataFrame) -> float:
    """BN's own momentum (``norm.momentum``), the one whose rows carry the run's own EMA."""
    return float(runs[MOMENTUM].dropna().iloc[0])


def by_momentum(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (row of ``frame``, momentum): the run's own EMA (``norm.momentum``) and each
    shadow EMA of ``eval.ema_momenta`` (``test_acc.ema_m0p01``, ...) in the ``<score>.ema``
    columns, the momentum in ``norm.momentum`` (NaN: the cumulative average); every other
    column, precise included, is the row's (the same weights)."""
    from bnexp.layers.ema_shadows import mode_name  # the training side's naming (a script may import it)

    momenta = json.loads(runs["eval.ema_momenta"].dropna().iloc[0]) if "eval.ema_momenta" in runs else []
    if MOMENTUM not in frame:  # curves carry the swept columns only
        frame = frame.assign(**{MOMENTUM: frame["run"].map(runs.set_index("run")[MOMENTUM])})
    parts = [frame]
    for m in momenta:
        mode = mode_name(m)
        cols = {f"{s}.{mode}": f"{s}.ema" for s in SCORES if f"{s}.{mode}" in frame}
        shadow = frame.drop(columns=[f"{s}.ema" for s in SCORES if f"{s}.ema" in frame])
        parts.append(shadow.rename(columns=cols).assign(**{MOMENTUM: float("nan") if m is None else m}))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- figures, words
def epoch_lines(curves: pd.DataFrame, ref: float) -> pd.DataFrame:
    """Per-epoch test error: an ``EMA, momentum m`` line per momentum and one ``precise`` line
    (reference-momentum runs only: the others hold the same weights, and would count seeds twice)."""
    curves = A.with_error(curves)
    ema = curves.assign(line=[f"EMA, {momentum_label(m)}" for m in curves[MOMENTUM]],
                        test_err=curves["test_err.ema"])
    precise = curves[curves[MOMENTUM] == ref]
    precise = precise.assign(line="precise BN", test_err=precise["test_err.precise"])
    return pd.concat([ema, precise], ignore_index=True)


def n_lines(per_n: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Excess test error over precise BN at the largest N of the same seed (the same weights),
    against N: ``precise BN`` per N, and each momentum's final EMA drawn flat across the N."""
    sizes = sorted(per_n["eval.precise_samples"].unique())
    population = per_n[per_n["eval.precise_samples"] == sizes[-1]].set_index("seed")["test_err"]
    ema = A.with_error(runs[runs["status"] == "ok"])
    ema = ema.assign(line=[f"EMA, {momentum_label(m)}" for m in ema[MOMENTUM]],
                     excess_err=ema["test_err.ema"] - ema["seed"].map(population))
    keep = ["run", "status", "seed", "eval.precise_samples", "line", "excess_err"]
    flat = [ema.assign(**{"eval.precise_samples": n})[keep] for n in sizes]
    return pd.concat([per_n.assign(line="precise BN")[keep], *flat], ignore_index=True)


def figures(curves: pd.DataFrame, per_n: pd.DataFrame, runs: pd.DataFrame, ref: float) -> dict:
    per_epoch = A.plot_curves(epoch_lines(curves, ref), "epoch", "test_err", "line",
                              title="test error per epoch (mean over seeds, 95% CI)")
    epochs = sorted(curves["epoch"].unique())
    shown = epochs[::max(1, round(len(epochs) / 10))]  # about 10 labels, however many epochs
    per_epoch.axes[0].set_xticks(shown, [str(e + 1) for e in shown])  # epochs completed
    vs_n = A.plot_metric_vs(n_lines(per_n, runs), "eval.precise_samples", "excess_err", "line", logx=2,
                            title="error above the population estimate, same weights")
    vs_n.axes[0].axhline(0.0, color="0.3", lw=0.8, ls="--")
    vs_n.axes[0].set_ylabel(f"test error minus precise BN\nat N={max(per_n['eval.precise_samples'])} "
                            "(points, paired by seed)")
    precise = n_lines(per_n, runs)
    zoom = A.plot_metric_vs(precise[precise["line"] == "precise BN"], "eval.precise_samples",
                            "excess_err", "line", logx=2, title="precise BN alone (zoomed)")
    colour = PALETTE[precise["line"].nunique() - 1]  # precise BN's colour in the full figure
    zoom.axes[0].lines[0].set_color(colour)
    zoom.axes[0].collections[0].set_color(colour)
    zoom.axes[0].axhline(0.0, color="0.3", lw=0.8, ls="--")
    zoom.axes[0].set_ylabel(vs_n.axes[0].get_ylabel())
    per_epoch.axes[0].get_legend().set_title("BN statistics")
    zoom.axes[0].legend(title="BN statistics")
    vs_n.axes[0].legend(title="BN statistics", loc="center right")  # clear of the top line
    return {"test_err_per_epoch": per_epoch, "test_err_vs_n": vs_n, "precise_err_vs_n": zoom}


def _paired(values) -> str:
    """``+m +/- h points (n=k)``: mean and 95% t-interval of per-seed differences (fractions)."""
    mean, _, n, half = A.mean_ci(values)
    return f"{100 * mean:+.1f} +/- {100 * half:.1f} points (n={n})"


def statements(runs: pd.DataFrame, curves: pd.DataFrame, per_n: pd.DataFrame) -> str:
    """Paired by seed throughout: every EMA of a run and its precise statistics score the same
    weights, so their difference is the estimator's alone. ``runs``, ``curves``: ``by_momentum``."""
    text = ["Every EMA of a seed and its precise statistics score one set of weights: the EMAs "
            "at other momenta are kept beside BN's own in the same run (eval.ema_momenta)."]
    errs = A.with_error(curves).assign(lag=lambda d: d["test_err.ema"] - d["test_err.precise"])
    errs = errs.assign(m=errs[MOMENTUM].map(momentum_label))
    mean_lag = errs.groupby(["run", "m"])["lag"].mean().groupby("m")
    final = A.with_error(runs[runs["status"] == "ok"])
    final_lag = (final["test_err.ema"] - final["test_err.precise"]).groupby(
        final[MOMENTUM].map(momentum_label))
    text.append("EMA minus precise test error (same model), averaged over epochs: " + "; ".join(
        f"{m} {_paired(v)}" for m, v in mean_lag) + ". After the last epoch: " + "; ".join(
        f"{m} {_paired(v)}" for m, v in final_lag) + ".")
    if len(per_n):
        largest = per_n["eval.precise_samples"].max()
        by_n = per_n[per_n["eval.precise_samples"] < largest].groupby("eval.precise_samples")
        text.append(f"Precise BN at N minus at N={largest} (same model): " + "; ".join(
            f"N={n} {_paired(g['excess_err'])}" for n, g in by_n) + ".")
    return " ".join(text)


def initial_weight(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per momentum m: steps per epoch, steps in all (t), and (1 - m)^t after one epoch and at
    the end: the weight the EMA still puts on its initial buffers (PyTorch convention, running =
    (1 - m) running + m batch). The cumulative average (m = null) weighs the first batch by 1,
    so nothing of the initial buffers is left after one step."""
    first = curves[curves["epoch"] == curves["epoch"].min()]["step"].max()
    total = curves["step"].max()
    rows = []
    for m in sorted(runs[MOMENTUM].unique(), key=lambda v: (pd.isna(v), v)):
        after = (lambda t: 0.0) if pd.isna(m) else (lambda t, m=m: (1.0 - m) ** t)
        rows.append({MOMENTUM: momentum_label(m), "steps per epoch": int(first),
                     "steps t": int(total), "(1 - m)^t after epoch 1": f"{after(first):.2g}",
                     "(1 - m)^t at the end": f"{after(total):.2g}"})
    return pd.DataFrame(rows)


def prepare(d: StudyData) -> StudyData:
    d.extra["ref"] = reference_momentum(d.runs)
    d.extra["runs_m"] = by_momentum(d.runs, d.runs)
    d.extra["curves_m"] = by_momentum(d.curves, d.runs)
    d.extra["per_n"] = per_n = rescore(d.study_dir, d.runs)  # training side: the saved models
    per_n.to_csv(d.study_dir / "precise_vs_n.csv", index=False)
    return d


def table(d: StudyData) -> pd.DataFrame:
    runs = A.with_error(d.extra["runs_m"])
    runs = runs.assign(**{MOMENTUM: runs[MOMENTUM].map(momentum_label)})
    metrics = ["test_err.ema", "test_err.precise"]
    return A.format_summary(A.summarize(runs, [MOMENTUM], metrics), [MOMENTUM], metrics)


def notes(d: StudyData) -> str:
    per_n, runs = d.extra["per_n"], d.runs
    curves = d.extra["curves_m"]
    n_metrics = ["test_err", "excess_err", "draw_std_points"]
    by_n = A.summarize(per_n, ["eval.precise_samples"], n_metrics)
    return (f"Precise BN re-scored at each N on every run: mean over "
            f"{int(_grid_spec(runs.iloc[0])['repeats'])} independent draws of the N images per "
            "run, then 95% CI over seeds; excess_err is paired by seed (minus the largest N); "
            "draw_std_points is the accuracy spread (std, points) between draws of one model.\n\n"
            + A.markdown_table(A.format_summary(by_n, ["eval.precise_samples"], n_metrics))
            + "\n\nThe weight the EMA still puts on its initial buffers, (1 - m)^t after t steps:\n\n"
            + A.markdown_table(initial_weight(d.extra["runs_m"], curves)))


def lag_over_training(curves_m: pd.DataFrame) -> pd.DataFrame:
    """Per (run, momentum): the EMA's test error minus precise BN's on the same weights, averaged
    over every scored epoch (the training window; at the last epoch the cosine lr is ~0 and the
    EMA has caught up, so the end alone hides the lag the figure shows)."""
    c = A.with_error(curves_m[curves_m["test_err.precise" if "test_err.precise" in curves_m
                                      else "test_acc.precise"].notna()])
    c = c.assign(**{"test_err.lag": c["test_err.ema"] - c["test_err.precise"]}, status="ok",
                 momentum=c[MOMENTUM].map(momentum_label))
    return c.groupby(["run", "seed", "momentum"], as_index=False)["test_err.lag"].mean().assign(status="ok")


def ema_above_precise(d: StudyData):
    """EMA above precise during training (D: matched epochs, same weights, no gate), per seed;
    the run's own momentum first, each other momentum beside it."""
    lag = lag_over_training(d.extra["curves_m"])
    epochs = int(d.extra["curves_m"]["epoch"].nunique())
    ref = momentum_label(d.extra["ref"])
    order = [ref, *sorted(m for m in lag["momentum"].unique() if m != ref)]
    parts = [compare_value(lag[lag["momentum"] == m], "test_err.lag", 0.0, want=+1, claim="D", runs=d.runs,
                           name=f"EMA ({m}) minus precise test error, mean over {epochs} epochs")
             for m in order]
    return parts[0].also(*parts[1:])


def precise_matches_from_1k(d: StudyData):
    """Precise BN at the smallest N >= 1k against the largest N on the same weights (E)."""
    per_n = A.with_error(d.extra["per_n"])
    sizes = sorted(n for n in per_n["eval.precise_samples"].unique() if n >= 1000)
    largest = per_n["eval.precise_samples"].max()
    parts = [compare(per_n, "test_err", "eval.precise_samples", n, largest, want=0, claim="E", runs=d.runs,
                     names=(f"precise BN over {n} images", f"over {largest}")) for n in sizes[:-1]]
    return parts[0].also(*parts[1:])


def _ready(d: StudyData) -> bool:
    return "test_acc.precise" in d.curves and (d.runs["status"] == "ok").any()


SOURCE = "Wu & Johnson 2021, Sec. 3"
STUDY = Study(
    "ema_vs_precise", __doc__,
    shapes=[Shape("with few steps per epoch the EMA's test error is above precise BN's, at every "
                  "momentum", SOURCE, ema_above_precise, "D"),
            Shape("precise BN with >= ~1k samples matches the population estimate", SOURCE,
                  precise_matches_from_1k, "E")],
    converged=None,  # augmented, 16k images: the design does not memorize
    requires=_ready, prepare=prepare,
    figures=lambda d: figures(d.extra["curves_m"], d.extra["per_n"], d.extra["runs_m"], d.extra["ref"]),
    table=table, comparisons=lambda d: statements(d.extra["runs_m"], d.extra["curves_m"], d.extra["per_n"]),
    notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
