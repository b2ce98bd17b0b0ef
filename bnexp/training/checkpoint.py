"""Epoch checkpoints that let an interrupted run resume exactly where it stopped.

``last.pt`` holds everything the next epoch depends on: weights and BN buffers, optimizer and
schedule state, every random number generator the loop draws from, and the epoch rows written so
far. It is written atomically after each epoch and deleted once ``summary.json`` exists, so a run
killed at any moment resumes from its last complete epoch and ends with the records an
uninterrupted run would have written (same seed, same numbers on CPU fp32).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from bnexp import records

log = logging.getLogger(__name__)


def save_last(run_dir: Path, *, model, optimizer, scheduler, generator: torch.Generator,
              epoch: int, step: int, history: list[dict], timing: dict) -> None:
    state = {
        "epoch": epoch, "step": step, "history": history, "timing": timing,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path = Path(run_dir) / records.LAST
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_last(run_dir: Path, *, model, optimizer, scheduler, generator: torch.Generator) -> dict | None:
    """Restore the state saved by ``save_last`` into the given objects; returns the bookkeeping
    (epoch, step, history, timing), or None when there is nothing to resume. Rewrites
    ``metrics.jsonl`` from the saved history, dropping rows of the epoch that was interrupted."""
    path = Path(run_dir) / records.LAST
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    metrics = Path(run_dir) / records.METRICS
    metrics.unlink(missing_ok=True)
    records.append_jsonl(metrics, state["history"])
    return {k: state[k] for k in ("epoch", "step", "history", "timing")}


def save_model(run_dir: Path, model, config: dict, num_classes: int, mean=None, std=None) -> bool:
    """The final weights (and the config that made them), for fine-tuning and fusion; returns
    whether they were saved. Weights or buffers that are not all finite (a diverged run) are
    not: no later use could make sense of them, and ``load_model_state`` then says so.

    ``mean``/``std``: the input normalization the model was trained with (part of the function it
    computes; a fine-tuned run keeps its source's, which its own data config would not give).
    """
    state = model.state_dict()
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        log.warning("model.pt not saved: the weights are not finite (the run diverged)")
        return False
    path = Path(run_dir) / records.MODEL
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"model": state, "config": config, "num_classes": num_classes,
                "mean": _floats(mean), "std": _floats(std)}, tmp)
    os.replace(tmp, path)
    return True


def _floats(values) -> list | None:
    return None if values is None else torch.as_tensor(values).tolist()


def load_model_state(run_dir: Path) -> dict:
    """The dict written by ``save_model``; a clear error when the run has no final weights."""
    path = Path(run_dir) / records.MODEL
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the run has not finished, diverged (non-finite weights are "
            "not saved), or ran with checkpoint=false")
    return torch.load(path, map_location="cpu", weights_only=False)


def clear_last(run_dir: Path) -> None:
    (Path(run_dir) / records.LAST).unlink(missing_ok=True)
