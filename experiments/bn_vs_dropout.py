"""Is BN a regularizer like dropout, and does dropout placed before BN hurt?

Sweep (conf/study/bn_vs_dropout.yaml): norm {bn, none} x dropout p {0, 0.1, 0.3, 0.5} (smoke:
{0, 0.3, 0.5}) x placement {before_norm: on the input of every conv but the first, hence before
each BN; after_norm: once, on the feature map after the last BN; classifier: on the pooled
features before the linear head} x seeds (3; 5 at small scale). No data augmentation, so the generalization
gap (train accuracy in eval mode on un-augmented training images minus test accuracy) shows what
the network itself regularizes; it is read under EMA statistics (`gen_gap`) and, for BN nets,
under precise statistics (`gen_gap.precise`: train and test both scored with the statistics
re-estimated with dropout off). Probes: the per-layer variance shift, per channel as Li et al.
define it (r_c = running_var_c / the variance of channel c's input at test time, dropout off;
`variance_shift.abs_log` = mean_c |log r_c|, 0 = no shift, so channels above and below 1 do not
cancel; `variance_shift.max` = max_c max(r_c, 1 / r_c)) and calibration (gap and ECE per epoch).
Eval modes: ema and precise (statistics re-estimated with dropout off, Li et al.'s remedy).

    make study S=bn_vs_dropout ARGS="data=synthetic scale=smoke"   # 54 runs, a few CPU minutes
    make study S=bn_vs_dropout ARGS="data=fashion_mnist scale=small launcher=joblib"  # 120 runs + 6 tuning none
    make study S=bn_vs_dropout                                     # CIFAR-10: 72 runs, one GPU

Expected (Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Normalization
by Variance Shift"; Ioffe & Szegedy 2015, Sec. 4.2.1): BN alone narrows the gap about as much as
dropout does without BN; dropout placed before BN costs test accuracy because at test time the
BN layers see a smaller variance than the running statistics they learned under dropout
(variance shift ratio about 1 / (1 - p) > 1, |log r| about -log(1 - p)), while dropout after the
last BN or before the classifier does not; precise statistics recomputed with dropout off
recover much of that loss.
"""
from __future__ import annotations

import math

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, compare_recovery, words
from bnexp.analysis.run_study import run_study

P, PLACE = "model.dropout", "model.dropout_placement"
ARMS = {("bn", "before_norm"): "BN, dropout before every BN",
        ("bn", "after_norm"): "BN, dropout after the last BN",
        ("none", "before_norm"): "no norm, dropout before every conv",
        ("none", "after_norm"): "no norm, dropout after the last conv",
        ("bn", "classifier"): "BN, dropout before the classifier",
        ("none", "classifier"): "no norm, dropout before the classifier"}
SHIFT = "variance_shift.abs_log"  # mean_c |log r_c| per BN layer (bnexp.measure.probes.variance_shift)


def with_arm(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``arm``: norm and dropout placement in words (the legend of the figures)."""
    return df.assign(arm=[ARMS.get((n, p), f"{n}, {p}") for n, p in zip(df["norm"], df[PLACE])])


def titled(fig, title: str, width: float | None = None):
    """The figure with its legend titled ``title`` (the hue columns are made up) and, when
    given, a width that leaves the data room beside an outside legend."""
    for ax in fig.axes:
        if ax.get_legend() is not None:
            ax.get_legend().set_title(title)
    if width:
        fig.set_figwidth(width)
    return fig


def variance_shift(probes: pd.DataFrame, name: str = SHIFT) -> pd.DataFrame:
    """Rows of the last-epoch ``name`` probe (``variance_shift.abs_log`` or ``.max``), with the
    layer's depth (1, 2, ...)."""
    rows = probes[probes["name"] == name] if len(probes) else probes
    if rows.empty:
        return rows
    rows = rows[rows["epoch"] == rows.groupby("run")["epoch"].transform("max")]
    order = list(dict.fromkeys(rows["layer"]))  # registration order = depth
    return rows.assign(bn_layer=rows["layer"].map({name: i + 1 for i, name in enumerate(order)}))


def gap_modes(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs x {ema, precise}: ``gen_gap`` (EMA statistics, the default mode, recorded without a
    suffix) and ``gen_gap.precise`` stacked into ``gen_gap`` with an ``eval_mode`` column."""
    return A.eval_modes_long(runs.assign(**{"gen_gap.ema": runs["gen_gap"]}), "gen_gap")


def gap_curves(probes: pd.DataFrame, p_max: float) -> pd.DataFrame:
    """Per-epoch gap (calibration probe) of the p = 0 nets and of every arm at the largest p;
    empty where the runs did not record it (the small scale leaves the probe out)."""
    rows = probes[probes["name"] == "calibration.gen_gap"].rename(columns={"value": "gen_gap"})
    if rows.empty:
        return rows
    rows = with_arm(rows)
    base = rows[(rows[P] == 0) & (rows[PLACE] == "before_norm")]
    base = base.assign(line=base["norm"].map({"bn": "BN", "none": "no norm"}) + ", no dropout")
    top = rows[rows[P] == p_max]
    return pd.concat([base, top.assign(line=top["arm"] + f", p={p_max:g}")], ignore_index=True)


def figures(runs, probes) -> dict:
    setup = "normalization and dropout placement"
    figs = {"gen_gap_vs_p": titled(A.plot_metric_vs(runs, P, "gen_gap", "arm", logx=False,
                                                    title="gap under EMA statistics"), setup, 8.0),
            "test_acc_vs_p": titled(A.plot_metric_vs(runs, P, "test_acc", "arm", logx=False), setup, 8.0)}
    bn = runs[runs["norm"] == "bn"]
    if "gen_gap.precise" in bn:
        gaps = gap_modes(bn)
        gaps = gaps.assign(line=gaps["arm"] + ", " + gaps["eval_mode"] + " stats")
        figs["bn_gen_gap_ema_vs_precise"] = titled(
            A.plot_metric_vs(gaps, P, "gen_gap", "line", logx=False,
                             title="BN nets: gap under EMA and precise statistics"),
            "BN net, test-time statistics", 8.5)
    modes = A.eval_modes_long(bn, "test_acc")
    modes = modes.assign(line=modes["arm"] + ", " + modes["eval_mode"] + " stats")
    figs["bn_test_acc_ema_vs_precise"] = titled(
        A.plot_metric_vs(modes, P, "test_acc", "line", logx=False), "BN net, test-time statistics", 8.0)
    shift = variance_shift(probes)
    if len(shift):
        fig = A.plot_probe(shift, name=SHIFT, x="bn_layer", hue=P, col=PLACE,
                           title="variance shift after training (0 = none)")
        layers = sorted(shift["bn_layer"].unique())
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            ax.set_xlabel("BN layer (1 = first)")
            ax.set_xticks(layers)
            for p in sorted(x for x in shift[P].unique() if x > 0):  # Li et al.: r = 1 / (1 - p)
                ax.axhline(-math.log(1 - p), color="0.6", lw=0.7, ls=":")
            if ax.get_ylabel():
                ax.set_ylabel("mean over channels of |log r|\nr = running var / test-time var")
        figs["variance_shift_per_layer"] = fig
    curves = gap_curves(probes, runs[P].max()) if len(probes) else pd.DataFrame()
    if len(curves):
        figs["gen_gap_per_epoch"] = titled(A.plot_curves(curves, "epoch", "gen_gap", "line"),
                                           "net (calibration probe, eval mode)", 8.5)
        epochs = sorted(curves["epoch"].unique())
        figs["gen_gap_per_epoch"].axes[0].set_xticks(epochs, [str(e + 1) for e in epochs])
        figs["gen_gap_per_epoch"].axes[0].set_xlabel("epochs completed")
    return figs


def statements(runs: pd.DataFrame) -> str:
    """The expected shape, claim by claim, each from the data with its interval (Welch between
    different models, paired by seed between two eval modes of the same models)."""
    p_max = runs[P].max()
    base = runs[runs[PLACE] == "before_norm"]  # p = 0: both placements are the same net
    text = ["BN alone vs no norm, no dropout: "
            + A.compare_statement(base, "gen_gap", "norm", "bn", "none", at={P: 0}) + "."]
    plain = runs[runs["norm"] == "none"]
    by_p = A.summarize(plain, [P, PLACE], ["gen_gap"]).dropna(subset=["gen_gap.mean"])
    best = by_p[by_p[P] > 0].sort_values("gen_gap.mean").head(1)
    if len(best):
        p, place = best[P].iloc[0], best[PLACE].iloc[0]
        pair = pd.concat([plain[(plain[P] == p) & (plain[PLACE] == place)].assign(arm=f"dropout {p:g}"),
                          plain[(plain[P] == 0) & (plain[PLACE] == place)].assign(arm="no dropout")])
        text.append(f"Dropout without norm (best gap at p={p:g}, {place}): "
                    + A.compare_statement(pair, "gen_gap", "arm", f"dropout {p:g}", "no dropout") + ".")
    bn = runs[runs["norm"] == "bn"]
    text += ["Placement with BN: " + A.compare_statement(
        bn, "test_acc", PLACE, other, "before_norm", at={P: p_max}) + "."
             for other in ("after_norm", "classifier") if other in set(bn[PLACE])]
    if "var_shift" in bn:
        s = A.summarize(bn[bn[P] == p_max], [PLACE], ["var_shift"]).set_index(PLACE)["var_shift.mean"]
        text.append(f"Variance shift (mean over BN layers of mean_c |log r_c|) at p={p_max:g}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in s.items())
                    + f" (-log(1 - p) = {-math.log(1 - p_max):.3f}, Li et al.'s 1 / (1 - p)).")
    if "gen_gap.precise" in bn:
        gaps = gap_modes(bn[(bn[PLACE] == "before_norm") & (bn[P] == p_max)])
        if gaps["eval_mode"].nunique() > 1:
            text.append(f"Gap of dropout-before-BN at p={p_max:g}, precise minus EMA statistics: "
                        + A.paired_statement(gaps, "gen_gap", "eval_mode", "precise", "ema") + ".")
    before = A.eval_modes_long(bn[(bn[PLACE] == "before_norm") & (bn[P] == p_max)], "test_acc")
    if before["eval_mode"].nunique() > 1:
        text.append("Dropout before BN, re-estimating the statistics: " + A.paired_statement(
            before, "test_acc", "eval_mode", "precise", "ema") + ".")  # the same models
    return " ".join(text)


def fit_note(runs: pd.DataFrame) -> str:
    """How well each net fits without dropout: a gap is only comparable between nets that fit."""
    base = runs[(runs[P] == 0) & (runs["status"] == "ok")].groupby("norm")["train_acc"].mean() * 100
    text = "Without dropout, train accuracy: " + ", ".join(f"{k} {v:.1f}%" for k, v in base.items()) + "."
    if {"bn", "none"} <= set(base.index) and base["bn"] - base["none"] > 10:
        text += (" The net without normalization fits its training set much less at this lr and "
                 "budget, so its smaller gap is underfitting, not regularization; compare the gaps "
                 "of nets that fit (full scale), or read test accuracy.")
    return text


def prepare(d: StudyData) -> StudyData:
    runs = with_arm(d.runs)
    shift = variance_shift(d.probes)
    if len(shift):
        runs = runs.merge(shift.groupby("run")["value"].mean().rename("var_shift"), on="run", how="left")
    worst = variance_shift(d.probes, "variance_shift.max")
    if len(worst):
        runs = runs.merge(worst.groupby("run")["value"].max().rename("var_shift_max"), on="run", how="left")
    d.runs = runs
    return d


def notes(d: StudyData) -> str:
    return (fit_note(d.runs) + " "
            "gen_gap = train accuracy (eval mode, EMA statistics, un-augmented training images) "
            "minus test accuracy, in points; gen_gap.precise the same with both scored under "
            "precise statistics. var_shift = mean over BN layers of mean_c |log r_c|, r_c = "
            "running_var_c / the variance of channel c's input in eval mode, after the last "
            "epoch (0 = no shift; -log(1 - p) for Li et al.'s 1 / (1 - p)); var_shift_max = the "
            "largest max(r_c, 1 / r_c) over channels and layers. Runs without BN have no precise "
            "mode and no variance shift (-). At p = 0 the three placements are the same net "
            "trained three times. Dropout \"before every BN\" drops the input of every conv "
            "but the first (the image is left whole), so BN layer 1 sees no variance shift.")


def bn_narrows_gap(d: StudyData):
    """The gap, BN against none at p = 0; also test accuracy, which the gap alone does not give
    (a smaller gap can come with lower test accuracy)."""
    base = d.runs[d.runs[PLACE] == "before_norm"]  # p = 0: the three placements are one net
    gap = compare(base, "gen_gap", "norm", "bn", "none", want=-1, at={P: 0},
                  note="a gap is only comparable between nets that fit their training set")
    return gap.also(compare(base, "test_acc", "norm", "bn", "none", want=+1, at={P: 0}))


def before_bn_hurts(d: StudyData):
    bn = d.runs[d.runs["norm"] == "bn"]
    top = d.runs[P].max()
    parts = [compare(bn, "test_acc", PLACE, other, "before_norm", want=+1, at={P: top},
                     names=(f"dropout {words(other)}", "dropout before every BN"))
             for other in ("after_norm", "classifier") if other in set(bn[PLACE])]
    return parts[0].also(*parts[1:])


def precise_undoes(d: StudyData):
    """Per seed at the largest p: the share of the accuracy that dropout before BN loses against
    dropout after the last BN (EMA statistics both) that precise statistics win back on the
    same weights."""
    top = d.runs[(d.runs["norm"] == "bn") & (d.runs[P] == d.runs[P].max()) & (d.runs["status"] == "ok")]
    by = {place: g.groupby("seed") for place, g in top.groupby(PLACE)}
    return compare_recovery(by["after_norm"]["test_acc.ema"].mean(), by["before_norm"]["test_acc.ema"].mean(),
                            by["before_norm"]["test_acc.precise"].mean(), claim="E",
                            name="share of the loss precise statistics recover",
                            runs=top[top[PLACE] == "before_norm"])


SOURCE = "Li et al. 2019, variance shift"
STUDY = Study(
    "bn_vs_dropout", __doc__,
    shapes=[Shape("BN alone narrows the generalization gap (no dropout)", "Ioffe & Szegedy 2015",
                  bn_narrows_gap, "G"),
            Shape("dropout placed before BN costs test accuracy against dropout after the last BN "
                  "and before the classifier", SOURCE,
                  before_bn_hurts, "G"),
            Shape("precise statistics recover much of that loss", SOURCE, precise_undoes, "E")],
    requires="gen_gap", prepare=prepare,
    figures=lambda d: figures(d.runs, d.probes), by=("norm", PLACE, P),
    metrics=("test_acc", "test_acc.precise", "train_acc", "gen_gap", "gen_gap.precise", "var_shift",
             "var_shift_max", "ece"),
    comparisons=lambda d: statements(d.runs), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
