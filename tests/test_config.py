"""Every config and preset composes and parses; bad input fails naming the setting."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bnexp import config as C
from conftest import compose_config, make_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("study", "__pycache__"))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_parses(group, option):
    extra = ["sampler.p=4", "sampler.k=32"] if group == "sampler" else []
    cfg = make_config([f"{group}={option}", *extra])
    assert isinstance(cfg, C.Config)


def test_defaults_parse_and_round_trip():
    raw = OmegaConf.to_container(compose_config(), resolve=True)
    cfg = C.parse_config(raw)
    back = C.to_dict(cfg)
    for section in C.SECTIONS:
        assert set(back[section]) == set(raw[section]), section
        for key, value in raw[section].items():
            assert back[section][key] == value, (section, key)


def test_dropout_preset_sets_no_norm_and_dropout():
    cfg = make_config(["norm=dropout"])
    assert cfg.norm.name == "none" and cfg.model.dropout > 0


def test_momentum_convention_is_pytorch():
    # The documented default is PyTorch's 0.1, i.e. the weight of the *new* batch statistic.
    assert make_config().norm.momentum == pytest.approx(0.1)
    with pytest.raises(C.ConfigError, match="Keras"):
        make_config(["norm.momentum=0"])


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-0.1", "optim.lr"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout_placement=middle", "before_norm"),
    ("norm.name=batchnorm", "allowed values: bn"),
    ("data.name=imagenet", "cifar10"),
    ("eval.modes=[ema,foo]", "eval.modes"),
    ("+optim.lrr=0.1", "allowed keys in optim"),
    ("data.batch_size=0", "data.batch_size"),
    ("precision=fp16", "bf16"),
])
def test_bad_values_name_the_setting(override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace(".", r"\.")):
        make_config([override])


def test_pk_needs_p_times_k_equal_batch():
    with pytest.raises(C.ConfigError, match="sampler.p \\* sampler.k"):
        make_config(["sampler=pk", "sampler.p=4", "sampler.k=8", "data.batch_size=64"])
    assert make_config(["sampler=pk", "sampler.p=4", "sampler.k=16", "data.batch_size=64"]).sampler.p == 4


def test_linear_lr_scaling():
    cfg = make_config(["optim.scale_lr=true", "optim.lr=0.1", "data.batch_size=32"])
    assert cfg.optim.effective_lr(32) == pytest.approx(0.1 * 32 / 128)
    assert make_config(["optim.lr=0.1"]).optim.effective_lr(32) == pytest.approx(0.1)


def test_unknown_group_option_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="batchnorm"):
        compose_config(["norm=batchnorm"])
