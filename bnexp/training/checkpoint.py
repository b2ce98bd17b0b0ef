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
from bnexp.config import config_diff

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unsafe to unpickle, or of another config."""


class ResumeRefused(CheckpointError):
    """``last.pt`` belongs to a run of another config: nothing was run, the folder is untouched."""


# Settings that do not change what a run computes (conf/config.yaml's override_dirname
# exclude_keys): a resume with another value of one of these is the same computation.
RESUME_IGNORES = ("study", "study_name", "device", "threads", "progress", "logger", "rerun_failed",
                  "checkpoint", "results_dir", "data.root", "data.download")


def save_last(run_dir: Path, *, model, optimizer, scheduler, generator: torch.Generator,
              epoch: int, step: int, history: list[dict], timing: dict, config: dict) -> None:
    """Write ``last.pt`` atomically (a failed write leaves no partial file). ``config``: the
    resolved config of the run (``to_dict``), which a resume must match (``load_last``)."""
    state = {
        "epoch": epoch, "step": step, "history": history, "timing": timing, "config": config,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    _save_atomic(state, Path(run_dir) / records.LAST)


def _save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``; on any failure (a full disk:
    ``OSError``) the temporary file is removed and the error raised."""
    tmp = path.with_suffix(".pt.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safe_load(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain Python types only, so a
    crafted pickle in a shared results folder runs nothing; ``CheckpointError`` (one line) when
    the file holds anything else or is not a checkpoint at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (unsafe globals), truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was not loaded: it is not a checkpoint that loads safely "
                              f"(weights_only; {first[:160]}); delete it if you did not write it") from None


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key (saved -> now)`` for each dotted key whose value differs, ``RESUME_IGNORES`` aside."""
    return [f"{k} ({x!r} -> {y!r})" for k, (x, y) in sorted(config_diff(saved, current, RESUME_IGNORES).items())]


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` (a state_dict) that hold inf or NaN."""
    return [name for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def load_last(run_dir: Path, *, model, optimizer, scheduler, generator: torch.Generator,
              config: dict) -> dict | None:
    """Restore the state saved by ``save_last`` into the given objects; returns the bookkeeping
    (epoch, step, history, timing), or None when there is nothing to resume. Rewrites
    ``metrics.jsonl`` from the saved history, dropping rows of the epoch that was interrupted.
    ``CheckpointError`` naming the keys when ``last.pt`` was saved by a run of another
    ``config`` (a resume would run the old schedule under the new record): nothing is changed."""
    path = Path(run_dir) / records.LAST
    if not path.exists():
        return None
    state = safe_load(path)
    if "config" not in state:  # written before last.pt kept its config: cannot be checked
        log.warning("%s holds no config (an older checkpoint): resuming without checking it", path)
    elif changes := config_changes(state["config"], config):
        raise ResumeRefused(f"{path} was saved by a run of another config: {', '.join(changes)}; "
                              "not resuming (delete last.pt to train from scratch, or run in another folder)")
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
    if nonfinite_tensors(state):
        log.warning("model.pt not saved: the weights are not finite (the run diverged)")
        return False
    _save_atomic({"model": state, "config": config, "num_classes": num_classes,
                  "mean": _floats(mean), "std": _floats(std)}, Path(run_dir) / records.MODEL)
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
    return safe_load(path)


def clear_last(run_dir: Path) -> None:
    (Path(run_dir) / records.LAST).unlink(missing_ok=True)
