"""The parts of a run, assembled: its model (``build``), its input pipeline (``make_pipeline``),
and a finished run rebuilt from its folder (``load_run``).

``fit`` assembles a new run from these; fusion (``bnexp-fuse``), the post-hoc precise-BN
re-scoring (``bnexp.tools.rescore``), ``bench`` and any notebook use a run again the same way:
``parse_config`` of the config saved in ``model.pt``, ``build`` with the saved weights,
``load_data`` of its data section (same seed, so the same splits), and ``make_pipeline`` with the
input normalization the model was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bnexp.config import Config, parse_config
from bnexp.data.datasets import DataBundle, Pipeline, load_data, spec
from bnexp.layers import ema_shadows
from bnexp.layers.models import build_model
from bnexp.layers.norms import make_norm
from bnexp.runtime import resolve_device, resolve_precision
from bnexp.training.checkpoint import load_model_state


def build(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The model of ``cfg`` for the input shape of ``cfg.data`` (``data.SPECS``: the shape
    ``load_data`` checks its images against) on ``device``, seeded, in channels_last when asked."""
    shape = spec(cfg.data.name)
    model = build_model(cfg.model, make_norm(cfg.norm), num_classes, shape.channels, shape.size).to(device)
    ema_shadows.attach(model, cfg.eval.ema_momenta)  # more EMAs beside BN's own (none by default)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_pipeline(cfg: Config, data: DataBundle, device: torch.device, precision: str) -> Pipeline:
    """How this run's uint8 images become model inputs (``fit``, ``load_run``, ``bench``);
    its augmentation generator, saved in ``last.pt``, is seeded ``seed + 1``."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    return Pipeline(device, precision, data.mean, data.std, cfg.channels_last, cfg.data.augment, generator,
                    data.pad, data.flip)


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
