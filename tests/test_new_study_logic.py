"""The smoothness, robustness and lr_sensitivity scripts' own numbers against hand computations."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import lr_sensitivity  # noqa: E402
import robustness  # noqa: E402
import smoothness  # noqa: E402


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
