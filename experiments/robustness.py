"""Is a BN net more robust to distribution shift, and which test-time statistics help?

Sweep (conf/study/robustness.yaml): norm {bn, gn, ln, none}, each at its own lr, x seeds,
trained on clean images. After training every model is scored on the clean test set and on
each of five corruptions made in code (noise, blur, contrast, brightness, pixelate: CIFAR-10-C's
definitions and severity constants, bnexp/data/corruptions.py) at severities 1-5. BN nets are
scored under each test-time statistic (bnexp/measure/robustness.py): `ema` (running averages
of clean training), `precise` (population statistics of clean training images), `batch`
(statistics of each test batch, i.i.d. stream), `batch_sorted` (the same on a class-sorted
stream: the test set sorted by label, so a batch holds mostly one class) and `adapted` (AdaBN:
statistics re-estimated on the corrupted set itself). GN, LN and none have one way (`ema`).

    make study S=robustness ARGS="data=synthetic scale=smoke"                    # 8 runs, minutes
    make study S=robustness ARGS="data=fashion_mnist scale=small launcher=joblib" # 12 runs, 2 cores

Mean corruption error (`mean_corrupt_err.<mode>`): the mean test error over the five corruptions and every
severity scored, unnormalized (Hendrycks & Dietterich's mCE divides by AlexNet's errors, which
Fashion-MNIST does not have); `corrupt_err.<severity>.<mode>` the same at one severity.

Expected: test-batch statistics recover much of the shift on an i.i.d. stream (Schneider et al.
2020; Tent's CIFAR-10-C table: 43.5% error with the source statistics, 20.4% with test-batch
statistics, severity 5) and AdaBN likewise; on a class-sorted stream batch statistics collapse
(each batch's statistics hold its class), where GN and LN, which never use the batch, hold up
(Niu et al. 2023, SAR). The notes: "normalized data makes the network a bit robust to
distributional change", i.e. BN below none in mCE under its ordinary (EMA) statistics.
"""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from bnexp.analysis import generic as A
from bnexp.analysis.plots import PALETTE
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.run_study import run_study
from bnexp.analysis.verdicts import Shape, compare

BN_MODES = ("ema", "precise", "batch", "batch_sorted", "adapted")
SERIES = "statistics"  # column: "bn, ema", ..., "gn", "ln", "none"
ORDER = [f"bn, {m}" for m in BN_MODES] + ["gn", "ln", "none"]
MCE = "mean_corrupt_err"  # the summary key's name (bnexp/measure/robustness.py): mean corruption error


def series_name(norm: str, mode: str) -> str:
    return f"{norm}, {mode}" if norm == "bn" else norm


def long_errors(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, statistics, severity): ``err``, the test error (mean over corruptions;
    severity 0 = clean), plus ``mean_corrupt_err`` per (run, statistics) repeated on its rows."""
    rows = []
    for _, r in runs[runs["status"] == "ok"].iterrows():
        modes = BN_MODES if r["norm"] == "bn" else ("ema",)
        for mode in modes:
            if f"mean_corrupt_err.{mode}" not in r or pd.isna(r.get(f"mean_corrupt_err.{mode}")):
                continue
            base = {"run": r["run"], "seed": r["seed"], "norm": r["norm"], "mode": mode,
                    "trained": r.get("trained", True),
                    SERIES: series_name(r["norm"], mode), MCE: r[f"mean_corrupt_err.{mode}"]}
            clean = r.get(f"test_acc.{mode}")
            if mode == "ema" and pd.isna(clean):  # plain eval is the ema mode's number
                clean = r["test_acc"]
            rows.append({**base, "severity": 0, "err": 1 - clean if pd.notna(clean) else float("nan")})
            for severity in range(1, 6):
                key = f"corrupt_err.{severity}.{mode}"
                if key in r and pd.notna(r[key]):
                    rows.append({**base, "severity": severity, "err": r[key]})
    return pd.DataFrame(rows, columns=["run", "seed", "norm", "mode", "trained", SERIES, MCE, "severity", "err"])


def prepare(d: StudyData) -> StudyData:
    d.extra["long"] = long_errors(d.runs)
    return d


# ----------------------------------------------------------------------------- figures
def plot_vs_severity(long: pd.DataFrame) -> Figure:
    """Test error (mean over corruptions) vs severity (0 = clean), one line per statistics,
    mean over seeds with 95% CI bands; BN's solid, the others dashed."""
    A.set_style()
    fig = Figure(figsize=(7.5, 4.0))
    ax = fig.subplots()
    stats = A.summarize(long, [SERIES, "severity"], ["err"])
    present = [s for s in ORDER if s in set(stats[SERIES])]
    for color, name in zip(PALETTE + ["#555555", "#999999", "#000000"], present):
        g = stats[stats[SERIES] == name].sort_values("severity")
        ax.plot(g["severity"], 100 * g["err.mean"], color=color, label=name,
                ls="-" if name.startswith("bn") else "--", marker="o", ms=3)
        ax.fill_between(g["severity"], 100 * g["err.ci_lo"], 100 * g["err.ci_hi"], color=color, alpha=0.08, lw=0)
    ax.set_xlabel("corruption severity (0 = clean; mean over noise, blur, contrast, brightness, pixelate)")
    ax.set_ylabel("test error (%)")
    ax.legend(title="norm, test-time statistics", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def plot_mce(long: pd.DataFrame) -> Figure:
    """Mean corruption error per statistics (bars, 95% CI, runs as dots)."""
    per_run = long.drop_duplicates(["run", SERIES])
    fig = A.plot_bars(per_run, SERIES, MCE)
    ax = fig.axes[0]
    ax.set_xlabel("norm, test-time statistics [norm, eval mode]")
    ax.set_ylabel("mean corruption error (%)\n(over 5 corruptions x severities)")
    return fig


def figures(d: StudyData) -> dict:
    long = d.extra["long"]
    if not len(long):
        return {}
    return {"error_vs_severity": plot_vs_severity(long), "mce_per_arm": plot_mce(long)}


# ----------------------------------------------------------------------------- the answer
def diff(d: StudyData, metric: str, a: str, b: str, severity: int | None = None, gate: bool = True):
    """``a - b`` between two statistics series, paired by seed (the same run for two BN modes:
    same weights; different nets at the same seed otherwise). ``gate``: an arm that did not
    train is not compared (claims about finished models); off for same-weights estimators."""
    long = d.extra["long"] if gate else d.extra["long"].drop(columns="trained")
    rows = long if severity is None else long[long["severity"] == severity]
    if severity is None:
        rows = rows.drop_duplicates(["run", SERIES])
    return A.paired_diff(rows, metric, SERIES, a, b)


WORDS = {"bn, ema": "BN with EMA statistics", "bn, precise": "BN with precise statistics",
         "bn, batch": "BN with test-batch statistics (i.i.d. stream)",
         "bn, batch_sorted": "BN with test-batch statistics (class-sorted stream)",
         "bn, adapted": "BN with AdaBN statistics", "gn": "GN", "ln": "LN", "none": "no normalization"}


def verdict(d: StudyData, metric: str, a: str, b: str, want, claim: str, severity: int | None = None):
    """``a - b`` between two statistics series on ``metric`` (``err`` at ``severity``, else mCE).
    E (two BN modes: the same weights) pairs by run, with no training gate; G (different nets)
    pairs by seed, the arms' training read from the runs."""
    long = d.extra["long"]
    rows = long[long["severity"] == severity] if severity is not None else long.drop_duplicates(["run", SERIES])
    return compare(rows, metric, SERIES, a, b, want=want, claim=claim,
                   pair="run" if claim == "E" else "seed", runs=d.runs, names=(WORDS[a], WORDS[b]),
                   note=f"severity {severity}" if severity else "mean over corruptions and severities")


def batch_recovers(d: StudyData):
    """Claim type E (same weights, different statistics; no training gate). Primary contrast:
    BN's ``batch`` vs ``ema`` error at severity 5, paired by run: lower; AdaBN (``adapted``)
    beside it."""
    return verdict(d, "err", "bn, batch", "bn, ema", -1, "E", 5).also(
        verdict(d, "err", "bn, adapted", "bn, ema", -1, "E", 5))


def sorted_collapses(d: StudyData):
    """Claim type E. Primary contrast: BN's ``batch_sorted`` vs ``batch`` mCE, paired by run:
    higher on the class-sorted stream."""
    return verdict(d, MCE, "bn, batch_sorted", "bn, batch", +1, "E")


def group_norms_hold(d: StudyData):
    """Claim type G (finished models of different arms). Primary contrast: GN's mCE vs BN's on
    the class-sorted stream, paired by seed: lower; LN's beside it."""
    return verdict(d, MCE, "gn", "bn, batch_sorted", -1, "G").also(
        verdict(d, MCE, "ln", "bn, batch_sorted", -1, "G"))


def bn_more_robust(d: StudyData):
    """Claim type G. Primary contrast: BN (EMA statistics) vs none mCE, paired by seed: lower;
    beside it the other normalized nets against none (GN, LN): the notes' "normalized data"
    read as any normalization. (BN's EMA against GN, which no source claims a direction for, is
    a plain comparison in ``answer``.)"""
    present = set(d.extra["long"][SERIES]) if "long" in d.extra else set()
    others = [verdict(d, MCE, a, b, -1, "G") for a, b in (("gn", "none"), ("ln", "none")) if {a, b} <= present]
    return verdict(d, MCE, "bn, ema", "none", -1, "G").also(*others)


def answer(d: StudyData) -> list[str]:
    pairs = [("bn, batch", "bn, ema", 5), ("bn, adapted", "bn, ema", 5), ("bn, precise", "bn, ema", 5),
             ("bn, batch_sorted", "bn, batch", None), ("gn", "bn, batch_sorted", None),
             ("ln", "bn, batch_sorted", None), ("bn, ema", "none", None), ("gn", "none", None),
             ("ln", "none", None), ("bn, ema", "gn", None), ("bn, ema", "ln", None), ("bn, batch", "gn", None)]
    present = set(d.extra["long"][SERIES])
    return [A.sentence(diff(d, "err" if s else MCE, a, b, s)) + (f" (severity {s})" if s else "")
            for a, b, s in pairs if {a, b} <= present]


def table(d: StudyData) -> pd.DataFrame:
    """mCE and the error at each severity, per statistics: mean over seeds."""
    long = d.extra["long"]
    wide = long.pivot_table(index=SERIES, columns="severity", values="err", aggfunc="mean") * 100
    wide.columns = ["clean err %" if c == 0 else f"sev {c} err %" for c in wide.columns]
    mce = long.drop_duplicates(["run", SERIES]).groupby(SERIES)[MCE].agg(["mean", "count"])
    out = wide.join((mce["mean"] * 100).rename("mCE %")).join(mce["count"].rename("n"))
    return out.reindex([s for s in ORDER if s in out.index]).round(2).reset_index()


def notes(d: StudyData) -> str:
    lr = d.runs.groupby("norm")["optim.lr"].first()
    return ("Errors are means over the five corruptions (and over severities for mCE), unnormalized. "
            "Clean error of batch_sorted: the clean test set as a class-sorted stream. lrs: "
            + ", ".join(f"{k} {v:g}" for k, v in lr.items()) + ".")


def _has_corruptions(d: StudyData) -> bool:
    return any(c.startswith(MCE + ".") for c in d.runs.columns)


STUDY = Study(
    "robustness", __doc__,
    shapes=[Shape("test-batch statistics (and AdaBN) recover much of the shift on an i.i.d. stream: "
                  "lower error than the EMA at severity 5", "Schneider et al. 2020; Tent (Wang et al. 2021)",
                  batch_recovers, "E"),
            Shape("test-batch statistics collapse on a class-sorted stream", "Niu et al. 2023 (SAR)",
                  sorted_collapses, "E"),
            Shape("GN and LN hold up where BN's test-batch statistics on a sorted stream collapse",
                  "Niu et al. 2023 (SAR)", group_norms_hold, "G"),
            Shape("a BN net (its EMA statistics) is more robust than one without normalization",
                  "the notes: 'normalized data makes the network a bit robust'", bn_more_robust, "G")],
    requires=_has_corruptions, prepare=prepare, figures=figures, table=table, by=("norm",),
    arm=("norm",), metrics=tuple(f"{MCE}.{m}" for m in BN_MODES), comparisons=answer, notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
