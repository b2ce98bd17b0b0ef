"""optim.warmup_epochs against the closed form, and model.init=lsuv against
independent measurements."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnexp import records
from bnexp.config import ConfigError
from bnexp.data.datasets import load_data, normalize
from bnexp.layers import init as weight_init
from bnexp.layers.models import build_model
from bnexp.layers.norms import make_norm
from bnexp.training import fit as train
from conftest import TINY, make_config


def closed_form(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from peak / warmup to peak over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_warmup_then_cosine_lr_at_every_step():
    cfg = make_config([*TINY, "optim.epochs=3", "optim.warmup_epochs=1.5", "optim.lr=0.2"])
    model = nn.Linear(3, 2)
    opt = train.make_optimizer(model, cfg.optim, cfg.data.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_factor(cfg.optim, steps_per_epoch=4))
    for step in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(step, 0.2, 6, 12)), step
        opt.step()
        sched.step()


def test_a_run_with_warmup_records_the_closed_form_lr_per_epoch(tmp_path):
    cfg = make_config([*TINY, "optim.epochs=3", "optim.warmup_epochs=1", "optim.lr=0.05", "checkpoint=false"])
    train.fit(cfg, tmp_path)
    steps = 512 // 64
    rows = records.read_jsonl(tmp_path / records.METRICS)
    assert [r["lr"] for r in rows] == pytest.approx([closed_form(e * steps, 0.05, steps, 3 * steps)
                                                     for e in range(3)])


def images(n: int, seed: int = 0) -> torch.Tensor:
    data = load_data(make_config(TINY).data, "cpu", seed=seed)
    return normalize(data.train.x[:n], data.mean, data.std, channels_last=False)


def unnormalized_vgg(depth: int = 8) -> nn.Module:
    cfg = make_config([*TINY, "norm=none", f"model.depth={depth}", "model.width=8"])
    torch.manual_seed(0)
    return build_model(cfg.model, make_norm(cfg.norm), 10, 3, 32)


def variances(model: nn.Module, x: torch.Tensor) -> dict:
    """Every conv / linear output's variance in ONE forward pass (eval mode)."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, o.var().item())))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_gives_unit_output_variance_in_every_layer():
    model, x = unnormalized_vgg(), images(256)
    reported = weight_init.apply(model, "lsuv", lambda: x)
    assert model.training  # the flag is restored
    measured = variances(model, x)
    assert len(measured) == 9 and set(measured) == set(reported)  # 8 convs and the head
    assert all(abs(v - 1) < 0.05 for v in measured.values()), measured
    held_out = variances(model, images(512)[256:])  # other images of the same distribution
    assert all(abs(v - 1) < 0.3 for v in held_out.values()), held_out


def test_model_init_is_checked_and_lsuv_runs_in_fit(tmp_path):
    with pytest.raises(ConfigError, match="model.init"):
        make_config([*TINY, "model.init=xavier"])
    summary = train.fit(make_config([*TINY, "norm=none", "model.init=lsuv", "optim.epochs=1",
                                     "checkpoint=false"]), tmp_path)
    assert summary["status"] == "ok" and summary["config"]["model"]["init"] == "lsuv"
