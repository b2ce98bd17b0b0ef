"""Does BN stabilise the distribution of a layer's inputs (its pre-activations) during training?

Sweep (conf/study/activations.yaml): norm {bn, none} x seeds {0, 1, 2} ({0, ..., 4} at small); the `activations` probe
records the 15th, 50th and 85th percentiles of one fixed unit's pre-activations (one channel of
the input of one nonlinearity, over the images and positions of a fixed probe batch; the channel
is drawn once from the seed, `probes.unit`, and followed for the whole run) every
`probes.every_steps` optimizer steps (BN in train mode, as training sees it), as Ioffe & Szegedy
follow one sigmoid.

    make study S=activations ARGS="data=synthetic scale=smoke"   # a few CPU minutes
    make study S=activations ARGS="data=fashion_mnist scale=small launcher=joblib"  # 6 runs
    make study S=activations                                     # CIFAR-10 (data.root=...), one GPU

Which tensor, and why it is the same one in both nets: the probe records the input of the module
`probes.layer`. Its default (the second norm layer) is the *conv output* in both nets, i.e. BN's
input, which BN does not normalize. Ioffe & Szegedy plot the input of a sigmoid: the value the
nonlinearity sees. The study therefore probes `features.3.act`, the ReLU of the 4th conv block:
its input is BN's output (batch statistics, then gamma and beta) with `norm=bn`, and the conv
output plus bias (through an Identity) with `norm=none`. Same layer, same position relative to the
nonlinearity, same probe images.

Expected (Ioffe & Szegedy 2015, Fig. 1b-c): with BN the percentiles stay put (BN re-centres and
re-scales every step; only gamma and beta move them, slowly); without BN they drift as the weights
of the layers below grow or shrink. The statement reports, per norm, the 15-85 spread at the end
of training relative to its value at step 0 and the shift of the median in units of that
initial spread.
"""
from __future__ import annotations

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare
from bnexp.analysis.run_study import run_study

PERCENTILES = {"activations.p15": "15th", "activations.p50": "50th (median)", "activations.p85": "85th"}


def percentiles(probes: pd.DataFrame) -> pd.DataFrame:
    """The activation rows with a readable ``percentile`` column (legend entries)."""
    rows = probes[probes["name"].isin(list(PERCENTILES))] if len(probes) else probes
    return rows.assign(percentile=rows["name"].map(PERCENTILES))


def drift(acts: pd.DataFrame) -> pd.DataFrame:
    """Per run: ``spread_ratio`` = (p85 - p15) at the last probe / at the first, and
    ``median_shift`` = |p50 last - p50 first| / (p85 - p15) first. Scale-free, so the nets compare."""
    wide = acts.pivot_table(index=["run", "step"], columns="name", values="value").reset_index()
    rows = []
    for run, g in wide.sort_values("step").groupby("run"):
        first, last = g.iloc[0], g.iloc[-1]
        spread0 = first["activations.p85"] - first["activations.p15"]
        rows.append({"run": run, "spread_ratio": (last["activations.p85"] - last["activations.p15"]) / spread0,
                     "median_shift": abs(last["activations.p50"] - first["activations.p50"]) / spread0})
    return pd.DataFrame(rows)


def figure(acts: pd.DataFrame, layer: str):
    """Percentiles vs step, one panel per norm, mean over seeds with 95% CI bands."""
    fig = A.plot_probe(acts, name=None, hue="percentile", col="norm",
                       title=f"one unit's pre-activations during training (a channel of the input "
                             f"of {layer}, fixed per run)")
    for ax in fig.axes:
        if ax.get_visible() and ax.get_ylabel():
            ax.set_ylabel(f"pre-activation value\n(input of {layer})")
    return fig


def statement(summary: pd.DataFrame) -> str:
    parts = []
    for _, r in summary.iterrows():
        sr, ms = (f"{r[f'{m}.mean']:.2f} +/- {r[f'{m}.ci_hi'] - r[f'{m}.mean']:.2f}"
                  for m in ("spread_ratio", "median_shift"))
        parts.append(f"norm={r['norm']}: spread ratio {sr}, median shift {ms} (n={r['spread_ratio.n']})")
    return ("15-85 percentile spread of the pre-activations at the end of training relative to "
            "step 0 (1 = unchanged), and the median's shift in units of the initial spread: "
            + "; ".join(parts) + ".")


METRICS = ("spread_ratio", "median_shift", "test_acc")


def prepare(d: StudyData) -> StudyData:
    d.extra["acts"] = acts = percentiles(d.probes)
    d.runs = d.runs.merge(drift(acts), on="run", how="left")
    return d


def summary(d: StudyData) -> pd.DataFrame:
    return A.summarize(d.runs, ["norm"], list(METRICS))


def notes(d: StudyData) -> str:
    acts = d.extra["acts"]
    acc = summary(d).set_index("norm")["test_acc.mean"] * 100
    return (f"Probe layer: `{acts['layer'].iloc[0]}` (input of the ReLU = pre-activation). Values are "
            "raw pre-activations on a fixed batch of augmented training images; the bands are 95% "
            f"t-intervals over seeds. The last probe ran at step {int(acts['step'].max())}; the nets "
            "reached " + ", ".join(f"{acc[k]:.1f}% ({k})" for k in acc.index) + " test accuracy: "
            "drift needs the weights to move, so a net that has learned little has drifted little.")


def stable_with_bn(d: StudyData):
    """BN's median shift below the unnormalized net's: a trajectory read at the same steps (D),
    no training gate; paired by seed, on the log of the shift (a heavy-tailed ratio: the
    estimate is the ratio of the geometric means)."""
    return compare(d.runs, "median_shift", "norm", "bn", "none", want=-1, claim="D", log=True)


def _has_probes(d: StudyData) -> bool:
    return len(d.probes) > 0 and d.probes["name"].isin(list(PERCENTILES)).any()


STUDY = Study(
    "activations", __doc__,
    shapes=[Shape("the pre-activation distribution stays put with BN and drifts without (median "
                  "shift in units of the initial spread)", "Ioffe & Szegedy 2015, Fig. 1", stable_with_bn,
                  "D")],
    converged=None,  # augmented images and 10,000 of them: the design does not memorize
    requires=_has_probes, prepare=prepare,
    figures=lambda d: {"activation_percentiles": figure(d.extra["acts"], d.extra["acts"]["layer"].iloc[0])},
    by=("norm",), metrics=METRICS, comparisons=lambda d: statement(summary(d)), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
