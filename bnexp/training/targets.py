"""Steps to target: how many optimizer updates a run needed to reach given accuracies.

After each epoch ``fit`` records ``train_acc.clean``: the accuracy in eval mode (the running
statistics, as ``test_acc``'s default mode scores) on the first ``CLEAN_MAX`` training images,
un-augmented, the same images every epoch; a model that memorizes its training set shows it
here rather than in the running (train-mode, augmented, moving) ``train_acc``. At the end,
``steps_to(history, targets)`` gives ``steps_to.train_acc.<t>`` and ``steps_to.test_acc.<t>``:
the ``step`` (updates done) of the first epoch row whose value is >= t, or None when no row
reached it. Rows without a score (``test_acc`` is null between ``eval.score_every`` epochs) are
skipped, so the test-side step is only as fine as the scoring.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from bnexp.data.datasets import DataBundle
from bnexp.measure.modes import evaluate, preserved

CLEAN_MAX = 2000  # training images behind train_acc.clean (~0.3 point binomial s.e. at 90%)
CURVES = {"train_acc": "train_acc.clean", "test_acc": "test_acc"}  # summary name -> epoch row key


def clean_train_acc(model: nn.Module, data: DataBundle, pipe, batch_size: int) -> float:
    """Eval-mode accuracy on the first ``CLEAN_MAX`` training images, no augmentation; the model
    (modes, buffers, RNG) is left as it was."""
    n = min(CLEAN_MAX, len(data.train))
    with preserved(model):
        model.eval()
        return evaluate(model, data.train.x[:n], data.train.y[:n], pipe, batch_size)["acc"]


def first_step(history: Sequence[dict], key: str, target: float) -> Optional[int]:
    """The ``step`` of the first row whose ``key`` is >= ``target`` (rows without it skipped)."""
    return next((row["step"] for row in history if row.get(key) is not None and row[key] >= target), None)


def steps_to(history: Sequence[dict], targets: Sequence[float]) -> dict:
    """``steps_to.<train_acc|test_acc>.<target>`` for every target (None: never reached)."""
    return {f"steps_to.{name}.{t:g}": first_step(history, key, t)
            for name, key in CURVES.items() for t in targets}
