"""norm.affine: which of gamma and beta exist as parameters, per setting and norm; the forward is
unchanged at initialization; a run trains; the recorded quantiles match torch.quantile."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnexp.config import ConfigError
from bnexp.layers.norms import make_norm
from bnexp.measure.affine import affine_metrics, learned_affine
from conftest import make_config

KEPT = {"both": {"weight", "bias"}, "gamma": {"weight"}, "beta": {"bias"}, "none": set()}


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "ghost_bn", "batch_renorm", "pn"])
@pytest.mark.parametrize("affine", list(KEPT))
def test_affine_keeps_exactly_the_named_parameters_and_fixes_the_rest_at_one_and_zero(norm, affine):
    cfg = make_config([f"norm={norm}", f"norm.affine={affine}"])
    plain = make_norm(make_config([f"norm={norm}"]).norm)(8)
    layer = make_norm(cfg.norm)(8)
    assert {n for n, _ in layer.named_parameters()} == KEPT[affine]
    assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    x = torch.randn(4, 8, 3, 3)
    layer.train(), plain.train()
    assert torch.equal(layer(x), plain(x))  # the same function at init, parameters or not


def test_affine_names_the_allowed_values():
    with pytest.raises(ConfigError, match="norm.affine.*both, gamma, beta, none"):
        make_config(["norm.affine=scale"])


def test_learned_affine_rows_match_torch_quantile_and_skip_fixed_parameters():
    layer = make_norm(make_config(["norm.affine=gamma"]).norm)(10)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1, 2, 10))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), layer)
    rows = learned_affine(model)
    assert [(r["layer"], r["param"]) for r in rows] == [("1", "gamma")]
    values = np.linspace(-1, 2, 10)
    assert rows[0]["p50"] == pytest.approx(np.quantile(values, 0.5))
    assert rows[0]["p90"] == pytest.approx(np.quantile(values, 0.9))
    assert rows[0]["negative"] == pytest.approx(0.3)  # -1, -2/3, -1/3
    assert set(affine_metrics(model)) >= {"gamma.p50", "gamma.negative"}
    assert not any(k.startswith("beta.") for k in affine_metrics(model))


def test_a_run_without_gamma_and_beta_trains_and_records_none(tmp_path):
    from bnexp import records
    from bnexp.training import fit as train
    from conftest import TINY

    summary = train.fit(make_config([*TINY, "optim.epochs=2", "checkpoint=false", "data.synthetic_train=256",
                                     "data.batch_size=32", "data.synthetic_test=64", "eval.modes=[ema]",
                                     "norm.affine=none"]), tmp_path)
    assert summary["status"] == "ok"
    assert json.loads((tmp_path / records.AFFINE).read_text()) == []
    assert not any(k.startswith(("gamma.", "beta.")) for k in summary["metrics"])
