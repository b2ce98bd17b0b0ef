"""Does BN's edge hold as the batch gets small?

Design (a) of STUDIES.md, the per-worker view as Wu & He measure it (conf/study/batch_size.yaml):
the optimization batch (128; 64 at small scale), the learning rate and the step budget are the
same for every arm;
only BN's normalization batch (NBS) varies, 2 ... 64 (ghost BN: ``norm=ghost_bn2`` ...
``ghost_bn64`` set ``norm.virtual_batch``), against group norm (8 groups), layer norm and no
normalization, whose forward does not depend on the batch and which therefore run once per
seed and are drawn as horizontal reference levels. Every model is scored with its EMA statistics
(``test_err``) and with precise population statistics (``test_err.precise``). The true-batch
design (b) is experiments/batch_size_true.py.

Run::

    make study S=batch_size ARGS="data=synthetic scale=smoke"                    # 18 runs
    make study S=batch_size ARGS="data=fashion_mnist scale=small launcher=joblib"  # 45 runs
    make study S=batch_size                                                      # CIFAR-10: 27 runs

Expected (Wu & He 2018, "Group Normalization", Fig. 1: ImageNet error 34.7% at 2 images per
worker vs 23.6% at 32): BN's error rises as the normalization batch shrinks to 2-4 (noisy batch
statistics), GN and LN stay flat (here by construction: the same runs at every NBS) and win at
the smallest NBS, BN wins at the large ones.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnexp.analysis import generic as A
from bnexp.analysis.forest import paired_rows, plot_forest
from bnexp.analysis.plots import PALETTE
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, memorization_note, words
from bnexp.analysis.run_study import run_study

NBS = "norm.virtual_batch"
BN = "ghost_bn"  # norm.name of the arms along the axis
LEVELS = ("gn", "ln", "none")  # batch-independent arms: reference levels across the axis
NAMES = {"gn": "GN", "ln": "LN", "none": "no normalization"}


def bn_rows(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["norm.name"] == BN]


def plot_vs_nbs(runs: pd.DataFrame, metric: str = "test_err", title: str | None = None) -> Figure:
    """``metric`` against the normalization batch (log2 x) for ghost BN, a line with its 95% CI
    band; gn / ln / none as horizontal levels (mean over seeds) with their CI bands. A level arm
    that did not train (the report's training check) is named in the legend, not drawn: its
    error would only set the y range."""
    fig = A.plot_metric_vs(bn_rows(runs), NBS, metric, "norm.name", logx=2, title=title)
    ax = fig.axes[0]
    stats = A.summarize(runs[runs["norm.name"].isin(LEVELS)], ["norm.name"], [metric])
    scale = 100.0 if A.is_percent(metric) else 1.0
    for color, name in zip(PALETTE[1:], LEVELS):
        row = stats[stats["norm.name"] == name]
        if row.empty or np.isnan(row[f"{metric}.mean"].iloc[0]):
            continue
        arm = runs[runs["norm.name"] == name]
        if "trained" in arm and arm["trained"].eq(False).any():
            ax.plot([], [], ls="none", label=f"{name}: did not train, not drawn")
            continue
        mean, lo, hi = (row[f"{metric}.{k}"].iloc[0] * scale for k in ("mean", "ci_lo", "ci_hi"))
        ax.axhline(mean, color=color, ls="--", lw=1.2, label=f"{name} (no batch dependence)")
        if not np.isnan(lo):
            ax.axhspan(lo, hi, color=color, alpha=0.15, lw=0)
    ax.legend(title=A.knob_label("norm.name"), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fit_note(runs: pd.DataFrame) -> str:
    """How well the BN arms fit their training set: the context for the NBS axis."""
    bn = bn_rows(runs)
    bn = bn[bn["status"] == "ok"] if "status" in bn else bn
    if bn.empty or "train_acc" not in bn:
        return ""
    low = bn.groupby(NBS)["train_acc"].mean().min()
    return (f" Every BN arm's mean final training accuracy is at least {100 * low:.1f}%: at this "
            "scale the nets fit their training set at every normalization batch, so the axis "
            "measures what the normalization batch does to generalization on a training set the "
            "nets memorize; Wu & He's ImageNet nets do not memorize theirs.")


def regime_note(d: StudyData) -> str:
    """The regime test's answer (experiments/batch_size_regime.py, same data and scale): each
    shape of its verdicts.json, and whether its nets stayed below memorization (its report's
    notes say so; stated here from its verdicts' clean training accuracies), or where it stands
    when it has not run."""
    other = Path(d.study_dir).parent.parent / "batch_size_regime" / Path(d.study_dir).name if d.study_dir else None
    path = other / "verdicts.json" if other else None
    if path is None or not path.is_file():
        return (" The regime test (does the small-batch penalty appear once the net cannot memorize? "
                "`make study S=batch_size_regime`) has no results at this data and scale yet.")
    shapes = json.loads(path.read_text())
    fit = max((a for v in shapes for a in (v.get("train_acc") or {}).values() if a is not None), default=None)
    regime = ("" if fit is None else
              f" Its nets stayed below memorization (highest mean clean training accuracy {100 * fit:.1f}%)."
              if fit < 0.99 else
              f" One of its arms fits its training set ({100 * fit:.1f}% clean training accuracy): the "
              "regime it wants is not reached.")
    return (f" **The regime test** (batch_size_regime, [report](../../batch_size_regime/{other.name}/report.md):"
            " ghost BN at normalization batch 2 vs 32 and GN, trained on augmented images the nets are "
            "meant not to memorize)." + regime + " " + " ".join(v["text"] for v in shapes))


def nbs(d: StudyData) -> list:
    return sorted(bn_rows(d.runs)[NBS].dropna().unique())


def arm_names(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``arm``: ``ghost_bn 2`` ... for BN along the axis, the norm name otherwise."""
    return runs.assign(arm=[f"{n} {int(v)}" if n == BN else n for n, v in zip(runs["norm.name"], runs[NBS])])


def _arm(a) -> str:
    return f"{a[0]} {int(a[1])}" if a[0] == BN else a[0]


def _words(a) -> str:
    return f"BN at normalization batch {int(a[1])}" if a[0] == BN else words(a[0])


def paired(runs: pd.DataFrame, a, b, metric: str = "test_err"):
    """``a - b`` of ``metric`` between two arms given as ``(norm.name, NBS or None)``, paired by
    seed: every arm of a seed shares its initialization (up to the norm layers) and batches."""
    return A.paired_diff(arm_names(runs), metric, "arm", _arm(a), _arm(b))


def verdict(runs: pd.DataFrame, a, b, want, metric: str = "test_err"):
    """The shape verdict of ``a - b`` (arms as in ``paired``), paired by seed."""
    return compare(arm_names(runs), metric, "arm", _arm(a), _arm(b), want=want, names=(_words(a), _words(b)))


def plot_paired(runs: pd.DataFrame, xs: list, metric: str = "test_err") -> Figure:
    """The headline: the contrasts of ``statements`` as per-seed paired differences (BN at each NBS
    against BN at 32; GN, LN and none against BN at the smallest and the largest NBS)."""
    rows = runs.assign(arm=[f"{n} {int(v)}" if n == BN else n for n, v in zip(runs["norm.name"], runs[NBS])])
    ref = min(xs, key=lambda x: abs(x - 32))
    pairs = [(f"{BN} {int(x)}", f"{BN} {int(ref)}", f"BN at {int(x)} - BN at {int(ref)}") for x in xs if x != ref]
    pairs += [(n, f"{BN} {int(x)}", f"{NAMES[n]} - BN at {int(x)}") for n in LEVELS if n in set(runs["norm.name"])
              for x in (xs[0], xs[-1])]
    return plot_forest(paired_rows(rows, metric, "arm", pairs), metric,
                       title="test error, paired by seed (below 0: the first arm is better)")


def statements(d: StudyData) -> list[str]:
    """BN at each NBS against BN at 32 (Wu & He's reference), then GN / LN / none against BN at
    the smallest and the largest NBS; all paired by seed."""
    xs, runs = nbs(d), d.runs
    if not xs:
        return []
    ref = min(xs, key=lambda x: abs(x - 32))
    out = [A.sentence(paired(runs, (BN, x), (BN, ref))) for x in xs if x != ref]
    present = set(runs["norm.name"])
    for level in (n for n in LEVELS if n in present):
        out += [A.sentence(paired(runs, (level, None), (BN, x))) for x in (xs[0], xs[-1])]
    return out


def bn_rises(d: StudyData):
    """BN's error at the smallest NBS above its error at 32 (paired by seed); 4 beside it."""
    xs = nbs(d)
    ref = min(xs, key=lambda x: abs(x - 32))
    primary = memorization_note(verdict(d.runs, (BN, xs[0]), (BN, ref), +1))
    return primary.also(*[verdict(d.runs, (BN, x), (BN, ref), +1) for x in xs[1:] if x <= 4])


def levels_win_small(d: StudyData):
    xs = nbs(d)
    return verdict(d.runs, ("gn", None), (BN, xs[0]), -1).also(verdict(d.runs, ("ln", None), (BN, xs[0]), -1))


def bn_wins_large(d: StudyData):
    xs = nbs(d)
    return verdict(d.runs, (BN, xs[-1]), ("gn", None), -1).also(verdict(d.runs, (BN, xs[-1]), ("ln", None), -1))


def table_rows(d: StudyData) -> pd.DataFrame:
    """One row label per arm: the norm preset (ghost_bn2 ...) with its NBS, gn / ln / none."""
    return d.runs.assign(**{NBS: d.runs[NBS].where(d.runs["norm.name"] == BN)})


SOURCE = "Wu & He 2018, Group Normalization, Fig. 1"
def lr_words(runs) -> str:
    """The figure title's lrs: one for every arm, or BN's beside the tuned ones (lr_choice.json)."""
    lrs = runs.groupby("norm")["optim.lr"].first()
    bn = sorted({lr for n, lr in lrs.items() if str(n).startswith("ghost_bn")})
    other = ", ".join(f"{n} {lr:g}" for n, lr in lrs.items() if not str(n).startswith("ghost_bn"))
    return (f"lr {lrs.iloc[0]:g} for every arm" if lrs.nunique() == 1
            else f"lr: BN {', '.join(f'{x:g}' for x in bn)}, {other} (tuned)")


STUDY = Study(
    "batch_size", __doc__,
    shapes=[Shape("BN's error rises at normalization batch 2-4 (against 32)", SOURCE, bn_rises, "G"),
            Shape("GN and LN beat BN at the smallest normalization batch", SOURCE, levels_win_small, "G"),
            Shape("BN beats GN and LN at the largest normalization batch", SOURCE, bn_wins_large, "G")],
    prepare=lambda d: replace(d, runs=A.with_error(d.runs)),
    figures=lambda d: {"test_err_paired": plot_paired(d.runs, nbs(d)),
                       "test_err_vs_normalization_batch": plot_vs_nbs(
        d.runs, title=f"batch {int(d.runs['data.batch_size'].iloc[0])}, equal steps\n" + lr_words(d.runs))},
    by=("norm", NBS), metrics=("test_err", "test_err.precise", "train_loss", "gen_gap"),
    table_rows=table_rows,
    comparisons=lambda d: [regime_note(d).strip(), *statements(d)],  # the regime test's answer first
    notes=lambda d: ("Error is 1 - accuracy with EMA statistics; `test_err.precise` (population "
                     "statistics recomputed after training) separates a poor EMA estimate from a "
                     "poorly trained model and is missing where the model has no BN layer. GN, LN "
                     "and none do not depend on the normalization batch: one set of runs per seed, "
                     "drawn as levels; their flatness is by construction here, the true-batch "
                     "design (batch_size_true) tests it. Differences are paired by seed." + fit_note(d.runs)))


if __name__ == "__main__":
    run_study(STUDY)
