"""Reports that say only what the numbers carry: did every arm train, and was each shape shown.

Before any shape verdict a report checks every arm (one combination of the swept settings,
seeds pooled) with ``check_training``: a run trained when it finished (status ``ok``), its
per-epoch training loss is flat over the last fifth of training (it moved by less than 5%, or
by less than 0.01 nats: a memorized training set) and its final train-mode accuracy is well
above chance. An arm trained when each of its finished runs did; an arm that
did not is named, and ``bnexp.analysis.report``'s statements refuse to compare it (``Diff.untrained``).

A study states each expected shape as a ``Shape(claim, source, check)``; ``check(data)`` returns
a ``Verdict`` (shown, not shown, partly, not tested) with the numbers and intervals behind it
and, where not shown, the reason. ``expect`` builds one from ``Diff``s and the sign each should
have, so that no claim rests on an interval that holds 0. The thresholds live here, in one place.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bnexp.analysis.report import Diff, markdown_table
from bnexp.analysis.tables import mean_ci

# A run's loss is "flat" when it moved by less than this fraction of its value over the last
# PLATEAU_FRACTION of its epochs. Why 5%: the committed 4-epoch synthetic runs, which had not
# finished learning (issue 8), still fell by a median 9-18% in their last epoch (demo 8.5%,
# batch_size 15.5%, ema_vs_precise 14%), while stalled runs (lr_sensitivity at lr 0.001) moved by
# ~1%. A cosine schedule's last lr decay still lowers a plateaued loss a little, hence not ~0.
PLATEAU_FRACTION = 0.2
PLATEAU_MAX_REL_CHANGE = 0.05
# ... or by less than this many nats: a net that has memorized its training set sits at a loss of
# a few hundredths or thousandths (weight decay's floor, plus the batch noise of train-mode BN),
# where tiny absolute moves are large relative ones. Measured on Fashion-MNIST (scale=small, no
# augmentation, 100% train accuracy): bn_vs_dropout's BN net (3000 images, 16 epochs) 0.0070 ->
# 0.0058 over the last fifth (-18%); the demo's BN net at batch 8 (1000 images, 20 epochs) 0.0365
# -> 0.0278 (-24%, 0.009 nats), its epoch-to-epoch noise at that floor about +/- 0.01.
PLATEAU_MAX_ABS_CHANGE = 0.01
CHANCE_MULTIPLE = 2.0  # final train-mode accuracy must be >= this x chance (1 / classes)
# A run at this final training accuracy has memorized its training set: its loss may still
# fall (norm_vs_noise on 3,000 Fashion-MNIST images: LN, PN and none at 100% with losses of
# 0.006-0.03 still shrinking 14-35% over the last fifth, BN flat at 0.003), which is not learning.
# The accuracy is the better of the last epoch's train-mode one and the summary's eval-mode one
# (un-augmented training images, no injected noise): a net with ghost noise injection predicts
# every training image right in eval mode while its noisy train-mode accuracy stays ~99.7%.
MEMORIZED = 0.995
FLAT_MARGIN = 0.02  # "flat" / "matches": the interval of the difference within +/- 2 points
CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}
SHOWN, NOT_SHOWN, PARTLY, NOT_TESTED = "shown", "not shown", "partly", "not tested"


# ----------------------------------------------------------------------------- did it train
def chance(run: pd.Series) -> float:
    """Accuracy of guessing, 1 / classes: ``data.classes`` when a subset is kept, else the
    dataset's class count (``data.synthetic_classes`` for synthetic data); NaN when unknown."""
    classes = run.get("data.classes")
    if isinstance(classes, str) and classes.startswith("["):
        return 1.0 / len(json.loads(classes))
    n = CLASSES.get(run.get("data.name"), run.get("data.synthetic_classes"))
    return 1.0 / float(n) if n is not None and not pd.isna(n) and n else math.nan


def loss_change(losses: Sequence[float], fraction: float = PLATEAU_FRACTION,
                absolute: bool = False) -> float:
    """Relative change of the training loss over the last ``fraction`` of the epochs:
    ``(loss at the start of that window - final loss) / loss at the start`` (positive while the
    loss still falls, negative when it climbs); ``absolute``: the numerator alone, in the loss's
    units. The window is at least one epoch; NaN with fewer than two epochs."""
    losses = [float(v) for v in losses]
    if len(losses) < 2:
        return math.nan
    window = max(1, round(fraction * len(losses)))
    start = losses[-1 - window]
    if absolute:
        return start - losses[-1]
    return (start - losses[-1]) / abs(start) if start else math.nan


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def run_check(run: pd.Series, curve: pd.DataFrame) -> str:
    """'' when the run trained, else why not: diverged, loss not flat, accuracy near chance.
    A loss still falling is no reason once the run has memorized its training set (final
    train-mode accuracy >= MEMORIZED): nothing is left to learn, the (small) loss only keeps
    shrinking as the logits grow."""
    if run.get("status") == "diverged":
        return "diverged"
    acc = (curve.sort_values("epoch")["train_acc"].dropna() if "train_acc" in curve
           else pd.Series(dtype=float))
    final = float(acc.iloc[-1]) if len(acc) else float(run.get("train_acc", math.nan))
    reasons = []
    if len(curve) and "train_loss" in curve:
        losses = curve.sort_values("epoch")["train_loss"].dropna()
        change, moved = loss_change(losses), loss_change(losses, absolute=True)
        memorized = change > 0 and max(final, _number(run.get("train_acc"))) >= MEMORIZED
        if (not math.isnan(change) and abs(change) >= PLATEAU_MAX_REL_CHANGE
                and abs(moved) >= PLATEAU_MAX_ABS_CHANGE and not memorized):
            verb = "still falling" if change > 0 else "rising"
            reasons.append(f"training loss {verb} ({100 * change:+.0f}% over the last "
                           f"{PLATEAU_FRACTION:.0%} of epochs)")
    floor = CHANCE_MULTIPLE * chance(run)
    if not math.isnan(final) and not math.isnan(floor) and final < floor:
        reasons.append(f"train-mode accuracy {100 * final:.0f}% < {CHANCE_MULTIPLE:g} x chance")
    return "; ".join(reasons)


def check_training(runs: pd.DataFrame, curves: pd.DataFrame, arm: Sequence[str]):
    """``(runs, arms)``: ``runs`` with ``trained`` (True/False for ok and diverged runs, NaN for
    the others) and ``train_check`` (why not); ``arms`` one row per combination of ``arm``
    columns: runs checked, runs trained, and the reasons of those that did not."""
    by_run = dict(tuple(curves.groupby("run"))) if len(curves) and "run" in curves else {}
    checked = runs["status"].isin(("ok", "diverged")) if "status" in runs else runs.index == runs.index
    why = pd.Series("", index=runs.index, dtype=object)
    for i, r in runs[checked].iterrows():
        why[i] = run_check(r, by_run.get(r["run"], pd.DataFrame()))
    trained = pd.Series(math.nan, index=runs.index, dtype=object)
    trained[checked] = why[checked] == ""
    out = runs.assign(trained=trained, train_check=why)
    out.attrs = dict(runs.attrs)
    arm = [c for c in arm if c in runs]
    rows = []
    for key, g in out[checked].groupby(arm, dropna=False, sort=True) if arm else [((), out[checked])]:
        row = dict(zip(arm, key if isinstance(key, tuple) else (key,)))
        bad = g[g["trained"].eq(False)]
        rows.append({**row, "runs": len(g), "trained": len(g) - len(bad),
                     "why not": "; ".join(dict.fromkeys(bad["train_check"]))})
    return out, pd.DataFrame(rows)


def training_text(arms: pd.DataFrame) -> str:
    """The report's training check: the criteria, then all arms trained, or the table of those
    that did not ("did not train": no comparison is drawn from them)."""
    criteria = (f"A run trained when it finished, its training loss moved by less than "
                f"{PLATEAU_MAX_REL_CHANGE:.0%} (or less than {PLATEAU_MAX_ABS_CHANGE:g} nats) over "
                f"the last {PLATEAU_FRACTION:.0%} of its epochs (or, once it memorized its training "
                f"set, final train-mode accuracy >= {MEMORIZED:.1%}, did not rise), "
                f"and its final train-mode accuracy is at least {CHANCE_MULTIPLE:g} x chance. "
                "An arm trained when every finished seed did.")
    if arms.empty:
        return criteria + " No run finished."
    failed = arms[arms["trained"] < arms["runs"]]
    if failed.empty:
        return criteria + (f" All {len(arms)} arms trained." if len(arms) != 1 else " Its one arm trained.")
    return (criteria + f" {len(failed)} of {len(arms)} arms **did not train**; they are not "
            "compared:\n\n" + markdown_table(failed))


def mean_diff(rows: pd.DataFrame, column: str, metric: str, a: str, b: str = "0", where: str = "",
              ref: float = 0.0) -> Diff:
    """``Diff`` of the mean of ``rows[column]`` (e.g. per-run differences, or a gap) against
    ``ref``, with the one-sample t interval (``tables.mean_ci``): for claims about one quantity.
    Rows with ``trained`` False make it untrained (not compared)."""
    mean, _, n, half = mean_ci(rows[column])
    untrained = (a,) if "trained" in rows and (rows["trained"].eq(False)).any() else ()
    return Diff(a, b, metric, where, mean - ref, mean - ref - half, mean - ref + half,
                f"n={n}", "95% t CI", missing="" if n else "no finished run", untrained=untrained)


# ----------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    status: str  # SHOWN | NOT_SHOWN | PARTLY | NOT_TESTED
    evidence: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Shape:
    """One expected shape of a study: the literature's ``claim``, its ``source``, and
    ``check(data) -> Verdict`` on the study's data (``bnexp.analysis.study.StudyData``)."""
    claim: str
    source: str
    check: Callable[[Any], Verdict]

    def line(self, data) -> str:
        """``- **shown**: claim (source). evidence. Not shown because: reason.`` A check that
        cannot run on these data (an arm missing from the sweep) reads "not tested"."""
        try:
            v = self.check(data)
        except (KeyError, ValueError, IndexError) as err:
            v = Verdict(NOT_TESTED, reason=f"the data do not hold what the check needs ({err})")
        text = f"- **{v.status}**: {self.claim} ({self.source})."
        text += f" {v.evidence}." if v.evidence else ""
        why = {PARTLY: "What is missing", NOT_SHOWN: "Why not", NOT_TESTED: "Why not tested"}
        return text + (f" {why[v.status]}: {v.reason}." if v.reason and v.status in why else "")


def part(d: Diff, want) -> tuple[str, str]:
    """``(outcome, reason)`` of one difference against what the shape wants: ``+1`` (a above
    b: the interval above 0), ``-1`` (below), ``"flat"`` (the interval within +/- FLAT_MARGIN,
    for fractions) or ``"<="`` (a not above b: the interval's top below FLAT_MARGIN).
    Untrained or missing sides, or no interval: not tested."""
    if d.untrained:
        return NOT_TESTED, f"{' and '.join(map(str, d.untrained))} did not train"
    if d.missing or d.sign is None:
        return NOT_TESTED, f"{d.a} vs {d.b}: {d.missing or 'too few runs for an interval'}"
    if want == "<=":
        if d.hi < FLAT_MARGIN:
            return SHOWN, ""
        return NOT_SHOWN, (f"{d.a} vs {d.b}{d.where}: the interval reaches "
                           f"{100 * d.hi:+.1f} points")
    if want == "flat":
        if -FLAT_MARGIN < d.lo and d.hi < FLAT_MARGIN:
            return SHOWN, ""
        return NOT_SHOWN, (f"{d.a} vs {d.b}{d.where}: the interval leaves +/- "
                           f"{100 * FLAT_MARGIN:g} points")
    if d.sign == want:
        return SHOWN, ""
    if d.sign == 0:
        return NOT_SHOWN, f"{d.a} vs {d.b}{d.where}: the interval holds 0"
    return NOT_SHOWN, f"{d.a} vs {d.b}{d.where}: the opposite direction"


def expect(parts: Sequence[tuple[Diff, Any]]) -> Verdict:
    """The verdict of a claim made of several differences (see ``part``): shown when each is,
    not shown when none is, partly in between; not tested when no part could be read."""
    outcomes = [part(d, want) for d, want in parts]
    evidence = "; ".join(d.numbers() for d, _ in parts)
    reason = "; ".join(r for _, r in outcomes if r)
    done = [o for o, _ in outcomes if o != NOT_TESTED]
    if not done:
        return Verdict(NOT_TESTED, evidence, reason)
    shown = sum(o == SHOWN for o, _ in outcomes)
    status = SHOWN if shown == len(outcomes) else NOT_SHOWN if shown == 0 else PARTLY
    return Verdict(status, evidence, reason)


def learned(runs: pd.DataFrame) -> pd.Series:
    """Runs that learned: finished and final train-mode accuracy at least ``CHANCE_MULTIPLE`` x
    chance (the training check without the plateau test)."""
    floor = CHANCE_MULTIPLE * runs.apply(chance, axis=1)
    return runs["status"].eq("ok") & runs["train_acc"].ge(floor)


def on_learned_runs(check: Callable[[Any], Verdict]) -> Callable[[Any], Verdict]:
    """``check`` for a shape about one model's own trajectory or estimators, compared over the
    same steps or on the same weights, not about how far training got (activations' drift,
    ema_vs_precise's EMA against precise BN). When ``check`` is not tested and every run learned
    (``learned``), so that only unflattened losses kept arms out, it is read again with every
    run counted as trained, and *shown* then reads *partly*: the caveat stays in the verdict.
    Frames in ``data.extra`` with a ``trained`` column (a ``prepare`` step's) are counted too."""
    def checked(data) -> Verdict:
        verdict = check(data)
        if verdict.status != NOT_TESTED or not len(data.runs) or not learned(data.runs).all():
            return verdict
        extra = {k: v.assign(trained=True) if isinstance(v, pd.DataFrame) and "trained" in v else v
                 for k, v in data.extra.items()}
        again = check(dataclasses.replace(data, runs=data.runs.assign(trained=True), extra=extra))
        why = (f"compared on the runs that learned (finished, train accuracy >= {CHANCE_MULTIPLE:g} x "
               f"chance), although not every arm's loss had flattened ({verdict.reason})")
        status = PARTLY if again.status == SHOWN else again.status
        return Verdict(status, again.evidence, "; ".join(r for r in (again.reason, why) if r))

    return checked
