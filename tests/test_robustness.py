"""Corruption scoring against the eval modes run by hand on independently corrupted sets, the
summary keys against a hand average, and steps to target against the epoch rows of a run."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bnexp import records
from bnexp.data import corruptions as C
from bnexp.data.datasets import Split
from bnexp.measure import modes as stats
from bnexp.measure import robustness
from bnexp.training import targets
from test_stats import model_state, tiny_setup


def test_corruption_table_equals_each_mode_run_on_the_corrupted_set_by_hand():
    cfg, model, data, pipe = tiny_setup(extra=["eval.corruptions=[contrast,noise]", "eval.severities=[2,5]",
                                               "eval.modes=[ema,precise,batch,batch_sorted,adapted]"])
    model.train()
    before = model_state(model)
    rows = robustness.corruption_table(model, data, pipe, cfg.eval, 16, cfg.seed)
    after = model_state(model)
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0]) and after[1:3] == before[1:3]
    assert len(rows) == 5 * (1 + 2 * 2)
    got = {(r["corruption"], r["severity"], r["mode"]): r["acc"] for r in rows}
    for name, severity in (("clean", 0), ("contrast", 5), ("noise", 2)):
        x = data.test.x if name == "clean" else C.corrupt(
            data.test.x, name, severity, C.corruption_generator(cfg.seed, name, severity, "cpu"))
        shifted = dataclasses.replace(data, test=Split(x, data.test.y))
        for mode in ("ema", "precise", "batch", "batch_sorted", "adapted"):
            want, _ = stats.run_mode(mode, model, shifted, pipe, cfg.eval, 16, cfg.seed)
            assert got[(name, severity, mode)] == pytest.approx(want["acc"]), (name, severity, mode)


def test_corruption_metrics_average_the_errors_by_hand():
    rows = [{"corruption": c, "severity": s, "mode": "batch", "acc": acc, "loss": 0.0}
            for c, s, acc in (("clean", 0, 0.9), ("blur", 1, 0.8), ("blur", 5, 0.5),
                              ("noise", 1, 0.7), ("noise", 5, 0.2))]
    m = robustness.corruption_metrics(rows)
    assert m["mean_corrupt_err.batch"] == pytest.approx((0.2 + 0.5 + 0.3 + 0.8) / 4)  # clean not counted
    assert m["corrupt_err.5.batch"] == pytest.approx((0.5 + 0.8) / 2)
    assert m["corrupt_acc.noise.1.batch"] == 0.7 and "corrupt_acc.clean.0.batch" not in m


def test_a_model_without_bn_is_scored_once_per_set():
    cfg, model, data, pipe = tiny_setup("none", ["eval.corruptions=[blur]", "eval.severities=[3]"])
    rows = robustness.corruption_table(model, data, pipe, cfg.eval, 16, cfg.seed)
    assert {r["mode"] for r in rows} == {"ema"} and len(rows) == 2


def test_first_step_reads_the_first_row_at_or_above_the_target():
    history = [{"step": 10, "train_acc.clean": 0.4, "test_acc": None},
               {"step": 20, "train_acc.clean": 0.85, "test_acc": 0.5},
               {"step": 30, "train_acc.clean": 0.8, "test_acc": None},
               {"step": 40, "train_acc.clean": 0.95, "test_acc": 0.81}]
    got = targets.steps_to(history, [0.5, 0.8, 0.9, 0.99])
    assert got == {"steps_to.train_acc.0.5": 20, "steps_to.train_acc.0.8": 20, "steps_to.train_acc.0.9": 40,
                   "steps_to.train_acc.0.99": None, "steps_to.test_acc.0.5": 20, "steps_to.test_acc.0.8": 40,
                   "steps_to.test_acc.0.9": None, "steps_to.test_acc.0.99": None}


def test_a_run_records_clean_train_accuracy_steps_to_target_and_corruptions(tmp_path):
    from bnexp.training import fit as train
    from conftest import TINY, make_config

    cfg = make_config([*TINY, "optim.epochs=3", "checkpoint=false", "data.synthetic_train=256",
                       "data.batch_size=32", "data.synthetic_test=64", "eval.modes=[ema,batch]",
                       "eval.targets=[0.2,0.3,1.0]", "eval.corruptions=[pixelate]", "eval.severities=[5]"])
    summary = train.fit(cfg, tmp_path)
    rows = records.read_jsonl(tmp_path / records.METRICS)
    assert [r["step"] for r in rows] == [8, 16, 24]
    for t in (0.2, 0.3, 1.0):  # from the epoch rows, independently of targets.first_step
        hits = [r["step"] for r in rows if r["train_acc.clean"] >= t]
        assert summary["metrics"][f"steps_to.train_acc.{t:g}"] == (hits[0] if hits else None)
        hits = [r["step"] for r in rows if r["test_acc"] >= t]
        assert summary["metrics"][f"steps_to.test_acc.{t:g}"] == (hits[0] if hits else None)
    table = json.loads((tmp_path / records.CORRUPTIONS).read_text())
    assert {(r["corruption"], r["severity"], r["mode"]) for r in table} == {
        ("clean", 0, "ema"), ("clean", 0, "batch"), ("pixelate", 5, "ema"), ("pixelate", 5, "batch")}
    clean_ema = next(r["acc"] for r in table if r["corruption"] == "clean" and r["mode"] == "ema")
    assert clean_ema == pytest.approx(summary["metrics"]["test_acc.ema"])
    assert summary["metrics"]["mean_corrupt_err.batch"] == pytest.approx(
        1 - next(r["acc"] for r in table if r["severity"] == 5 and r["mode"] == "batch"))
