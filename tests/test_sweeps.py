"""Sweeps at scale: job placement, the run lock, progress, kill-and-resume, and launchers that
must leave the same records as the basic one. End-to-end tests run ``python -m bnexp -m`` on
tiny synthetic settings in a temporary results_dir, one torch thread per process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bnexp import records
from bnexp.jobs import launch
from bnexp.training import progress
from bnexp.training import fit as train
from bnexp.jobs.launch import Placement, place_job
from conftest import TINY, compose_config, make_config

TIMING = {"seconds", "images_per_s"}
JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
SUBMITIT = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ helpers

def tiny(*extra: str) -> list[str]:
    """TINY with ``extra`` overrides replacing those of the same key (as a sweep would)."""
    merged = {o.split("=", 1)[0]: o for o in (*TINY, *extra)}
    return list(merged.values())


def bnexp_cmd(*args, progress="off") -> list[str]:
    return [sys.executable, "-m", "bnexp", "-m", *tiny(f"progress={progress}", *args)]


def sweep(tmp_path, *args, study="s", progress="off", timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(bnexp_cmd(f"results_dir={tmp_path}", f"study_name={study}", *args,
                                   progress=progress),
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_dirs(root: Path, study: str) -> dict[str, Path]:
    runs = root / study / "synthetic-full" / "runs"
    return {p.name: p for p in sorted(runs.iterdir())} if runs.exists() else {}


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def record_of(run_dir: Path) -> dict:
    """What must not depend on the launcher: overrides, config (less results_dir), metrics."""
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    config.pop("results_dir")
    summary = records.read_summary(run_dir)
    overrides = [o for o in records.read_overrides(run_dir) if not o.startswith("results_dir=")]
    return {"overrides": overrides, "config": config,
            "status": summary["status"], "metrics": summary["metrics"],
            "epochs": strip_timing(records.read_jsonl(run_dir / records.METRICS))}


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """A 2-run sweep with the default (sequential) launcher: the reference records."""
    root = tmp_path_factory.mktemp("basic")
    sweep(root, "optim.epochs=1", "seed=0,1")
    return root


# ------------------------------------------------------------------------------ placement

@pytest.mark.parametrize("launcher,job,threads,cores,gpus,expected", [
    (BASIC, 3, 0, 8, 4, Placement(0, None, False)),            # sequential: keeps all, no spreading
    ({**JOBLIB, "n_jobs": 4}, 0, 0, 8, 0, Placement(2, None, True)),
    ({**JOBLIB, "n_jobs": 3}, 0, 0, 8, 0, Placement(2, None, True)),  # floor: 3 x 2 <= 8
    ({**JOBLIB, "n_jobs": -1}, 0, 0, 8, 0, Placement(1, None, True)),  # one job per core
    ({**JOBLIB, "n_jobs": -2}, 0, 0, 8, 0, Placement(1, None, True)),  # 7 jobs
    ({**JOBLIB, "n_jobs": 16}, 0, 0, 8, 0, Placement(1, None, True)),  # never 0 threads (warns)
    ({**JOBLIB, "n_jobs": 2}, 0, 3, 8, 0, Placement(3, None, True)),   # the config wins
    ({**JOBLIB, "n_jobs": 4}, 5, 0, 8, 2, Placement(2, 1, True)),      # job 5 on cuda:1
    ({**JOBLIB, "n_jobs": 4}, 6, 0, 8, 3, Placement(2, 0, True)),      # job 6 on cuda:0
    ({**JOBLIB, "n_jobs": 4}, 5, 0, 8, 1, Placement(2, None, True)),   # one GPU: leave it
    ({**SUBMITIT, "cpus_per_task": 6}, 2, 0, 64, 1, Placement(6, None, True)),
    ({**SUBMITIT, "cpus_per_task": None}, 2, 0, 64, 1, Placement(0, None, True)),
])
def test_place_job_splits_cores_and_spreads_gpus(launcher, job, threads, cores, gpus, expected):
    assert place_job(launcher, job, threads, cores, gpus) == expected


@pytest.mark.parametrize("launcher,threads,cores,oversubscribed", [
    ({**JOBLIB, "n_jobs": 16}, 0, 8, True),   # 16 jobs x 1 thread: 1 is the least a job can have
    ({**JOBLIB, "n_jobs": 4}, 3, 8, True),    # explicit threads: 4 x 3 > 8
    ({**JOBLIB, "n_jobs": 4}, 2, 8, False),
    ({**JOBLIB, "n_jobs": 4}, 0, 8, False),
    ({**JOBLIB, "n_jobs": -1}, 0, 8, False),
    ({**SUBMITIT, "cpus_per_task": 6}, 0, 8, False),  # a Slurm task has its own allocation
    ({**SUBMITIT, "cpus_per_task": 6}, 16, 8, True),  # more threads than the task's cores
    (BASIC, 16, 8, False),                            # one job at a time: torch's business
])
def test_place_job_warns_when_jobs_times_threads_exceed_the_cores(caplog, launcher, threads, cores,
                                                                  oversubscribed):
    with caplog.at_level("WARNING", logger="bnexp"):
        place_job(launcher, 0, threads, cores, 0)
    assert ("oversubscribes" in caplog.text) == oversubscribed


@pytest.mark.parametrize("preset,kind", [("joblib", "joblib"), ("local", "submitit"),
                                         ("slurm", "submitit")])
def test_launcher_presets_change_neither_the_task_config_nor_folder_names(preset, kind):
    plain = compose_config(["seed=3"], return_hydra_config=True)
    cfg = compose_config([f"launcher={preset}", "seed=3"], return_hydra_config=True)
    assert launch.launcher_kind(dict(cfg.hydra.launcher)) == kind
    assert cfg.hydra.job.override_dirname == plain.hydra.job.override_dirname == "seed=3"
    strip = lambda c: {k: v for k, v in c.items() if k != "hydra"}
    assert strip(cfg) == strip(plain)


def test_config_drift_names_changed_keys_and_ignores_excluded_ones():
    old = {"seed": 0, "threads": 0, "optim": {"lr": 0.1, "epochs": 3}, "data": {"root": "a"}}
    new = {"seed": 0, "threads": 4, "optim": {"lr": 0.1, "epochs": 5}, "data": {"root": "b"}}
    assert launch.config_drift(old, new, ["threads", "data.root"]) == ["optim.epochs"]
    assert launch.config_drift(old, old) == []


def test_a_skip_warns_of_a_changed_setting_but_not_of_a_key_added_with_its_default(tmp_path, caplog):
    """A run recorded before ``eval.ema_momenta`` existed reads it as its default ([]), so a
    re-run sweep should not call that drift; a changed epoch count it should."""
    import copy
    import json

    from bnexp.jobs import job
    from bnexp.config import to_dict

    recorded = to_dict(make_config(tiny()))
    del recorded["eval"]["ema_momenta"]
    (tmp_path / records.SUMMARY).write_text(json.dumps({"status": "ok", "config": recorded}))
    today = copy.deepcopy(recorded)
    today["eval"]["ema_momenta"] = []
    with caplog.at_level("INFO", logger="bnexp"):
        job._log_skip(tmp_path, today, [])
    assert "already finished" in caplog.text and "differs" not in caplog.text
    today["optim"]["epochs"] += 1
    job._log_skip(tmp_path, today, [])
    assert "differs from today's composition in optim.epochs" in caplog.text


# ------------------------------------------------------------------------------ run lock

def test_run_lock_is_exclusive_and_released(tmp_path):
    with launch.run_lock(tmp_path) as first:
        with launch.run_lock(tmp_path) as second:  # another open file: flock conflicts
            assert first and not second
        assert str(os.getpid()) in launch.lock_holder(tmp_path)
    with launch.run_lock(tmp_path) as again:
        assert again


def test_run_lock_of_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bnexp.jobs import launch\n"
        f"with launch.run_lock({str(tmp_path)!r}) as held:\n"
        "    print(held, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with launch.run_lock(tmp_path) as held:
            assert not held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with launch.run_lock(tmp_path) as held:
        assert held


def test_sweep_skips_a_locked_run_and_shows_progress(tmp_path):
    names = {}
    for seed in (0, 1):  # the folder of seed=1, as Hydra will name it
        cfg = compose_config(tiny("optim.epochs=1", f"seed={seed}", "study_name=s"),
                             return_hydra_config=True)
        names[seed] = cfg.hydra.job.override_dirname
    busy = tmp_path / "s" / "synthetic-full" / "runs" / names[1]
    with launch.run_lock(busy) as held:
        assert held
        out = sweep(tmp_path, "optim.epochs=1", "seed=0,1", progress="on")
    dirs = run_dirs(tmp_path, "s")
    assert records.read_summary(dirs[names[0]])["status"] == "ok"
    assert records.read_summary(busy) is None and not (busy / records.METRICS).exists()
    log = out.stdout + out.stderr
    assert "another process is training it" in log
    # progress was asked for: the run's line (epochs, images/s) and the sweep's count
    assert "epoch 1/1" in out.stderr and "img/s" in out.stderr
    assert "sweep 1/2 runs done" in out.stderr and "sweep 2/2" not in out.stderr


# ------------------------------------------------------------------------------ progress

def test_run_progress_draws_epochs_and_rate_only_when_enabled(capsys, monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    bar = progress.RunProgress("on", epochs=2, steps_per_epoch=3, batch_size=8)
    batches = [torch.tensor([i]) for i in range(3)]
    tracked = bar.track(batches, epoch=0)
    assert len(tracked) == 3 and list(tracked) == batches
    bar.epoch_done(0, 123.0)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" in err and "epoch 1/2 step 3/3" in err and "123 img/s" in err and "ETA" in err
    quiet = progress.RunProgress("auto", 2, 3, 8)  # pytest's stderr is not a terminal
    assert quiet.track(batches, 0) is batches
    quiet.epoch_done(0, 1.0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.6, "1m00s"), (185, "3m05s"),
                                          (7620, "2h07m")])
def test_duration(seconds, text):
    assert progress.duration(seconds) == text


# ------------------------------------------------------------------------------ end to end

def test_killed_sweep_resumes_and_trains_every_run_once(tmp_path):
    """SIGKILL a sweep once a run has finished and another is mid-training, then re-run it."""
    args = ["optim.epochs=3", "seed=0,1,2", f"results_dir={tmp_path}", "study_name=k"]
    with open(tmp_path / "first.log", "w") as log_file:
        proc = subprocess.Popen(bnexp_cmd(*args), cwd=tmp_path, env=ENV, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            finished, partial = _wait_for_finished_and_partial(tmp_path / "k" / "synthetic-full" / "runs", proc)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert records.read_summary(partial) is None and (partial / "last.pt").exists(), \
        "the interrupted run finished before the kill: make its epochs longer"
    before = {d.name: _finished_state(d) for d in finished}

    again = subprocess.run(bnexp_cmd(*args), cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    dirs = run_dirs(tmp_path, "k")
    assert len(dirs) == 3 and all(records.read_summary(d)["status"] == "ok" for d in dirs.values())
    for name, state in before.items():  # finished runs were skipped, their records untouched
        assert _finished_state(dirs[name]) == state
        assert f"skip {name}: already finished" in again.stdout + again.stderr
    for name, d in dirs.items():  # nobody trained twice, nothing written twice
        summary = records.read_summary(d)
        assert summary["resumed"] == (name == partial.name)
        assert [r["epoch"] for r in records.read_jsonl(d / records.METRICS)] == [0, 1, 2]
        assert not (d / "last.pt").exists()

    # the resumed run ends with the records of an uninterrupted one (same threads: 1)
    seed = records.read_summary(partial)["config"]["seed"]
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = train.fit(make_config(tiny("optim.epochs=3", f"seed={seed}")), clean_dir)
    finally:
        torch.set_num_threads(threads)
    resumed = records.read_summary(partial)
    rows = strip_timing(records.read_jsonl(partial / records.METRICS))
    clean_rows = strip_timing(records.read_jsonl(clean_dir / records.METRICS))
    assert len(rows) == len(clean_rows) and all(r == pytest.approx(c) for r, c in zip(rows, clean_rows))
    assert resumed["metrics"] == pytest.approx(clean["metrics"], abs=1e-6)
    _check_analysis_tables(tmp_path / "k", n_runs=3, epochs=3)


def _wait_for_finished_and_partial(runs: Path, proc, timeout: float = 240.0):
    """Poll until one run has a summary and another has an epoch checkpoint but no summary."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        dirs = sorted(runs.iterdir()) if runs.exists() else []
        finished = [d for d in dirs if (d / records.SUMMARY).exists()]
        partial = [d for d in dirs if (d / "last.pt").exists() and not (d / records.SUMMARY).exists()]
        if finished and partial:
            return finished, partial[0]
        time.sleep(0.02)
    raise AssertionError("no finished + interrupted pair of runs within the timeout")


def _finished_state(run_dir: Path) -> tuple:
    files = (records.SUMMARY, records.METRICS, "model.pt")
    return (records.read_summary(run_dir)["started_at"],
            *((run_dir / f).stat().st_mtime_ns for f in files))


def _check_analysis_tables(study_dir: Path, n_runs: int, epochs: int) -> None:
    tables = pytest.importorskip("bnexp.analysis.tables")
    runs, curves = tables.collect_runs(study_dir)
    assert len(runs) == n_runs and runs["run"].is_unique
    assert len(curves) == n_runs * epochs and not curves.duplicated(["run", "epoch"]).any()


@pytest.mark.slow  # loky starts worker processes that import torch: 15-25 s on 2 cores
def test_joblib_sweep_leaves_the_records_of_the_basic_launcher(basic_sweep, tmp_path):
    # hydra/launcher=joblib is a Hydra override: .hydra/overrides.yaml stays byte for byte the
    # same. n_jobs = cores gives every job 1 thread, as the basic sweep had (OMP_NUM_THREADS=1).
    cores = launch.available_cores()
    sweep(tmp_path, "optim.epochs=1", "seed=0,1", "hydra/launcher=joblib",
          f"hydra.launcher.n_jobs={cores}")
    ours, ref = run_dirs(tmp_path, "s"), run_dirs(basic_sweep, "s")
    assert list(ours) == list(ref) and len(ours) == 2
    for name in ours:
        assert record_of(ours[name]) == record_of(ref[name])
        assert "1 threads" in records.read_summary(ours[name])["device"]


@pytest.mark.slow  # submitit polls its jobs: about 20-40 s on 2 cores
def test_submitit_local_sweep_leaves_the_records_of_the_basic_launcher(basic_sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep(tmp_path, "optim.epochs=1", "seed=0,1", "launcher=local")
    ours, ref = run_dirs(tmp_path, "s"), run_dirs(basic_sweep, "s")
    assert list(ours) == list(ref) and len(ours) == 2
    for name in ours:
        mine, theirs = record_of(ours[name]), record_of(ref[name])
        # the preset is a task override, so Hydra lists it; it is left out of folder names
        assert mine.pop("overrides") == theirs.pop("overrides") + ["launcher=local"]
        assert mine == theirs


def test_rerun_keeps_a_finished_runs_records_and_hydra_folder(tmp_path):
    tables = pytest.importorskip("bnexp.analysis.tables")
    sweep(tmp_path, "optim.epochs=1", "seed=0", "checkpoint=false")
    [run_dir] = run_dirs(tmp_path, "s").values()
    first = records.read_summary(run_dir)
    assert "seed=0" in first["overrides"] and first["choices"]["norm"] == "bn"
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    assert set(hydra_files) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    # threads is left out of folder names: the same folder, skipped, and its .hydra/ is left as
    # the run wrote it (Hydra is told not to write it: launch.hydra_subdir)
    again = sweep(tmp_path, "optim.epochs=1", "seed=0", "checkpoint=false", "threads=1")
    assert "already finished" in again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    assert "threads=1" not in records.read_overrides(run_dir)
    assert records.read_summary(run_dir) == first
    runs, _ = tables.collect_runs(tmp_path / "s")
    assert "threads" not in runs.attrs["override_keys"] and "seed" in runs.attrs["override_keys"]
    # a run of the same sweep that has not finished gets its .hydra/ from today's command
    more = sweep(tmp_path, "optim.epochs=1", "seed=0,1", "checkpoint=false", "threads=1")
    assert "already finished" in more.stdout + more.stderr
    [new_run] = [d for name, d in run_dirs(tmp_path, "s").items() if "seed=1" in name]
    assert "threads=1" in records.read_overrides(new_run)
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == hydra_files["overrides.yaml"]


# ------------------------------------------------------------------------------ bench

def test_bench_naive_dataset_serves_the_same_images_as_pil():
    from torchvision.transforms.functional import pil_to_tensor

    from bnexp.tools.bench import SyntheticCIFAR

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([3, 1, 4, 1])
    ds = SyntheticCIFAR(x, y)
    assert len(ds) == 4
    for i in range(4):
        img, label = ds[i]
        assert torch.equal(pil_to_tensor(img), x[i]) and label == y[i].item()


def test_bench_flop_count_matches_the_conv_arithmetic():
    from bnexp.tools.bench import train_flops_per_image

    cfg = make_config(["model.width=8"])
    flops = train_flops_per_image(cfg, num_classes=10, device=torch.device("cpu"), batch=2)
    # VGG-8: 4 stages of 2 3x3 convs, widths 8..64 at 32, 16, 8, 4 pixels; then a linear head.
    convs, c_in = [], 3
    for stage in range(4):
        side, c_out = 32 >> stage, 8 << stage
        for _ in range(2):
            convs.append(2 * c_in * c_out * 9 * side * side)
            c_in = c_out
    head = 2 * c_in * 10
    # backward: weight and input gradients cost a forward each, except the input's gradient
    assert flops == 3 * (sum(convs) + head) - convs[0]
