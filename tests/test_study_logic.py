"""Study-specific computations in experiments/*.py, against hand-computed or independent values.

Covers the scripts' own logic (not the sweeps, which tests/test_studies.py runs): the
ema_vs_precise re-scoring at N against the run's own precise eval mode, the noise study's
"measured noise", the activation drift numbers, the variance-shift layer order, the finetune
study's split of overrides between its two sweeps and the fusion table's refusal rows.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from bnexp import records
from bnexp.training import fit as train
from conftest import TINY, experiment, make_config

activations = experiment("activations")
bn_vs_dropout = experiment("bn_vs_dropout")
ema_vs_precise = experiment("ema_vs_precise")
finetune = experiment("finetune")
fusion = experiment("fusion")
noise = experiment("noise")
stat_modes_vs_batch = experiment("stat_modes_vs_batch")
batch_size_true = experiment("batch_size_true")
norm_vs_noise = experiment("norm_vs_noise")


def test_precise_vs_n_reproduces_the_runs_own_precise_mode(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train.fit(make_config([*TINY, "optim.epochs=1", "eval.modes=[ema,precise]", "model.depth=4",
                                     "data.synthetic_train=256", "data.synthetic_test=128"]), run_dir)
    rows = ema_vs_precise.precise_vs_n(run_dir, [256, 64], repeats=2)
    assert [(r["samples"], r["repeat"]) for r in rows] == [(256, 0), (256, 1), (64, 0), (64, 1)]
    # draw 0 at the run's own N (TINY: eval.precise_samples=256) is the run's precise eval
    assert rows[0]["test_acc"] == summary["metrics"]["test_acc.precise"]
    assert rows[0]["test_loss"] == pytest.approx(summary["metrics"]["test_loss.precise"], rel=1e-6)
    # another draw of the same N is another estimate: the loss moves
    assert rows[1]["test_loss"] != rows[0]["test_loss"]
    # cached: same sizes and repeats are read back, not recomputed
    path = run_dir / records.PRECISE_VS_N  # bnexp.tools.rescore.rescore_precise's cache
    cached = json.loads(path.read_text())
    cached["rows"][0]["test_acc"] = -1.0
    path.write_text(json.dumps(cached))
    assert ema_vs_precise.precise_vs_n(run_dir, [256, 64], repeats=2)[0]["test_acc"] == -1.0


def _noise_probe(run: str, size: int, mean: float, var: float, layers=("a", "b")) -> list[dict]:
    return [{"run": run, "epoch": 0, "layer": layer, "batch_size": size, "name": name, "value": value}
            for layer in layers for name, value in (("noise.mean", mean), ("noise.var", var))]


def test_measured_noise_picks_the_normalization_batch_and_adds_injected_noise():
    probes = pd.DataFrame(_noise_probe("ghost", 16, 0.3, 0.8) + _noise_probe("ghost", 128, 0.1, 0.2)
                          + _noise_probe("bn", 16, 0.3, 0.8) + _noise_probe("bn", 128, 0.1, 0.2)
                          + _noise_probe("noisy", 128, 0.1, 0.2))
    runs = pd.DataFrame([
        {"run": "ghost", "norm.name": "ghost_bn", "norm.virtual_batch": 16, "data.batch_size": 128},
        {"run": "bn", "norm.name": "bn", "norm.virtual_batch": 16, "data.batch_size": 128},
        {"run": "noisy", "norm.name": "noisy_bn", "norm.virtual_batch": 32, "data.batch_size": 128,
         "norm.noise_mean": 0.6, "norm.noise_scale": 1.6, "norm.noise_add": 0.3, "norm.noise_mul": 0.4},
        {"run": "plain", "norm.name": "none", "norm.virtual_batch": 32, "data.batch_size": 128},
        {"run": "unprobed", "norm.name": "ghost_bn", "norm.virtual_batch": 4, "data.batch_size": 128}])
    got = noise.measured_noise(runs, probes)
    assert got["ghost"] == pytest.approx(math.hypot(0.3, 0.8 / 2))
    assert got["bn"] == pytest.approx(math.hypot(0.1, 0.2 / 2))
    # Santurkar et al.'s noise: shift mu_t ~ U(-0.6, 0.6) (variance 0.6^2 / 3) plus N(0, 0.3^2)
    # jitter; scale sigma_t ~ U(1, 1.6) (variance 0.6^2 / 12) plus N(0, 0.4^2) jitter
    shift, scale = 0.6 ** 2 / 3 + 0.3 ** 2, 0.6 ** 2 / 12 + 0.4 ** 2
    assert got["noisy"] == pytest.approx(math.sqrt(0.1 ** 2 + (0.2 / 2) ** 2 + shift + scale))
    assert got["plain"] == 0.0 and math.isnan(got["unprobed"])


def test_activation_drift_is_relative_to_the_first_probe():
    rows = []
    for step, (p15, p50, p85) in ((0, (-1.0, 0.0, 1.0)), (10, (-9.0, 9.0, 9.0)), (20, (-3.0, 1.0, 5.0))):
        rows += [{"run": "r", "step": step, "name": f"activations.p{q}", "value": v}
                 for q, v in ((15, p15), (50, p50), (85, p85))]
    out = activations.drift(pd.DataFrame(rows)).set_index("run")
    assert out.loc["r", "spread_ratio"] == pytest.approx(8.0 / 2.0)  # last spread / first spread
    assert out.loc["r", "median_shift"] == pytest.approx(1.0 / 2.0)


def test_variance_shift_keeps_the_last_epoch_and_numbers_layers_by_depth():
    rows = [{"run": run, "epoch": e, "layer": layer, "name": f"variance_shift.{stat}", "value": e + i}
            for run in ("r1", "r2") for e in (0, 1) for stat in ("abs_log", "max")
            for i, layer in enumerate(["features.1.norm", "features.3.norm"])]
    rows.append({"run": "r1", "epoch": 1, "layer": "model", "name": "calibration.gen_gap", "value": 0.5})
    out = bn_vs_dropout.variance_shift(pd.DataFrame(rows))
    assert set(out["epoch"]) == {1} and len(out) == 4
    assert set(out["name"]) == {"variance_shift.abs_log"}  # the probe's per-channel |log r| (default)
    assert set(bn_vs_dropout.variance_shift(pd.DataFrame(rows), "variance_shift.max")["name"]) == {
        "variance_shift.max"}
    assert dict(zip(out["layer"], out["bn_layer"])) == {"features.1.norm": 1, "features.3.norm": 2}


def test_gap_curves_are_the_calibration_gap_and_empty_without_that_probe():
    rows = [{"run": f"{norm}{p}", "epoch": e, "layer": "model", "name": "calibration.gen_gap",
             "value": 0.1 * e + p, "norm": norm, "model.dropout": p,
             "model.dropout_placement": "before_norm"}
            for norm in ("bn", "none") for p in (0.0, 0.5) for e in (0, 1)]
    shift_only = [{"run": "bn0.0", "epoch": 0, "layer": "features.0.norm",
                   "name": "variance_shift.abs_log", "value": 0.2}]
    got = bn_vs_dropout.gap_curves(pd.DataFrame(rows + shift_only), 0.5)
    assert len(got) == 8 and set(got["gen_gap"]) == {0.0, 0.1, 0.5, 0.6}
    assert set(got.loc[got["model.dropout"] == 0, "line"]) == {"BN, no dropout", "no norm, no dropout"}
    # the small scale records no calibration probe: no curves (the sweep's analysis crashed here)
    assert bn_vs_dropout.gap_curves(pd.DataFrame(shift_only), 0.5).empty


def test_finetune_target_overrides_stay_out_of_the_source_sweep():
    given = ["data=synthetic", "scale=smoke", "results_dir=/tmp/x", "data.shift=blur",
             "data.shift_severity=5", "data.batch_size=8", "data.train_size=100",
             "finetune.bn=adapt", "+finetune.extra=1", "optim.epochs=3", "launcher=joblib"]
    assert finetune.source_overrides(given) == ["data=synthetic", "scale=smoke", "results_dir=/tmp/x",
                                                "optim.epochs=3", "launcher=joblib"]


def test_fusion_table_has_a_not_applicable_row_per_refused_mode():
    fused = pd.DataFrame([{"run": f"r{s}", "status": "ok", "seed": s, "model": "vgg", "stats": "ema",
                           "max_abs_logit_diff": d, "exact": True, "test_acc.before": 0.5,
                           "test_acc.after": 0.5, "images_per_s.before": 100.0,
                           "images_per_s.after": 125.0, "speedup": 1.25}
                          for s, d in ((0, 1e-6), (1, 3e-6))])
    out = fusion.table(fused, {"batch": "cannot fold with --mode batch: it changes per batch"})
    assert list(out["statistics"]) == ["ema", "batch"]
    assert out["max abs logit diff (max over runs)"].tolist() == ["3.0e-06", "not applicable"]
    assert out["note"].tolist() == ["", "refused: it changes per batch"]
    assert out["speedup (mean ± CI)"].iloc[0] == "1.25 ± 0.00"


def test_paired_statement_uses_per_seed_differences():
    from bnexp.analysis.generic import paired_statement, t_quantile

    # a - b per seed: 0.02, 0.03, 0.04 -> mean 0.03, std 0.01; unpaired, the seed spread (0.1
    # between seeds) would swamp the 0.03. Seed 3 has no b: dropped. A failed run is ignored.
    rows = [{"mode": m, "seed": s, "acc": 0.5 + 0.1 * s + d, "status": "ok"}
            for s, d in ((0, 0.02), (1, 0.03), (2, 0.04)) for m, d in (("a", d), ("b", 0.0))]
    rows += [{"mode": "a", "seed": 3, "acc": 0.9, "status": "ok"},
             {"mode": "b", "seed": 0, "acc": 0.0, "status": "failed"}]
    text = paired_statement(pd.DataFrame(rows), "acc", "mode", "a", "b")
    half = t_quantile(0.975, 2) * 0.01 / math.sqrt(3) * 100
    assert text == (f"a beats b on acc (higher is better) by 3.0 +/- {half:.1f} points "
                    "(paired by seed, n=3 pairs, 95% t CI)")
    flat = pd.DataFrame([{"mode": m, "seed": s, "acc": 0.5 + d}
                         for s, d in ((0, 0.01), (1, -0.01), (2, 0.0)) for m, d in (("a", d), ("b", 0.0))])
    assert "not distinguishable" in paired_statement(flat, "acc", "mode", "a", "b")
    assert "lower is better" in paired_statement(
        pd.DataFrame(rows).rename(columns={"acc": "test_err"}), "test_err", "mode", "b", "a")


def test_expected_run_names_follow_a_custom_sweep_subdir(tmp_path):
    """finetune_source names its runs by dataset, scale and seed (hydra.sweep.subdir): the
    sweep status must expect those folders, checked against a real Hydra multirun."""
    import subprocess
    import textwrap

    from bnexp.analysis.generic import expected_run_names, status_counts

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent("""
        data: {name: syn}
        seed: 0
        b: x
        hydra:
          sweep: {dir: out, subdir: "runs/${data.name}-${b}-seed${seed}"}
          sweeper: {params: {seed: "0,1,2"}}
        """))
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra
        @hydra.main(config_path="conf", config_name="config", version_base=None)
        def main(cfg):
            pass
        main()
        """))
    subprocess.run([sys.executable, "app.py", "-m", "b=y", "data.name=cifar"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    made = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert made == ["cifar-y-seed0", "cifar-y-seed1", "cifar-y-seed2"]
    assert sorted(expected_run_names(tmp_path / "out")) == made
    assert status_counts(tmp_path / "out")["pending"] == 0  # .hydra folders exist, no summaries


def test_finetune_cells_keep_diverged_runs_and_eval_only_rows_of_every_seed():
    """A diverged fine-tune is counted in its cell (not dropped), and the eval-only rows of its
    seed still come from another run of that seed."""
    rows = []
    for seed in (0, 1):
        for mode in ("train", "frozen_stats"):
            diverged = (seed, mode) == (1, "train")
            rows.append({"run": f"{mode}-{seed}", "status": "diverged" if diverged else "ok",
                         "seed": seed, "data.batch_size": 2, "finetune.bn": mode,
                         "test_acc": math.nan if diverged else 0.5 + 0.1 * seed,
                         "test_acc.before_finetune": 0.3 + seed / 10,
                         "test_acc.before_finetune.adapted": 0.4 + seed / 10})
    long = finetune.cells(pd.DataFrame(rows))
    train_cell = long[long["row"] == finetune.ROWS["train"]]
    assert sorted(train_cell["status"]) == ["diverged", "ok"]
    adapted = long[long["row"] == finetune.EVAL_ONLY["test_acc.before_finetune.adapted"]]
    assert sorted(adapted["test_acc"]) == pytest.approx([0.4, 0.5])  # one per seed, seed 1 included
    summary = finetune.A.summarize(long, ["row", "data.batch_size"], ["test_acc"])
    cell = summary[summary["row"] == finetune.ROWS["train"]].iloc[0]
    assert (cell["n_diverged"], cell["test_acc.n"]) == (1, 1)


def test_frozen_bn_loss_around_the_freeze():
    """Epochs of 10 steps, frozen at step 30: epoch 2 (steps 20-30) is the last before, epochs
    3-4 are after."""
    losses = {"frozen": [2.0, 1.0, 0.8, 0.6, 0.6], "plain": [2.0, 1.0, 0.8, 0.79, 0.79]}
    curves = pd.DataFrame([{"run": r, "epoch": e, "step": 10 * (e + 1), "train_loss": v}
                           for r, vs in losses.items() for e, v in enumerate(vs)])
    runs = pd.DataFrame([{"run": "frozen", "seed": 0, "status": "ok", "norm.freeze_after": 0.6,
                          "norm.virtual_batch": 2, "trained": True},
                         {"run": "plain", "seed": 0, "status": "ok", "norm.freeze_after": None,
                          "norm.virtual_batch": 2, "trained": True}])
    frozen_at = {"frozen": 30, "plain": None}
    loss = stat_modes_vs_batch.loss_around_freeze(runs, curves, frozen_at)
    want = [{"run": "frozen", "before": 0.8, "after": 0.6}]
    assert loss[["run", "before", "after"]].to_dict("records") == want
    assert loss["rise"].iloc[0] == pytest.approx(-0.25)


def test_true_batch_compares_only_where_every_arm_trained():
    """Batch 2: gn did not train, so 2 is not readable; 8 and 32 are."""
    rows = [{"run": f"{n}{b}{s}", "norm": n, "data.batch_size": b, "seed": s, "status": "ok",
             "trained": not (n == "gn" and b == 2 and s == 1)}
            for n in ("bn", "gn") for b in (2, 8, 32) for s in (0, 1)]
    assert batch_size_true.readable(pd.DataFrame(rows)) == [8, 32]


def test_norm_vs_noise_uses_precise_numbers_where_there_are_and_averages_the_noise():
    runs = pd.DataFrame({"run": ["a", "b"], "norm": ["bn_gni16", "ln"], "test_acc": [0.80, 0.70],
                         "test_acc.precise": [0.82, math.nan], "gen_gap": [0.15, 0.20],
                         "gen_gap.precise": [0.13, math.nan]})
    probes = pd.DataFrame({"run": ["a"] * 4 + ["b"] * 2, "name": ["forward_noise.ratio"] * 6,
                           "layer": ["l1", "l2", "l1", "l2", "l1", "l2"], "epoch": [0, 0, 1, 1, 0, 0],
                           "value": [0.1, 0.3, 0.2, 0.4, 0.0, 0.0]})
    out = norm_vs_noise.with_arms(runs, probes).set_index("run")
    assert out.loc["a", "test_err.pop"] == pytest.approx(0.18)  # precise where the net has BN
    assert out.loc["b", "test_err.pop"] == pytest.approx(0.30)  # the plain number for LN
    assert out.loc["a", "gen_gap.pop"] == pytest.approx(0.13) and out.loc["b", "gen_gap.pop"] == 0.20
    assert out.loc["a", "forward_noise"] == pytest.approx(0.25) and out.loc["b", "forward_noise"] == 0
    assert (out.loc["a", "normalization"], out.loc["a", "added noise"]) == ("BN", "GNI 16")


def test_norm_vs_noise_averages_the_gradient_noise_and_names_lrs_only_where_they_differ():
    """grad_noise: the mean of grad_noise.batchmates over epochs, per run (other rows ignored);
    the pn_online contrasts carry the two arms' learning rates, PN - BN at one lr none."""
    from bnexp.analysis.study import StudyData

    runs = pd.DataFrame({"run": ["p", "o", "b"], "norm": ["pn", "pn_online", "bn"], "seed": 0,
                         "test_acc": [0.8, 0.7, 0.85], "gen_gap": [0.2, 0.3, 0.15], "optim.lr": [0.1, 0.01, 0.1]})
    probes = pd.DataFrame({"run": ["p", "p", "p", "o", "o"],
                           "name": ["grad_noise.batchmates", "grad_noise.batchmates", "grad_noise.sampling",
                                    "grad_noise.batchmates", "forward_noise.ratio"],
                           "layer": "model", "epoch": [0, 1, 0, 0, 0], "value": [0.02, 0.04, 0.9, 0.0, 0.0]})
    out = norm_vs_noise.with_arms(runs, probes).set_index("run")
    assert out.loc["p", "grad_noise"] == pytest.approx(0.03) and out.loc["o", "grad_noise"] == 0.0
    assert math.isnan(out.loc["b", "grad_noise"]) and out.loc["o", "forward_noise"] == 0.0
    assert out.loc["o", "normalization"] == "PN online"
    d = StudyData(Path("."), "", out.reset_index(), pd.DataFrame(), pd.DataFrame())
    assert norm_vs_noise.lr_words(d, "pn_online", "bn") == " (lr 0.01 for PN online, 0.1 for BN)"
    assert norm_vs_noise.lr_words(d, "pn", "bn") == ""


def test_norm_vs_noise_verdict_names_the_explanation_whose_intervals_exclude_zero():
    from bnexp.analysis.study import StudyData

    rows = []
    for seed, jitter in enumerate([0.0, 0.004, -0.003, 0.002, -0.001]):
        for norm, err in {"none": 0.20, "none_gni16": 0.17, "ln": 0.20, "ln_gni16": 0.16,
                          "pn": 0.19, "bn": 0.15}.items():
            rows.append({"run": f"{norm}-{seed}", "seed": seed, "norm": norm, "status": "ok",
                         "test_err.pop": err + jitter + 0.001 * (norm == "ln") * seed})
    d = StudyData(Path("."), "", pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame())
    text = norm_vs_noise.verdict_sentence(d)
    # noise helps in all three noise comparisons; LN = none (interval holds 0), PN helps a bit
    assert text.startswith("The data support both explanations")
    assert "PN -> BN, none -> none + GNI, LN -> LN + GNI" in text and "none -> PN" in text
    assert "none -> LN" not in text


def test_finetune_first_epoch_loss_reads_the_largest_batch_first_epoch_per_mode():
    """Means and maxima over seeds of epoch 1's loss at the largest batch only, by hand."""
    rows = []
    for mode, losses in {"train": [0.2, 0.4], "frozen_stats": [9.0, 3.0]}.items():
        for seed, loss in enumerate(losses):
            for batch in (2, 128):
                for epoch, scale in ((1, 1.0), (2, 0.5)):
                    rows.append({finetune.MODE: mode, finetune.BATCH: batch, "seed": seed, "epoch": epoch,
                                 "train_loss": loss * scale + (100.0 if batch == 2 else 0.0)})
    text = finetune.first_epoch_loss(pd.DataFrame(rows), 10)
    assert "batch 128" in text and "frozen_stats 6.00 (max 9.00)" in text and "train 0.30 (max 0.40)" in text
    assert f"ln 10 = {math.log(10):.2f}" in text
    assert finetune.first_epoch_loss(pd.DataFrame(), 10) == ""


@pytest.mark.parametrize("bn_acc, none_status, none_acc, verdict", [
    (1.00, "diverged", None, "shown"),          # BN learned, none diverged in every seed
    (0.95, "diverged", None, "shown"),          # not converged: a T claim reads the outcome only
    (0.10, "diverged", None, "inconclusive"),   # BN stalled at chance too: no seed in the direction
    (1.00, "ok", 0.90, "equivalent"),           # the unnormalized net learned there as well
    (0.10, "ok", 0.90, "contradicted"),         # the other way round
])
def test_lr_sensitivity_high_lr_shape_reads_the_per_seed_outcome(bn_acc, none_status, none_acc, verdict):
    """The shape at the largest lr is a T claim: learned / stalled / diverged per seed, counted."""
    from types import SimpleNamespace

    from bnexp.analysis.convergence import check_training

    L = experiment("lr_sensitivity")
    runs = pd.DataFrame([{"run": f"{n}{s}", "norm": n, L.LR: 3.0, "seed": s, "data.name": "fashion_mnist",
                          "status": "ok" if n == "bn" else none_status,
                          "train_acc": bn_acc if n == "bn" else none_acc} for n in ("bn", "none") for s in range(3)])
    runs, _ = check_training(runs, ["norm", L.LR])
    v = L.only_bn_at_high_lr(SimpleNamespace(runs=runs))
    assert v.label == verdict and v.n == 3 and "Fisher" in v.test


def test_noise_figure_marks_arms_that_did_not_train_and_leaves_off_scale_points_out():
    rows = [{"run": f"{n}{s}", "norm": n, "seed": s, "status": "ok", "noise": nz, "test_acc": acc + 0.001 * s,
             "gen_gap": 0.1, "trained": n != "noisy_bn"}
            for n, nz, acc in (("bn", 0.02, 0.86), ("ghost_bn4", 0.1, 0.87), ("noisy_bn", 0.3, 0.82),
                               ("none", 0.0, 0.30)) for s in range(3)]
    fig = noise.plot_vs_noise(pd.DataFrame(rows))
    ax = fig.axes[0]
    drawn = {c.get_label(): c for c in ax.containers}
    assert set(drawn) == {"bn", "ghost_bn4", "noisy_bn (did not train)"}  # none: far below, not drawn
    assert drawn["noisy_bn (did not train)"].lines[0].get_markerfacecolor() == "white"
    assert drawn["bn"].lines[0].get_markerfacecolor() != "white"
    assert any("off scale: none 30.1" in t.get_text() for t in ax.texts)


def test_batch_size_true_counts_the_runs_that_reached_stop_at_and_their_median_steps():
    bst = experiment("batch_size_true")
    runs = pd.DataFrame({
        "run": list("abcdef"), "status": ["ok", "ok", "ok", "ok", "diverged", "ok"],
        "norm": ["bn", "bn", "bn", "none", "none", "none"], "data.batch_size": [8, 8, 8, 128, 128, 8],
        "optim.stop_at": 0.99, "stop_at_reached.step": [100.0, 300.0, None, 50.0, None, 900.0]})
    t = bst.fit_steps(runs).set_index(["norm", "data.batch_size"])
    assert (t.loc[("bn", 8), "runs"], t.loc[("bn", 8), "reached"], t.loc[("bn", 8), "median_steps"]) == (3, 2, 200.0)
    assert (t.loc[("none", 128), "runs"], t.loc[("none", 128), "reached"]) == (2, 1)  # a diverged run counts
    lines = bst.fit_statements(runs)
    assert lines[0] == "BN reached 99% clean training accuracy at batch 8: 2 of 3, median 200 steps"
    assert lines[1].endswith("batch 8: 1 of 1, median 900 steps; batch 128: 1 of 2, median 50 steps")
    assert bst.fit_statements(runs.drop(columns="stop_at_reached.step")) == []  # records before stop_at


@pytest.mark.parametrize("gaps, systematic", [([-0.6, -0.5, -0.3, -0.4], True), ([-0.6, 0.5, -0.3, 0.4], False)])
def test_noniid_gn_sorting_calls_a_one_signed_gap_systematic_and_a_mixed_one_rounding(gaps, systematic):
    """GN under sorted16g10 vs pk2x16g5, paired by seed: the hand interval of the gaps decides."""
    from bnexp.analysis.study import StudyData
    from scipy import stats

    nn = experiment("noniid")
    rows = [{"run": f"{s}{seed}", "norm": "gn", "sampler": s, "status": "ok", "seed": seed,
             "test_acc": 0.85 + (g / 100 if s == "sorted16g10" else 0.0), "train_acc.train_mode": 0.995}
            for seed, g in enumerate(gaps) for s in ("pk2x16g5", "sorted16g10")]
    text = nn.gn_sorting(StudyData(None, "cmd", pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()))
    mean = sum(gaps) / len(gaps)
    half = stats.t.ppf(0.975, len(gaps) - 1) * pd.Series(gaps).std() / len(gaps) ** 0.5
    assert f"{mean:+.1f} points [{mean - half:+.1f}, {mean + half:+.1f}]" in text
    assert ("a systematic effect" in text) is systematic
    assert ("consistent with the rounding explanation" in text) is (not systematic)


def test_bn_vs_dropout_bn_vs_none_reads_the_gap_and_test_accuracy_at_p0():
    """BN against none at p = 0: the gap (primary, lower is the claim) and test accuracy, paired
    by seed, each difference the hand mean of the per-seed differences; the dropout runs and the
    other placements (the same net at p = 0) do not enter."""
    from bnexp.analysis.study import StudyData

    rows = []
    for seed, (gap_bn, gap_none, acc_bn, acc_none) in enumerate(
            [(0.10, 0.16, 0.85, 0.83), (0.11, 0.15, 0.86, 0.83), (0.09, 0.17, 0.85, 0.82),
             (0.12, 0.16, 0.84, 0.83), (0.10, 0.18, 0.86, 0.81)]):
        for norm, gap, acc in (("bn", gap_bn, acc_bn), ("none", gap_none, acc_none)):
            for place in ("before_norm", "after_norm"):
                for p, shift in ((0.0, 0.0), (0.5, 0.3)):  # p = 0.5 rows would move the means
                    rows.append({"run": f"{norm}-{place}-{p}-{seed}", "seed": seed, "norm": norm,
                                 "status": "ok", bn_vs_dropout.P: p, bn_vs_dropout.PLACE: place,
                                 "gen_gap": gap + shift, "test_acc": acc - shift, "train_acc": 1.0,
                                 "clean_train_acc": 1.0, "converged": seed > 0 or norm == "bn"})
    v = bn_vs_dropout.bn_narrows_gap(StudyData(Path("."), "", pd.DataFrame(rows), pd.DataFrame(),
                                               pd.DataFrame()))
    gap = (0.10 + 0.11 + 0.09 + 0.12 + 0.10 - 0.16 - 0.15 - 0.17 - 0.16 - 0.18) / 5 * 100  # -6.0
    acc = (0.85 + 0.86 + 0.85 + 0.84 + 0.86 - 0.83 - 0.83 - 0.82 - 0.83 - 0.81) / 5 * 100  # +2.8
    # none's seed 0 did not converge: the label is the equal-budget one, and says so
    assert v.label == "shown at equal budget" and f"difference {gap:+.1f} points" in v.text
    assert "Also: " in v.text and f"difference {acc:+.1f} points" in v.text.split("Also: ")[1]
    assert "test accuracy" in v.text.split("Also: ")[1] and "5 of 5 seeds" in v.text
    every = pd.DataFrame(rows).assign(converged=True)  # every seed of both arms converged
    v = bn_vs_dropout.bn_narrows_gap(StudyData(Path("."), "", every, pd.DataFrame(), pd.DataFrame()))
    assert v.label == "shown" and f"difference {gap:+.1f} points" in v.text


BF16_GAPS = [-1.0, -1.2, -0.9, -1.1, -1.0]
BF16_GAPS_SCATTERED = [-0.42, 0.11, -0.69, -0.08, 0.23]  # the committed bf16 runs: holds 0


def _gn_pair_rows(gaps, precision="bf16", late=()):
    nn = experiment("noniid")
    return pd.DataFrame([{"run": f"{s}{seed}", "norm": "gn", "sampler": s, "status": "ok", "seed": seed,
                          "precision": precision, "test_acc": 0.85 + (g / 100 if s == "sorted16g10" else 0.0),
                          "train_acc.train_mode": 0.98 if (s, seed) in late else 0.995}
                         for seed, g in enumerate(gaps) for s in nn.GN_PAIR])


@pytest.mark.parametrize("fp32_gaps, reading", [
    ([0.3, -0.2, 0.2, -0.4, 0.2], "the reduced-precision sums explain it"),
    ([-1.0, -1.3, -0.8, -1.1, -0.9], "reduced precision does not explain it"),
    ([1.0, 1.3, 0.8, 1.1, 0.9], "a gap of the other sign"),
    ([-3.0, 1.0, -2.0, 0.5, -1.5], "inconclusive"),
    # the committed re-run's shape: bf16 holds 0, fp32 a small gap of the same mean
    ([-0.23, -0.11, -0.23, -0.06, -0.18], "the gap has the same sign at both precisions"),
    ([0.3], "too few to read")])
def test_noniid_fp32_check_says_whether_bf16_explains_the_gn_gap(fp32_gaps, reading):
    """The fp32 pair beside a bf16 gap that excludes 0: its own paired interval and its change
    from bf16 on the shared seeds (both by hand) decide the reading."""
    from scipy import stats

    nn = experiment("noniid")
    low = BF16_GAPS_SCATTERED if reading.startswith("the gap has the same sign") else BF16_GAPS
    text = nn.fp32_sentence(_gn_pair_rows(low), _gn_pair_rows(fp32_gaps, "fp32", late={("sorted16g10", 0)}))
    assert reading in text
    if len(fp32_gaps) < 2:
        return
    def interval(xs):
        m, h = sum(xs) / len(xs), stats.t.ppf(0.975, len(xs) - 1) * pd.Series(xs).std() / len(xs) ** 0.5
        return f"{m:+.1f} points [{m - h:+.1f}, {m + h:+.1f}]"
    change = [f - b for f, b in zip(fp32_gaps, low)]
    assert interval(fp32_gaps) in text and f"fp32 minus bf16 on the 5 seeds both have: {interval(change)}" in text
    assert "sorted16g10: 4 of 5 runs at >= 99%" in text and "(`gn_fp32`, 5 seeds)" in text
    if low is BF16_GAPS_SCATTERED:  # 5 of 5 one way: two-sided sign test 2 / 2**5
        assert f"5 of 5 its way is a sign test p of {2 / 2 ** 5:.2g}" in text


def test_noniid_fp32_runs_that_did_not_train_at_fp32_are_not_read():
    nn = experiment("noniid")
    assert "not read" in nn.fp32_sentence(_gn_pair_rows(BF16_GAPS), _gn_pair_rows(BF16_GAPS, "bf16"))


def test_lr_sensitivity_reads_equal_at_small_lr_on_the_longer_budget_and_keeps_it_out_of_the_grid():
    """grid.extra's longer runs are set apart (the grid's table and figures keep one budget); the
    primary contrast is BN - none at their lr (hand-paired mean), the grid's smallest lr follows."""
    from bnexp.analysis.study import StudyData

    lrs = experiment("lr_sensitivity")
    rows = []
    for seed, jitter in enumerate([0.0, 0.002, -0.001, 0.001, -0.002]):
        for norm in ("bn", "none"):
            for lr, epochs, acc in ((0.001, 20, {"bn": 0.60, "none": 0.30}), (0.01, 20, {"bn": 0.85, "none": 0.80}),
                                    (0.01, 80, {"bn": 0.900, "none": 0.896})):
                rows.append({"run": f"{norm}-{lr}-{epochs}-{seed}", "seed": seed, "norm": norm, "status": "ok",
                             lrs.LR: lr, lrs.EPOCHS: epochs, "test_acc": acc[norm] + (jitter if norm == "bn" else 0),
                             "train_acc": 1.0, "clean_train_acc": 1.0, "converged": epochs == 80,
                             "scale_name": "small", "grid.small.epochs": 20, "grid.small.long_epochs": 80,
                             "grid.small.long_lr": 0.01})
    d = lrs.prepare(StudyData(Path("."), "", pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame()))
    assert set(d.runs[lrs.EPOCHS]) == {20} and len(d.runs) == 20 and set(d.extra[lrs.LONG][lrs.EPOCHS]) == {80}
    v = lrs.equal_at_small_lr(d)
    long_diff = 100 * (0.900 - 0.896)  # jitters sum to 0 over the seeds
    assert v.label == "shown" and f"difference {long_diff:+.1f} points" in v.text
    assert "80 epochs" in v.text.split("Also: ")[0]
    also = v.text.split("Also: ")[1]
    assert "learning rate 0.001" in also and f"difference {100 * (0.60 - 0.30):+.1f} points" in also
    assert "At lr 0.01 for 80 epochs" in lrs.long_statements(d)[0] and "10 runs at lr 0.01" in lrs.long_note(d)
    # the long runs are told by the recorded grid.<scale>.long_* settings, not by having more
    # epochs: a grid run at more epochs (a command-line optim.epochs) stays in the grid
    more = pd.DataFrame(rows).assign(**{lrs.EPOCHS: lambda r: r[lrs.EPOCHS].replace(20, 120),
                                        "grid.small.epochs": 120})
    assert lrs.is_long(more).sum() == 10 and set(more[lrs.is_long(more)][lrs.EPOCHS]) == {80}
    assert not lrs.is_long(pd.DataFrame(rows).drop(columns="grid.small.long_epochs")).any()
    # without the longer runs: the grid's smallest lr, as before
    grid_only = lrs.prepare(StudyData(Path("."), "", d.runs.copy(), pd.DataFrame(), pd.DataFrame()))
    assert lrs.LONG not in grid_only.extra and "learning rate 0.001" in lrs.equal_at_small_lr(grid_only).text


def test_stat_modes_names_the_ghost_update_used_and_the_per_chunk_momentum():
    """The report says which running-statistics update the ghost BN runs used; for the per-step
    one it gives the per-chunk alternative's effective momentum, 1 - 0.9^(128 / 2) by hand."""
    runs = pd.DataFrame({"norm.virtual_batch": [2, 128], "norm.momentum": 0.1, "data.batch_size": 128,
                         "norm.ghost_update": "step"})
    text = stat_modes_vs_batch.ghost_update_note(runs)
    assert "once per step" in text and f"= {1 - 0.9 ** 64:.3f} per step at NBS 2" in text
    chunked = stat_modes_vs_batch.ghost_update_note(runs.assign(**{"norm.ghost_update": "chunk"}))
    assert "once per chunk" in chunked and "effective momentum" not in chunked
    assert stat_modes_vs_batch.ghost_update_note(runs.drop(columns="norm.ghost_update")) == ""
    # a null momentum (cumulative average) and records without the setting
    cumulative = stat_modes_vs_batch.ghost_update_note(runs.assign(**{"norm.momentum": None}))
    assert "cumulative average" in cumulative and "effective momentum" not in cumulative
    assert stat_modes_vs_batch.ghost_update_note(runs.assign(**{"norm.ghost_update": None})) == ""


def test_noniid_curves_are_drawn_per_epoch_so_seeds_with_different_steps_per_epoch_average():
    """A sampler's steps per epoch differ between seeds (16-18 batches from a seed's 3,000
    images): per step each point would hold one seed. Per epoch every point is the seeds' mean."""
    from bnexp.analysis.study import StudyData

    nn = experiment("noniid")
    rows = [{"run": f"gn{seed}", "norm": "gn", "sampler": "iid", "status": "ok", "seed": seed,
             "epoch": epoch, "step": epoch * per_epoch, "test_acc": acc, "test_acc.ema": acc}
            for seed, per_epoch, accs in ((0, 16, (0.70, 0.80)), (1, 18, (0.74, 0.86)))
            for epoch, acc in zip((4, 8), accs)]
    curves = pd.DataFrame(rows)
    runs = curves.groupby("run").last().reset_index()
    d = StudyData(None, "cmd", runs, curves, pd.DataFrame(), extra={"long": pd.DataFrame({"norm": []})})
    ax = nn.figures(d)["test_acc_curves_iid"].axes[0]
    line = next(l for l in ax.get_lines() if l.get_label() == "gn / ema")
    assert list(line.get_xdata()) == [4, 8] and ax.get_xlabel().lower().startswith("epoch")
    assert line.get_ydata() == pytest.approx([72.0, 83.0])


def test_batch_size_true_title_reads_the_budget_and_each_norms_lr_from_the_records():
    """The figure's title comes from the runs: until stop_at (capped) or equal epochs, and each
    norm's own base lr (the tuned ones differ from BN's), not a fixed 'equal epochs, lr 0.1'."""
    bst = experiment("batch_size_true")
    runs = pd.DataFrame({"norm": ["bn", "bn", "ln", "none"], "optim.lr": [0.1, 0.1, 0.03, 0.01],
                         "optim.stop_at": 0.99, "optim.epochs": 154, "optim.warmup_epochs": 1,
                         "optim.ref_batch_size": 128})
    assert bst.budget_title(runs) == ("until 99% clean train accuracy (cap 154 epochs)\n"
                                      "lr = base x batch / 128 (bn 0.1, ln 0.03, none 0.01) after 1 warmup epoch")
    equal = runs.assign(**{"optim.stop_at": None, "optim.epochs": 15, "optim.warmup_epochs": 0})
    assert bst.budget_title(equal) == "equal epochs (15)\nlr = base x batch / 128 (bn 0.1, ln 0.03, none 0.01)"
