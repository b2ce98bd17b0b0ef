"""optim.stop_at: training ends after the first epoch whose clean training accuracy reaches the
level; until then the run is the same run as without it."""
from __future__ import annotations

import pytest

from bnexp import records
from bnexp.config import ConfigError
from bnexp.training import fit as train
from conftest import TINY, make_config

BASE = [*TINY, "optim.epochs=6", "checkpoint=false", "data.synthetic_train=256", "data.batch_size=32",
        "data.synthetic_test=64", "eval.modes=[ema]"]


def test_a_run_stops_after_the_first_epoch_at_the_level_and_matches_the_full_run_until_then(tmp_path):
    (tmp_path / "full").mkdir(), (tmp_path / "short").mkdir()
    full = train.fit(make_config([*BASE, "eval.targets=[0.5]"]), tmp_path / "full")
    rows = records.read_jsonl(tmp_path / "full" / records.METRICS)
    assert len(rows) == 6 and full["stopped_early"] is None and full["steps"] == rows[-1]["step"]
    # a level the full run first reaches strictly before its last epoch
    levels = sorted({r["train_acc.clean"] for r in rows[:-1]})
    level = next(v for v in reversed(levels) if all(r["train_acc.clean"] < v for r in rows[:2]))
    first = next(i for i, r in enumerate(rows) if r["train_acc.clean"] >= level)
    assert first < 5
    short = train.fit(make_config([*BASE, "eval.targets=[0.5]", f"optim.stop_at={level}"]), tmp_path / "short")
    got = records.read_jsonl(tmp_path / "short" / records.METRICS)
    assert len(got) == first + 1
    assert short["stopped_early"] == {"epoch": first, "step": rows[first]["step"],
                                      "train_acc.clean": rows[first]["train_acc.clean"]}
    assert short["steps"] == rows[first]["step"]
    for a, b in zip(got, rows):  # the same training up to the stop (the schedule runs over the cap)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["train_acc.clean"] == b["train_acc.clean"]


def test_a_level_never_reached_trains_every_epoch(tmp_path):
    s = train.fit(make_config([*BASE, "optim.epochs=2", "eval.targets=[0.5]", "optim.stop_at=1.0",
                               "data.synthetic_train=512"]), tmp_path)
    rows = records.read_jsonl(tmp_path / records.METRICS)
    if rows[0]["train_acc.clean"] < 1.0:
        assert len(rows) == 2 and s["stopped_early"] is None


@pytest.mark.parametrize("extra, words", [(["optim.stop_at=1.5"], "optim.stop_at=1.5 must be an accuracy"),
                                          (["optim.stop_at=0.9", "eval.targets=[]"], "eval.targets=[]")])
def test_bad_stop_at_is_one_clear_line(extra, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make_config([*BASE, *extra])
