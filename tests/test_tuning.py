"""Per-arm lr selection: the rule (bnexp.lr_choice) against an independent argmax, and
the whole tuning (bnexp.jobs.tuning) on tiny synthetic runs: choice, lr_choice.json, the final
sweep at the chosen lrs, the analysis' view of it, and skip/resume of the grid."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bnexp import records
from bnexp import lr_choice
from bnexp.analysis.tables import expected_run_names
from bnexp.jobs import tuning

ROOT = Path(__file__).resolve().parents[1]


def ok(acc, loss=1.0):
    return {"status": "ok", "metrics": {"val_acc": acc, "val_loss": loss}}


def test_choice_is_the_argmax_of_mean_val_acc_with_failures_as_zero():
    grid = {0.01: [ok(0.80), ok(0.84)], 0.03: [ok(0.90), {"status": "diverged"}],
            0.003: [ok(0.70), ok(0.72)], 0.1: [{"status": "failed"}, {"status": "diverged"}]}
    means = {0.01: 0.82, 0.03: 0.45, 0.003: 0.71, 0.1: 0.0}  # by hand: diverged/failed count 0
    entry = lr_choice.choose_lr(grid)
    assert entry["chosen_lr"] == max(means, key=means.get) == 0.01
    assert entry["val_acc"] == pytest.approx({repr(k): v for k, v in means.items()})
    assert entry["failed"][repr(0.03)] == 1 and entry["val_loss"][repr(0.1)] is None
    assert entry["edge"] is None and entry["grid"] == [0.003, 0.01, 0.03, 0.1]


@pytest.mark.parametrize("best, edge", [(0.003, "low"), (0.03, "high")])
def test_an_optimum_at_the_grid_edge_is_flagged(best, edge):
    grid = {lr: [ok(0.9 if lr == best else 0.5)] for lr in (0.003, 0.01, 0.03)}
    entry = lr_choice.choose_lr(grid)
    assert entry["chosen_lr"] == best and entry["edge"] == edge and "not bracketed" in entry["why"]
    assert lr_choice.edge_warnings({"none": entry})
    assert lr_choice.choose_lr({0.1: [ok(0.9)]})["edge"] == "grid"


def test_ties_go_to_the_lower_val_loss_then_the_smaller_lr():
    assert lr_choice.choose_lr({0.01: [ok(0.9, 0.5)], 0.03: [ok(0.9, 0.4)], 0.1: [ok(0.2)]})["chosen_lr"] == 0.03
    assert lr_choice.choose_lr({0.01: [ok(0.9, 0.4)], 0.03: [ok(0.9, 0.4)], 0.1: [ok(0.2)]})["chosen_lr"] == 0.01


def test_an_unfinished_or_unsplit_run_cannot_be_chosen_from():
    with pytest.raises(ValueError, match="cannot choose"):
        lr_choice.choose_lr({0.01: [{"status": "ok", "metrics": {"test_acc": 0.9}}]})
    with pytest.raises(ValueError, match="cannot choose"):
        lr_choice.choose_lr({0.01: [{"status": "incomplete"}]})


TINY_STUDY = ["data=synthetic", "scale=smoke", "data.synthetic_train=300", "data.synthetic_test=100",
              "optim.epochs=1", "model.width=8", "eval.modes=[ema]", "probes.enabled=false",
              "precision=fp32", "device=cpu", "threads=1", "progress=off", "grid.smoke.seed=0"]


def launcher(calls):
    def launch(args):
        calls.append(list(args))
        subprocess.run([sys.executable, "-m", "bnexp", "-m", *args], cwd=ROOT, check=True,
                       capture_output=True)
    return launch


@pytest.mark.slow  # ~100 s on the shared 2 cores: 10 bnexp processes (most of it their start-up)
def test_tuning_end_to_end_on_tiny_runs(tmp_path):
    overrides = [*TINY_STUDY, f"results_dir={tmp_path}"]
    spec = tuning.read_spec("norm_vs_noise", overrides, ROOT)
    assert spec.arm_key == "norm" and "none" in spec.lrs and spec.arms[0] == "none"
    spec = dataclasses.replace(spec, lrs={"none": (0.003, 0.05, 0.3), "bn": (0.1,)}, seeds=(7,),
                               val_size=60, arms=("none", "bn", "ln"), extra=())
    calls = []
    out = tuning.run(spec, overrides, launcher(calls))
    assert len(calls) == 2 + len(out["sweeps"])  # one grid sweep per tuned arm, then the final ones

    # independent: every grid summary on disk, grouped by (arm, lr), argmax of mean val_acc
    table = {}
    for run_dir in records.iter_run_dirs(spec.grid_dir):
        s = records.read_summary(run_dir)
        assert s["config"]["data"]["val_size"] == 60 and s["config"]["seed"] == 7
        key = (s["choices"]["norm"], s["config"]["optim"]["lr"])
        acc = s["metrics"]["val_acc"] if s["status"] == "ok" else 0.0
        table.setdefault(key, []).append(acc)
    assert len(table) == 4
    saved = json.loads((spec.study_dir / tuning.CHOICE_FILE).read_text())
    for arm in ("none", "bn"):
        means = {lr: sum(v) / len(v) for (a, lr), v in table.items() if a == arm}
        best = max(means.values())
        assert saved["arms"][arm]["chosen_lr"] in [lr for lr, m in means.items() if math.isclose(m, best)]
    assert saved["arms"]["bn"]["edge"] == "grid" and saved["untuned"] == ["ln"]

    # the final sweep: each arm at its chosen lr (ln at the study's), and the analysis sees all
    finals = {}
    for run_dir in records.iter_run_dirs(spec.study_dir):
        s = records.read_summary(run_dir)
        finals[s["choices"]["norm"]] = s["config"]["optim"]["lr"]
        assert s["config"]["data"]["val_size"] == 0
    assert finals == {"none": saved["arms"]["none"]["chosen_lr"], "bn": 0.1, "ln": 0.1}
    names = {p.name for p in records.iter_run_dirs(spec.study_dir)}
    assert set(expected_run_names(spec.study_dir)) == names

    # a re-run skips every finished grid run (and final run): nothing is trained again
    started = {p: records.read_summary(p)["started_at"] for p in records.iter_run_dirs(tmp_path)}
    again = tuning.run(spec, overrides, launcher([]))
    assert again["arms"] == out["arms"]
    assert {p: records.read_summary(p)["started_at"] for p in records.iter_run_dirs(tmp_path)} == started


def test_collect_keeps_this_launchs_grid_runs_whatever_the_swept_axes(tmp_path):
    """Grid runs are matched by their overrides: a value of an axis the study sweeps belongs, a
    run of another setting (other epochs) or not of the grid (val_size 0) does not."""
    spec = tuning.TuneSpec("demo", "norm", {"none": (0.01, 0.03)}, (100,), 50, ("bn", "none"),
                           tmp_path / "demo" / "synthetic-smoke", ("study", "threads", "launcher"),
                           swept=("data.batch_size", "norm", "seed"))
    base = ["study=demo", "data=synthetic", "optim.epochs=2"]

    def fake(name, lr, batch, epochs=2, val=50):
        run = spec.grid_dir / "runs" / name
        run.mkdir(parents=True)
        overrides = ["study=demo", "threads=1", f"data.batch_size={batch}", "norm=none", "seed=100",
                     "data=synthetic", f"optim.epochs={epochs}", f"optim.lr={lr}", f"data.val_size={val}",
                     "probes.enabled=False"]
        records.write_json_atomic(run / records.SUMMARY, {
            "status": "ok", "overrides": overrides, "choices": {"norm": "none"},
            "config": {"seed": 100, "optim": {"lr": lr}, "data": {"val_size": val}},
            "metrics": {"val_acc": 0.5, "val_loss": 1.0}})

    for i, (lr, batch) in enumerate([(0.01, 8), (0.01, 128), (0.03, 8), (0.03, 128)]):
        fake(f"r{i}", lr, batch)
    fake("other_epochs", 0.01, 8, epochs=3)
    fake("no_split", 0.03, 8, val=0)
    found = tuning.collect(spec, base)
    assert {lr: sorted(r["run"] for r in runs) for lr, runs in found["none"].items()} == \
        {0.01: ["r0", "r1"], 0.03: ["r2", "r3"]}
    with pytest.raises(RuntimeError, match="unfinished"):
        tuning.collect(dataclasses.replace(spec, seeds=(100, 101)), base)


def test_the_report_note_names_each_arms_lr_and_its_edge(tmp_path):
    arms = lr_choice.choose_all({"none": {lr: [ok(a)] for lr, a in ((0.003, 0.9), (0.01, 0.8), (0.03, 0.7))},
                                 "bn": {lr: [ok(a)] for lr, a in ((0.03, 0.8), (0.1, 0.9), (0.3, 0.7))}})
    records.write_json_atomic(tmp_path / lr_choice.CHOICE_FILE, {
        "arms": arms, "untuned": ["ln"], "seeds": [100], "val_size": 50, "rule": lr_choice.RULE})
    text = lr_choice.note(tmp_path)
    assert "none at lr 0.003" in text and "low edge" in text and "bn at lr 0.1 (" in text
    assert "bn at lr 0.1 (grid 0.03, 0.1, 0.3; mean val_acc 0.800, 0.900, 0.700)" in text
    assert "(ln) at the study's lr" in text and lr_choice.note(tmp_path / "none") == ""


def test_extra_launches_follow_the_chosen_ones_and_are_recorded_in_lr_choice(tmp_path, monkeypatch):
    """grid.tune.extra: more launches of untuned arms (more seeds for a contrast), run after the
    chosen-lr launches, recorded in lr_choice.json's sweeps and expanded by the analysis."""
    spec = tuning.TuneSpec("norm_vs_noise", "norm", {"none": (0.01, 0.03)}, (100,), 50, ("none", "bn", "pn"),
                           tmp_path / "norm_vs_noise" / "synthetic-smoke", (),
                           extra=(("norm=pn,bn", "seed=5,6"),))
    monkeypatch.setattr(tuning, "collect", lambda *_: {"none": {0.01: [ok(0.8)], 0.03: [ok(0.7)]}})
    calls = []
    out = tuning.run(spec, ["data=synthetic"], calls.append)
    assert out["sweeps"] == [["norm=none", "optim.lr=0.01"], ["norm=bn,pn"], ["norm=pn,bn", "seed=5,6"]]
    assert calls[1:] == [["study=norm_vs_noise", "data=synthetic", *s] for s in out["sweeps"]]  # after the grid
    # the analysis expands every launch as it ran, from any one launch's recorded task
    from bnexp.analysis.tables import _launches
    for task in calls[1:]:
        assert _launches(spec.study_dir, task) == calls[1:]


@pytest.mark.parametrize("launch", [["norm=none", "seed=5"], ["seed=5"], ["norm=bn", "optim.lr=0.3"],
                                    ["norm=pn", "bn", "seed=5"]])  # the unquoted YAML list norm=pn,bn
def test_an_extra_launch_of_a_tuned_arm_or_with_an_lr_is_one_clear_error(launch, tmp_path):
    from bnexp.config import ConfigError

    ov = ["data=synthetic", "scale=smoke", f"results_dir={tmp_path}",
          "+grid.tune={arm: norm, lr: {none: [0.01, 0.03]}, seeds: [100], val_size: 50, extra: [["
          + ",".join(f"'{o}'" for o in launch) + "]]}"]
    with pytest.raises(ConfigError, match="grid.tune.extra launch"):
        tuning.read_spec("norm_vs_noise", ov, ROOT)


def test_norm_vs_noise_small_tunes_the_arms_without_bn_layers_and_gives_pn_and_bn_ten_seeds(tmp_path):
    """The issue-26 design: none, none + GNI, LN, LN + GNI and PN online tuned on a bracketing grid (>= 3
    lrs), every BN-layer arm at BN's lr, and the extra launch adds 5 seeds to PN and BN only."""
    spec = tuning.read_spec("norm_vs_noise", ["data=fashion_mnist", "scale=small", f"results_dir={tmp_path}"], ROOT)
    assert set(spec.lrs) == {"none", "none_gni16", "ln", "ln_gni16", "pn_online"}
    assert all(len(lrs) >= 3 and min(lrs) < max(lrs) for lrs in spec.lrs.values())
    assert {"pn", "bn", "ghost_bn16", "bn_gni16", "pn_gni16"} <= set(spec.arms) - set(spec.lrs)
    (launch,) = spec.extra
    extra = dict(o.split("=", 1) for o in launch)
    assert set(extra["norm"].split(",")) == {"pn", "bn"}
    study_seeds = {0, 1, 2, 3, 4}
    assert len(study_seeds | {int(s) for s in extra["seed"].split(",")}) == 10


def test_grid_extra_launches_run_after_an_untuned_study_and_override_the_keys_they_name(tmp_path, monkeypatch):
    """grid.extra (a study without grid.tune): each launch runs after the study's sweep, its keys
    replacing the command line's; interpolations resolve per scale; a malformed one is one error."""
    from bnexp.config import ConfigError

    ov = ["data=synthetic", "scale=smoke", f"results_dir={tmp_path}", "optim.epochs=3",
          "++grid.extra=[['optim.lr=0.02', 'optim.epochs=${grid.${scale_name}.epochs}']]"]
    assert tuning.read_extra("lr_sensitivity", ov) == [["optim.lr=0.02", "optim.epochs=4"]]
    calls = []
    monkeypatch.setattr(tuning.subprocess, "run", lambda cmd, **kw: calls.append(cmd[4:]))
    tuning.sweep("lr_sensitivity", ov, ROOT)
    assert calls == [["study=lr_sensitivity", *ov],
                     ["study=lr_sensitivity", *[o for o in ov if not o.startswith("optim.epochs")],
                      "optim.lr=0.02", "optim.epochs=4"]]
    assert tuning.read_extra("batch_size", ov[:3]) == []  # declares none
    with pytest.raises(ConfigError, match="grid.extra of study lr_sensitivity"):
        tuning.read_extra("lr_sensitivity", [*ov[:4], "++grid.extra=[optim.lr]"])
