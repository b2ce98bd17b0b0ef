"""Folding BN into the preceding conv for inference: is it exact, and is it faster?

Sweep (conf/study/fusion.yaml): BN nets (vgg and resnet; smoke: vgg) x {statistics from the EMA,
FrozenBN for the last tenth of training: `norm.freeze_after=0.9`} x seeds {0, 1, 2}. Then the
script folds every finished run with `bnexp.tools.fusion.fuse_run` (the same function as `bnexp-fuse`),
once per statistics mode that is fixed at inference:

* `ema`: the running averages of a run trained with batch statistics throughout;
* `precise`: population statistics recomputed over `eval.precise_samples` training images;
* `frozen`: the statistics a FrozenBN run trained with at the end (its EMA buffers, frozen).

Each fold compares the fused with the unfused model on the test set in fp32, eval mode: the
largest |logit difference|, accuracy before and after, and inference images/s before and after
(median of 5 alternating timed passes; `<run>/fused.json` keeps the rows, so re-running the
analysis does not re-time). Modes whose statistics depend on the test inputs (`batch`, and
`adapted`, which re-estimates on the test set) are refused by `fuse_run`; the table shows the
refusal message as a "not applicable" row.

    make study S=fusion ARGS="data=synthetic scale=smoke"   # 6 runs, a few CPU minutes
    make study S=fusion ARGS="data=fashion_mnist scale=small launcher=joblib"  # 12 runs
    make study S=fusion                                     # CIFAR-10: 12 runs, one GPU

Expected (Ioffe & Szegedy 2015, Alg. 2; `torch.nn.utils.fusion.fuse_conv_bn_eval`): the fused
net computes the same function up to float rounding (max |logit diff| about 1e-5 in fp32, the
same accuracy) and is faster, since one pass over every activation map disappears; the gain is
largest where BN's elementwise pass is a large share of the time (small convs, CPU). Folding is
not applicable to batch-statistic modes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bnexp.analysis import generic as A
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import CONTRADICTED, SHOWN, Shape, Verdict, compare_value
from bnexp.analysis.run_study import run_study

FREEZE = "norm.freeze_after"
METRICS = ("max_abs_logit_diff", "test_acc.before", "test_acc.after", "images_per_s.before",
           "images_per_s.after", "speedup")


def fold_runs(study_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (finished run, foldable statistics mode): the fuse_run row with the run's
    swept settings. A run's rows come from its fused.json when present (no re-timing). The
    training-side step of this study (``bnexp.tools.fusion.fuse_run``, the same as ``bnexp-fuse``)."""
    from bnexp.tools.fusion import FUSED, fuse_run  # training side: a study script may import it
    from bnexp.runtime import set_threads

    rows = []
    for _, r in runs[runs["status"] == "ok"].iterrows():
        run_dir = study_dir / "runs" / r["run"]
        done = json.loads((run_dir / FUSED).read_text()) if (run_dir / FUSED).exists() else {}
        frozen = r.get(FREEZE) is not None and not pd.isna(r.get(FREEZE))
        for mode in ("ema",) if frozen else ("ema", "precise"):
            if mode not in done:
                set_threads(int(r.get("threads") or 0))  # the run's thread count, for the timing
                done[mode] = fuse_run(run_dir, mode)
            rows.append({"run": r["run"], "status": "ok", "seed": r["seed"], "model": r["model.name"],
                         **_renamed(done[mode])})
    return pd.DataFrame(rows)


def _renamed(row: dict) -> dict:
    """fuse_run's keys with before/after as suffixes, so accuracies read as accuracies."""
    out = dict(row)
    for key in ("test_acc", "images_per_s"):
        out[f"{key}.before"], out[f"{key}.after"] = out.pop(f"{key}_before"), out.pop(f"{key}_after")
    return out


def refusals(study_dir: Path, runs: pd.DataFrame) -> dict:
    """``{mode: message}`` of the modes fuse_run refuses, asked on one finished run."""
    from bnexp.tools.fusion import REFUSED_MODES, FusionError, fuse_run

    ok = runs[runs["status"] == "ok"]
    out = {}
    for mode in REFUSED_MODES:
        try:
            fuse_run(study_dir / "runs" / ok["run"].iloc[0], mode)
        except FusionError as err:
            out[mode] = str(err)
    return out


def table(fused: pd.DataFrame, refused: dict) -> pd.DataFrame:
    """Per (model, statistics): runs, largest |logit diff|, all exact, accuracy and images/s
    before -> after, speedup (mean ± 95% CI); then a "not applicable" row per refused mode."""
    by = ["model", "stats"]
    s = A.summarize(fused, by, list(METRICS))
    worst = fused.groupby(by)["max_abs_logit_diff"].max()
    exact = fused.groupby(by)["exact"].all()
    rows = []
    for _, r in s.iterrows():
        key = (r["model"], r["stats"])
        rows.append({"model": r["model"], "statistics": r["stats"], "runs": int(r["n_runs"]),
                     "max abs logit diff (max over runs)": f"{worst[key]:.1e}",
                     "exact (fp32 tolerance)": "yes" if exact[key] else "NO",
                     "test acc before -> after (%)": f"{100 * r['test_acc.before.mean']:.2f} -> "
                                                     f"{100 * r['test_acc.after.mean']:.2f}",
                     "images/s before -> after": f"{r['images_per_s.before.mean']:.0f} -> "
                                                 f"{r['images_per_s.after.mean']:.0f}",
                     "speedup (mean ± CI)": _pm(r, "speedup"), "note": ""})
    for mode, message in refused.items():
        rows.append({"model": "any", "statistics": mode, "runs": 0,
                     "max abs logit diff (max over runs)": "not applicable",
                     "exact (fp32 tolerance)": "-", "test acc before -> after (%)": "-",
                     "images/s before -> after": "-", "speedup (mean ± CI)": "-",
                     "note": "refused: " + message.split(": ", 1)[-1]})
    return pd.DataFrame(rows)


def _pm(r: pd.Series, metric: str) -> str:
    half = r[f"{metric}.ci_hi"] - r[f"{metric}.mean"]
    return f"{r[f'{metric}.mean']:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")


def figures(fused: pd.DataFrame) -> dict:
    hue = "model" if fused["model"].nunique() > 1 else None
    speed = A.plot_bars(fused, "stats", "speedup", hue, title="inference speedup from folding BN")
    speed.axes[0].axhline(1.0, color="0.3", lw=0.8, ls="--")
    speed.axes[0].annotate("no speedup", (1.0, 1.0), xycoords=("axes fraction", "data"),
                           xytext=(-2, 3), textcoords="offset points", ha="right", fontsize=7)
    speed.axes[0].set_xlabel("statistics folded")
    speed.axes[0].set_ylabel("images/s fused / unfused")
    diff = A.plot_bars(fused, "stats", "max_abs_logit_diff", hue,
                       title="max |logit difference|, fused vs unfused (fp32)")
    ax = diff.axes[0]
    ax.set_yscale("log")
    ax.axhline(1e-5, color="0.3", lw=0.8, ls="--")
    ax.annotate("1e-5: fp32 rounding scale", (1.0, 1e-5), xycoords=("axes fraction", "data"),
                xytext=(-2, 3), textcoords="offset points", ha="right", fontsize=7)
    ax.set_xlabel("statistics folded")
    ax.set_ylabel("max |logit diff| over the test set")
    return {"speedup": speed, "max_logit_diff": diff}


def statement(fused: pd.DataFrame, refused: dict) -> str:
    acc_change = (fused["test_acc.after"] - fused["test_acc.before"]).abs().max() * 100
    s = A.summarize(fused, ["stats"], ["speedup"])
    text = [f"{int(fused['exact'].sum())} of {len(fused)} folds are exact within the fp32 "
            f"tolerance; the largest max |logit diff| is {fused['max_abs_logit_diff'].max():.1e} "
            f"and accuracy moved by at most {acc_change:.2f} points.",
            "Speedup (fused / unfused images/s): " + ", ".join(
                f"{r['stats']} {_pm(r, 'speedup')} (n={int(r['speedup.n'])})" for _, r in s.iterrows()) + "."]
    text += [f"Mode {mode}: not applicable ({msg.split(': ', 1)[-1]})." for mode, msg in refused.items()]
    return " ".join(text)


def accuracy_note(runs: pd.DataFrame) -> str:
    """Test accuracy (EMA statistics, from the runs) with and without FrozenBN, in words."""
    ok = runs[runs["status"] == "ok"]
    frozen = ok[FREEZE].notna() if FREEZE in ok else pd.Series(False, index=ok.index)
    parts = [f"{name} runs {100 * ok.loc[mask, 'test_acc'].mean():.1f}% test accuracy (n={int(mask.sum())})"
             for name, mask in (("EMA", ~frozen), ("FrozenBN", frozen)) if mask.any()]
    precision = ", ".join(sorted(set(ok["precision"].astype(str)))) if "precision" in ok else "?"
    return "; ".join(parts) + f" (the runs' own {precision} evaluation; the fold is compared in fp32)."


def prepare(d: StudyData) -> StudyData:
    d.extra["fused"] = fused = fold_runs(d.study_dir, d.runs)
    fused.to_csv(d.study_dir / "fused.csv", index=False)
    d.extra["refused"] = refusals(d.study_dir, d.runs)
    return d


def notes(d: StudyData) -> str:
    fused = d.extra["fused"]
    device = ", ".join(sorted(set(fused["device"])))
    threads = ", ".join(str(t) for t in sorted(set(fused["threads"])))
    freeze = ", ".join(f"{f:g}" for f in sorted(set(d.runs[FREEZE].dropna()))) or "none"
    return (f"Timed on {device} with {threads} torch thread(s), fp32, eval batch "
            f"{int(fused['batch_size'].iloc[0])}; on a shared machine images/s are noisy (the "
            "two models alternate, so load hits both). `frozen` = EMA buffers of runs trained "
            f"with {FREEZE}={freeze}. Folding reproduces whatever the statistics give: "
            + accuracy_note(d.runs))


def _trained(d: StudyData) -> dict:
    """The one arm's converged fraction and mean clean training accuracy (verdicts.json)."""
    ok = d.runs[d.runs["status"] == "ok"]
    return {"converged": {"BN net": float(ok["converged"].mean())},
            "train_acc": {"BN net": round(float(ok["clean_train_acc"].mean()), 4)}}


def exact(d: StudyData) -> Verdict:
    """Every fold within the fp32 tolerance (the same weights, E): a count, no interval."""
    fused = d.extra["fused"]
    k, n = int(fused["exact"].sum()), len(fused)
    label = SHOWN if k == n else CONTRADICTED
    worst = float(fused["max_abs_logit_diff"].max())
    return Verdict(label, "folded vs unfolded net", "max_abs_logit_diff", worst, None, n, k, **_trained(d),
                   test="every fold within the fp32 tolerance" if k == n else "some folds outside it",
                   budget="same weights, no training gate", unit="folds",
                   text=f"{label}: {k} of {n} folds (runs x statistics) compute the unfolded net's logits "
                        f"within the fp32 tolerance, largest max |logit difference| {worst:.1e}; "
                        f"clean train accuracy {100 * d.runs['clean_train_acc'].mean():.1f}%.")


def faster(d: StudyData) -> Verdict:
    """The speedup (unfolded / folded inference time) above 1, per statistics mode, paired by
    seed over runs (E: the same weights)."""
    fused = d.extra["fused"].assign(status="ok")
    parts = [compare_value(fused[fused["stats"] == s], "speedup", 1.0, want=+1, claim="E", runs=d.runs,
                           margin=0.0, name=f"inference speedup of the folded net ({s} statistics)")
             for s in sorted(fused["stats"].unique())]
    return parts[0].also(*parts[1:])


def refused_batch_modes(d: StudyData) -> Verdict:
    refused = d.extra["refused"]
    label = SHOWN if "batch" in refused else CONTRADICTED
    return Verdict(label, "batch-statistic modes", "refused", n=len(refused), k=len(refused), **_trained(d),
                   test="fuse_run asked once per mode", budget="same weights, no training gate",
                   text=f"{label}: folding refused in {len(refused)} of {len(refused)} batch-statistic modes "
                        f"asked ({', '.join(refused) or 'none'}) on one finished run; clean train accuracy "
                        f"{100 * d.runs['clean_train_acc'].mean():.1f}%.")


SOURCE = "Ioffe & Szegedy 2015, Alg. 2"
STUDY = Study(
    "fusion", __doc__,
    shapes=[Shape("the folded net computes the same function up to float rounding", SOURCE, exact, "E"),
            Shape("the folded net infers faster", SOURCE, faster, "E"),
            Shape("folding is not applicable to batch-statistic modes", SOURCE, refused_batch_modes, "E")],
    requires=lambda d: (d.runs["status"] == "ok").any(), prepare=prepare,
    figures=lambda d: figures(d.extra["fused"]),
    table=lambda d: table(d.extra["fused"], d.extra["refused"]),
    comparisons=lambda d: statement(d.extra["fused"], d.extra["refused"]), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
