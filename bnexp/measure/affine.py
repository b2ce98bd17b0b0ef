"""Where a trained network's normalization gammas and betas end up.

``learned_affine`` reads the scale (gamma, ``weight``) and shift (beta, ``bias``) of every norm
layer (BN family, GroupNorm, LayerNorm) whose value is a learned parameter (``norm.affine``
fixes the others at 1 and 0: they are buffers then, and skipped). Rows, one per layer and
parameter: ``{layer, param: gamma | beta, channels, mean, std, min, p10, p50, p90, max,
negative}`` (``negative``: the fraction of channels below 0: a negative gamma flips a channel
before the ReLU, which no positive rescaling of the next conv can undo). ``affine_metrics``
pools every channel of every layer into summary keys ``gamma.p50``, ``gamma.negative``,
``beta.p50``, ``beta.mean_abs``, ... (absent where nothing was learned).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bnexp import records
from bnexp.measure.probes import NORM_TYPES

QUANTILES = (0.1, 0.5, 0.9)
NAMES = {"weight": "gamma", "bias": "beta"}


def _describe(values: torch.Tensor) -> dict:
    v = values.detach().double().flatten().cpu()
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
    return {"channels": v.numel(), "mean": v.mean().item(), "std": v.std(unbiased=False).item(),
            "min": v.min().item(), **{f"p{round(100 * p)}": x.item() for p, x in zip(QUANTILES, q)},
            "max": v.max().item(), "negative": (v < 0).double().mean().item(),
            "mean_abs": v.abs().mean().item()}


def learned_affine(model: nn.Module) -> list[dict]:
    """Rows of the module doc, layers in ``named_modules`` order."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, NORM_TYPES):
            continue
        for attr, param in m.named_parameters(recurse=False):
            if attr in NAMES:
                rows.append({"layer": name, "param": NAMES[attr], **_describe(param)})
    return rows


def affine_metrics(model: nn.Module) -> dict:
    """``<gamma|beta>.<stat>`` over every learned channel of every norm layer pooled."""
    pooled: dict[str, list] = {}
    for _, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for attr, param in m.named_parameters(recurse=False):
                if attr in NAMES:
                    pooled.setdefault(NAMES[attr], []).append(param.detach().flatten())
    return {f"{param}.{k}": v for param, tensors in pooled.items()
            for k, v in _describe(torch.cat(tensors)).items() if k != "channels"}


def record_affine(model: nn.Module, run_dir=None) -> dict:
    """``learned_affine``'s rows into ``<run_dir>/affine.json`` (with ``run_dir``); returns
    ``affine_metrics``."""
    if run_dir is not None:
        records.write_json_atomic(Path(run_dir) / records.AFFINE, learned_affine(model))
    return affine_metrics(model)
