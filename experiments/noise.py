"""Is BN's regularization the noise of its batch statistics?

Sweep (conf/study/noise.yaml): norm {bn, ghost_bn4, ghost_bn16, ghost_bn64, noisy_bn, none} x
seeds {0, 1, 2} at an optimization batch of 128, without data augmentation (so that the gap
shows the regularization). Ghost BN normalizes sub-batches of 4 / 16 / 64 images: smaller
normalization batches, noisier statistics. noisy_bn is BN over the whole batch plus a noise on
its output in the spirit of Santurkar et al. 2018 (Sec. 2.1: i.i.d. noise of non-zero mean and
non-unit variance whose distribution changes at every step, injected after BN), not a
replication of it: its magnitudes (noise_mean 0.5, noise_scale 1.25, jitter 0.1) and its
granularity (per sample and channel, shared over H x W) are as recalled, not checked against
their Appendix A.2.1, which could not be retrieved here (bnexp.layers.batchnorms.
NoisyBatchNorm2d, preset conf/norm/noisy_bn.yaml). Per channel and step a shift mu_t ~ U(-noise_mean, noise_mean) and a
scale sigma_t ~ U(1, noise_scale), and per sample a jitter around them, scale N(sigma_t,
noise_mul^2) and shift N(mu_t, noise_add^2); y = scale * BN(x) + shift. The `noise` probe
measures, once per epoch, per BN layer and per batch size B (4, 16, 64 and 128; full scale 2 ...
128), the spread of the batch statistics around the population: ``noise.mean = std_B(mu_B) /
sigma`` and ``noise.var = std_B(var_B) / sigma^2``.

    make study S=noise ARGS="data=synthetic scale=smoke"   # 18 runs, a few CPU minutes
    make study S=noise ARGS="data=fashion_mnist scale=small launcher=joblib"  # 30 runs (5 seeds)
    make study S=noise                                     # CIFAR-10: 18 runs, one GPU

Measured noise of a config (the x axis of the first figure): the standard deviation of the
perturbation that the statistics add to a unit-variance normalized value. Normalizing with
(mu_B, sigma_B) instead of (mu, sigma) turns x_hat into about x_hat * (1 - e) - d, with
std(d) = noise.mean and std(e) = noise.var / 2 (sigma_B / sigma = sqrt(var_B / var)); so the
noise is sqrt(noise.mean^2 + (noise.var / 2)^2) at the config's normalization batch size (its
ghost size, else 128), averaged over BN layers and epochs. noisy_bn adds the standard deviations
of its injected shift and scale in quadrature (``injected_noise``): the shift's
sqrt(noise_mean^2 / 3 + noise_add^2) (a U(-a, a) draw has variance a^2 / 3, plus the jitter) and
the scale's sqrt((noise_scale - 1)^2 / 12 + noise_mul^2) (U(1, b): variance (b - 1)^2 / 12), read
on a unit-variance output (the noise acts after BN's affine map, so this takes gamma ~ 1; the
scale's mean offset (noise_scale - 1) / 2 is a systematic rescaling, not counted as noise); none
has no normalization noise (0).

Expected (Hoffer et al. 2017, "Train longer, generalize better" (ghost BN); Santurkar et al.
2018, noisy BN; Luo et al. 2019, "Towards Understanding Regularization in Batch Normalization"):
the noise grows as the normalization batch shrinks (about as 1 / sqrt(B)), and more noise
regularizes more (smaller train/test gap, better test accuracy) up to a point, beyond which
(ghost batch 4, or too much injected noise) the noise hurts accuracy.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, memorization_note, words
from bnexp.analysis.plots import PALETTE
from bnexp.analysis.run_study import run_study


def noise_rows(probes: pd.DataFrame) -> pd.DataFrame:
    """The noise probe's rows (``noise.mean`` / ``noise.var`` per layer, batch size, epoch)."""
    return probes[probes["name"].isin(["noise.mean", "noise.var"])] if len(probes) else probes


def measured_noise(runs: pd.DataFrame, noise: pd.DataFrame) -> pd.Series:
    """Per run (indexed by ``run``): the noise of its normalization, as the module doc defines."""
    out = {}
    for _, r in runs.iterrows():
        if r["norm.name"] == "none":
            out[r["run"]] = 0.0
            continue
        size = r["norm.virtual_batch"] if r["norm.name"] == "ghost_bn" else r["data.batch_size"]
        rows = noise[(noise["run"] == r["run"]) & (noise["batch_size"] == size)]
        if rows.empty:  # this batch size was not probed (see grid.noise_sizes)
            out[r["run"]] = math.nan
            continue
        mean, var = (rows.loc[rows["name"] == n, "value"].mean() for n in ("noise.mean", "noise.var"))
        shift, scale = injected_noise(r) if r["norm.name"] == "noisy_bn" else (0.0, 0.0)
        out[r["run"]] = math.sqrt(mean ** 2 + shift ** 2 + (var / 2) ** 2 + scale ** 2)
    return pd.Series(out, name="noise")


def injected_noise(run: pd.Series) -> tuple[float, float]:
    """``(std of the shift, std of the scale)`` that noisy_bn injects per sample and channel
    (Santurkar et al.'s Algorithm 1, see the module docstring): a per-step uniform draw plus a
    per-sample Gaussian jitter, independent, so their variances add."""
    n_mu, n_sigma = float(run["norm.noise_mean"]), float(run["norm.noise_scale"])
    shift = math.sqrt(n_mu ** 2 / 3 + float(run["norm.noise_add"]) ** 2)
    scale = math.sqrt((n_sigma - 1) ** 2 / 12 + float(run["norm.noise_mul"]) ** 2)
    return shift, scale


def plot_vs_noise(runs: pd.DataFrame, metrics: tuple = ("test_acc", "gen_gap")) -> Figure:
    """One panel per metric: mean over seeds against the mean measured noise, one point per norm
    with 95% CI bars in both directions, labelled with the norm preset. The y range fits the
    normalized nets' intervals; a point outside it (`none`: noise 0, a different net) is not
    drawn but named in the corner. An arm with seeds that did not train (``trained``) gets an
    open marker, as in every bnexp figure: the report does not compare it."""
    A.set_style()
    fig = Figure(figsize=(4.2 * len(metrics) + 1.4, 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    stats = A.summarize(runs, ["norm"], ["noise", *metrics]).sort_values("noise.mean")
    normed = stats[stats["norm"] != "none"]
    untrained = (stats["n_untrained"].fillna(0).gt(0) if "n_untrained" in stats
                 else pd.Series(False, index=stats.index))
    for ax, metric in zip(axes, metrics):
        scale = 100.0 if A.is_percent(metric) else 1.0
        lo, hi = _y_range(normed, metric, scale)
        inside = (stats[f"{metric}.mean"].mul(scale).between(lo, hi) if np.isfinite(lo) and np.isfinite(hi)
                  else pd.Series(True, index=stats.index))
        labels = []
        for color, (k, s) in zip(PALETTE * 2, stats.iterrows()):
            if not inside[k]:
                continue
            x, y = s["noise.mean"], s[f"{metric}.mean"] * scale
            xerr = np.nan_to_num(s["noise.ci_hi"] - x)
            yerr = np.nan_to_num(s[f"{metric}.ci_hi"] * scale - y)
            face = "white" if untrained[k] else color
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=color, mfc=face, mec=color, capsize=2,
                        label=s["norm"] + (" (did not train)" if untrained[k] else ""))
            labels.append((s["norm"], x, y))
        line = normed[~untrained[normed.index]]  # the trend through the arms that trained
        ax.plot(line["noise.mean"], line[f"{metric}.mean"] * scale, color="0.6", lw=0.8, zorder=0)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.set_ylim(lo, hi)
        A.label_points(ax, labels)  # after the limits: each label beside its point, none on another
        outside = stats[~inside]
        if len(outside):
            ax.text(0.02, 0.02, "off scale: " + "; ".join(
                f"{r['norm']} {r[f'{metric}.mean'] * scale:.1f}" + (" (did not train)" if untrained[k] else "")
                for k, r in outside.iterrows()), transform=ax.transAxes, fontsize=7, color="0.3")
        ax.set_xlabel("measured normalization noise\n(std of the perturbation of x_hat)")
        ax.set_ylabel(A.label(metric))
    axes[-1].legend(title=A.knob_label("norm"), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _y_range(normed: pd.DataFrame, metric: str, scale: float) -> tuple[float, float]:
    """y limits around the normalized nets' intervals (15% padding); NaN when there are none."""
    lo = (normed[f"{metric}.ci_lo"].fillna(normed[f"{metric}.mean"]).min()) * scale
    hi = (normed[f"{metric}.ci_hi"].fillna(normed[f"{metric}.mean"]).max()) * scale
    pad = 0.15 * max(hi - lo, 1e-9)
    return lo - pad, hi + pad


def plot_noise_vs_batch(noise: pd.DataFrame, title: str) -> Figure:
    """std of the batch mean and variance against the batch size (log-log), a line per BN layer
    (mean over seeds, last epoch), with a dashed 1/sqrt(B) reference through the first layer."""
    last = noise[noise["epoch"] == noise.groupby("run")["epoch"].transform("max")]
    fig = A.plot_probe(last, name=None, x="batch_size", hue="layer", col="name", title=title)
    for ax in fig.axes:
        if not ax.get_visible() or not ax.lines:
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs, ys = ax.lines[0].get_data()
        ref = ys[0] * np.sqrt(xs[0] / np.asarray(xs, dtype=float))
        ax.plot(xs, ref, ls="--", color="0.4", lw=1)
        ax.annotate("∝ 1/√B", (xs[-1], ref[-1]), textcoords="offset points", xytext=(-4, -10),
                    ha="right", fontsize=7, color="0.3")
        sizes = sorted(set(float(x) for x in xs))
        ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size B")
        titles = {"noise.mean": "batch mean: std(mu_B) / sigma",
                  "noise.var": "batch variance: std(var_B) / sigma^2"}
        ax.set_title(titles.get(ax.get_title().split(" = ")[-1], ax.get_title()))
    fig.axes[0].set_ylabel("std over batches (relative)")
    return fig


def statements(runs: pd.DataFrame) -> str:
    stats = A.summarize(runs, ["norm"], ["noise", "test_acc", "gen_gap"]).dropna(subset=["test_acc.mean"])
    order = stats.sort_values("noise.mean")
    text = ["Measured noise by norm (mean over seeds): " + ", ".join(
        f"{r['norm']} {r['noise.mean']:.3f}" for _, r in order.iterrows()) + "."]
    # among the normalized nets only: `none` differs from them in more than its noise
    finite = stats[stats["norm"] != "none"].dropna(subset=["noise.mean"])
    if len(finite) > 2:
        rho = finite["noise.mean"].rank().corr(finite["test_acc.mean"].rank())
        rho_gap = finite["noise.mean"].rank().corr(finite["gen_gap.mean"].rank())
        text.append(f"Across the {len(finite)} normalized configs, the rank correlation (Spearman, "
                    f"of the means) of noise with test accuracy is {rho:+.2f} and with the gap "
                    f"{rho_gap:+.2f}.")
    if len(finite) > 1:
        noisiest = finite.sort_values("noise.mean").iloc[-1]["norm"]
        if noisiest != "bn" and "bn" in set(finite["norm"]):
            text.append("Regularization by the noisiest normalization: " + A.compare_statement(
                runs, "gen_gap", "norm", noisiest, "bn") + "; train accuracy: " + A.compare_statement(
                runs, "train_acc", "norm", noisiest, "bn") + ".")
    best = stats.sort_values("test_acc.mean", ascending=False).iloc[0]["norm"]
    text.append(f"Best test accuracy: {best}.")
    for a, b in (("bn", "none"), (best, "bn"), ("ghost_bn4", best)):
        if a != b and {a, b} <= set(stats["norm"]):
            text.append(A.compare_statement(runs, "test_acc", "norm", a, b) + ".")
    return " ".join(text)


def prepare(d: StudyData) -> StudyData:
    noise = noise_rows(d.probes)
    d.extra["noise"] = noise
    d.runs = d.runs.merge(measured_noise(d.runs, noise), left_on="run", right_index=True, how="left")
    return d


def figures(d: StudyData) -> dict:
    figs = {"test_acc_vs_noise": plot_vs_noise(d.runs)}
    noise = d.extra["noise"]
    bn_noise = noise[noise["norm"] == "bn"] if len(noise) else noise
    if len(bn_noise):
        figs["noise_vs_batch_size"] = plot_noise_vs_batch(
            bn_noise, "batch-statistic noise per layer (norm=bn, after training)")
    return figs


def arm_words(arm: str) -> str:
    return f"ghost BN {arm.removeprefix('ghost_bn')}" if arm.startswith("ghost_bn") else words(arm)


def verdict(d: StudyData, metric: str, a: str, b: str, want, **kw):
    """Paired by seed: a seed fixes subset, init and batch order of every arm."""
    return compare(d.runs, metric, "norm", a, b, want=want, names=(arm_words(a), arm_words(b)), **kw)


def noise_grows(d: StudyData):
    """The measured noise of one arm against the next larger batch: a ratio (log, D)."""
    pairs = (("ghost_bn4", "ghost_bn16"), ("ghost_bn16", "ghost_bn64"), ("ghost_bn64", "bn"))
    parts = [verdict(d, "noise", a, b, +1, claim="D", log=True) for a, b in pairs]
    return parts[0].also(*parts[1:])


def more_noise_regularizes(d: StudyData):
    return memorization_note(verdict(d, "test_acc", "ghost_bn16", "bn", +1)).also(
        verdict(d, "gen_gap", "ghost_bn16", "bn", -1))


def too_much_hurts(d: StudyData):
    return verdict(d, "test_acc", "ghost_bn4", "ghost_bn16", -1)


SOURCE = "Hoffer et al. 2017; Santurkar et al. 2018; Luo et al. 2019"
STUDY = Study(
    "noise", __doc__,
    shapes=[Shape("batch-statistic noise grows as the normalization batch shrinks", SOURCE, noise_grows, "D"),
            Shape("more noise (ghost BN 16) regularizes more than BN: smaller gap, better test "
                  "accuracy", SOURCE, more_noise_regularizes, "G"),
            Shape("beyond a point (ghost BN 4) the noise hurts accuracy", SOURCE, too_much_hurts, "G")],
    prepare=prepare, figures=figures, by=("norm",),
    metrics=("noise", "test_acc", "test_acc.precise", "train_acc", "gen_gap"),
    comparisons=lambda d: statements(d.runs),
    notes=lambda d: (
        "noise: see the module docstring of experiments/noise.py (unitless; 0 for none). "
        "noisy_bn is a noisy BN in the spirit of Santurkar et al. 2018 (Sec. 2.1), not a "
        "replication: its noise magnitudes and granularity are as recalled, not checked against "
        "their Appendix A.2.1. "
        "Bars and bands are 95% t-intervals over seeds. The per-layer figure uses the norm=bn "
        "runs' last-epoch probe; the dashed line is the 1/sqrt(B) scaling of i.i.d. batches. "
        "Reading the result: where more noise narrows the gap but lowers train accuracy as "
        "much, the noise slows fitting rather than improving generalization, which is what a "
        "net that is not yet overfitting strongly (train accuracy in the table) can show."))


if __name__ == "__main__":
    run_study(STUDY)
