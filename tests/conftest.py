"""Shared test helpers: compose real configs through Hydra, keep torch small and quiet."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# One thread: tiny models gain nothing from a second, and tests that start subprocesses
# (sweeps) would otherwise oversubscribe the two cores and run many times slower.
torch.set_num_threads(1)


def compose_config(overrides=(), return_hydra_config: bool = False):
    """The composed DictConfig for ``overrides``, exactly as ``bnexp`` would build it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="bnexp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides),
                       return_hydra_config=return_hydra_config)


def make_config(overrides=()):
    """A parsed, checked ``bnexp.config.Config`` for ``overrides``."""
    from omegaconf import OmegaConf

    from bnexp.config import parse_config

    cfg = compose_config(overrides)
    return parse_config(OmegaConf.to_container(cfg, resolve=True))


# Small and fast: a few hundred synthetic images, a narrow net, fp32 for exact comparisons.
TINY = ["data=synthetic", "data.synthetic_train=512", "data.synthetic_test=256",
        "data.batch_size=64", "model.width=8", "optim.epochs=2", "precision=fp32",
        "device=cpu", "eval.precise_samples=256", "eval.batch_size=128"]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def norm_defaults() -> dict:
    """The ``norm:`` section of conf/config.yaml (the single source of defaults), as a dict."""
    import yaml
    from pathlib import Path

    with open(Path(__file__).resolve().parents[1] / "conf" / "config.yaml") as f:
        return dict(yaml.safe_load(f)["norm"])


@pytest.fixture
def norm_cfg():
    """``norm_cfg(**overrides)`` builds a ``NormConfig`` from the YAML defaults plus overrides."""
    from bnexp.config import NormConfig

    defaults = norm_defaults()

    def build(**overrides):
        return NormConfig(**{**defaults, **overrides})

    return build


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment(name: str):
    """The module of ``experiments/<name>.py``, loaded by its file path (the scripts are not a
    package: each runs as ``python experiments/<name>.py``, which puts its folder on the path, so
    one script may import another by name). A sibling it imports that is not loaded yet is loaded
    the same way first; nothing is added to ``sys.path``."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "") == str(EXPERIMENTS / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        del sys.modules[name]
        if err.name and err.name != name and (EXPERIMENTS / f"{err.name}.py").exists():
            experiment(err.name)
            return experiment(name)
        raise
    return module
