"""A trained model scored on corrupted copies of its test set, under each test-time statistic.

``corruption_table`` scores the clean test set (severity 0) and each corruption of
``eval.corruptions`` at each of ``eval.severities`` (``bnexp.data.corruptions``: CIFAR-10-C's
definitions, seeded, cached) under each eval mode of ``eval.modes`` that applies here:

* ``ema`` and ``precise``: statistics of the clean training data, set once (``precise``: the
  precise pass of ``modes.precise_pass``), then every set is scored in eval mode;
* ``batch`` (i.i.d. test batches), ``batch_sorted`` (the class-sorted stream) and ``adapted``
  (AdaBN: statistics re-estimated on that corrupted set, Li et al. 2016; Schneider et al. 2020)
  run per set, as ``modes.run_mode`` runs them on the clean one.

A model without BN layers has one way to be scored (``ema``, plain eval). Rows are
``{corruption, severity, mode, acc, loss}``; ``corruption_metrics`` turns them into summary keys:
``corrupt_acc.<corruption>.<severity>.<mode>`` per cell, ``corrupt_err.<severity>.<mode>`` (the
mean error over corruptions at one severity) and ``mean_corrupt_err.<mode>``, the mean corruption error: the
mean error over every corruption and severity 1..5, unnormalized (Tent and Schneider et al.
report this mean; Hendrycks & Dietterich's mCE also divides by AlexNet's errors, which have no
Fashion-MNIST counterpart). The model comes back as it was (``preserved``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from torch import nn

from bnexp import records
from bnexp.config import EvalConfig
from bnexp.data.corruptions import corrupted
from bnexp.data.datasets import DataBundle, Split
from bnexp.layers.norms import bn_layers
from bnexp.measure.modes import evaluate, precise_pass, preserved, run_mode

STATIC = ("ema", "precise")                        # statistics that do not depend on the test set
PER_SET = ("batch", "batch_sorted", "adapted")     # statistics taken from each scored set
SUPPORTED = STATIC + PER_SET


def corrupted_sets(data: DataBundle, names: Sequence[str], severities: Sequence[int], seed: int):
    """``(corruption, severity, Split)``: the clean test set first (``"clean"``, 0), then each
    corruption at each severity, in the order given."""
    yield "clean", 0, data.test
    for name in names:
        for severity in severities:
            yield name, severity, Split(corrupted(data.test.x, data.name, name, severity, seed), data.test.y)


def corruption_table(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, train_batch_size: int,
                     seed: int, modes: Sequence[str] | None = None) -> list[dict]:
    """Rows ``{corruption, severity, mode, acc, loss}`` for every set of ``corrupted_sets`` under
    every mode of ``modes`` (default ``cfg.modes``) in ``SUPPORTED`` that applies to the model."""
    wanted = [m for m in (cfg.modes if modes is None else modes) if m in SUPPORTED]
    if not bn_layers(model):
        wanted = ["ema"]
    sets = list(corrupted_sets(data, cfg.corruptions, cfg.severities, seed))
    rows = []
    for mode in wanted:
        if mode in STATIC:
            with preserved(model):
                if mode == "precise":
                    precise_pass(model, data, pipe, cfg, train_batch_size, seed)
                model.eval()
                scores = [evaluate(model, split.x, split.y, pipe, cfg.batch_size) for _, _, split in sets]
        else:
            scores = [run_mode(mode, model, dataclasses.replace(data, test=split), pipe, cfg,
                               train_batch_size, seed)[0] for _, _, split in sets]
        rows += [{"corruption": name, "severity": severity, "mode": mode, "acc": s["acc"], "loss": s["loss"]}
                 for (name, severity, _), s in zip(sets, scores)]
    return rows


def corruption_metrics(rows: Sequence[dict]) -> dict:
    """Summary keys of the module doc from ``corruption_table``'s rows."""
    out = {f"corrupt_acc.{r['corruption']}.{r['severity']}.{r['mode']}": r["acc"] for r in rows if r["severity"]}
    shifted = [r for r in rows if r["severity"]]
    for mode in dict.fromkeys(r["mode"] for r in shifted):
        errs = [1 - r["acc"] for r in shifted if r["mode"] == mode]
        out[f"mean_corrupt_err.{mode}"] = sum(errs) / len(errs)
        for severity in sorted({r["severity"] for r in shifted}):
            at = [1 - r["acc"] for r in shifted if r["mode"] == mode and r["severity"] == severity]
            out[f"corrupt_err.{severity}.{mode}"] = sum(at) / len(at)
    return out


def record_corruptions(model: nn.Module, data: DataBundle, pipe, cfg: EvalConfig, train_batch_size: int,
                       seed: int, run_dir=None) -> dict:
    """With ``cfg.corruptions``: ``corruption_table`` into ``<run_dir>/corruptions.json`` (with
    ``run_dir``) and its ``corruption_metrics`` returned; without, nothing (``{}``)."""
    if not cfg.corruptions:
        return {}
    rows = corruption_table(model, data, pipe, cfg, train_batch_size, seed)
    if run_dir is not None:
        records.write_json_atomic(Path(run_dir) / records.CORRUPTIONS, rows)
    return corruption_metrics(rows)
