"""data.val_size: the validation split carved from the training subset, and val_acc / val_loss."""
from __future__ import annotations

import pytest
import torch

from bnexp import records
from bnexp.config import ConfigError
from bnexp.data.datasets import load_data, normalize, split_validation
from bnexp.training import fit as train
from bnexp.training.assemble import load_run
from conftest import TINY, make_config


def test_split_is_disjoint_complete_and_seeded():
    keep, held = split_validation(100, 30, seed=3)
    assert len(held) == 30 and len(keep) == 70
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    again_keep, again_held = split_validation(100, 30, seed=3)
    assert torch.equal(keep, again_keep) and torch.equal(held, again_held)
    assert not torch.equal(held, split_validation(100, 30, seed=4)[1])


def test_val_size_must_leave_training_images():
    with pytest.raises(ConfigError, match="data.val_size"):
        split_validation(10, 10, seed=0)
    with pytest.raises(ConfigError, match="data.val_size"):
        make_config([*TINY, "data.val_size=-1"])


def test_load_data_carves_val_out_of_the_training_subset():
    """train + val are exactly the ``train_size`` subset that the run without a split trains on,
    split at the indices ``split_validation`` names; the test set is untouched."""
    base = make_config([*TINY, "data.train_size=300"]).data
    whole = load_data(base, "cpu", seed=5)
    cfg = make_config([*TINY, "data.train_size=300", "data.val_size=80"]).data
    split = load_data(cfg, "cpu", seed=5)
    keep, held = split_validation(300, 80, seed=5)
    assert len(split.train) + len(split.val) == 300 and len(split.val) == 80
    assert torch.equal(split.train.x, whole.train.x[keep]) and torch.equal(split.val.y, whole.train.y[held])
    assert torch.equal(split.val.x, whole.train.x[held]) and torch.equal(split.test.x, whole.test.x)
    assert whole.val is None


def test_val_acc_equals_an_independent_evaluation(tmp_path):
    """The recorded val_acc / val_loss (default mode ema = eval mode) match a plain forward pass
    over the held-out images with the saved model and input statistics."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = make_config([*TINY, "data.val_size=100", "optim.epochs=1"])
    summary = train.fit(cfg, run_dir)
    loaded = load_run(run_dir)
    _, held = split_validation(cfg.data.synthetic_train, 100, cfg.seed)
    full = load_data(make_config(TINY).data, "cpu", seed=cfg.seed).train  # no split: index into it
    x, y = full.x[held], full.y[held]
    with torch.no_grad():
        logits = loaded.model(normalize(x, loaded.pipe.mean, loaded.pipe.std)).float()
    m = summary["metrics"]
    assert m["val_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert m["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    rows = records.read_jsonl(run_dir / records.METRICS)
    assert rows[-1]["val_acc"] == pytest.approx(m["val_acc"])
