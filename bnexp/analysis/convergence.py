"""What each run reached: its outcome (diverged, stalled, learned) and whether it converged.

Both are read from the run's summary, never from the slope of its train-mode loss: under a
cosine schedule the last 20% of the epochs hold 1.3% of the integral of the learning rate, so
a flat loss there measures the schedule, not convergence (over the 434 committed Fashion-MNIST
runs that rule failed 70 runs at >= 95% training accuracy and passed 26 below 90%).

* **Clean training accuracy**: eval mode on the un-augmented training images, the summary's
  ``train_acc`` (the default eval mode) or ``train_acc.precise``, the better of the two (a BN
  net's population statistics are its own choice of estimator; both score the same weights).
* **Outcome** (the evidence of "trains at" claims, type T): ``diverged`` (the loss became
  non-finite), ``stalled`` (finished below ``CHANCE_MULTIPLE`` x chance), ``learned``.
* **Converged**: clean training accuracy >= ``CONVERGED`` where the design memorizes its training
  set (un-augmented, a few thousand images). A study whose design cannot (augmentation, a budget
  that stops short) declares ``Study.converged = None``: then no run counts as converged and
  every generalization verdict is at equal budget.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pandas as pd

from bnexp.analysis.compare import markdown_table

CONVERGED = 0.99  # clean training accuracy of a run that memorized its training set
CHANCE_MULTIPLE = 2.0  # below this x chance a finished run "stalled"
CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}
OUTCOMES = ("diverged", "stalled", "learned")


def chance(run: pd.Series) -> float:
    """Accuracy of guessing, 1 / classes: ``data.classes`` when a subset is kept, else the
    dataset's class count (``data.synthetic_classes`` for synthetic data); NaN when unknown."""
    classes = run.get("data.classes")
    if isinstance(classes, str) and classes.startswith("["):
        return 1.0 / len(json.loads(classes))
    n = CLASSES.get(run.get("data.name"), run.get("data.synthetic_classes"))
    return 1.0 / float(n) if n is not None and not pd.isna(n) and n else math.nan


def clean_train_acc(runs: pd.DataFrame) -> pd.Series:
    """Per run, the better of ``train_acc`` and ``train_acc.precise`` (NaN when neither)."""
    cols = [c for c in ("train_acc", "train_acc.precise") if c in runs]
    if not cols:
        return pd.Series(math.nan, index=runs.index)
    return runs[cols].apply(pd.to_numeric, errors="coerce").max(axis=1)


def outcome(runs: pd.DataFrame) -> pd.Series:
    """Per run: ``diverged``, ``stalled`` or ``learned``; NaN for runs that did not finish
    (failed, incomplete): they are no evidence either way."""
    status = runs["status"] if "status" in runs else pd.Series("ok", index=runs.index)
    floor = CHANCE_MULTIPLE * runs.apply(chance, axis=1) if len(runs) else pd.Series(dtype=float)
    acc = clean_train_acc(runs)
    out = pd.Series(math.nan, index=runs.index, dtype=object)
    out[status == "diverged"] = "diverged"
    ok = status == "ok"
    out[ok & (acc < floor)] = "stalled"
    out[ok & ~(acc < floor)] = "learned"
    return out


def converged(runs: pd.DataFrame, threshold: float | None = CONVERGED) -> pd.Series:
    """Per run: finished and clean training accuracy >= ``threshold`` (None: the design declares
    no criterion, no run converged)."""
    if threshold is None:
        return pd.Series(False, index=runs.index)
    status = runs["status"] if "status" in runs else pd.Series("ok", index=runs.index)
    return (status == "ok") & clean_train_acc(runs).ge(threshold)


def check_training(runs: pd.DataFrame, arm: Sequence[str], threshold: float | None = CONVERGED):
    """``(runs, arms)``: ``runs`` with ``clean_train_acc``, ``outcome``, ``converged`` and
    ``trained`` (the run learned: True/False for finished runs, NaN otherwise; figures mark arms
    with a seed that did not); ``arms`` one row per combination of the ``arm`` columns: runs,
    each outcome's count, converged count and mean clean training accuracy."""
    out = runs.assign(clean_train_acc=clean_train_acc(runs), outcome=outcome(runs),
                      converged=converged(runs, threshold))
    out["trained"] = out["outcome"].map(lambda o: o == "learned" if isinstance(o, str) else math.nan)
    out.attrs = dict(runs.attrs)
    arm = [c for c in arm if c in runs]
    done = out[out["outcome"].notna()]
    rows = []
    for key, g in done.groupby(arm, dropna=False, sort=True) if arm else [((), done)]:
        row = dict(zip(arm, key if isinstance(key, tuple) else (key,)))
        row.update(runs=len(g), **{o: int((g["outcome"] == o).sum()) for o in OUTCOMES},
                   converged=int(g["converged"].sum()),
                   **{"clean train acc (%)": round(100 * g["clean_train_acc"].mean(), 1)})
        rows.append(row)
    return out, pd.DataFrame(rows)


def training_text(arms: pd.DataFrame, threshold: float | None = CONVERGED) -> str:
    """The report's account of what every arm reached: the criteria, then the table of arms."""
    crit = (f"A run *converged* when its clean training accuracy (eval mode, un-augmented "
            f"training images) is >= {threshold:.0%}: the design memorizes its training set."
            if threshold is not None else
            "This design does not memorize its training set (augmentation or a short budget), and "
            "no convergence criterion is measured: every generalization verdict is at equal budget.")
    text = (f"{crit} A finished run *stalled* below {CHANCE_MULTIPLE:g} x chance training accuracy, "
            "else it *learned*; *diverged*: its loss became non-finite. No comparison is gated "
            "on these: they are reported beside each verdict.")
    if arms.empty:
        return text + " No run finished."
    return text + "\n\n" + markdown_table(arms)
