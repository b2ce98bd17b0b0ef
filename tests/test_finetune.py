"""Fine-tuning from a saved run: the weights it claims, BN modes that hold through training,
head re-initialisation, and clear errors."""
from __future__ import annotations

import pytest
import torch

from bnexp.training import assemble, finetune
from bnexp.training import fit as train
from bnexp.training.checkpoint import load_model_state, save_model
from bnexp.config import ConfigError, to_dict
from bnexp.data.datasets import channel_stats, load_data
from bnexp.layers.models import build_model
from bnexp.layers.norms import bn_layers, make_norm
from conftest import TINY, make_config

# one epoch of 4 steps, only the ema eval mode: these tests are about what fine-tuning starts from
FAST = ["optim.epochs=1", "data.synthetic_train=256", "eval.modes=[ema]"]
FT = [*TINY, *FAST, "optim.lr=0.05", "data.shift=contrast", "data.shift_severity=5"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny run on clean synthetic data (10 classes): the source of every test here."""
    run_dir = tmp_path_factory.mktemp("source")
    train.fit(make_config([*TINY, *FAST]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, source):
    """``tuned(bn_mode)``: (summary, final state_dict) of a one-epoch fine-tune, run once per mode."""
    done = {}

    def get(mode: str):
        if mode not in done:
            run_dir = tmp_path_factory.mktemp(f"ft_{mode}")
            summary = train.fit(make_config([*FT, f"finetune.from={source}", f"finetune.bn={mode}"]), run_dir)
            done[mode] = summary, load_model_state(run_dir)["model"]
        return done[mode]

    return get


def started(source, overrides):
    """What ``fit`` does up to the first step: resolve, build, load data, ``finetune.start``."""
    cfg, src = finetune.resolve(make_config([*FT, f"finetune.from={source}", *overrides]))
    data = load_data(cfg.data, "cpu", seed=cfg.seed)
    model = assemble.build(cfg, data.num_classes, torch.device("cpu"))
    pipe = train.Pipeline(torch.device("cpu"), "fp32", data.mean, data.std, cfg.channels_last,
                          cfg.data.augment, torch.Generator().manual_seed(1))
    return model, finetune.start(model, src, cfg, data, pipe), pipe


def bn_state(state: dict) -> dict:
    return {k: v for k, v in state.items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_start_loads_every_source_tensor_and_the_source_normalization(source):
    model, result, pipe = started(source, ["finetune.bn=train"])
    saved = load_model_state(source)
    state = model.state_dict()
    assert set(state) == set(saved["model"])
    for key, tensor in saved["model"].items():
        assert torch.equal(state[key], tensor), key
    assert not result.info["head_reinitialised"]
    # the source's input statistics (clean images), not the contrast-reduced target's
    clean = load_data(make_config([*TINY, *FAST]).data, "cpu")
    torch.testing.assert_close(pipe.mean, channel_stats(clean.train.x)[0])
    torch.testing.assert_close(pipe.std, channel_stats(clean.train.x)[1])
    shifted = load_data(make_config(FT).data, "cpu")
    assert (pipe.std - shifted.std).abs().max() > 0.05  # contrast 0.15 really moves the std


def test_head_reinitialised_when_the_label_set_changes(source):
    model, result, _ = started(source, ["data.shift=null", "data.classes=[5,6,7,8,9]"])
    saved = load_model_state(source)["model"]
    assert result.info["head_reinitialised"] and result.metrics == {}
    assert model.head.weight.shape == (5, saved["head.weight"].shape[1])
    for key, tensor in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(tensor, saved[key]), key


def test_reinit_head_rule():
    src = finetune.Source(None, {}, make_config(["data.classes=[0,1,2,3,4]"]), 5, None, None, {})
    data = lambda *o: make_config(list(o)).data  # noqa: E731
    assert finetune.reinit_head("auto", src, data("data.classes=[5,6,7,8,9]"), 5)
    assert not finetune.reinit_head("auto", src, data("data.classes=[0,1,2,3,4]", "data.shift=noise"), 5)
    assert finetune.reinit_head("auto", src, data("data.classes=[0,1,2,3,4]", "data.synthetic_seed=1"), 5)
    assert finetune.reinit_head(True, src, data("data.classes=[0,1,2,3,4]"), 5)
    assert not finetune.reinit_head(False, src, data("data.classes=[5,6,7,8,9]"), 5)
    with pytest.raises(ConfigError, match="reinit_head=false"):
        finetune.reinit_head(False, src, data(), 10)


def test_frozen_stats_keeps_running_stats_bitwise_and_records_the_source(source, tuned):
    summary, state = tuned("frozen_stats")
    saved = load_model_state(source)["model"]
    for key, tensor in bn_state(saved).items():
        assert torch.equal(state[key], tensor), key
    bn_weights = [k for k in saved if k.endswith("norm.weight")]
    assert any(not torch.equal(state[k], saved[k]) for k in bn_weights)  # affine trained
    assert not torch.equal(state["features.0.conv.weight"], saved["features.0.conv.weight"])
    info = summary["finetune"]
    assert info["from"] == str(source) and info["bn"] == "frozen_stats"
    assert info["head_reinitialised"] is False and "source_git_commit" in info
    assert info["source_data"]["shift"] is None
    m = summary["metrics"]
    assert 0 <= m["test_acc.before_finetune"] <= 1 and "test_acc.before_finetune.adapted" in m


def test_frozen_all_also_keeps_bn_affine(source, tuned):
    _, state = tuned("frozen_all")
    saved = load_model_state(source)["model"]
    bn_keys = [k for k in saved if ".norm." in k]
    assert bn_keys and all(torch.equal(state[k], saved[k]) for k in bn_keys)
    assert not torch.equal(state["features.0.conv.weight"], saved["features.0.conv.weight"])


def test_train_mode_updates_running_stats(source, tuned):
    _, state = tuned("train")
    saved = load_model_state(source)["model"]
    assert not torch.equal(state["features.0.norm.running_var"], saved["features.0.norm.running_var"])


def test_adapt_reestimates_on_the_target_then_keeps_those_stats(source, tuned):
    model, result, _ = started(source, ["finetune.bn=adapt"])
    adapted = bn_state(model.state_dict())
    saved = load_model_state(source)["model"]
    assert not torch.equal(adapted["features.0.norm.running_var"], saved["features.0.norm.running_var"])
    assert all(m.frozen for _, m in bn_layers(model))
    summary, state = tuned("adapt")
    for key, tensor in adapted.items():
        assert torch.equal(state[key], tensor), key
    # fit went through the same start: the same scores before fine-tuning
    assert result.metrics == {k: v for k, v in summary["metrics"].items() if "before_finetune" in k}


def test_architecture_comes_from_the_source(source):
    cfg, src = finetune.resolve(make_config([*FT, f"finetune.from={source}", "model.width=16"]))
    assert cfg.model.width == 8
    assert src.config_differs == {"model.width": {"given": 16, "source": 8}}


def test_missing_model_pt_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        finetune.resolve(make_config([*FT, f"finetune.from={tmp_path}"]))


def test_frozen_modes_need_bn_and_own_the_freezing(tmp_path, source):
    cfg = make_config([*TINY, "norm=gn"])
    run = tmp_path / "gn"
    run.mkdir()
    save_model(run, build_model(cfg.model, make_norm(cfg.norm), 10), to_dict(cfg), 10)
    with pytest.raises(ConfigError, match="norm=gn"):
        finetune.resolve(make_config([*FT, f"finetune.from={run}", "finetune.bn=frozen_stats"]))
    with pytest.raises(ConfigError, match="freeze_after"):
        finetune.resolve(make_config([*FT, f"finetune.from={source}", "finetune.bn=frozen_all",
                                      "norm.freeze_after=0.5"]))


@pytest.mark.parametrize("preset,source_dir", [("classes", "classes_seed2"), ("shift", "clean_seed2")])
def test_study_presets_point_at_the_source_of_the_same_seed(preset, source_dir):
    cfg = make_config([f"finetune={preset}", "seed=2", "data.batch_size=8"])
    assert cfg.finetune.from_ == f"results/finetune_source/{source_dir}"
    assert cfg.eval.precise_batch_size == 128 and cfg.optim.scale_lr
    assert (cfg.data.classes is not None) == (preset == "classes")
