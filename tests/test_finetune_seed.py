"""finetune.seed_offset: a fine-tune's randomness is decoupled from its source run's seed."""
from __future__ import annotations

from bnexp.training import fit as train
from conftest import TINY, make_config

FAST = ["optim.epochs=1", "eval.modes=[ema]"]


def test_seed_offset_is_the_same_as_running_at_the_shifted_seed(tmp_path):
    """seed=0 with offset 7 trains exactly as seed=7 without one (same source), and not as
    seed=0 without one: the offset reaches every seeded draw of the fine-tune."""
    source = tmp_path / "source"
    source.mkdir()
    train.fit(make_config([*TINY, *FAST]), source)

    def tune(name, *overrides):
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg = make_config([*TINY, *FAST, f"finetune.from={source}", "data.shift=contrast", *overrides])
        return train.fit(cfg, run_dir)

    offset = tune("offset", "seed=0", "finetune.seed_offset=7")
    shifted = tune("shifted", "seed=7")
    plain = tune("plain", "seed=0")
    assert offset["config"]["seed"] == 7 and offset["config"]["finetune"]["seed_offset"] == 7
    assert offset["metrics"] == shifted["metrics"]
    assert offset["metrics"]["train_loss"] != plain["metrics"]["train_loss"]
