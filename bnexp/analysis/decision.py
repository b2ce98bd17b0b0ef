"""The decision rule of a verdict: paired differences in, a label, an interval, the sign count
and a test out (numbers only; ``bnexp.analysis.verdicts`` turns them into a verdict and words).

Labels (``LABELS``) and the rule that gives them, on the paired differences ``d`` (``want``: +1
a above b, -1 a below b, 0 equal within ``margin``, "<=" / ">=" a not above / not below b):

* ``shown``: the 95% interval of mean(d) excludes 0 in the claimed direction and, with fewer
  than ``MIN_T_SEEDS`` pairs (where a t-interval of 3 seeds decides little), every pair agrees
  (k = n; the sign test's p is printed, the count is primary); for G, ``shown at equal budget``
  when not every seed of both arms converged;
* ``contradicted``: the same the other way;
* ``equivalent``: neither, and the interval lies inside +/- margin (for a directional claim);
  for a claim of equality (``want=0``) that is ``shown``, and an interval wholly outside the
  margin is ``contradicted``;
* ``inconclusive``: anything else;
* ``not tested``: only where an arm has no finished run at all.

Why the count below ``MIN_T_SEEDS``: with 3 or 4 pairs a t-interval that excludes 0 already
implies every pair agrees, but the reader should see the count and its exact test (the sign
test cannot reach 5% with 3 seeds: p = 1/8), so that is what the verdict prints first.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from bnexp.analysis.tables import quiet

SHOWN, SHOWN_AT_BUDGET, CONTRADICTED = "shown", "shown at equal budget", "contradicted"
EQUIVALENT, INCONCLUSIVE, NOT_TESTED = "equivalent", "inconclusive", "not tested"
LABELS = (SHOWN, SHOWN_AT_BUDGET, CONTRADICTED, EQUIVALENT, INCONCLUSIVE, NOT_TESTED)
MIN_T_SEEDS = 5  # below this many pairs the sign count decides, with its exact test printed
CI, ALPHA = 0.95, 0.05
MARGIN = 0.01  # default margin: 1 point of accuracy or error


def decide(d: Sequence[float], want, margin: float = MARGIN, rank: bool = False) -> dict:
    """Label, estimate, interval, k and test of paired differences ``d`` (see the module
    docstring). ``rank``: the Wilcoxon signed-rank test instead of the paired t (heavy tails)."""
    d = np.asarray([v for v in d if math.isfinite(v)], dtype=float)
    n = len(d)
    if n == 0:
        return dict(label=NOT_TESTED, estimate=math.nan, ci=None, n=0, k=0, test="")
    est = float(d.mean())
    ci = _t_interval(d)
    side = {1: "greater", -1: "less", ">=": "greater", "<=": "less"}.get(want, "two-sided")
    if want == 0:
        k = int((abs(d) < margin).sum())
    elif want in ("<=", ">="):
        k = int((d <= 0).sum() if want == "<=" else (d >= 0).sum())
    else:
        k = int((np.sign(d) == want).sum())
    test = _paired_test(d, side if want in (1, -1) else "two-sided", rank, k)
    return dict(label=_label(d, ci, want, margin, k, test), estimate=est,
                ci=None if ci is None else [float(ci[0]), float(ci[1])], n=n, k=k, test=test)


def _t_interval(d: np.ndarray):
    if len(d) < 2:
        return None
    if d.std() == 0:
        return (float(d.mean()),) * 2
    with quiet():
        return scipy.stats.ttest_1samp(d, 0.0).confidence_interval(CI)


def _paired_test(d: np.ndarray, side: str, rank: bool, k: int) -> str:
    n = len(d)
    if n < 2:
        return ""
    if n < MIN_T_SEEDS:
        nonzero = int((d != 0).sum())
        p = scipy.stats.binomtest(min(k, nonzero), nonzero, 0.5,
                                  alternative="greater" if side != "two-sided" else "two-sided").pvalue \
            if nonzero else 1.0
        return f"sign test p={p:.2g}"
    with quiet():
        if rank:
            p = scipy.stats.wilcoxon(d, alternative=side).pvalue if (d != 0).any() else 1.0
            return f"Wilcoxon signed-rank p={p:.2g}"
        p = scipy.stats.ttest_1samp(d, 0.0, alternative=side).pvalue if d.std() else 0.0
    return f"paired t p={p:.2g}"


def _label(d: np.ndarray, ci, want, margin: float, k: int, test: str) -> str:
    n = len(d)
    if ci is None:
        return INCONCLUSIVE
    lo, hi = ci
    inside = -margin < lo and hi < margin
    if want == 0:
        return SHOWN if inside else CONTRADICTED if (lo >= margin or hi <= -margin) else INCONCLUSIVE
    if want in ("<=", ">="):
        good = hi < margin if want == "<=" else lo > -margin
        bad = lo > margin if want == "<=" else hi < -margin
        return SHOWN if good else CONTRADICTED if bad else INCONCLUSIVE
    if "Wilcoxon" in test:
        p_for = float(test.rsplit("=", 1)[1])
        return SHOWN if p_for < ALPHA else EQUIVALENT if inside else INCONCLUSIVE
    s_lo, s_hi = sorted((want * lo, want * hi))
    agree = n >= MIN_T_SEEDS or k == n
    against = n >= MIN_T_SEEDS or k == 0
    if s_lo > 0 and agree:
        return SHOWN
    if s_hi < 0 and against:
        return CONTRADICTED
    return EQUIVALENT if inside else INCONCLUSIVE


def decide_unpaired(va: pd.Series, vb: pd.Series, want, margin: float) -> dict:
    """No pair has both sides: Welch's interval and the Mann-Whitney U test (two groups)."""
    est = float(va.mean() - vb.mean())
    ci = None
    if len(va) >= 2 and len(vb) >= 2:
        with quiet():
            ci = ((est, est) if va.std() == 0 and vb.std() == 0 else
                  tuple(map(float, scipy.stats.ttest_ind(va, vb, equal_var=False).confidence_interval(CI))))
    side = {1: "greater", -1: "less"}.get(want, "two-sided")
    p = scipy.stats.mannwhitneyu(va, vb, alternative=side).pvalue
    against = scipy.stats.mannwhitneyu(va, vb, alternative={"greater": "less", "less": "greater"}.get(
        side, "two-sided")).pvalue
    inside = ci is not None and -margin < ci[0] and ci[1] < margin
    if want == 0:
        label = SHOWN if inside else INCONCLUSIVE
    else:
        label = (SHOWN if p < ALPHA else CONTRADICTED if against < ALPHA else
                 EQUIVALENT if inside else INCONCLUSIVE)
    return dict(label=label, estimate=est, ci=None if ci is None else list(ci), n=len(va) + len(vb),
                k=None, test=f"Mann-Whitney U p={p:.2g}", unit_n=f"runs ({len(va)} vs {len(vb)})")
