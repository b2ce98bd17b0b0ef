"""bnexp: why and when does Batch Normalization regularize? An experiment runner on Hydra.

From Python (a notebook): ``bnexp.compose(overrides) -> Config`` and
``bnexp.run(overrides, run_dir=None) -> summary`` (``bnexp.api``), the same configs and records
as the ``bnexp`` command. They are imported on first use, so ``import bnexp`` loads neither
Hydra nor torch.
"""
from __future__ import annotations

__all__ = ["compose", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bnexp' has no attribute {name!r}")
