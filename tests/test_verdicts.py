"""The verdict engine against run tables whose answers are known by construction.

Each table is built so that one property of the engine decides its label: pairing by seed,
the sign count below 5 seeds, the margin, the direction, the per-seed outcome of a T claim, the
absence of a training gate for same-weights claims, convergence read from clean training
accuracy. The intervals and p-values are checked against scipy called directly.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from bnexp.analysis import convergence as C
from bnexp.analysis import verdicts as V

SEED_LEVELS = [0.70, 0.80, 0.90, 0.75, 0.85]  # big differences between seeds (subset, init)
NOISE = [0.001, -0.002, 0.0015, -0.001, 0.002]  # small differences within a seed


def runs(effect: float, seeds: int = 3, train_acc=(1.0, 1.0), metric: str = "test_acc",
         noise=NOISE) -> pd.DataFrame:
    """Arms a and b over ``seeds`` seeds; a = b + ``effect`` + small noise, seeds far apart."""
    rows = []
    for s in range(seeds):
        for arm, acc in zip("ab", train_acc):
            value = SEED_LEVELS[s] + (effect + noise[s] if arm == "a" else 0.0)
            rows.append({"run": f"{arm}{s}", "arm": arm, "seed": s, "status": "ok", metric: value,
                         "train_acc": acc, "data.name": "fashion_mnist"})
    out, _ = C.check_training(pd.DataFrame(rows), ["arm"])
    return out


# ----------------------------------------------------------------------------- labels
def test_a_paired_two_point_effect_with_small_noise_is_shown():
    v = V.compare(runs(0.02), "test_acc", "arm", "a", "b", want=+1)
    assert v.label == V.SHOWN and (v.n, v.k) == (3, 3) and v.budget == "at convergence"
    d = np.array([0.02 + e for e in NOISE[:3]])
    lo, hi = scipy.stats.ttest_rel(d + 0.5, np.full(3, 0.5)).confidence_interval(0.95)
    assert v.estimate == pytest.approx(d.mean()) and v.ci == pytest.approx([lo, hi])
    p = scipy.stats.binomtest(3, 3, 0.5, alternative="greater").pvalue
    assert v.test == f"sign test p={p:.2g}"
    # unpaired, the seeds' spread (10 points) would hide the 2 points: the pairing decides
    a, b = (runs(0.02).query(f"arm == '{x}'")["test_acc"] for x in "ab")
    assert scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)[0] < 0


def test_the_same_effect_reversed_is_contradicted():
    v = V.compare(runs(-0.02), "test_acc", "arm", "a", "b", want=+1)
    assert v.label == V.CONTRADICTED and v.k == 0 and v.ci[1] < 0


def test_equal_arms_within_the_margin_are_equivalent():
    v = V.compare(runs(0.0), "test_acc", "arm", "a", "b", want=+1, margin=0.01)
    assert v.label == V.EQUIVALENT and -0.01 < v.ci[0] and v.ci[1] < 0.01
    # a claim of equality on the same table is shown, and a 2-point gap contradicts it
    assert V.compare(runs(0.0), "test_acc", "arm", "a", "b", want=0, margin=0.01).label == V.SHOWN
    assert V.compare(runs(0.05), "test_acc", "arm", "a", "b", want=0, margin=0.01).label == V.CONTRADICTED


def test_a_small_consistent_effect_inside_the_margin_is_shown_not_equivalent():
    """Half a point in every one of 5 seeds: the interval excludes 0, so it is shown (the text
    gives its size); equivalent is for intervals that do not exclude 0."""
    v = V.compare(runs(0.005, 5, noise=[0.0, 0.001, -0.001, 0.0005, -0.0005]), "test_acc", "arm", "a", "b",
                  want=+1, margin=0.01)
    assert v.ci[0] > 0 and v.ci[1] < 0.01 and v.label == V.SHOWN


def test_below_five_seeds_the_count_is_primary_and_from_five_the_interval_decides():
    noise = [0.03, 0.025, -0.004, 0.03, 0.028]  # seed 2 goes the other way by a little
    three = V.compare(runs(0.0, 3, noise=noise), "test_acc", "arm", "a", "b", want=+1)
    five = V.compare(runs(0.0, 5, noise=noise), "test_acc", "arm", "a", "b", want=+1)
    assert (three.k, three.n, five.k, five.n) == (2, 3, 4, 5)
    assert three.label == V.INCONCLUSIVE  # 2 of 3 seeds: the count is primary
    lo, _ = scipy.stats.ttest_1samp(noise, 0.0).confidence_interval(0.95)
    assert lo > 0 and five.label == V.SHOWN and five.test.startswith("paired t")


def test_an_unconverged_arm_makes_a_generalization_verdict_equal_budget_and_is_named():
    v = V.compare(runs(0.02, train_acc=(1.0, 0.853)), "test_acc", "arm", "a", "b", want=+1,
                  names=("BN", "no normalization"))
    assert v.label == V.SHOWN_AT_BUDGET and v.budget == "equal budget"
    assert v.converged == {"BN": 1.0, "no normalization": 0.0}
    assert v.train_acc == {"BN": 1.0, "no normalization": 0.853}
    assert "no normalization 85.3%" in v.text and "3 of 3 seeds" in v.text


def test_three_seeds_of_zero_or_hundred_outcomes_go_to_the_count():
    rows = pd.DataFrame([{"run": f"{n}{s}", "norm": n, "seed": s, "data.name": "fashion_mnist",
                          "status": "ok" if n == "bn" else "diverged", "train_acc": 0.95 if n == "bn" else None}
                         for n in ("bn", "none") for s in range(3)])
    rows, _ = C.check_training(rows, ["norm"])
    v = V.compare_outcomes(rows, "norm", "bn", "none")
    p = scipy.stats.fisher_exact([[3, 0], [0, 3]], alternative="greater").pvalue
    assert v.label == V.SHOWN and v.ci is None and (v.n, v.k) == (3, 3) and v.estimate == 1.0
    assert v.test == f"Fisher exact p={p:.2g}" and "3 diverged" in v.text
    one = rows.assign(status=["ok", "ok", "ok", "ok", "diverged", "diverged"],
                      train_acc=[0.95, 0.95, 0.95, 0.9, None, None])
    one, _ = C.check_training(one, ["norm"])
    assert V.compare_outcomes(one, "norm", "bn", "none").label == V.INCONCLUSIVE  # 3/3 vs 1/3


def test_a_same_weights_comparison_of_an_unconverged_model_is_still_answered():
    """EMA vs precise on the same runs of a model at 60% training accuracy (E): no gate."""
    rows = []
    for s in range(4):
        for mode, err in (("ema", 0.30 + 0.05), ("precise", 0.30)):
            rows.append({"run": f"r{s}", "seed": s, "status": "ok", "eval_mode": mode,
                         "test_err": err + 0.01 * s + (0.002 * s if mode == "ema" else 0)})
    table = pd.DataFrame([{"run": f"r{s}", "status": "ok", "train_acc": 0.6, "data.name": "fashion_mnist"}
                          for s in range(4)])
    table, _ = C.check_training(table, [])
    v = V.compare(pd.DataFrame(rows), "test_err", "eval_mode", "ema", "precise", want=+1, claim="E",
                  pair="run", runs=table)
    assert v.label == V.SHOWN and v.budget == V.BUDGETS["E"] and v.k == 4
    assert v.train_acc == {"EMA statistics": 0.6, "precise statistics": 0.6}


def test_not_tested_only_where_an_arm_has_no_finished_run():
    table = runs(0.02)
    failed = table.assign(status=np.where(table["arm"] == "b", "failed", "ok"))
    assert V.compare(failed, "test_acc", "arm", "a", "b").label == V.NOT_TESTED
    stalled = runs(0.02, train_acc=(1.0, 0.11))  # b stalled near chance: still compared
    assert V.compare(stalled, "test_acc", "arm", "a", "b").label == V.SHOWN_AT_BUDGET
    # finished runs recorded before a metric existed: not tested, and the verdict says why
    older = table.assign(test_acc=np.where(table["arm"] == "b", np.nan, table["test_acc"]))
    v = V.compare(older, "test_acc", "arm", "a", "b")
    assert v.label == V.NOT_TESTED and "3 finished runs did not record test_acc" in v.text
    assert "no finished run" in V.compare(failed, "test_acc", "arm", "a", "b").text


def test_recovers_most_is_a_fraction_of_the_loss():
    seeds = pd.Index(range(3), name="seed")
    base, hurt = pd.Series([0.9, 0.91, 0.89], seeds), pd.Series([0.7, 0.69, 0.72], seeds)
    precise = hurt + 0.15 * (base - hurt) + pd.Series([0.002, -0.001, 0.001], seeds)
    renorm = hurt + 0.99 * (base - hurt)
    assert V.compare_recovery(base, hurt, precise, name="precise").label == V.CONTRADICTED
    v = V.compare_recovery(base, hurt, renorm, name="renorm")
    assert v.label == V.SHOWN_AT_BUDGET and v.estimate == pytest.approx(0.99)
    # the sign alone (precise above EMA) would have called the 15% a recovery
    assert (precise > hurt).all()


def test_ratios_compare_on_the_log_scale():
    t = runs(0.0, 5, metric="shift")
    t.loc[t["arm"] == "a", "shift"] = [0.01, 0.02, 0.005, 0.03, 0.01]  # heavy-tailed, far below b
    v = V.compare(t, "shift", "arm", "a", "b", want=-1, claim="D", log=True)
    ratio = np.exp(np.mean(np.log(t[t.arm == "a"]["shift"].values) - np.log(t[t.arm == "b"]["shift"].values)))
    assert v.label == V.SHOWN and v.estimate == pytest.approx(ratio) and v.budget == V.BUDGETS["D"]
    # the scorecard and reports print it as a ratio, unsigned (not "+0.0019" as if a - b)
    from bnexp.analysis.report import effect
    row = {**V.asdict(v), "metric": "shift"}
    assert v.ratio and effect(row).startswith(f"ratio {ratio:.3g} [{v.ci[0]:.3g}, {v.ci[1]:.3g}] on shift")
    assert not V.compare(t, "shift", "arm", "a", "b", want=-1).ratio


# ----------------------------------------------------------------------------- convergence
def test_converged_reads_clean_train_accuracy_not_the_loss():
    rows = pd.DataFrame({"run": list("abcd"), "status": ["ok", "ok", "ok", "diverged"],
                         "train_acc": [0.97, 0.98, 0.999, math.nan], "train_acc.precise": [0.995, 0.985, math.nan, math.nan],
                         "train_loss": [0.5, 0.001, 0.9, math.nan], "data.name": "fashion_mnist"})
    out, arms = C.check_training(rows, [])
    assert out["converged"].tolist() == [True, False, True, False]  # the better clean accuracy
    assert out["outcome"].tolist() == ["learned", "learned", "learned", "diverged"]
    assert C.converged(rows, None).sum() == 0  # a design without a criterion converges nowhere
    assert (arms["runs"].iloc[0], arms["converged"].iloc[0], arms["diverged"].iloc[0]) == (4, 2, 1)


def test_shape_declares_its_claim_type_and_writes_the_schema(tmp_path):
    from bnexp.analysis.study import write_verdicts

    with pytest.raises(ValueError, match="claim='X'; allowed: T, E, D, G"):
        V.Shape("s", "src", lambda d: None, "X")
    shape = V.Shape("a beats b", "Someone 2020", lambda d: V.compare(d, "test_acc", "arm", "a", "b"), "G")
    got = write_verdicts(tmp_path, [shape.verdict(runs(0.02))])
    keys = {"shape", "source", "claim", "label", "contrast", "metric", "estimate", "ci", "n", "k",
            "converged", "train_acc", "test", "budget", "text"}
    assert keys <= set(got[0]) and json.loads((tmp_path / "verdicts.json").read_text()) == got
    assert got[0]["label"] in V.LABELS and got[0]["claim"] == "G"


def test_memorization_note_only_where_every_arm_converged_and_the_effect_is_under_a_point():
    from dataclasses import replace

    from bnexp.analysis.verdicts import MEMORIZATION, Verdict, memorization_note
    base = Verdict("equivalent", metric="test_err", estimate=-0.001, converged={"a": 1.0, "b": 1.0},
                   text="NBS 2 above NBS 16, difference -0.1 points.")
    noted = memorization_note(base).text
    assert noted == "NBS 2 above NBS 16, difference -0.1 points; " + MEMORIZATION + "."
    assert "batch_size_regime" in noted  # where the question is asked on data the net cannot memorize
    assert memorization_note(replace(base, estimate=0.012)).text == base.text          # a point or more
    assert memorization_note(replace(base, converged={"a": 1.0, "b": 0.8})).text == base.text  # one arm short
    assert memorization_note(replace(base, metric="gen_gap")).text == base.text         # not test error


def test_a_count_says_what_it_counts():
    """A verdict counts seeds unless it says otherwise: fusion's exactness counts folds (runs x
    statistics), and the scorecard must not call 30 folds '30 seeds'."""
    from bnexp.analysis.report import effect
    paired = {**V.asdict(V.Verdict("shown", "a vs b", "test_err", 0.01, [0.0, 0.02], 5, 5)), "metric": "test_err"}
    assert effect(paired).endswith(", 5 of 5 seeds")
    folds = V.asdict(V.Verdict("shown", "folded vs unfolded", "max_abs_logit_diff", 2e-5, None, 30, 30, unit="folds"))
    assert effect(folds).endswith(", 30 of 30 folds")
    assert effect({k: x for k, x in folds.items() if k != "unit"}).endswith("30 of 30 seeds")  # older verdicts.json
