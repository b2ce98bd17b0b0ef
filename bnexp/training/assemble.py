"""Rebuild a finished run from its folder: config, model with its final weights, data, pipeline.

One place for what fusion (``bnexp-fuse``), the post-hoc precise-BN re-scoring
(``stats.rescore_precise``) and any notebook need to use a run again, the same way ``train.fit``
built it: ``parse_config`` of the config saved in ``model.pt``, ``train.build`` with the saved
weights, ``load_data`` of its data section (same seed, so the same splits), and
``train.make_pipeline`` with the input normalization the model was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bnexp.training.checkpoint import load_model_state
from bnexp.config import Config, parse_config
from bnexp.data.datasets import DataBundle, Pipeline, load_data
from bnexp.runtime import resolve_device, resolve_precision


@dataclass
class LoadedRun:
    """A finished run, rebuilt. ``model`` holds the final weights and BN buffers, in eval mode;
    ``data.mean``/``std`` and ``pipe`` normalize inputs as the model was trained (a fine-tuned
    run keeps its source's normalization)."""
    run_dir: Path
    config: Config
    model: nn.Module
    data: DataBundle
    pipe: Pipeline
    num_classes: int


def load_run(run_dir, device: str = "cpu", precision: Optional[str] = None) -> LoadedRun:
    """Rebuild the run in ``run_dir`` on ``device`` (``auto`` | ``cpu`` | ``cuda``).

    ``precision``: ``fp32`` | ``bf16`` | ``auto``; None = the run's own ``precision`` setting,
    resolved for this device. Raises ``FileNotFoundError`` when the run has no ``model.pt`` and
    ``ConfigError`` when its saved config no longer parses.
    """
    from bnexp.training.fit import build, make_pipeline  # train imports stats, which imports this lazily

    run_dir = Path(run_dir)
    state = load_model_state(run_dir)
    cfg = parse_config(state["config"])
    dev = resolve_device(device)
    model = build(cfg, state["num_classes"], dev)
    model.load_state_dict(state["model"])
    model.eval()
    data = load_data(cfg.data, dev, seed=cfg.seed)
    if state.get("mean") is not None:
        data = replace(data, mean=torch.as_tensor(state["mean"], dtype=torch.float32, device=dev),
                       std=torch.as_tensor(state["std"], dtype=torch.float32, device=dev))
    pipe = make_pipeline(cfg, data, dev, resolve_precision(precision or cfg.precision, dev))
    return LoadedRun(run_dir, cfg, model, data, pipe, state["num_classes"])
