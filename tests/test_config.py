"""Every config and preset composes and parses; bad input fails naming the setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
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
    extra = ["sampler.p=4", "sampler.k=32", "sampler.groups=1"] if group == "sampler" else []  # presets at their own batch: test_sampling
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
    ("+optim.lrr=0.1", "allowed keys in optim"),  # added keys reach parse_config; plain ones: below
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


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=abc", "optim.lr='abc' has the wrong type: expected a number"),
    ("model.dropout=null", "model.dropout=None has the wrong type: expected a number"),
    ("optim.milestones=0.5", "optim.milestones=0.5 has the wrong type: expected a list of numbers"),
    ("optim.milestones=[0.5,x]", "optim.milestones[1]='x' has the wrong type"),
    ("seed=1.5", "seed=1.5 has the wrong type: expected an integer"),
    ("checkpoint=1", "checkpoint=1 has the wrong type: expected a boolean"),
    ("data.train_size=[1]", "data.train_size=[1] has the wrong type: expected an integer or null"),
    ("data.root=12", "data.root=12 has the wrong type: expected a string"),
])
def test_wrong_types_are_config_errors_naming_setting_value_and_type(override, expected):
    # before: TypeError from a comparison deep in check(), and no record
    with pytest.raises(C.ConfigError) as err:
        make_config([override])
    assert str(err.value).startswith(expected)


def test_ints_are_accepted_as_floats_and_become_floats():
    cfg = make_config(["optim.lr=1", "optim.grad_clip=2", "data.train_size=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.data.train_size is None


def test_study_name_stays_out_of_folder_names():
    cfg = compose_config(["study_name=x", "seed=3"], return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "seed=3"


def test_check_override_key_lists_allowed_keys():
    with pytest.raises(C.ConfigError, match=r"unknown setting optim\.lrr; allowed keys in optim: .*\blr\b"):
        C.check_override_key("optim.lrr")
    with pytest.raises(C.ConfigError, match="allowed top-level keys: .*seed.*study"):
        C.check_override_key("sed", groups=["study"])
    C.check_override_key("finetune.from")  # a YAML key renamed in the dataclass
    C.check_override_key("grid.smoke.seed")  # grid is free-form
    C.check_override_key("scale", groups=["scale"])


def bnexp(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bnexp", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_plain_unknown_key_lists_the_allowed_keys(tmp_path):
    out = bnexp("optim.lrr=0.1", f"results_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "bnexp: unknown setting optim.lrr; allowed keys in optim: " + ", ".join(sorted(
            f.name for f in fields(C.OptimConfig)))]
    top = bnexp("sed=1", f"results_dir={tmp_path}", cwd=tmp_path)
    assert top.returncode == 2 and "allowed top-level keys" in top.stderr and "seed" in top.stderr
    assert not (tmp_path / "scratch").exists()  # nothing ran


def test_cli_key_check_leaves_hydra_features_alone(tmp_path):
    out = bnexp("--cfg", "job", "optim.lr=0.2", "hydra.job.name=x", "~probes.every_steps", "+optim.extra=1", cwd=tmp_path)
    assert out.returncode == 0 and "lr: 0.2" in out.stdout, out.stderr
    group = bnexp("--cfg", "job", "norm=batchnorm", cwd=tmp_path)  # Hydra lists the options
    assert group.returncode != 0 and "bn" in group.stderr + group.stdout
    assert bnexp("--help", cwd=tmp_path).returncode == 0


def test_cli_sweep_records_wrong_types_and_goes_on(tmp_path):
    out = bnexp("-m", "optim.lr=abc,-1", f"results_dir={tmp_path}", "study_name=t", cwd=tmp_path)
    # both were recorded; a sweep of failures only exits 1, counting them (issue 23)
    assert out.returncode == 1 and "2 of 2 runs of the sweep failed" in out.stderr, out.stderr[-2000:]
    errors = sorted(json.loads(p.read_text())["error"] for p in tmp_path.glob("t/synthetic-full/runs/*/summary.json"))
    assert len(errors) == 2 and "optim.lr='abc' has the wrong type" in errors[0]
    assert "optim.lr=-1.0 must be > 0" in errors[1]


def test_every_conf_group_is_a_listed_package():
    # setuptools only ships the sub-packages listed: a group folder left out is missing from a
    # wheel (and setuptools warns that it is relying on deprecated data-file discovery)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((CONF.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert groups and {f"bnexp.conf.{g}" for g in groups} <= listed
