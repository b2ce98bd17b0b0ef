"""Experiment tracking: ``logger=tensorboard`` event files read back against the run's records."""
from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------- hparams, wandb
SWEPT = ["norm=bn", "data.batch_size=32", "seed=1", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """One run through the command-line path (``bnexp.run``: its summary records the overrides)."""
    import bnexp

    run_dir = tmp_path_factory.mktemp("tb") / "run"
    summary = bnexp.run([*TINY, *SWEPT, "optim.epochs=1", "logger=tensorboard", "checkpoint=false",
                         "progress=off", "launcher=joblib"], run_dir=run_dir)
    return run_dir, summary


def test_tensorboard_hparams_hold_the_runs_settings_and_final_metrics(tb_run):
    """The HParams plugin's records, parsed back from the event file: the session's hparams are
    the run's overrides (typed), and the experiment's metrics are final/ scalars of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, summary = tb_run
    acc = EventAccumulator(str(run_dir / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw)
               for tag, raw in acc.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    got = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.items()}
    assert got["norm"] == "bn" and got["data.batch_size"] == 32 and got["seed"] == 1
    assert got["optim.lr"] == pytest.approx(0.05) and got["precision"] == "fp32"
    assert "launcher" not in got and "progress" not in got
    metric_tags = {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos}
    # every finite number of the summary; a null (steps_to.* of a level never reached) is no scalar
    numbers = {k for k, v in summary["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    assert {f"final/{k}" for k in numbers} == metric_tags
    final = acc.Scalars("final/test_acc")[-1].value
    assert final == pytest.approx(summary["metrics"]["test_acc"], rel=1e-6)


def _wandb_records(path):
    """The records of an offline run's ``.wandb`` file, read by hand: a LevelDB-style log (a
    7-byte ``:W&B`` file header, 32 KiB blocks of chunks with a crc32/length/type header, type
    1 whole, 2-3-4 first/middle/last) of ``wandb_internal_pb2.Record`` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records_ = []
    for chunk in chunks:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(chunk)
        records_.append(rec)
    return records_


def test_wandb_offline_run_holds_config_epochs_and_final_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    import bnexp

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    summary = bnexp.run([*TINY, *SWEPT, "logger=wandb", "checkpoint=false", "progress=off"], run_dir=run_dir)
    import wandb

    wandb.teardown()  # stop wandb's service process: its last records are on disk once it has gone
    [wandb_file] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    recs = _wandb_records(wandb_file)
    kind = lambda r: r.WhichOneof("record_type")
    name = lambda u: u.key or "/".join(u.nested_key)  # wandb-core writes nested_key
    summ = {name(u): json.loads(u.value_json) for r in recs if kind(r) == "summary" for u in r.summary.update}
    assert summ["final/test_acc"] == pytest.approx(summary["metrics"]["test_acc"], rel=1e-9)
    assert summ["status"] == "ok"
    config = {name(u): json.loads(u.value_json) for r in recs if kind(r) == "config" for u in r.config.update}
    assert config["hparams"]["norm"] == "bn" and config["hparams"]["data.batch_size"] == 32
    assert config["resolved"]["optim"]["lr"] == pytest.approx(0.05)
    rows = records.read_jsonl(run_dir / records.METRICS)
    history = [{name(u): json.loads(u.value_json) for u in r.history.item} for r in recs if kind(r) == "history"]
    history = [h for h in history if "test_acc" in h]
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    assert [h["test_acc"] for h in history] == pytest.approx([r["test_acc"] for r in rows])
