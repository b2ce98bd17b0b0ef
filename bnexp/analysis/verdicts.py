"""Verdicts that say what the data say: one primary contrast per expected shape, a label from a
fixed set, and the numbers a reader needs to judge it (n, the sign count, the arms' training).

A study declares each expected shape as ``Shape(shape, source, check, claim)``; ``check(data)``
returns a ``Verdict``, usually from one of three comparisons:

* ``compare(rows, metric, by, a, b, want=...)``: ``a - b`` of a number, paired on ``pair`` (the
  seed fixes subset, init and batch order of every arm; the run, where both sides score the same
  weights), unpaired (Mann-Whitney) only where no pair has both sides;
* ``compare_value(rows, metric, ref, want=...)``: one quantity against a reference;
* ``compare_outcomes(rows, by, a, b)``: claims of type T ("trains at"), per-seed outcomes as
  counts with Fisher's exact test.

Claim types (``CLAIMS``): **T** trains / is stable at (the outcome is the evidence, a failed arm
is a result); **E** same-weights estimators (no training gate, paired by run); **D** trajectories
at matched steps (no gate; ``log=True`` for ratios); **G** generalization of finished models
(always at equal budget, "at convergence" where every seed of both arms converged).

Labels (``LABELS``) and the rule that gives them: ``bnexp.analysis.decision``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from bnexp.analysis.decision import (ALPHA, CONTRADICTED, EQUIVALENT, INCONCLUSIVE, LABELS, MARGIN,
                                     MIN_T_SEEDS, NOT_TESTED, SHOWN, SHOWN_AT_BUDGET, decide,
                                     decide_unpaired)
from bnexp.analysis.plots import LABELS as AXIS_LABELS
from bnexp.analysis.plots import is_percent
from bnexp.analysis.tables import quiet

__all__ = ["ALPHA", "BUDGETS", "CLAIMS", "CONTRADICTED", "EQUIVALENT", "INCONCLUSIVE", "LABELS", "MARGIN",
           "MIN_T_SEEDS", "NOT_TESTED", "SHOWN", "SHOWN_AT_BUDGET", "Shape", "Verdict", "compare",
           "compare_outcomes", "compare_recovery", "compare_value", "decide", "memorization_note", "words"]

CLAIMS = {"T": "trains / is stable at", "E": "same-weights estimators",
          "D": "trajectories at matched steps", "G": "generalization of finished models"}
BUDGETS = {"T": "per-seed outcome", "E": "same weights, no training gate",
           "D": "matched steps, no training gate"}
# Plain words for arms and metrics in a verdict's text (LABELS of plots for the rest).
WORDS = {"bn": "BN", "none": "no normalization", "ln": "LN", "gn": "GN", "pn": "PN",
         "pn_online": "PN with an online backward",
         "ema": "EMA statistics", "precise": "precise statistics", "batch": "batch statistics",
         "adapted": "re-estimated statistics", "frozen": "FrozenBN", "batch_renorm": "batch renorm",
         "ghost_bn": "ghost BN", "dropout": "dropout", "iid": "i.i.d. batches",
         "eval_mode": "eval mode", "pop": "population statistics", "noise": "measured batch-statistic noise",
         "batch_sampler": "test batches of the training sampler",
         "median_shift": "median shift of the pre-activations",
         "after_norm": "after the last BN", "before_norm": "before every BN",
         "classifier": "before the classifier",
         "test_err": "test error", "test_acc": "test accuracy", "gen_gap": "generalization gap",
         "train_acc": "train accuracy", "train_loss": "training loss",
         "err": "test error", "mean_corrupt_err": "mean corruption error",
         "batch_sorted": "batch statistics of a class-sorted stream",
         "smoothness.loss_range": "loss range along the gradient",
         "smoothness.grad_change_max": "largest gradient change along the gradient",
         "smoothness.beta": "effective beta-smoothness", "ics.l2": "internal covariate shift (l2)",
         "log2_steps_to_target": "log2 of the steps to the target accuracy"}


def words(x) -> str:
    """The plain name of an arm or metric: ``WORDS``, else ``<metric> under <mode>`` for a
    ``metric.mode`` column, else the axis label less its unit."""
    key = str(x)
    base, _, mode = key.partition(".")
    if key not in WORDS and mode and base in WORDS:
        return f"{WORDS[base]} under {WORDS.get(mode, mode)}"
    return WORDS.get(key) or AXIS_LABELS.get(key, key).split(" (")[0]


@dataclass(frozen=True)
class Verdict:
    """One shape's answer: the fields of ``verdicts.json`` (less shape, source and claim, which
    ``Shape`` adds). ``ci`` is ``[low, high]`` of ``estimate`` (a - b, in the metric's units;
    a ratio where ``log``) or None; ``k`` counts the pairs in the claimed direction."""
    label: str
    contrast: str = ""
    metric: str = ""
    estimate: float = math.nan
    ci: list | None = None
    n: int = 0
    k: int | None = None
    converged: dict = field(default_factory=dict)
    train_acc: dict = field(default_factory=dict)
    test: str = ""
    budget: str = ""
    text: str = ""
    ratio: bool = False  # ``estimate`` and ``ci`` are a ratio a / b (``compare(log=True)``), not a - b
    unit: str = "seeds"  # what ``n`` and ``k`` count: seeds (paired), or folds, runs where a verdict counts those

    def also(self, *others: Verdict) -> Verdict:
        """This verdict with the texts of secondary contrasts appended (they do not change the
        label: one primary contrast per shape)."""
        def sentence(text: str) -> str:  # every part ends as a sentence before the next "Also:"
            return text if not text or text.endswith((".", "!", "?")) else text + "."
        extra = " ".join(f"Also: {sentence(o.text)}" for o in others if o.text)
        return replace(self, text=f"{sentence(self.text) if extra else self.text} {extra}".strip())


@dataclass(frozen=True)
class Shape:
    """One expected shape: its sentence, its source, ``check(data) -> Verdict`` on the study's
    data (``bnexp.analysis.study.StudyData``) and its claim type (a key of ``CLAIMS``)."""
    shape: str
    source: str
    check: Callable[[Any], Verdict]
    claim: str = "G"

    def __post_init__(self):
        if self.claim not in CLAIMS:
            raise ValueError(f"Shape {self.shape!r}: claim={self.claim!r}; allowed: {', '.join(CLAIMS)}")

    def verdict(self, data) -> dict:
        """The ``verdicts.json`` object of this shape on ``data``."""
        v = self.check(data)
        return {"shape": self.shape, "source": self.source, "claim": self.claim, **asdict(v)}


# ----------------------------------------------------------------------------- comparisons
def compare(rows: pd.DataFrame, metric: str, by: str, a, b, *, want=1, claim: str = "G",
            at: dict | None = None, pair: str = "seed", margin: float = MARGIN, names=None,
            log: bool = False, runs: pd.DataFrame | None = None, note: str = "") -> Verdict:
    """``a - b`` of ``metric`` between the rows where ``by`` is ``a`` and ``b`` (at ``at``),
    paired on ``pair`` (see the module docstring for the label). Only finished rows (status
    ``ok``) enter. ``log``: compare log(metric) and report the ratio (D claims on ratios).
    ``runs``: where ``rows`` lack the per-run columns of ``convergence.check_training``, the
    table to read them from by ``run``. ``names``: the arms in plain words."""
    rows = _with_training(_select(rows, at), runs)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    sides = [rows[rows[by] == v] for v in (a, b)]
    names = names or (words(a), words(b))
    contrast = f"{names[0]} vs {names[1]}" + _where(at)
    stats = _arm_stats(sides, names)
    values = [pd.to_numeric(s[metric], errors="coerce") if metric in s else pd.Series(dtype=float)
              for s in sides]
    values = [np.log(v.where(v > 0)) if log else v for v in values]
    if not all(v.notna().any() for v in values):
        lacking = [(nm, len(side)) for nm, v, side in zip(names, values, sides) if not v.notna().any()]
        why = "; ".join(f"{nm} has no finished run" if not count else
                        f"{nm}'s {count} finished runs did not record {metric} (recorded before it existed)"
                        for nm, count in lacking)
        return Verdict(NOT_TESTED, contrast, metric, text=f"not tested: {why}", **stats)
    keyed = [v.groupby(s[pair]).mean() for v, s in zip(values, sides)] if pair in rows else []
    both = pd.concat(keyed, axis=1).dropna() if keyed else pd.DataFrame()
    if len(both):
        out = decide(both.iloc[:, 0] - both.iloc[:, 1], want, margin if not log else math.log1p(margin))
        out["unit_n"] = f"{pair}s" if pair != "seed" else "seeds"
    else:
        out = decide_unpaired(*[v.dropna() for v in values], want, margin)
    out["margin"] = None if log else margin
    return _finish(out, contrast, metric, claim, stats, names, want, log, note)


def compare_value(rows: pd.DataFrame, metric: str, ref: float = 0.0, *, want=1, claim: str = "G",
                  at: dict | None = None, pair: str = "seed", margin: float = MARGIN,
                  name: str = "", runs: pd.DataFrame | None = None, note: str = "") -> Verdict:
    """One quantity (per ``pair``, averaged) against ``ref``: for claims such as "the gap is
    positive" or "the speedup exceeds 1"."""
    rows = _with_training(_select(rows, at), runs)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    name = name or words(metric)
    names = (name, f"{ref:g}")
    stats = _arm_stats([rows], names[:1])
    v = pd.to_numeric(rows[metric], errors="coerce") if metric in rows else pd.Series(dtype=float)
    contrast = f"{name} vs {ref:g}" + _where(at)
    if not v.notna().any():
        return Verdict(NOT_TESTED, contrast, metric, text=f"not tested: {name} has no finished run", **stats)
    v = v.groupby(rows[pair]).mean() if pair in rows else v
    out = decide(v - ref, want, margin)
    out.update(unit_n=f"{pair}s" if pair != "seed" else "seeds", margin=margin, ref=ref,
               estimate=out["estimate"] + ref, ci=None if out["ci"] is None else [c + ref for c in out["ci"]])
    return _finish(out, contrast, metric, claim, stats, names, want, False, note)


def compare_outcomes(rows: pd.DataFrame, by: str, a, b, *, want=1, success: Sequence[str] = ("learned",),
                     at: dict | None = None, pair: str = "seed", names=None, note: str = "") -> Verdict:
    """Claims of type T: the share of runs whose ``outcome`` (``convergence.outcome``) is in
    ``success``, ``a`` against ``b``, Fisher's exact test on the 2 x 2 counts. Shown when the
    counts separate completely in the claimed direction (every ``a`` run succeeded, no ``b``
    run did) or Fisher's p < ALPHA; contradicted the same way round; equivalent where every run
    of both arms succeeded (no difference to claim); else inconclusive."""
    rows = _select(rows, at)
    rows = rows[rows["outcome"].notna()]
    names = names or (words(a), words(b))
    contrast = f"{names[0]} vs {names[1]}" + _where(at)
    sides = [rows[rows[by] == v] for v in (a, b)]
    stats = _arm_stats(sides, names)
    if not all(len(s) for s in sides):
        missing = " and ".join(nm for nm, s in zip(names, sides) if not len(s))
        return Verdict(NOT_TESTED, contrast, "outcome", text=f"not tested: {missing} has no finished run", **stats)
    hit = [s["outcome"].isin(success) for s in sides]
    (sa, na), (sb, nb) = ((int(h.sum()), len(h)) for h in hit)
    with quiet():
        p = scipy.stats.fisher_exact([[sa, na - sa], [sb, nb - sb]],
                                     alternative="greater" if want == 1 else "less").pvalue
        p_against = scipy.stats.fisher_exact([[sa, na - sa], [sb, nb - sb]],
                                             alternative="less" if want == 1 else "greater").pvalue
    ok_a, ok_b = (sa == na, sb == 0) if want == 1 else (sa == 0, sb == nb)
    label = (SHOWN if (ok_a and ok_b) or p < ALPHA else
             CONTRADICTED if ((sb == nb and sa == 0) if want == 1 else (sa == na and sb == 0)) or p_against < ALPHA
             else EQUIVALENT if sa == na and sb == nb else INCONCLUSIVE)
    by_seed = [h.groupby(s[pair]).all() for h, s in zip(hit, sides)] if pair in rows else []
    both = pd.concat(by_seed, axis=1).dropna() if by_seed else pd.DataFrame()
    n = len(both) if len(both) else min(na, nb)
    k = int((both.iloc[:, 0] & ~both.iloc[:, 1].astype(bool)).sum() if want == 1 else
            (~both.iloc[:, 0].astype(bool) & both.iloc[:, 1]).sum()) if len(both) else None
    what = "/".join(success)
    counts = f"{what} in {sa} of {na} {names[0]} runs and {sb} of {nb} {names[1]} runs"
    out = dict(label=label, estimate=sa / na - sb / nb, ci=None, n=n, k=k,
               test=f"Fisher exact p={p:.2g}", unit_n="seeds")
    v = _finish(out, contrast, f"share {what}", "T", stats, names, want, False, note)
    seen = "; ".join(f"{nm}: " + ", ".join(f"{c} {o}" for o, c in s["outcome"].value_counts().items())
                     for nm, s in zip(names, sides))
    return replace(v, text=f"{label}: {counts} ({_counted(k, n, names, want, 'T')}; {out['test']}); "
                           f"outcomes {seen}{_where(at)}; {_train_words(stats, names)}"
                           f"{'; ' + note if note else ''}.")


# ----------------------------------------------------------------------------- words
def _finish(out: dict, contrast: str, metric: str, claim: str, stats: dict, names, want, log: bool,
            note: str) -> Verdict:
    out = {**out, "metric": metric}
    label, budget = out["label"], BUDGETS.get(claim, "equal budget")
    if claim == "G":
        conv = list(stats["converged"].values())
        if conv and all(c == 1.0 for c in conv):
            budget = "at convergence"
        elif label == SHOWN:
            label = SHOWN_AT_BUDGET
    est, ci = out["estimate"], out["ci"]
    if log:
        est, ci = math.exp(est), None if ci is None else [math.exp(c) for c in ci]
    text = (f"{label}: {names[0]} {_direction(want)} {names[1]}" if len(names) > 1 else f"{label}: {names[0]}")
    where = contrast[len(" vs ".join(names)):] if len(names) > 1 else ""
    on = "" if "ref" in out else f" on {words(metric)}"
    text += (f"{on}{where}, "
             f"{_effect(est, ci, metric, log, 'ref' in out)} ({_counted(out['k'], out['n'], names, want, claim, out)}"
             f"{'; ' + out['test'] if out['test'] else ''}); {_train_words(stats, names)}; {budget}"
             f"{_unconverged(stats, names) if budget == 'equal budget' and claim == 'G' else ''}"
             f"{'; ' + note if note else ''}.")
    return Verdict(label, contrast, metric, est, ci, int(out["n"]), out["k"], stats["converged"],
                   stats["train_acc"], out["test"], budget, text, ratio=bool(log))


def _direction(want) -> str:
    return {1: "above", -1: "below", 0: "equal to", "<=": "not above", ">=": "not below"}[want]


def _effect(est: float, ci, metric: str, log: bool, value: bool = False) -> str:
    if log:
        band = "" if ci is None else f" [{ci[0]:.3g}, {ci[1]:.3g}]"
        return f"ratio {est:.3g}{band}"
    scale, unit, fmt = (100.0, " points", "{:+.1f}") if is_percent(metric) else (1.0, "", "{:+.3g}")
    fmt = fmt.replace("+", "") if value else fmt
    band = "" if ci is None else f" [{fmt.format(ci[0] * scale)}, {fmt.format(ci[1] * scale)}]"
    return f"{'mean' if value else 'difference'} {fmt.format(est * scale)}{unit}{band}"


def _counted(k, n, names, want, claim, out: dict | None = None) -> str:
    unit = (out or {}).get("unit_n", "seeds")
    if k is None:
        return f"n={n} {unit}, unpaired"
    margin = (out or {}).get("margin")
    within = f"within +/- {_amount(margin, (out or {}).get('metric', ''))}" if margin else "within the margin"
    how = {0: within, "<=": "not above", ">=": "not below"}.get(want, "in the claimed direction")
    text = f"{k} of {n} {unit} {how}"
    if (out or {}).get("label") == EQUIVALENT and margin:
        text += f"; the interval inside +/- {_amount(margin, out.get('metric', ''))}"
    return text


def _amount(margin: float, metric: str) -> str:
    return f"{100 * margin:g} points" if is_percent(metric) else f"{margin:g}"


def _train_words(stats: dict, names) -> str:
    accs = stats["train_acc"]
    if not accs or all(v is None for v in accs.values()):
        return "clean train accuracy not recorded"
    if len(accs) == 1:
        v = next(iter(accs.values()))
        return "clean train accuracy " + ("none finished" if v is None else f"{100 * v:.1f}%")
    return "clean train accuracy " + ", ".join(
        f"{nm} {'none finished' if v is None else f'{100 * v:.1f}%'}" for nm, v in accs.items())


def _unconverged(stats: dict, names) -> str:
    if not any(stats["converged"].values()):
        return " (no run of either arm converged)"
    off = [f"{nm} in {100 * c:.0f}% of runs" for nm, c in stats["converged"].items() if c < 1.0]
    return f" (converged: {', '.join(off)})" if off else ""


def _arm_stats(sides: Sequence[pd.DataFrame], names) -> dict:
    """Per arm (by its plain name): the fraction of its finished runs that converged and its
    mean clean training accuracy (None where the rows do not carry them)."""
    conv, acc = {}, {}
    for nm, s in zip(names, sides):
        runs = s.drop_duplicates("run") if "run" in s else s
        conv[nm] = float(runs["converged"].astype(float).mean()) if "converged" in runs and len(runs) else 0.0
        a = runs["clean_train_acc"].mean() if "clean_train_acc" in runs and len(runs) else math.nan
        acc[nm] = None if pd.isna(a) else round(float(a), 4)
    return {"converged": conv, "train_acc": acc}


def _with_training(rows: pd.DataFrame, runs: pd.DataFrame | None) -> pd.DataFrame:
    cols = ["clean_train_acc", "converged", "outcome"]
    if runs is None or "run" not in rows or all(c in rows for c in cols):
        return rows
    have = [c for c in cols if c in runs and c not in rows]
    return rows.merge(runs[["run", *have]].drop_duplicates("run"), on="run", how="left") if have else rows


def _select(rows: pd.DataFrame, at: dict | None) -> pd.DataFrame:
    for k, v in (at or {}).items():
        rows = rows[rows[k] == v]
    return rows


def _where(at: dict | None) -> str:
    def one(k, v) -> str:
        if k in ("norm", "norm.name") or k.startswith("norm /"):
            return "with " + ", ".join(words(w) for w in str(v).split(" / "))
        return f"at {words(k)} {v:g}" if isinstance(v, float) else f"at {words(k)} {words(v)}"
    return " " + ", ".join(one(k, v) for k, v in at.items()) if at else ""


# ----------------------------------------------------------------------------- the scale finding
MEMORIZATION = ("in the memorization regime of scale=small (a few thousand un-augmented images, "
                "100% clean training accuracy) the normalization batch moves test error by under a point; "
                "batch_size_regime asks the same question on 20,000 augmented images the net cannot "
                "memorize")


def memorization_note(v: Verdict) -> Verdict:
    """``v`` with the scale finding said in its text, where the data say it: every arm
    converged and the effect on test error is under a point."""
    small = v.metric.startswith(("test_err", "test_acc")) and math.isfinite(v.estimate) and abs(v.estimate) < 0.01
    if not small or not v.converged or min(v.converged.values()) < 1.0:
        return v
    return replace(v, text=f"{v.text[:-1]}; {MEMORIZATION}.")


# ----------------------------------------------------------------------------- "recovers most"
RECOVERS_MOST = 0.5  # "recovers most / much of the loss": at least half of it


def compare_recovery(base: pd.Series, hurt: pd.Series, fixed: pd.Series, *, name: str, claim: str = "G",
                     runs: pd.DataFrame | None = None, note: str = "") -> Verdict:
    """"``fixed`` recovers most of the loss from ``base`` to ``hurt``": per pair (the index, e.g.
    seed), the fraction ``(fixed - hurt) / (base - hurt)`` against ``RECOVERS_MOST``. The three
    Series share their index; ``runs`` (with ``seed``) gives the arms' training columns."""
    frac = ((fixed - hurt) / (base - hurt)).dropna().rename("recovered")
    rows = frac.rename_axis("seed").reset_index()
    rows = rows.assign(status="ok")
    if runs is not None and "seed" in runs:
        per_seed = runs.groupby("seed")[["clean_train_acc", "converged"]].agg(
            {"clean_train_acc": "mean", "converged": "all"}) if "converged" in runs else None
        if per_seed is not None:
            rows = rows.merge(per_seed.reset_index(), on="seed", how="left")
    lost = f"loss {100 * abs(float((base - hurt).mean())):.1f} points" if len(frac) else "no loss measured"
    return compare_value(rows, "recovered", RECOVERS_MOST, want=1, claim=claim, margin=0.0, name=name,
                         note=f"{lost}; {note}" if note else lost)
