"""The OmegaConf resolvers ``conf/`` uses, registered where configs are composed.

``${bnexp_hydra_subdir:}`` (``hydra.output_subdir``: ``launch.hydra_subdir``) and
``${bnexp_names:KEY}``, the allowed values of a setting joined by ``|`` for ``bnexp --help``
(conf/hydra/help/bnexp.yaml), read from the one list each has: ``bnexp.config``'s (equal to the
registries, tests/test_config.py), and conf/study/ for the studies. No torch is loaded.
"""
from __future__ import annotations

from importlib.resources import files

from omegaconf import OmegaConf

from bnexp import config
from bnexp.jobs.launch import hydra_subdir


def names(key: str, sep: str = "|") -> str:
    """The allowed values of ``key`` (``norm``, ``eval.modes``, ``study``, ...) joined by ``sep``."""
    if key == "study":
        return sep.join(sorted(p.name.removesuffix(".yaml") for p in (files("bnexp.conf") / "study").iterdir()
                               if p.name.endswith(".yaml")))
    return sep.join(CHOICES[key])


CHOICES = {"data": config.DATASETS, "sampler": config.SAMPLERS, "model": config.MODELS, "norm": config.NORMS,
           "eval.modes": config.EVAL_MODES, "probes": config.PROBES, "logger": config.LOGGERS}


def register_resolvers() -> None:
    """Register ``conf/``'s resolvers. Called by the entry point (on import, so launcher workers
    that unpickle its task function have them too) and ``bnexp.api``; idempotent."""
    OmegaConf.register_new_resolver("bnexp_hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("bnexp_names", names, replace=True)
