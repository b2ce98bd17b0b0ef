"""The runner under faults and bad input (issue 23): nothing lost, nothing mislabeled.

Each test states a fault a tester met and what the runner must do instead: one clear line
naming the setting, or a record with the run's true status; no half-written file, no other run
of the sweep affected.
"""
from __future__ import annotations

import errno
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bnexp
from bnexp import __main__ as entry
from bnexp import records
from bnexp.config import ConfigError
from bnexp.training import checkpoint
from bnexp.training import fit as train
from conftest import TINY, make_config
from test_api import ENV, ONE_EPOCH, _as_sweep_job, _task_return


def cli(tmp_path: Path, *args: str, multirun: bool = False, timeout: int = 300):
    cmd = [sys.executable, "-m", "bnexp", *(["-m"] if multirun else []), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def kill_after_epoch(monkeypatch, epoch: int) -> None:
    """``fit`` raises KeyboardInterrupt right after epoch ``epoch`` (0-based) was checkpointed."""
    real = train.save_last

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_last", save_then_die)


# ------------------------------------------------------------------------------ 1: divergence

def test_weights_blown_up_with_a_finite_loss_make_the_run_diverged(tmp_path, monkeypatch):
    """The loss is computed before each update: the last updates can leave inf weights behind a
    finite loss. The oracle: the weight we set to inf is named, and nothing is scored as ok."""
    real, blown = train.train_epoch, []

    def blow_up_after(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        name, weight = next(iter(model.named_parameters()))
        with torch.no_grad():
            weight.fill_(math.inf)
        blown.append(name)
        return result

    monkeypatch.setattr(train, "train_epoch", blow_up_after)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train.fit(make_config([*TINY, "optim.epochs=1"]), run_dir)
    assert records.read_summary(run_dir)["status"] == summary["status"] == "diverged"
    assert blown and blown[0] in summary["diverged_at"]["reason"]
    assert summary["metrics"] == {} and not (run_dir / records.MODEL).exists()
    assert math.isnan(entry.objective(summary))
    with pytest.raises(ValueError):  # what Optuna's sweeper does with the task's value
        float(entry.task_value(summary))


# ------------------------------------------------------------------------------ 2: resume

def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kill_after_epoch(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train.fit(make_config(TINY), run_dir)
    monkeypatch.undo()
    last = run_dir / records.LAST
    before = last.stat().st_mtime_ns, (run_dir / records.METRICS).read_text()
    with pytest.raises(RuntimeError) as err:
        train.fit(make_config([*TINY, "optim.lr=0.05", "seed=1"]), run_dir)
    assert type(err.value).__name__ == "ResumeRefused"
    message = one_line(str(err.value))
    assert "optim.lr (0.1 -> 0.05)" in message and "seed (0 -> 1)" in message
    assert "data." not in message  # only the keys that differ
    assert (last.stat().st_mtime_ns, (run_dir / records.METRICS).read_text()) == before
    assert not (run_dir / records.SUMMARY).exists()
    # a setting that does not change the computation (progress) resumes
    resumed = train.fit(make_config([*TINY, "progress=off"]), run_dir)
    assert resumed["resumed"] and resumed["status"] == "ok"


# ------------------------------------------------------------------------------ 6: bad values

@pytest.mark.parametrize("override, named", [
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("norm.eps=nan", "norm.eps=nan must be a finite number"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number"),
    ("optim.gamma=-1", "optim.gamma=-1.0 must be > 0"),
    ("norm=batchnorm", "norm=batchnorm is not an option; allowed values: batch_renorm, bn, "),
])
def test_values_that_once_passed_validation_are_refused_naming_the_setting(override, named):
    with pytest.raises(ConfigError) as err:
        bnexp.compose(["data=synthetic", override])
    assert named in one_line(str(err.value))


def test_cli_rejects_a_bad_setting_in_one_line_exit_2_and_leaves_no_scratch_folder(tmp_path):
    out = cli(tmp_path, "data=synthetic", "optim.lr=inf")
    assert out.returncode == 2 and "optim.lr=inf must be a finite number" in one_line(out.stderr)
    scratch = tmp_path / "results" / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())
    out = cli(tmp_path, "data=synthetic", "norm=batchnorm")
    assert out.returncode == 2 and "norm=batchnorm is not an option" in one_line(out.stderr)
    (tmp_path / "a_file").write_text("")
    out = cli(tmp_path, "data=synthetic", f"results_dir={tmp_path / 'a_file' / 'res'}")
    assert out.returncode == 2 and "results_dir=" in one_line(out.stderr)
    assert "is a file, not a folder" in out.stderr


def test_groups_that_do_not_divide_a_width_are_recorded_as_used(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = train.fit(make_config([*TINY, "optim.epochs=1", "norm=gn", "norm.groups=3"]), run_dir)
    used = records.read_summary(run_dir)["norm_groups_used"]
    assert used == summary["norm_groups_used"] and "8" in used  # model.width=8: the first block
    for channels, groups in used.items():  # oracle: the largest divisor <= norm.groups
        assert groups == max(g for g in range(1, 4) if int(channels) % g == 0)
    assert used["8"] == 2


# ------------------------------------------------------------------------------ 7: full disk

def test_a_full_disk_fails_the_run_cleanly_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    value = _task_return(*_as_sweep_job(tmp_path, "full", ONE_EPOCH))
    assert sorted(p.name for p in (tmp_path / "full").glob("*.pt*")) == []  # no partial file
    summary = records.read_summary(tmp_path / "full")
    assert one_line(summary["error"]) == "OSError: [Errno 28] No space left on device"
    assert summary["status"] == "failed" and isinstance(value, str)

    # the summary cannot be written either: the job still returns, nothing half-written
    real_write = records.write_json_atomic
    monkeypatch.setattr(records, "write_json_atomic",
                        lambda path, obj: disk_full(obj, Path(path).with_suffix(".json.tmp")))
    _task_return(*_as_sweep_job(tmp_path, "nothing", ONE_EPOCH))
    assert not (tmp_path / "nothing" / records.SUMMARY).exists()
    monkeypatch.setattr(records, "write_json_atomic", real_write)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert math.isfinite(_task_return(*_as_sweep_job(tmp_path, "next", ONE_EPOCH)))
    assert records.read_summary(tmp_path / "next")["status"] == "ok"


@pytest.mark.parametrize("content", ["", "{\"status\": \"ok\", \"metr", "[1, 2]"])
def test_an_empty_or_corrupt_summary_counts_as_unfinished_and_is_run_again(tmp_path, caplog, content):
    job = _as_sweep_job(tmp_path, "run", ONE_EPOCH)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / records.SUMMARY).write_text(content)
    assert records.read_summary(tmp_path / "run") is None
    assert "empty or corrupt" in caplog.text
    assert not records.is_finished(tmp_path / "run")
    tables = pytest.importorskip("bnexp.analysis.tables")  # what bnexp-analyze --status counts
    assert tables.status_counts(tmp_path)["incomplete"] == 1
    assert math.isfinite(_task_return(*job))
    assert records.read_summary(tmp_path / "run")["status"] == "ok"


# ------------------------------------------------------------------------------ 8: sweeps

def test_a_sweep_where_every_run_failed_exits_1_counting_them(tmp_path):
    out = cli(tmp_path, *TINY, f"results_dir={tmp_path}", "study_name=f", "optim.lr=-1,-2",
              multirun=True)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "bnexp: 2 of 2 runs of the sweep failed" in out.stderr
    summaries = [records.read_summary(p.parent) for p in tmp_path.rglob(records.SUMMARY)]
    assert sorted(s["status"] for s in summaries) == ["failed", "failed"]  # still results


def test_optuna_search_records_a_failed_trial_and_goes_on(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = cli(tmp_path, *ONE_EPOCH, f"results_dir={tmp_path}", "study_name=o",
              "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=1",
              "hydra.sweeper.n_trials=4", "hydra.sweeper.direction=maximize",
              "optim.lr=choice(-1.0,0.05)", multirun=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Values were told" not in out.stderr + out.stdout
    summaries = [records.read_summary(p.parent) for p in tmp_path.rglob(records.SUMMARY)]
    assert sorted({s["status"] for s in summaries}) == ["failed", "ok"]  # seed 1 draws both


@pytest.mark.slow  # loky starts worker processes that import torch: 20-40 s on 2 cores
def test_joblib_workers_die_with_a_killed_sweep(tmp_path):
    args = [*TINY, "data.synthetic_train=4096", "optim.epochs=200", "threads=1", "progress=off",
            f"results_dir={tmp_path}", "study_name=j", "seed=0,1", "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2"]
    proc = subprocess.Popen([sys.executable, "-m", "bnexp", "-m", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(workers) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            started = [p.parent for p in tmp_path.rglob(records.METRICS)]
            workers = [int((d / ".lock").read_text().split()[1]) for d in started]
            time.sleep(0.2)
        assert len(workers) == 2 and proc.pid not in workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "orphaned workers still train"
    finally:
        proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie trains no more


# ------------------------------------------------------------------------------ 11: the API

def test_run_refuses_to_overwrite_a_finished_run_and_logs_each_eval_mode(tmp_path):
    run_dir = tmp_path / "run"
    first = bnexp.run(ONE_EPOCH, run_dir=run_dir)
    log = (run_dir / "run.log").read_text()
    modes = first["config"]["eval"]["modes"]
    for i, mode in enumerate(modes, 1):
        assert f"final evaluation: {mode} ({i}/{len(modes)})" in log
    with pytest.raises(FileExistsError) as err:
        bnexp.run([*ONE_EPOCH, "seed=1"], run_dir=run_dir)
    assert "overwrite=True" in one_line(str(err.value))
    assert records.read_summary(run_dir) == first


# ------------------------------------------------------------------------------ 12: pickles

class _Evil:
    """Unpickling it creates ``marker``: code a crafted file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_last_pt_runs_nothing_and_fails_the_run_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    job = _as_sweep_job(tmp_path, "run", ONE_EPOCH)
    (tmp_path / "run").mkdir()
    torch.save({"model": _Evil(marker), "epoch": 0}, tmp_path / "run" / records.LAST)
    value = _task_return(*job)
    assert not marker.exists()
    assert isinstance(value, str)
    summary = records.read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "not loaded" in one_line(summary["error"])


def test_a_crafted_model_pt_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker)}, tmp_path / records.MODEL)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_model_state(tmp_path)
    assert "not loaded" in one_line(str(err.value)) and not marker.exists()


def test_a_crafted_cifar_batch_runs_nothing(tmp_path):
    from bnexp.data.datasets import DataError
    from bnexp.data.files import read_cifar
    from cifar_fixture import write_cifar_folder

    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    [batch] = tmp_path.rglob("data_batch_1")
    batch.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DataError):
        read_cifar(tmp_path, "cifar10", download=False, verify_checksums=False)
    assert not marker.exists()
