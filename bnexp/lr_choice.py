"""Which learning rate each arm of a study gets: the rule, as a pure function of the grid's runs.

A study that declares ``grid.tune`` (``bnexp/jobs/tuning.py`` runs it) trains every arm at each
lr of its own grid, on ``tune.seeds`` with ``data.val_size`` images held out of the training
subset, and the arm then runs at the lr this module picks. The test set is never looked at.

The rule (``choose_lr``), stated once:

1. an lr's score is the mean over the tuning seeds of ``val_acc``; a run that diverged or failed
   counts as 0 (an lr that breaks one seed in two is not chosen over one that trains in both);
2. the best score wins; an exact tie goes to the lower mean ``val_loss`` (continuous, so ties
   end there), then to the smaller lr (the one further from instability);
3. the choice is flagged ``edge: "low"`` or ``"high"`` when it is the grid's smallest or largest
   lr (the optimum is not bracketed: widen the grid), and ``edge: "grid"`` when the grid has
   fewer than 3 points.

``lr_choice.json`` (written by ``tuning.py`` in the study folder) holds ``choose_all``'s result.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

CHOICE_FILE = "lr_choice.json"
FAILED_SCORE = 0.0  # val_acc of a diverged or failed run
RULE = ("mean val_acc over the tuning seeds (diverged/failed runs count 0); ties: lower mean "
        "val_loss, then the smaller lr; edge: the choice is the grid's smallest/largest lr")


def run_score(run: Mapping) -> tuple[float, float]:
    """``(val_acc, val_loss)`` of one grid run's summary-like mapping (``status``, ``metrics``);
    a diverged or failed run scores ``(0, inf)``. Raises ``ValueError`` for a run that has not
    finished, or one without ``val_acc`` (trained without ``data.val_size``)."""
    status = run.get("status")
    if status in ("diverged", "failed"):
        return FAILED_SCORE, math.inf
    metrics = run.get("metrics") or {}
    if status != "ok" or "val_acc" not in metrics:
        raise ValueError(f"grid run {run.get('run', '?')}: status {status!r}, val_acc "
                         f"{'missing' if 'val_acc' not in metrics else 'present'}; cannot choose")
    return float(metrics["val_acc"]), float(metrics["val_loss"])


def choose_lr(grid: Mapping[float, Iterable[Mapping]]) -> dict:
    """Apply the module's rule to ``{lr: [run summaries]}``; return the arm's ``lr_choice.json``
    entry: ``grid`` (sorted lrs), ``val_acc`` / ``val_loss`` (``{str(lr): mean}``), ``runs``
    (``{str(lr): [val_acc per run]}``), ``failed`` (``{str(lr): count}``), ``chosen_lr``,
    ``edge`` (None | "low" | "high" | "grid") and ``why`` (one sentence)."""
    if not grid:
        raise ValueError("empty lr grid")
    lrs = sorted(float(lr) for lr in grid)
    scores = {float(lr): [run_score(r) for r in runs] for lr, runs in grid.items()}
    if any(not s for s in scores.values()):
        raise ValueError(f"lr grid {lrs}: an lr has no finished run")
    mean_acc = {lr: sum(a for a, _ in s) / len(s) for lr, s in scores.items()}
    mean_loss = {lr: sum(v for _, v in s) / len(s) for lr, s in scores.items()}
    chosen = min(lrs, key=lambda lr: (-mean_acc[lr], mean_loss[lr], lr))
    edge = ("grid" if len(lrs) < 3 else "low" if chosen == lrs[0] and len(lrs) > 1
            else "high" if chosen == lrs[-1] and len(lrs) > 1 else None)
    tied = [lr for lr in lrs if lr != chosen and mean_acc[lr] == mean_acc[chosen]]
    why = (f"lr {chosen:g} has the best mean val_acc {mean_acc[chosen]:.4f} over "
           f"{len(scores[chosen])} seed(s)" + (f", tied with {', '.join(f'{t:g}' for t in tied)} "
                                               "and chosen by lower val_loss / smaller lr" if tied else "")
           + {None: "", "grid": "; fewer than 3 grid points: not known to be bracketed",
              "low": "; it is the grid's smallest lr: the optimum may lie below (not bracketed)",
              "high": "; it is the grid's largest lr: the optimum may lie above (not bracketed)"}[edge])
    key = _key
    return {"grid": lrs, "val_acc": {key(lr): mean_acc[lr] for lr in lrs},
            "val_loss": {key(lr): None if math.isinf(mean_loss[lr]) else mean_loss[lr] for lr in lrs},
            "runs": {key(lr): [a for a, _ in scores[lr]] for lr in lrs},
            "failed": {key(lr): sum(v == math.inf for _, v in scores[lr]) for lr in lrs},
            "chosen_lr": chosen, "edge": edge, "why": why}


def choose_all(arms: Mapping[str, Mapping[float, Iterable[Mapping]]]) -> dict:
    """``{arm: choose_lr(grid)}`` for every arm, in the given order."""
    return {arm: choose_lr(grid) for arm, grid in arms.items()}


def edge_warnings(choice: Mapping[str, Mapping]) -> list[str]:
    """One line per arm whose choice is flagged (``edge`` not None)."""
    return [f"lr of arm {arm}: {entry['why']}" for arm, entry in choice.items() if entry.get("edge")]


def note(study_dir) -> str:
    """The report's sentence on the learning rates of a tuned study (``lr_choice.json`` in
    ``study_dir``); "" when the study was not tuned."""
    path = Path(study_dir) / CHOICE_FILE
    if not path.exists():
        return ""
    saved = json.loads(path.read_text())
    arms = "; ".join(_arm_text(arm, entry) for arm, entry in saved["arms"].items())
    untuned = f"; the other arms ({', '.join(saved['untuned'])}) at the study's lr" if saved.get("untuned") else ""
    return (f"Learning rates chosen per arm ({CHOICE_FILE}; {saved['rule']}; tuning seeds "
            f"{', '.join(map(str, saved['seeds']))}, {saved['val_size']} training images held out): "
            f"{arms}{untuned}.")


def _arm_text(arm: str, entry: Mapping) -> str:
    """``none at lr 0.01 (grid 0.003, 0.01, 0.03; mean val_acc 0.81, 0.86, 0.84)``."""
    grid = ", ".join(f"{lr:g}" for lr in entry["grid"])
    accs = ", ".join(f"{entry['val_acc'][_key(lr)]:.3f}" for lr in entry["grid"])
    edge = f"; {entry['edge']} edge: not bracketed" if entry.get("edge") else ""
    return f"{arm} at lr {entry['chosen_lr']:g} (grid {grid}; mean val_acc {accs}{edge})"


def _key(lr: float) -> str:
    """An lr as a JSON object key: ``repr`` round-trips (0.003 -> "0.003")."""
    return repr(float(lr))
