"""Shadow EMAs (eval.ema_momenta): one run scores the EMA at several momenta.

The oracle is the design they replace: separate runs with norm.momentum set to each momentum.
The momentum never changes the weights, so each shadow must equal that run's running statistics,
and keeping shadows must change nothing else in the run.
"""
from __future__ import annotations

import pytest
import torch

from bnexp.layers import ema_shadows
from bnexp.layers import norms
from bnexp.layers.batchnorms import BatchNorm2d
from bnexp.config import ConfigError, parse_config, to_dict
from bnexp.training.assemble import load_run
from bnexp.training.fit import fit
from conftest import TINY, make_config

MOMENTA = [0.01, 0.4, None]
BUFFERS = ("running", "num_batches", "shadow")  # state-dict keys that are not weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with shadows at MOMENTA beside momentum 0.1, and one plain run per momentum."""
    root = tmp_path_factory.mktemp("shadows")
    out = {}
    for name, extra in [("shadows", ["norm.momentum=0.1", "eval.ema_momenta=[0.01,0.4,null]"]),
                        ("m0.1", ["norm.momentum=0.1"]), ("m0.01", ["norm.momentum=0.01"]),
                        ("m0.4", ["norm.momentum=0.4"]), ("mNone", ["norm.momentum=null"])]:
        (root / name).mkdir()
        summary = fit(make_config([*TINY, "eval.modes=[ema]", *extra]), root / name)
        out[name] = (summary, load_run(root / name).model)
    return out


def test_each_shadow_equals_the_running_statistics_of_a_run_at_that_momentum(runs):
    _, model = runs["shadows"]
    for k, m in enumerate(MOMENTA):
        _, plain = runs[f"m{m}"]
        for (name, a), (_, b) in zip(norms.bn_layers(model), norms.bn_layers(plain)):
            assert torch.allclose(a.shadow_mean[k], b.running_mean, rtol=1e-4, atol=1e-5), (m, name)
            assert torch.allclose(a.shadow_var[k], b.running_var, rtol=1e-4, atol=1e-5), (m, name)


def test_shadow_modes_score_what_the_separate_runs_score(runs):
    summary, _ = runs["shadows"]
    for m in MOMENTA:
        plain = runs[f"m{m}"][0]["metrics"]
        mode = ema_shadows.mode_name(m)
        assert summary["metrics"][f"test_acc.{mode}"] == pytest.approx(plain["test_acc.ema"], abs=1 / 256)
        assert summary["metrics"][f"test_loss.{mode}"] == pytest.approx(plain["test_loss.ema"], rel=1e-3)


def test_keeping_shadows_changes_nothing_else(runs):
    (with_shadows, a), (plain, b) = runs["shadows"], runs["m0.1"]
    for key in ("train_loss", "train_acc", "test_acc.ema", "test_loss.ema"):
        assert with_shadows["metrics"][key] == plain["metrics"][key], key
    sb = b.state_dict()
    for key, value in a.state_dict().items():
        if "shadow" not in key:  # every weight and BN buffer
            assert torch.equal(value, sb[key]), key


def test_the_momentum_does_not_change_the_weights(runs):
    # what makes one run per seed enough: train-mode BN never reads its running statistics
    weights = [{k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith(BUFFERS)}
               for _, model in runs.values()]
    assert len(weights) == 5 and len(weights[0]) > 4
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in weights[0])


def test_cumulative_shadow_is_the_mean_of_the_batch_statistics_and_other_passes_leave_it():
    torch.manual_seed(0)
    layer = BatchNorm2d(3, momentum=0.1)
    ema_shadows.attach(torch.nn.Sequential(layer), [None, 1.0])
    batches = [torch.randn(8, 3, 4, 4) * (i + 1) + i for i in range(5)]
    layer.train()
    for x in batches:
        layer(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches])
    assert torch.allclose(layer.shadow_mean[0], means.mean(0), atol=1e-5)
    assert torch.allclose(layer.shadow_var[0], variances.mean(0), rtol=1e-5)
    assert torch.allclose(layer.shadow_var[1], variances[-1], rtol=1e-5)  # momentum 1: the last batch
    before = layer.shadow_mean.clone(), layer.shadow_var.clone()
    layer.momentum = 0.0  # a probe or precise pass
    layer(batches[0] + 5)
    layer.momentum = 0.1
    layer.eval()
    layer(batches[0] + 5)
    layer.train()
    layer.frozen = True
    layer(batches[0] + 5)
    assert torch.equal(layer.shadow_mean, before[0]) and torch.equal(layer.shadow_var, before[1])
    assert int(layer.shadow_count[0]) == len(batches)


def test_mode_names_and_bad_settings():
    assert [ema_shadows.mode_name(m) for m in MOMENTA] == ["ema_m0p01", "ema_m0p4", "ema_cumulative"]
    with pytest.raises(ConfigError, match="eval.ema_momenta"):
        make_config([*TINY, "eval.ema_momenta=[1.5]"])
    with pytest.raises(ConfigError, match="eval.ema_momenta needs BatchNorm"):
        ema_shadows.attach(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), [0.1])


def test_a_config_saved_before_ema_momenta_existed_still_parses():
    saved = to_dict(make_config(TINY))
    del saved["eval"]["ema_momenta"]
    assert parse_config(saved).eval.ema_momenta == ()
