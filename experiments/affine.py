"""Do gamma and beta matter ("the network can undo the normalization as much as needed")?

Sweep (conf/study/affine.yaml): norm {bn, gn, ln} x `norm.affine` {both, gamma, beta, none}
(which of the norm's scale gamma and shift beta are learned; the others are fixed at 1 and 0)
x seeds, each norm at its own lr, trained to memorize a small training set. Every run records
where its learned gammas and betas ended (`affine.json`: per layer, quantiles over channels;
bnexp/measure/affine.py).

    make study S=affine ARGS="data=synthetic scale=smoke"                    # 24 runs, minutes
    make study S=affine ARGS="data=fashion_mnist scale=small launcher=joblib" # 36 runs, 2 cores

Expected: the notes say gamma and beta preserve the network's representational power, so
removing them should cost accuracy. In a ReLU net the two are not alike: ReLU is positively
homogeneous, so a positive gamma can fold into the next layer's weights (relu(g z) = g relu(z)
for g > 0, and the next conv absorbs g), while beta moves the ReLU's threshold, which nothing
downstream can undo; so removing beta (affine=gamma) should cost more than removing gamma
(affine=beta). The learned values show how much of the normalization is undone: gammas far
from 1 or negative, betas far from 0.
"""
from __future__ import annotations

import json

import pandas as pd
from matplotlib.figure import Figure

from bnexp import records
from bnexp.analysis import generic as A
from bnexp.analysis.plots import PALETTE
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.run_study import run_study
from bnexp.analysis.verdicts import Shape, compare

AFFINE = "norm.affine"
ORDER = ["both", "gamma", "beta", "none"]  # both learned, gamma only (no beta), beta only, neither
ERR = "test_err.pop"


def learned_values(d: StudyData) -> pd.DataFrame:
    """The rows of every finished run's ``affine.json`` with the run's norm, affine and seed."""
    frames = []
    for run_dir in records.iter_run_dirs(d.study_dir):
        path = run_dir / records.AFFINE
        if path.exists():
            frames.append(pd.DataFrame(json.loads(path.read_text())).assign(run=run_dir.name))
    if not frames:
        return pd.DataFrame(columns=["run", "layer", "param", "p10", "p50", "p90"])
    rows = pd.concat(frames, ignore_index=True)
    return rows.merge(d.runs[["run", "norm", AFFINE, "seed"]], on="run")


def prepare(d: StudyData) -> StudyData:
    precise = d.runs.get("test_acc.precise", pd.Series(float("nan"), index=d.runs.index))
    d.runs = d.runs.assign(**{ERR: 1.0 - precise.fillna(d.runs["test_acc"])})
    d.extra["learned"] = learned_values(d)
    return d


# ----------------------------------------------------------------------------- figures
def plot_error(runs: pd.DataFrame) -> Figure:
    """Test error per norm, one bar per affine setting (95% CI, runs as dots)."""
    fig = A.plot_bars(runs, "norm", ERR, hue=AFFINE, hue_order=[a for a in ORDER if a in set(runs[AFFINE])])
    ax = fig.axes[0]
    ax.set_xlabel("normalization [norm]")
    ax.set_ylabel("test error (%)\n(precise stats for BN)")
    if ax.get_legend() is not None:
        ax.get_legend().set_title("learned [norm.affine]")
    return fig


def plot_learned(learned: pd.DataFrame) -> Figure:
    """Per layer (x: depth order), the 10th-50th-90th percentiles over channels of the learned
    gamma (top) and beta (bottom), mean over seeds; one colour per norm, solid where both are
    learned, dashed where only that one is. Reference lines at gamma = 1 and beta = 0."""
    A.set_style()
    fig = Figure(figsize=(9.0, 6.0))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, param, ref in zip(axes, ("gamma", "beta"), (1.0, 0.0)):
        rows = learned[learned["param"] == param]
        for color, norm in zip(PALETTE, sorted(rows["norm"].unique())):
            for affine, ls in (("both", "-"), (param, "--")):
                g = rows[(rows["norm"] == norm) & (rows[AFFINE] == affine)]
                if not len(g):
                    continue
                layers = list(dict.fromkeys(g["layer"]))
                m = g.groupby("layer")[["p10", "p50", "p90"]].mean().reindex(layers)
                xs = range(len(layers))
                text = f"{norm}, both learned" if affine == "both" else f"{norm}, only {param} learned"
                ax.plot(xs, m["p50"], color=color, ls=ls, marker="o", ms=3, label=text)
                ax.fill_between(xs, m["p10"], m["p90"], color=color, alpha=0.12 if ls == "-" else 0.06, lw=0)
        ax.axhline(ref, color="grey", lw=0.8)
        ax.set_ylabel(f"learned {param}\n(median; band: 10-90th pct over channels)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xlabel("norm layer, input to output")
    return fig


def figures(d: StudyData) -> dict:
    figs = {"test_err_per_affine": plot_error(d.runs)}
    if len(d.extra["learned"]):
        figs["learned_gamma_beta"] = plot_learned(d.extra["learned"])
    return figs


# ----------------------------------------------------------------------------- the answer
def diff(d: StudyData, a: str, b: str, norm: str):
    """``a - b`` test error between two affine settings of ``norm``, paired by seed."""
    return A.paired_diff(d.runs, ERR, AFFINE, a, b, at={"norm": norm})


def norms(d: StudyData) -> list[str]:
    return [n for n in ("bn", "gn", "ln") if n in set(d.runs["norm"])]


def costs(d: StudyData, a: str, b: str) -> list:
    """Claim type G per norm (BN first, the primary): ``a`` vs ``b`` test error, paired by
    seed, higher with ``a``."""
    return [compare(d.runs, ERR, AFFINE, a, b, want=+1, at={"norm": n},
                    names=(f"affine={a}", f"affine={b}")) for n in norms(d)]


def removing_costs(d: StudyData):
    """Claim type G (finished models). Primary contrast: affine=none vs both with BN, paired by
    seed, on test error (precise statistics for BN): higher without gamma and beta; GN and LN
    beside it."""
    first, *rest = costs(d, "none", "both")
    return first.also(*rest)


def beta_matters_more(d: StudyData):
    """Claim type G. Primary contrast: gamma only (beta removed) vs beta only (gamma removed)
    with BN, paired by seed, on test error: higher without beta; GN and LN beside it."""
    first, *rest = costs(d, "gamma", "beta")
    return first.also(*rest)


def answer(d: StudyData) -> list[str]:
    text = [A.sentence(diff(d, a, b, n)) for n in norms(d)
            for a, b in (("none", "both"), ("gamma", "both"), ("beta", "both"), ("gamma", "beta"))]
    learned = d.extra["learned"]
    both = learned[learned[AFFINE] == "both"] if len(learned) else learned
    for (norm, param), g in both.groupby(["norm", "param"]) if len(both) else []:
        text.append(f"{norm} {param} (affine=both): median over layers of the per-layer median "
                    f"{g['p50'].median():.3f}, 10th-90th pct {g['p10'].median():.3f} to "
                    f"{g['p90'].median():.3f}, fraction of negative channels {g['negative'].mean():.3f}")
    return text


def notes(d: StudyData) -> str:
    ok = d.runs[d.runs["status"] == "ok"]
    fit = ok.groupby(["norm", AFFINE])["train_acc"].mean() * 100
    return ("test_err.pop: precise statistics for BN, the plain eval for GN and LN. Learned values: "
            "affine.json per run (quantiles over channels, per layer). Train accuracy at the end: "
            + ", ".join(f"{n}/{a} {v:.1f}%" for (n, a), v in fit.items()) + ".")


STUDY = Study(
    "affine", __doc__,
    shapes=[Shape("removing gamma and beta costs accuracy (higher test error with norm.affine=none "
                  "than with both)", "the notes; Ioffe & Szegedy 2015, Sec. 3", removing_costs, "G"),
            Shape("removing beta costs more than removing gamma (a positive gamma folds into the next "
                  "conv through the ReLU; beta moves the ReLU's threshold)", "STUDIES.md's argument",
                  beta_matters_more, "G")],
    prepare=prepare, figures=figures, by=("norm", AFFINE), arm=("norm", AFFINE),
    metrics=(ERR, "train_acc", "test_acc", "gamma.p50", "gamma.negative", "beta.mean_abs"),
    comparisons=answer, notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
