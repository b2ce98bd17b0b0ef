"""Is BN a regularizer because it normalizes the input space of each layer, or because its batch
statistics are noisy?

Sweep (conf/study/norm_vs_noise.yaml): norm {none, ln, pn, pn_online, bn, ghost_bn16, none_gni16,
ln_gni16, pn_gni16, bn_gni16} x 5 seeds, no data augmentation, trained to ~100% training accuracy
on a small training set so that memorizing is possible. The arms pull the two explanations apart:
PN (population normalization: BN's normalization with the running statistics in the forward pass)
against BN changes only the batch noise of the forward pass, with the normalization held fixed (PN's
backward is train-mode BN's, through the batch statistics, so the gradient keeps BN's batch noise:
bnexp/layers/batchnorms.py, PopulationNorm2d). PN online (bnexp/layers/online_norm.py) has PN's
forward and a backward without batch-mates (running averages of BN's two gradient projections), so
PN online against BN is the batch noise of both passes with the normalization held fixed, and PN
online against PN the noise of the backward alone; PN online does not train at BN's learning rate
(it diverges at 0.02-0.1 on the smoke net), so it runs at its own tuned lr and its contrasts say
so. None against none + GNI and LN against LN + GNI (ghost noise injection of ghost batches of
16) add noise without BN; LN against none adds normalization without noise. Every arm shares the
initialization seed and batch order, so comparisons are paired by seed.

    make study S=norm_vs_noise ARGS="data=synthetic scale=smoke"                   # 30 runs, minutes
    make study S=norm_vs_noise ARGS="data=fashion_mnist scale=small launcher=joblib" # 50 runs, 2 cores
    make study S=norm_vs_noise                                                     # CIFAR-10, one GPU

Measured noise (the `forward_noise` probe, bnexp/measure/forward_noise.py): the spread of a fixed probe
image's norm output across batches of other training images, over the spread across images,
in train mode as training sees it; mean over normalization positions and epochs. 0 for none,
LN, PN and PN online; > 0 for BN, ghost BN and every GNI arm. Measured gradient noise (the
`grad_noise` probe, bnexp/measure/grad_noise.py): the share of the same probe images' weight
gradient that moves with their batch-mates, mean over epochs. 0 for none, LN and PN online; > 0 for
PN (its backward is BN's), BN, ghost BN and every GNI arm. Test error and gap are under precise
statistics for arms with BN layers (bn, pn, pn_online, ghost BN and their GNI arms:
`test_acc.precise`, `gen_gap.precise`) and the plain numbers for the others (`test_err.pop`,
`gen_gap.pop`).

Expected (Luo et al. 2019; Kosson et al. 2024; STUDIES.md): PN generalizes worse than BN, and so
does PN online, the same comparison with no batch-mates in the gradient either; noise
injected into LN or PN recovers much of BN's benefit, and GNI can beat ghost BN, so the noise
explains a large part. The notes bnexp started from say the opposite is "believed" (normalizing
the input space is "the more convincing reason"); the report says which the data support.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnexp.analysis import generic as A
from bnexp.analysis.forest import paired_rows, plot_forest
from bnexp.analysis.plots import PALETTE, TOL_MUTED
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, compare_recovery, words
from bnexp.analysis.run_study import run_study

NORMALIZATION, ADDED = "normalization", "added noise"
HUES = ["no", "GNI 16", "ghost batch 16"]
KNOBS = ("normalization [norm: none, ln, pn, pn_online, bn, ...]",
         "added noise [norm.ghost_noise=16 (GNI) or norm=ghost_bn16]")
# preset -> (normalization, noise added to it); the order of the table and the figures
ARMS = {"none": ("none", "no"), "none_gni16": ("none", "GNI 16"),
        "ln": ("LN", "no"), "ln_gni16": ("LN", "GNI 16"),
        "pn": ("PN", "no"), "pn_gni16": ("PN", "GNI 16"), "pn_online": ("PN online", "no"),
        "bn": ("BN", "no"), "bn_gni16": ("BN", "GNI 16"), "ghost_bn16": ("BN", "ghost batch 16")}
UNNORMALIZED = ("none", "none_gni16")
ERR, GAP, NOISE, GRAD = "test_err.pop", "gen_gap.pop", "forward_noise", "grad_noise"
PROBE_ROWS = {NOISE: "forward_noise.ratio", GRAD: "grad_noise.batchmates"}  # column -> probe row
AXIS = {NOISE: "measured forward noise, unitless\n(std across batch-mates / std across images)",
        GRAD: "measured gradient noise, unitless\n(share of a probe gradient's mean square that "
              "moves with its batch-mates)"}


def measured_noise(probes: pd.DataFrame, column: str = NOISE) -> pd.Series:
    """Per run: the mean of ``column``'s probe row (``PROBE_ROWS``) over layers and epochs."""
    if not len(probes) or "name" not in probes:
        return pd.Series(dtype=float, name=column)
    rows = probes[probes["name"] == PROBE_ROWS[column]]
    return rows.groupby("run")["value"].mean().rename(column)


def with_arms(runs: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """Adds the arm's normalization and added noise, the population-statistics test error and
    gap (precise where the run has it, else the plain number) and the measured noise."""
    precise = runs.get("test_acc.precise", pd.Series(np.nan, index=runs.index))
    gap = runs.get("gen_gap.precise", pd.Series(np.nan, index=runs.index))
    out = runs.assign(**{NORMALIZATION: runs["norm"].map(lambda n: ARMS.get(n, (n, ""))[0]),
                         ADDED: runs["norm"].map(lambda n: ARMS.get(n, ("", "?"))[1]),
                         ERR: 1.0 - precise.fillna(runs["test_acc"]),
                         GAP: gap.fillna(runs["gen_gap"])})
    for column in PROBE_ROWS:
        out = out.merge(measured_noise(probes, column), left_on="run", right_index=True, how="left")
    return out


def prepare(d: StudyData) -> StudyData:
    d.runs = with_arms(d.runs, d.probes)
    return d


# ----------------------------------------------------------------------------- figures
def plot_per_arm(runs: pd.DataFrame, metric: str, ylabel: str) -> Figure:
    """``metric`` per arm: bars per normalization, one colour per added noise, 95% CIs over
    seeds, each run a dot."""
    fig = A.plot_bars(runs, NORMALIZATION, metric, hue=ADDED, hue_order=HUES)
    ax = fig.axes[0]
    ax.set_xlabel(KNOBS[0])
    ax.set_ylabel(ylabel)
    if ax.get_legend() is not None:  # above the axes, in one row: inside it covers the LN and PN bars
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, title=KNOBS[1], loc="lower center", bbox_to_anchor=(0.5, 1.02),
                  ncol=len(labels))
    return fig


def plot_vs_noise(runs: pd.DataFrame, noise: str = NOISE) -> Figure:
    """Test error against a measured noise (``noise``: forward or gradient), one point per arm
    (mean over seeds, 95% CIs both ways); filled circles normalize, open squares do not."""
    A.set_style()
    fig = Figure(figsize=(6.8, 3.8))
    ax = fig.subplots()
    stats = A.summarize(runs, ["norm"], [noise, ERR])
    stats = stats.set_index("norm").reindex([a for a in ARMS if a in set(stats["norm"])]).reset_index()
    stats = stats.dropna(subset=[f"{noise}.mean", f"{ERR}.mean"])  # arms with no finished run
    # ten arms: Tol's muted nine and a grey darker than its pale one (which vanishes on white)
    colors = PALETTE + ["#999999"] if len(stats) <= len(PALETTE) + 1 else TOL_MUTED[:-1] + ["#777777"]
    for color, (_, s) in zip(colors, stats.iterrows()):
        x, y = s[f"{noise}.mean"], 100 * s[f"{ERR}.mean"]
        open_ = s["norm"] in UNNORMALIZED
        ax.errorbar(x, y, xerr=np.nan_to_num(s[f"{noise}.ci_hi"] - x),
                    yerr=np.nan_to_num(100 * s[f"{ERR}.ci_hi"] - y), fmt="s" if open_ else "o",
                    mfc="white" if open_ else color, color=color, capsize=2, label=s["norm"])
    top = float(np.nanmax((stats[f"{noise}.ci_hi"].fillna(stats[f"{noise}.mean"])).to_numpy(), initial=0.0))
    ax.set_xlim(-0.05 * max(top, 0.01), 1.1 * max(top, 0.01))  # the noise is >= 0
    ax.set_xlabel(AXIS[noise])
    ax.set_ylabel("test error (%)\n(precise stats where the net has BN layers)")
    ax.legend(title="normalization [norm]\n(open squares: not normalized)", loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return fig


# The primary contrasts, each "with the ingredient - without it" (below 0: the ingredient helps)
CONTRASTS = [("pn_gni16", "pn", "PN + noise - PN"), ("ln_gni16", "ln", "LN + noise - LN"),
             ("bn_gni16", "bn", "BN + noise - BN"), ("none_gni16", "none", "no norm. + noise - no norm."),
             ("bn", "pn", "BN - PN (batch noise, forward)"), ("ln", "none", "LN - no normalization"),
             ("pn", "none", "PN - no normalization"), ("bn_gni16", "ghost_bn16", "BN + noise - ghost BN 16"),
             ("bn", "pn_online", "BN - PN online (batch noise, both passes)"),
             ("pn", "pn_online", "PN - PN online (batch noise, backward)")]


def figures(d: StudyData) -> dict:
    where = "\n(precise stats where the net has BN layers)"
    present = [c for c in CONTRASTS if {c[0], c[1]} <= set(d.runs["norm"])]
    figs = {"test_err_paired": plot_forest(paired_rows(d.runs, ERR, "norm", present), "test_err",
                                           title="test error, paired by seed (below 0: the first arm is better)"),
            "test_err_per_arm": plot_per_arm(d.runs, ERR, "test error (%)" + where),
            "gen_gap_per_arm": plot_per_arm(d.runs, GAP, "generalization gap (train - test, points)" + where),
            "test_err_vs_noise": plot_vs_noise(d.runs)}
    if GRAD in d.runs and d.runs[GRAD].notna().any():
        figs["test_err_vs_grad_noise"] = plot_vs_noise(d.runs, GRAD)
    if len(d.curves) and "train_acc" in d.curves:
        curves = d.curves[d.curves["norm"].isin(list(ARMS))]
        figs["train_acc_per_epoch"] = A.plot_curves(curves, "epoch", "train_acc", hue="norm",
                                                    hue_order=[a for a in ARMS if a in set(curves["norm"])])
    return figs


# ----------------------------------------------------------------------------- the answer
def diff(d: StudyData, metric: str, a: str, b: str):
    """``a - b`` paired by seed: every arm shares init and batch order at the same seed."""
    return A.paired_diff(d.runs, metric, "norm", a, b)


def answer(d: StudyData) -> list[str]:
    """The notes' question in sentences, each difference with its 95% interval."""
    parts = [("forward noise with the normalization held fixed (PN - BN)", "pn", "bn"),
             ("noise of both passes with the normalization held fixed (PN online - BN)", "pn_online", "bn"),
             ("noise of the backward pass (PN online - PN)", "pn_online", "pn"),
             ("noise without BN, no normalization (none - none + GNI)", "none", "none_gni16"),
             ("noise without BN, LN (LN - LN + GNI)", "ln", "ln_gni16"),
             ("noise without BN, PN (PN - PN + GNI)", "pn", "pn_gni16"),
             ("noise on top of BN (BN - BN + GNI)", "bn", "bn_gni16"),
             ("normalization without noise (none - LN)", "none", "ln"),
             ("normalization without noise (none - PN)", "none", "pn"),
             ("GNI against ghost BN (ghost BN 16 - BN + GNI)", "ghost_bn16", "bn_gni16")]
    text = [f"What {what} buys, in test error: " + A.sentence(diff(d, ERR, a, b)) + lr_words(d, a, b)
            for what, a, b in parts if {a, b} <= set(d.runs["norm"])]
    text.append(verdict_sentence(d))
    return text


def verdict_sentence(d: StudyData) -> str:
    """Which explanation the intervals support: noise (PN worse than BN, or GNI helping none, LN
    or PN) and / or normalization (LN or PN better than none). Arms that did not train count for
    neither."""
    def helps(a, b):  # error of a minus error of b, interval above 0: b is better
        try:
            dd = diff(d, ERR, a, b)
        except (KeyError, ValueError):
            return False
        return not dd.untrained and dd.sign == 1
    noise = [w for w, a, b in (("PN -> BN", "pn", "bn"), ("none -> none + GNI", "none", "none_gni16"),
                               ("LN -> LN + GNI", "ln", "ln_gni16"), ("PN -> PN + GNI", "pn", "pn_gni16"),
                               ("PN online -> BN", "pn_online", "bn"), ("PN online -> PN", "pn_online", "pn"))
             if helps(a, b)]
    norm = [w for w, a, b in (("none -> LN", "none", "ln"), ("none -> PN", "none", "pn")) if helps(a, b)]
    support = ("both explanations" if noise and norm else "the noise explanation" if noise
               else "the normalization explanation" if norm else "neither explanation clearly")
    return (f"The data support {support}: noise lowers test error where its interval excludes 0 "
            f"in {', '.join(noise) or 'no comparison'}; normalization without noise does in "
            f"{', '.join(norm) or 'no comparison'}")


def verdict(d: StudyData, metric: str, a: str, b: str, want=-1):
    """The shape verdict of ``diff``: paired by seed, 5 seeds (the t-interval decides); its text
    names the arms' learning rates where they differ (grid.tune)."""
    return compare(d.runs, metric, "norm", a, b, want=want, names=(arm_words(a), arm_words(b)),
                   note=lr_words(d, a, b).strip(" ;()"))


def lr_words(d: StudyData, a: str, b: str) -> str:
    """`` (lr 0.01 for PN online, 0.1 for BN)`` where the two arms ran at different learning
    rates (each at its tuned one), else nothing."""
    if "optim.lr" not in d.runs:
        return ""
    lrs = [d.runs.loc[d.runs["norm"] == arm, "optim.lr"].dropna().unique() for arm in (a, b)]
    if any(len(v) != 1 for v in lrs) or lrs[0][0] == lrs[1][0]:
        return ""
    return f" (lr {lrs[0][0]:g} for {arm_words(a)}, {lrs[1][0]:g} for {arm_words(b)})"


def arm_words(arm: str) -> str:
    if arm == "pn_online":
        return "PN online"
    base, _, gni = arm.partition("_gni")
    if base.startswith("ghost_bn"):
        return f"ghost BN {base.removeprefix('ghost_bn')}"
    return words(base) + (f" + ghost noise injection {gni}" if gni else "")


def pn_worse(d: StudyData):
    return verdict(d, ERR, "pn", "bn", +1).also(verdict(d, GAP, "pn", "bn", +1))


def injected_recovers(d: StudyData):
    """Primary: the share of BN's advantage over PN (the same normalization without batch noise)
    that injected noise wins back for PN; beside it, GNI against LN and PN alone."""
    err = {a: g.groupby("seed")[ERR].mean() for a, g in d.runs[d.runs["status"] == "ok"].groupby("norm")}
    share = compare_recovery(err["bn"], err["pn"], err["pn_gni16"], runs=d.runs[d.runs["norm"] == "pn_gni16"],
                             name="share of BN's test-error advantage over PN that GNI 16 recovers for PN")
    return share.also(verdict(d, ERR, "pn_gni16", "pn"), verdict(d, ERR, "ln_gni16", "ln"))


def online_worse(d: StudyData):
    """PN online against BN: the same normalization, no batch-mates in either pass; beside it,
    the gap, and PN online against PN (the backward's noise alone)."""
    return verdict(d, ERR, "pn_online", "bn", +1).also(verdict(d, GAP, "pn_online", "bn", +1),
                                                       verdict(d, ERR, "pn_online", "pn", +1))


def gni_beats_ghost(d: StudyData):
    return verdict(d, ERR, "bn_gni16", "ghost_bn16")


def normalization_regularizes(d: StudyData):
    return verdict(d, ERR, "ln", "none").also(verdict(d, GAP, "ln", "none"))


def notes(d: StudyData) -> str:
    fit = d.runs[d.runs["status"] == "ok"].groupby("norm")["train_acc"].mean() * 100
    return ("test_err.pop / gen_gap.pop: precise statistics (4096 training images) for nets with "
            "BN layers, the plain eval for none and LN; gap = train accuracy (eval, un-augmented "
            "training images) - test accuracy. forward_noise: see the module docstring (unitless, "
            "mean over normalization positions and epochs); grad_noise: grad_noise.batchmates, mean "
            "over epochs (bnexp/measure/grad_noise.py). Intervals: 95% t over seeds; "
            "differences paired by seed. Train accuracy at the end: "
            + ", ".join(f"{k} {v:.1f}%" for k, v in fit.items()) + "." + backward_words(d) + lr_notes(d))


def backward_words(d: StudyData) -> str:
    """What PN - BN holds fixed, measured: PN's forward has no batch-mates, but its backward is
    train-mode BN's, through the batch statistics; the grad_noise probe says how much of BN's
    gradient noise that carries (PN online's is 0 by construction)."""
    if GRAD not in d.runs:
        return ""
    g = d.runs[d.runs["status"] == "ok"].groupby("norm")[GRAD].mean()
    if not {"pn", "bn"} <= set(g.dropna().index):
        return ""
    online = f", PN online's {g['pn_online']:.3f}" if "pn_online" in g and pd.notna(g["pn_online"]) else ""
    return (f" PN's backward is train-mode BN's (through the batch statistics), so PN - BN does not "
            f"remove all batch noise: PN's measured gradient noise is {g['pn']:.3f} against BN's "
            f"{g['bn']:.3f} ({g['bn'] / g['pn']:.0f}x less than BN's){online}; PN online - BN is the "
            "contrast with no batch-mates in either pass, at PN online's own lr.")


def lr_notes(d: StudyData) -> str:
    """The learning rate of each arm, where they differ (grid.tune)."""
    if "optim.lr" not in d.runs:
        return ""
    lr = d.runs.groupby("norm")["optim.lr"].first()
    return "" if lr.nunique() <= 1 else " lrs: " + ", ".join(f"{k} {v:g}" for k, v in lr.items()) + "."


SOURCE_LUO, SOURCE_KOSSON = "Luo et al. 2019", "Kosson, Fan & Jaggi 2024"
STUDY = Study(
    "norm_vs_noise", __doc__,
    shapes=[Shape("PN generalizes worse than BN (higher test error and gap)", SOURCE_LUO, pn_worse, "G"),
            Shape("noise injected into LN or PN (GNI 16) lowers their test error, recovering much "
                  "of BN's benefit", SOURCE_KOSSON, injected_recovers, "G"),
            Shape("GNI (on BN) beats ghost BN of the same ghost batch size", SOURCE_KOSSON, gni_beats_ghost, "G"),
            Shape("normalization without batch noise (LN) regularizes: lower test error and gap "
                  "than none", "the seed notes' 'more convincing reason'", normalization_regularizes,
                  "G"),
            Shape("with no batch-mates in the gradient either (PN online), PN still generalizes worse "
                  "than BN", SOURCE_LUO, online_worse, "G")],
    prepare=prepare, figures=figures, by=("norm",), arm=("norm",),
    metrics=(ERR, GAP, NOISE, GRAD, "train_acc", "test_acc", "test_acc.precise"),
    comparisons=answer, notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
