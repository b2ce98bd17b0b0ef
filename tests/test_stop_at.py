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
    assert len(rows) == 6 and full["stopped_early"] is False and full["stop_at_reached"] is None
    assert full["steps"] == rows[-1]["step"]
    # a level the full run first reaches strictly before its last epoch
    levels = sorted({r["train_acc.clean"] for r in rows[:-1]})
    candidates = [v for v in levels if all(r["train_acc.clean"] < v for r in rows[:2])]
    if not candidates:
        pytest.skip("the tiny run's clean accuracy did not rise after epoch 2")
    level = candidates[-1]
    first = next(i for i, r in enumerate(rows) if r["train_acc.clean"] >= level)
    short = train.fit(make_config([*BASE, "eval.targets=[0.5]", f"optim.stop_at={level}"]), tmp_path / "short")
    got = records.read_jsonl(tmp_path / "short" / records.METRICS)
    assert len(got) == first + 1
    assert short["stopped_early"] is True
    assert short["stop_at_reached"] == {"epoch": first, "step": rows[first]["step"],
                                        "train_acc.clean": rows[first]["train_acc.clean"]}
    assert short["steps"] == rows[first]["step"]
    for a, b in zip(got, rows):  # the same training up to the stop (the schedule runs over the cap)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["train_acc.clean"] == b["train_acc.clean"]
    # the analysis table reads where each run reached the level (NaN: never, or no stop_at)
    from bnexp.analysis.tables import collect_runs
    by = collect_runs(tmp_path)[0].set_index("run")
    assert by.loc["short", "stop_at_reached.step"] == rows[first]["step"] == by.loc["short", "steps"]
    assert by.loc["short", "stopped_early"] == True  # noqa: E712 (a numpy bool)
    assert by.loc["full", "steps"] == rows[-1]["step"] and by.loc["full", "stop_at_reached.step"] != by.loc["full", "stop_at_reached.step"]


def test_a_level_reached_only_in_the_last_epoch_or_never_trains_every_epoch(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg = [*BASE, "optim.epochs=3", "eval.targets=[0.5]"]
    rows = records.read_jsonl(tmp_path / "a" / records.METRICS) if train.fit(make_config(cfg), tmp_path / "a") else []
    last = rows[-1]["train_acc.clean"]
    if any(r["train_acc.clean"] >= last for r in rows[:-1]):
        pytest.skip("the tiny run's last epoch is not its first at its final accuracy")
    s = train.fit(make_config([*cfg, f"optim.stop_at={last}"]), tmp_path / "b")
    assert len(records.read_jsonl(tmp_path / "b" / records.METRICS)) == 3
    assert s["stopped_early"] is False and s["stop_at_reached"]["epoch"] == 2  # reached, at the cap
    never = min(1.0, last + 0.5)
    (tmp_path / "c").mkdir()
    s = train.fit(make_config([*cfg, f"optim.stop_at={never}"]), tmp_path / "c")
    if never > max(r["train_acc.clean"] for r in rows):
        assert s["stopped_early"] is False and s["stop_at_reached"] is None


@pytest.mark.parametrize("extra, words", [(["optim.stop_at=1.5"], "optim.stop_at=1.5 must be an accuracy"),
                                          (["optim.stop_at=0.9", "eval.targets=[]"], "eval.targets=[]")])
def test_bad_stop_at_is_one_clear_line(extra, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make_config([*BASE, *extra])
