"""Experiment tracking: ``logger=tensorboard`` event files read back against the run's records."""
from __future__ import annotations

import pytest

from bnexp import config, records
from bnexp.training import loggers
from bnexp.training import fit as train
from conftest import TINY, make_config

TB_ARGS = [*TINY, "logger=tensorboard", "probes=all", "eval.every_epoch=true", "checkpoint=false",
           "progress=off"]


def events(run_dir):
    """Every scalar and text in the run's TensorBoard folder, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / loggers.TENSORBOARD_DIR),
                           size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [e.tensor_proto.string_val[0].decode()
                                                 for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_logger_choices_match_the_registry():
    assert config.LOGGERS == loggers.LOGGERS.names()


def test_unknown_logger_is_a_setting_error():
    with pytest.raises(config.ConfigError, match="logger='mlflow'.*none, tensorboard"):
        make_config(["logger=mlflow"])


def test_tensorboard_events_hold_the_epochs_eval_modes_probes_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train.fit(make_config(TB_ARGS), run_dir)
    scalars, texts = events(run_dir)
    rows = records.read_jsonl(run_dir / records.METRICS)
    assert len(rows) == 2
    # every numeric column of metrics.jsonl, each eval mode among them, at its row's step
    assert {"test_acc.precise", "test_acc.batch", "lr", "train_loss"} <= set(rows[0])
    for key in set(rows[0]) - {"epoch", "step"}:
        assert [s for s, _ in scalars[key]] == [r["step"] for r in rows]
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6)
    probe_rows = records.read_jsonl(run_dir / records.PROBES)
    assert probe_rows
    # one series per probe, layer and qualifier (the noise probe's batch_size): no two rows collide
    assert len({(loggers.probe_tag(r), r["step"]) for r in probe_rows}) == len(probe_rows)
    assert "probes/noise.mean/features.0.norm/batch_size=8" in scalars
    for row in probe_rows:
        logged = dict(scalars[loggers.probe_tag(row)])
        assert logged[row["step"]] == pytest.approx(row["value"], rel=1e-6, abs=1e-12)
    last = rows[-1]["step"]
    for key, value in summary["metrics"].items():  # the final scores under every eval mode
        if value is None:  # steps_to.<target> a run never reached: no number to log
            assert f"final/{key}" not in scalars and key.startswith("steps_to.")
            continue
        assert scalars[f"final/{key}"] == [(last, pytest.approx(value, rel=1e-6))]
    assert texts["status"] == ["ok"] and '"name": "bn"' in texts["config"][0]


def test_no_logger_writes_no_event_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train.fit(make_config([*TINY, "optim.epochs=1", "checkpoint=false", "progress=off"]), run_dir)
    assert not (run_dir / loggers.TENSORBOARD_DIR).exists()


def test_a_resumed_run_hides_the_events_its_interrupted_attempt_wrote_after_the_resume_step(tmp_path):
    first = loggers.make("tensorboard", tmp_path, 0)
    for step, value in [(10, 0.1), (20, 0.2), (30, 0.3)]:  # the attempt died after step 30
        first.log_epoch({"epoch": step // 10 - 1, "step": step, "test_acc": value}, step)
    first.close()
    again = loggers.make("tensorboard", tmp_path, 20)  # its last checkpoint was at step 20
    again.log_epoch({"epoch": 2, "step": 30, "test_acc": 0.35}, 30)
    again.close()
    scalars, _ = events(tmp_path)
    assert scalars["test_acc"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.2)),
                                   (30, pytest.approx(0.35))]
