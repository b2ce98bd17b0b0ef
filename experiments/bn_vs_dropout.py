"""Is BN a regularizer like dropout, and does dropout placed before BN hurt?

Sweep (conf/study/bn_vs_dropout.yaml): norm {bn, none} x dropout p {0, 0.1, 0.3, 0.5} (smoke:
{0, 0.3, 0.5}) x placement {before_norm: on the input of every conv but the first, hence before
each BN; after_norm: once, on the feature map after the last BN} x seeds {0, 1, 2}. No data
augmentation, so the generalization gap (train accuracy in eval mode on un-augmented training
images minus test accuracy) shows what the network itself regularizes. Probes: the per-layer
variance shift (running_var / the variance the layer sees at test time, dropout off) and
calibration (gap and ECE per epoch). Eval modes: ema and precise (statistics re-estimated with
dropout off, Li et al.'s remedy).

    make study S=bn_vs_dropout ARGS="data=synthetic scale=smoke"   # 36 runs, a few CPU minutes
    make study S=bn_vs_dropout                                     # CIFAR-10: 48 runs, one GPU

Expected (Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Normalization
by Variance Shift"; Ioffe & Szegedy 2015, Sec. 4.2.1): BN alone narrows the gap about as much as
dropout does without BN; dropout placed before BN costs test accuracy because at test time the
BN layers see a smaller variance than the running statistics they learned under dropout
(variance shift ratio about 1 / (1 - p) > 1), while dropout after the last BN does not; precise
statistics recomputed with dropout off recover much of that loss.
"""
from __future__ import annotations


import pandas as pd

from bnexp import analysis as A
from bnexp.studies import Study, StudyData
from bnexp.verdicts import Shape, expect
from common import run_study

P, PLACE = "model.dropout", "model.dropout_placement"
ARMS = {("bn", "before_norm"): "BN, dropout before every BN",
        ("bn", "after_norm"): "BN, dropout after the last BN",
        ("none", "before_norm"): "no norm, dropout before every conv",
        ("none", "after_norm"): "no norm, dropout after the last conv"}


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


def variance_shift(probes: pd.DataFrame) -> pd.DataFrame:
    """Rows of the last-epoch ``variance_shift.ratio`` probe, with the layer's depth (1, 2, ...)."""
    rows = probes[probes["name"] == "variance_shift.ratio"] if len(probes) else probes
    if rows.empty:
        return rows
    rows = rows[rows["epoch"] == rows.groupby("run")["epoch"].transform("max")]
    order = list(dict.fromkeys(rows["layer"]))  # registration order = depth
    return rows.assign(bn_layer=rows["layer"].map({name: i + 1 for i, name in enumerate(order)}))


def gap_curves(probes: pd.DataFrame, p_max: float) -> pd.DataFrame:
    """Per-epoch gap (calibration probe) of the p = 0 nets and of every arm at the largest p."""
    rows = probes[probes["name"] == "calibration.gen_gap"].rename(columns={"value": "gen_gap"})
    rows = with_arm(rows)
    base = rows[(rows[P] == 0) & (rows[PLACE] == "before_norm")]
    base = base.assign(line=base["norm"].map({"bn": "BN", "none": "no norm"}) + ", no dropout")
    top = rows[rows[P] == p_max]
    return pd.concat([base, top.assign(line=top["arm"] + f", p={p_max:g}")], ignore_index=True)


def figures(runs, probes) -> dict:
    setup = "normalization and dropout placement"
    figs = {"gen_gap_vs_p": titled(A.plot_metric_vs(runs, P, "gen_gap", "arm", logx=False), setup),
            "test_acc_vs_p": titled(A.plot_metric_vs(runs, P, "test_acc", "arm", logx=False), setup)}
    bn = runs[runs["norm"] == "bn"]
    modes = A.eval_modes_long(bn, "test_acc")
    modes = modes.assign(line=modes["arm"] + ", " + modes["eval_mode"] + " stats")
    figs["bn_test_acc_ema_vs_precise"] = titled(
        A.plot_metric_vs(modes, P, "test_acc", "line", logx=False), "BN net, test-time statistics", 8.0)
    shift = variance_shift(probes)
    if len(shift):
        fig = A.plot_probe(shift, name="variance_shift.ratio", x="bn_layer", hue=P, col=PLACE,
                           title="variance shift after training (1 = none)")
        layers = sorted(shift["bn_layer"].unique())
        top = shift["value"].max()
        for ax in fig.axes:
            ax.set_xlabel("BN layer (1 = first)")
            ax.set_xticks(layers)
            ax.set_yscale("log")  # 1 / (1 - p) compounds through the layers
            ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= 1.5 * top]
            ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            if ax.get_ylabel():
                ax.set_ylabel("running var / test-time var")
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
    text.append("Placement with BN: " + A.compare_statement(
        bn, "test_acc", PLACE, "after_norm", "before_norm", at={P: p_max}) + ".")
    if "var_shift" in bn:
        s = A.summarize(bn[bn[P] == p_max], [PLACE], ["var_shift"]).set_index(PLACE)["var_shift.mean"]
        text.append(f"Variance shift (mean over BN layers) at p={p_max:g}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in s.items())
                    + f" (1 / (1 - p) = {1 / (1 - p_max):.2f}).")
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
    d.runs = runs
    return d


def notes(d: StudyData) -> str:
    return (fit_note(d.runs) + " "
            "gen_gap = train accuracy (eval mode, EMA statistics, un-augmented training images) "
            "minus test accuracy, in points. var_shift = running_var / variance of the layer's "
            "input in eval mode, mean over BN layers, after the last epoch. Runs without BN have "
            "no precise mode and no variance shift (-). At p = 0 the two placements are the "
            "same net trained twice.")


def bn_narrows_gap(d: StudyData):
    base = d.runs[d.runs[PLACE] == "before_norm"]
    return expect([(A.welch_diff(base, "gen_gap", "norm", "bn", "none", at={P: 0}), -1)])


def before_bn_hurts(d: StudyData):
    bn = d.runs[d.runs["norm"] == "bn"]
    return expect([(A.welch_diff(bn, "test_acc", PLACE, "after_norm", "before_norm",
                                 at={P: d.runs[P].max()}), +1)])


def precise_undoes(d: StudyData):
    bn = d.runs[(d.runs["norm"] == "bn") & (d.runs[PLACE] == "before_norm") & (d.runs[P] == d.runs[P].max())]
    long = A.eval_modes_long(bn, "test_acc")
    return expect([(A.paired_diff(long, "test_acc", "eval_mode", "precise", "ema"), +1)])


SOURCE = "Li et al. 2019, variance shift"
STUDY = Study(
    "bn_vs_dropout", __doc__,
    shapes=[Shape("BN alone narrows the generalization gap (no dropout)", "Ioffe & Szegedy 2015",
                  bn_narrows_gap),
            Shape("dropout placed before BN costs test accuracy against dropout after it", SOURCE,
                  before_bn_hurts),
            Shape("precise statistics recover much of that loss", SOURCE, precise_undoes)],
    requires="gen_gap", prepare=prepare,
    figures=lambda d: figures(d.runs, d.probes), by=("norm", PLACE, P),
    metrics=("test_acc", "test_acc.precise", "train_acc", "gen_gap", "var_shift", "ece"),
    comparisons=lambda d: statements(d.runs), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
