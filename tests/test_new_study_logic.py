"""The smoothness, robustness, affine and lr_sensitivity scripts' own numbers (and verdicts) against
hand computations."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from conftest import experiment

affine = experiment("affine")
lr_sensitivity = experiment("lr_sensitivity")
robustness = experiment("robustness")
smoothness = experiment("smoothness")


def test_smoothness_per_run_averages_log10_over_probe_points_and_layers():
    probes = pd.DataFrame([
        {"run": "r", "step": 0, "layer": "model", "name": "smoothness.beta", "value": 10.0},
        {"run": "r", "step": 8, "layer": "model", "name": "smoothness.beta", "value": 1000.0},
        {"run": "r", "step": 0, "layer": "a", "name": "ics.l2", "value": 1.0},
        {"run": "r", "step": 0, "layer": "b", "name": "ics.l2", "value": 3.0},  # layers: mean 2
        {"run": "r", "step": 0, "layer": "a", "name": "ics.cos", "value": 0.5},
        {"run": "r", "step": 0, "layer": "b", "name": "ics.cos", "value": 0.7},
        {"run": "r", "step": 0, "layer": "model", "name": "smoothness.loss", "value": 9.0, "eta": 0.1}])
    out = smoothness.per_run(smoothness.per_probe(probes)).set_index("run").loc["r"]
    assert out["smoothness.beta.log"] == pytest.approx(2.0)  # mean of log10 10 and log10 1000
    assert out["ics.l2.log"] == pytest.approx(math.log10(2.0))
    assert out["ics.cos"] == pytest.approx(0.6)
    assert "smoothness.loss.log" not in out


def test_robustness_long_table_reads_clean_and_per_severity_errors():
    runs = pd.DataFrame([
        {"run": "b", "seed": 0, "norm": "bn", "status": "ok", "test_acc": 0.9, "test_acc.ema": 0.9,
         "test_acc.batch_sorted": 0.3, "mean_corrupt_err.ema": 0.4, "mean_corrupt_err.batch_sorted": 0.8,
         "corrupt_err.1.ema": 0.2, "corrupt_err.5.ema": 0.6, "corrupt_err.1.batch_sorted": 0.7,
         "corrupt_err.5.batch_sorted": 0.9},
        {"run": "g", "seed": 0, "norm": "gn", "status": "ok", "test_acc": 0.88, "mean_corrupt_err.ema": 0.3,
         "corrupt_err.1.ema": 0.15, "corrupt_err.5.ema": 0.45}])
    long = robustness.long_errors(runs).set_index([robustness.SERIES, "severity"])["err"]
    assert long[("bn, ema", 0)] == pytest.approx(0.1)
    assert long[("bn, batch_sorted", 0)] == pytest.approx(0.7)  # the clean sorted stream
    assert long[("bn, batch_sorted", 5)] == pytest.approx(0.9)
    assert long[("gn", 0)] == pytest.approx(0.12) and long[("gn", 5)] == pytest.approx(0.45)
    assert ("bn, batch", 0) not in long.index  # modes the run did not score are absent


def test_steps_to_target_counts_a_run_that_never_reached_it_as_twice_its_budget():
    runs = pd.DataFrame({"run": ["a", "b"], "steps_to.train_acc.0.9": [64.0, None]})
    curves = pd.DataFrame({"run": ["a", "a", "b", "b"], "step": [32, 640, 32, 640],
                           "train_acc.clean": [0.5, 0.95, 0.4, 0.8]})
    got = lr_sensitivity.log2_steps_to(runs, curves).tolist()
    assert got == [6.0, math.log2(1280)]
    old = pd.DataFrame({"run": ["a"]})  # runs recorded before the metric: nothing to read
    assert math.isnan(lr_sensitivity.log2_steps_to(old, curves.drop(columns="train_acc.clean")).iloc[0])


def _data(runs: pd.DataFrame, **extra):
    from bnexp.analysis.study import StudyData

    return StudyData(None, "cmd", runs, pd.DataFrame(), pd.DataFrame(), extra=extra)


def test_smoothness_verdict_is_the_geometric_mean_ratio_of_bn_over_none_paired_by_seed():
    """D claim, no training gate: unconverged arms still give ``shown`` (not "at equal budget"),
    and the estimate is 10 ** (mean over seeds of the per-seed log10 difference)."""
    bn_log, none_log = [0.0, 0.5, 1.0], [1.0, 1.4, 2.1]  # loss range, mean log10 per run
    rows = [{"run": f"{n}{s}", "seed": s, "norm": n, "optim.lr": lr, "status": "ok", "converged": False,
             "clean_train_acc": 0.5, "smoothness.loss_range.log": v}
            for n, lr, vals in (("bn", 0.1, bn_log), ("none", 0.01, none_log)) for s, v in enumerate(vals)]
    runs = pd.DataFrame(rows)
    v = smoothness.smoother(_data(runs.assign(arm=[smoothness.arm_name(n, lr) for n, lr in
                                                   zip(runs["norm"], runs["optim.lr"])])))
    by_hand = 10 ** (sum(b - n for b, n in zip(bn_log, none_log)) / 3)
    assert v.estimate == pytest.approx(by_hand) and v.estimate < 1
    assert (v.label, v.n, v.k, v.budget) == ("shown", 3, 3, "matched steps, no training gate")
    assert v.contrast == "bn lr 0.1 vs none lr 0.01"


def test_robustness_verdicts_pair_modes_by_run_and_nets_by_seed():
    """E (two BN modes of one run): paired by run, no gate; G (BN vs none): paired by seed, at
    equal budget when an arm did not converge. Estimates against hand means of the differences."""
    bn_ema, bn_batch, none = [0.6, 0.5, 0.7], [0.3, 0.35, 0.3], [0.9, 0.8, 0.95]
    rows = []
    for s in range(3):
        rows.append({"run": f"b{s}", "seed": s, "norm": "bn", "status": "ok", "test_acc": 0.9,
                     "converged": True, "clean_train_acc": 1.0,
                     "mean_corrupt_err.ema": bn_ema[s], "corrupt_err.5.ema": bn_ema[s] + 0.1,
                     "mean_corrupt_err.batch": bn_batch[s], "corrupt_err.5.batch": bn_batch[s] + 0.05})
        rows.append({"run": f"n{s}", "seed": s, "norm": "none", "status": "ok", "test_acc": 0.8,
                     "converged": False, "clean_train_acc": 0.9, "mean_corrupt_err.ema": none[s]})
    d = robustness.prepare(_data(pd.DataFrame(rows)))
    e = robustness.batch_recovers(d)
    assert e.estimate == pytest.approx(sum(b + 0.05 - (m + 0.1) for b, m in zip(bn_batch, bn_ema)) / 3)
    assert (e.label, e.n, e.budget) == ("shown", 3, "same weights, no training gate") and "runs" in e.text
    assert "not tested" in e.text  # AdaBN beside it: no adapted scores here, the label unchanged
    g = robustness.bn_more_robust(d)
    assert g.estimate == pytest.approx(sum(b - n for b, n in zip(bn_ema, none)) / 3)
    assert (g.label, g.budget) == ("shown at equal budget", "equal budget")


def test_affine_verdict_decides_on_bn_and_reports_the_other_norms_beside_it():
    errs = {("bn", "none"): [0.3, 0.32, 0.31], ("bn", "both"): [0.2, 0.21, 0.2],
            ("gn", "none"): [0.2, 0.2, 0.2], ("gn", "both"): [0.25, 0.26, 0.24]}
    rows = [{"run": f"{n}{a}{s}", "seed": s, "norm": n, "norm.affine": a, "status": "ok", "test_acc": 1 - e,
             "converged": True, "clean_train_acc": 1.0} for (n, a), es in errs.items() for s, e in enumerate(es)]
    d = _data(pd.DataFrame(rows))
    d.study_dir = None
    d.runs = d.runs.assign(**{affine.ERR: 1.0 - d.runs["test_acc"]})
    v = affine.removing_costs(d)
    bn = [x - y for x, y in zip(errs[("bn", "none")], errs[("bn", "both")])]
    assert v.estimate == pytest.approx(sum(bn) / 3) and v.label == "shown" and v.budget == "at convergence"
    assert "Also: contradicted" in v.text  # GN's contrast goes the other way, beside the primary


def test_regime_verdicts_pair_ghost_bn_arms_by_seed_and_say_whether_the_nets_fit():
    """batch_size_regime: NBS 2 - NBS 32 and GN - NBS 2 of test error, against hand means of the
    per-seed differences; none of the arms converged, so both are at equal budget."""
    regime = experiment("batch_size_regime")
    err = {"ghost_bn2": [0.14, 0.15, 0.13], "ghost_bn32": [0.11, 0.12, 0.115], "gn": [0.125, 0.13, 0.12]}
    rows = [{"run": f"{n}{s}", "seed": s, "norm": n, "status": "ok", "test_acc": 1 - e, "train_acc": 0.9,
             "converged": False, "clean_train_acc": 0.9} for n, es in err.items() for s, e in enumerate(es)]
    d = _data(pd.DataFrame(rows))
    d.runs = d.runs.assign(test_err=1.0 - d.runs["test_acc"])
    p = regime.penalty(d)
    assert p.estimate == pytest.approx(sum(a - b for a, b in zip(err["ghost_bn2"], err["ghost_bn32"])) / 3)
    assert (p.label, p.k, p.n) == ("shown at equal budget", 3, 3)
    g = regime.gn_wins_small(d)
    assert g.estimate == pytest.approx(sum(a - b for a, b in zip(err["gn"], err["ghost_bn2"])) / 3)
    assert g.k == 3 and g.label == "shown at equal budget"
    assert "No run fits its training set" in regime.fit_note(d.runs) and regime.regime_holds(d.runs)
    fits = d.runs.assign(**{"train_acc.precise": [0.995] + [0.9] * 8})  # one run memorizes (precise)
    assert "A run fits" in regime.fit_note(fits) and regime.regime_holds(fits) is False


def _smooth_runs(bn_cos, none_cos, bn_l2, none_l2):
    """Two arms x 3 seeds of smoothness's per-run table (lrs 0.01 and 0.3)."""
    rows = []
    for seed in range(3):
        for norm, lr, cos, l2 in (("bn", 0.3, bn_cos[seed], bn_l2[seed]), ("none", 0.01, none_cos[seed], none_l2[seed]),
                                  ("bn", 0.01, none_cos[seed], none_l2[seed])):
            rows.append({"run": f"{norm}{lr}{seed}", "seed": seed, "norm": norm, "optim.lr": lr, "status": "ok",
                         "arm": smoothness.arm_name(norm, lr), "ics.cos": cos, "ics.l2.log": math.log10(l2),
                         "train_acc": 1.0})
    return pd.DataFrame(rows)


def test_smoothness_ratio_sentence_is_the_ratio_of_geometric_means_paired_by_seed():
    # l2 ratios per seed bn / none: 0.5, 0.25, 1.0 -> log10 mean = mean(-0.301, -0.602, 0) = -0.301
    runs = _smooth_runs([0.9] * 3, [0.99] * 3, [1.0, 1.0, 2.0], [2.0, 4.0, 2.0])
    d = _data(runs)
    text = smoothness.ratio_sentence(d, "ics.l2", "bn lr 0.3", "none lr 0.01")
    assert text.startswith("ICS, l2 (mean over layers): bn lr 0.3 / none lr 0.01 = 0.5x [")
    assert "not distinguishable" in text  # 3 seeds, spread 0.3 decades: the interval holds 1


def test_smoothness_ics_cosine_beside_l2_reads_bn_turning_more_as_not_lower_shift():
    """BN's cosine 0.05 below none's in every seed: 'BN's ICS is not lower' holds in cosine
    (shown), while BN's l2 is half of none's (the primary, l2 at each arm's lr: contradicted)."""
    runs = _smooth_runs([0.93, 0.94, 0.92], [0.98, 0.99, 0.97], [1.0, 1.1, 0.9], [2.0, 2.2, 1.8])
    v = smoothness.ics_not_lower(_data(runs))
    assert v.label == "contradicted"  # none's l2 is 2x BN's, every seed
    assert "shown" in v.text.split("Also:")[1] and "ics.cos" in v.text.split("Also:")[1]
    assert "bn lr 0.3 - none lr 0.01 = -0.050" in smoothness.cos_sentence(_data(runs), "bn lr 0.3", "none lr 0.01")
