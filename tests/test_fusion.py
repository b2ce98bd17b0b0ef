"""BN folding: the folded net computes the unfolded one's eval-mode function; refusals are clear."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnexp.tools import fusion
from bnexp.training.checkpoint import save_model
from bnexp.config import to_dict
from bnexp.layers.models import build_model
from bnexp.layers.norms import make_norm
from conftest import TINY, make_config

FOLDABLE = ["bn", "ghost_bn", "batch_renorm", "noisy_bn"]
NORM_OPTS = {"ghost_bn": ["norm.virtual_batch=4"], "batch_renorm": ["norm.renorm_warmup=0"],
             "noisy_bn": ["norm.noise_mul=0.1", "norm.noise_add=0.1"]}


def trained_model(model_name: str, norm: str, steps: int = 4) -> nn.Module:
    """A small model after a few SGD steps in train mode: running statistics and BN affine
    parameters are far from their initial 0/1, so a wrong fold would show."""
    torch.manual_seed(0)
    extra = ["model.depth=8"] if model_name == "resnet" else []
    cfg = make_config([f"model={model_name}", "model.width=8", f"norm={norm}", "norm.momentum=0.5",
                       *NORM_OPTS.get(norm, []), *extra])
    model = build_model(cfg.model, make_norm(cfg.norm), 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 16, 16) * 1.5 + 0.3
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("norm", FOLDABLE)
@pytest.mark.parametrize("model_name", ["vgg", "resnet"])
def test_fused_logits_match_unfused(model_name, norm):
    model = trained_model(model_name, norm)
    bn_count = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert any((m.running_var - 1).abs().max() > 0.05 for m in model.modules() if isinstance(m, _BatchNorm))
    fused, folded = fusion.fuse_bn(model)
    assert folded == bn_count and not any(isinstance(m, _BatchNorm) for m in fused.modules())
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(16, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert expected.abs().max() > 0.1  # a non-trivial function
    assert (expected - got).abs().max().item() < 1e-4
    # the original keeps its BN layers (fusion works on a copy)
    assert sum(isinstance(m, _BatchNorm) for m in model.modules()) == bn_count


def test_resnet_shortcut_conv_and_bn_are_folded():
    model = trained_model("resnet", "bn", steps=1)
    fused, _ = fusion.fuse_bn(model)
    block = fused.features.stage2[0]
    assert isinstance(block.shortcut.norm, nn.Identity) and block.shortcut.conv.bias is not None
    # folded weight = conv weight * gamma / sqrt(var + eps), per output channel
    bn, conv = model.features.stage2[0].shortcut.norm, model.features.stage2[0].shortcut.conv
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(block.shortcut.conv.weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(block.shortcut.conv.bias, bn.bias - bn.running_mean * scale)


@pytest.mark.parametrize("norm,why", [("gn", "GroupNorm"), ("ln", "GroupNorm"), ("none", "no BatchNorm")])
def test_norms_that_cannot_fold_are_refused(norm, why):
    cfg = make_config(["model.width=8", f"norm={norm}"])
    model = build_model(cfg.model, make_norm(cfg.norm), 10).eval()
    with pytest.raises(fusion.FusionError, match=why) as err:
        fusion.fuse_bn(model)
    if norm != "none":
        assert "gn and ln cannot be folded" in str(err.value)


def saved_run(tmp_path, overrides=(), name="run"):
    """A run folder holding model.pt (a briefly trained tiny model) and nothing else."""
    cfg = make_config([*TINY, *overrides])
    model = trained_model(cfg.model.name, cfg.norm.name, steps=2) if cfg.norm.name == "bn" else \
        build_model(cfg.model, make_norm(cfg.norm), 10)
    run = tmp_path / name
    run.mkdir()
    save_model(run, model, to_dict(cfg), 10)
    return run


def test_fuse_run_writes_fused_json_per_mode(tmp_path):
    run = saved_run(tmp_path)
    for mode in ("ema", "precise"):
        row = fusion.fuse_run(run, mode=mode, device="cpu", warmup=0, repeats=1, timing_images=64)
        assert row["max_abs_logit_diff"] < 1e-4 and row["exact"]
        assert row["test_acc_after"] == row["test_acc_before"]
    on_disk = json.loads((run / fusion.FUSED).read_text())
    assert set(on_disk) == {"ema", "precise"}
    for mode, row in on_disk.items():
        assert set(fusion.ROW_KEYS) <= set(row) and row["mode"] == mode
        assert row["n_test"] == 256 and row["bn_folded"] == 8 and row["images_per_s_after"] > 0
    # precise re-estimates statistics: a different fold of the same weights
    assert on_disk["precise"]["test_acc_before"] != on_disk["ema"]["test_acc_before"] or \
        on_disk["precise"]["max_abs_logit_diff"] != on_disk["ema"]["max_abs_logit_diff"]


@pytest.mark.parametrize("mode", ["batch", "adapted"])
def test_batch_statistic_modes_are_refused(tmp_path, mode, capsys):
    run = saved_run(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        fusion.main([str(run), "--mode", mode, "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot fold with --mode {mode}" in err
    assert not (run / fusion.FUSED).exists()


def test_cli_refuses_gn_run_and_prints_table_for_bn(tmp_path, capsys):
    gn = saved_run(tmp_path, ["norm=gn"], name="gn")
    with pytest.raises(SystemExit):
        fusion.main([str(gn), "--device", "cpu"])
    assert "GroupNorm" in capsys.readouterr().err
    bn = saved_run(tmp_path, name="bn")
    fusion.main([str(bn), "--device", "cpu", "--repeats", "1", "--warmup", "0", "--timing-images", "64"])
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "(exact up to fp32 rounding)" in out and "speedup" in out


def test_fusion_names_only_registered_eval_modes():
    """What fusion folds or refuses is named as the eval-mode registry names it (a renamed mode
    cannot leave fusion behind); a registered mode it does not fold is refused, not unknown."""
    from bnexp.measure.modes import MODES

    assert set(fusion.FOLDABLE) | set(fusion.REFUSED_MODES) <= set(MODES.names())
    with pytest.raises(fusion.FusionError, match="eval mode not folded here 'precise_bvar'"):
        fusion.fuse_run("no-such-run", mode="precise_bvar")
    with pytest.raises(fusion.FusionError, match="unknown --mode 'exact'"):
        fusion.fuse_run("no-such-run", mode="exact")

