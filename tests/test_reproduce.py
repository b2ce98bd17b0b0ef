"""experiments/reproduce.py: re-run a finished run from its recorded overrides.

The oracle is the run's own record: a CPU run of one thread is deterministic, so the re-run must
give the recorded accuracies (within the default one point; here, exactly), and a record whose
numbers were altered must be reported as not reproduced.
"""
from __future__ import annotations

import json

import pytest

import bnexp
from conftest import TINY, experiment

reproduce = experiment("reproduce")

ONE_EPOCH = [*TINY, "optim.epochs=1", "progress=off", "threads=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    summary = bnexp.run([*ONE_EPOCH, "launcher=joblib"], run_dir=run_dir)
    assert summary["status"] == "ok"
    return run_dir


def test_recorded_overrides_drop_the_launcher_and_keep_the_rest(finished):
    overrides, metrics = reproduce.recorded(finished)
    assert overrides == ONE_EPOCH
    assert metrics == json.loads((finished / "summary.json").read_text())["metrics"]


def test_a_rerun_gives_the_recorded_numbers(finished, tmp_path, capsys):
    assert reproduce.main([str(finished), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())["metrics"]
    old = json.loads((finished / "summary.json").read_text())["metrics"]
    assert again["test_acc"] == old["test_acc"] and again["train_loss"] == old["train_loss"]
    assert "reproduced: every accuracy within 1 point" in capsys.readouterr().out


def test_an_altered_record_is_not_reproduced(finished, tmp_path):
    copy = tmp_path / "altered"
    copy.mkdir()
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "overrides.yaml").write_text((finished / ".hydra" / "overrides.yaml").read_text())
    record = json.loads((finished / "summary.json").read_text())
    record["metrics"]["test_acc"] += 0.05  # five points off
    (copy / "summary.json").write_text(json.dumps(record))
    assert reproduce.main([str(copy)]) == 1
    rows, ok = reproduce.compare(record["metrics"], {**record["metrics"], "test_acc": record["metrics"]["test_acc"] - 0.05}, 0.01)
    assert not ok and dict((r[0], r[3]) for r in rows)["test_acc"] == pytest.approx(-0.05)


def test_a_folder_that_is_not_a_finished_run_exits_2(tmp_path, capsys):
    assert reproduce.main([str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_record_writes_the_outcome_that_the_report_cites(finished, tmp_path):
    from bnexp.analysis import report

    assert reproduce.main([str(finished), "--record", "--out", str(tmp_path / "again")]) == 0
    outcome = json.loads((finished / "reproduced.json").read_text())
    assert outcome["within_tolerance"] and outcome["max_abs_diff"] == 0
    study_dir = finished.parent  # iter_run_dirs finds the run folder below it
    text = report._reproduced(study_dir)
    assert f"`{finished.name}`" in text and "identical" in text
    (finished / "reproduced.json").unlink()
