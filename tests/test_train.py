"""The runner end to end on tiny synthetic data: learning, records, divergence, failure, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bnexp import records
from bnexp.layers import norms
from bnexp.measure import modes as stats
from bnexp.training import fit as train
from conftest import TINY, make_config

TIMING = {"seconds", "images_per_s"}


def run_fit(tmp_path, overrides, name="run"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    return train.fit(make_config([*TINY, *overrides]), run_dir), run_dir


def test_training_lowers_loss_and_writes_records(tmp_path):
    summary, run_dir = run_fit(tmp_path, ["optim.epochs=4", "data.batch_size=32"])
    rows = records.read_jsonl(run_dir / records.METRICS)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert all(set(records.EPOCH_KEYS) <= set(r) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    on_disk = json.loads((run_dir / records.SUMMARY).read_text())
    assert on_disk["status"] == "ok" and on_disk == json.loads(json.dumps(summary))
    m = on_disk["metrics"]
    assert m["gen_gap"] == pytest.approx(m["train_acc"] - m["test_acc"])
    assert m["test_acc"] > 0.2  # 10 classes: clearly above chance after 64 tiny steps
    assert on_disk["config"]["norm"]["name"] == "bn" and on_disk["precision"] == "fp32"
    assert on_disk["versions"]["torch"] and on_disk["train_images_per_s"] > 0
    assert (run_dir / records.MODEL).exists() and not (run_dir / records.LAST).exists()


def test_same_seed_same_numbers_different_seed_differs(tmp_path):
    a, _ = run_fit(tmp_path, ["optim.epochs=1", "checkpoint=false"], "a")
    b, _ = run_fit(tmp_path, ["optim.epochs=1", "checkpoint=false"], "b")
    c, _ = run_fit(tmp_path, ["optim.epochs=1", "checkpoint=false", "seed=1"], "c")
    assert a["metrics"] == b["metrics"]
    assert a["metrics"]["train_loss"] != c["metrics"]["train_loss"]


def test_non_finite_loss_is_recorded_as_diverged(tmp_path):
    summary, run_dir = run_fit(tmp_path, ["norm=none", "optim.lr=1e6", "optim.epochs=2"])
    assert summary["status"] == "diverged"
    assert summary["diverged_at"]["epoch"] == 0
    assert json.loads((run_dir / records.SUMMARY).read_text())["status"] == "diverged"


def test_interrupted_run_resumes_to_identical_records(tmp_path, monkeypatch):
    full, full_dir = run_fit(tmp_path, ["optim.epochs=3", "model.dropout=0.2"], "full")

    calls = {"n": 0}
    real_save = train.save_last

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after epoch 1 was checkpointed
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path, ["optim.epochs=3", "model.dropout=0.2"], "cut")
    monkeypatch.setattr(train, "save_last", real_save)
    cut_dir = tmp_path / "cut"
    assert not (cut_dir / records.SUMMARY).exists() and (cut_dir / records.LAST).exists()
    resumed = train.fit(make_config([*TINY, "optim.epochs=3", "model.dropout=0.2"]), cut_dir)

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(records.read_jsonl(cut_dir / records.METRICS)) == strip(records.read_jsonl(full_dir / records.METRICS))
    assert resumed["resumed"] and resumed["metrics"] == pytest.approx(full["metrics"], abs=1e-6)


def test_scoring_every_k_epochs_moves_no_training_number(tmp_path):
    """eval.score_every=3 over 4 epochs: the test set (and the per-epoch probes) only after epochs
    3 and 4, and training, the final metrics and the probes at those epochs exactly as when every
    epoch is scored. Dropout draws from the global RNG and the probes draw images, so a scoring
    pass that consumed randomness or touched BN state would move the training losses."""
    common = ["optim.epochs=4", "model.dropout=0.3", "probes.enabled=true",
              "probes.names=[variance_shift,weight_norm]", "eval.modes=[ema,precise]"]
    every, every_dir = run_fit(tmp_path, common, "every")
    sparse, sparse_dir = run_fit(tmp_path, [*common, "eval.score_every=3"], "sparse")
    dense_rows = records.read_jsonl(every_dir / records.METRICS)
    rows = records.read_jsonl(sparse_dir / records.METRICS)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in dense_rows]
    assert [r["test_acc"] is None for r in rows] == [True, True, False, False]
    assert all(set(records.EPOCH_KEYS) <= set(r) for r in rows)
    for r, d in zip(rows[2:], dense_rows[2:]):
        assert r["test_acc"] == d["test_acc"] and r["test_loss"] == d["test_loss"]
    assert sparse["metrics"] == every["metrics"]
    probes = records.read_jsonl(sparse_dir / records.PROBES)
    assert sorted({r["epoch"] for r in probes}) == [2, 3]
    assert probes == [r for r in records.read_jsonl(every_dir / records.PROBES) if r["epoch"] >= 2]


def cli(args, cwd, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bnexp", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, check=check, timeout=300)


def test_cli_sweep_folders_are_stable_and_failures_do_not_stop_it(tmp_path):
    args = ["-m", *TINY, "optim.epochs=1", f"results_dir={tmp_path}", "study_name=t",
            "data.train_size=100,100000"]
    out = cli(args, cwd=tmp_path)
    runs_dir = tmp_path / "t" / "synthetic-full" / "runs"
    runs = sorted(p.name for p in (runs_dir).iterdir())
    assert len(runs) == 2, out.stderr
    statuses = {name: records.read_summary(runs_dir / name)["status"] for name in runs}
    bad = [n for n in runs if "data.train_size=100000" in n][0]
    assert statuses[bad] == "failed" and "data.train_size" in records.read_summary(runs_dir / bad)["error"]
    assert statuses[[n for n in runs if n != bad][0]] == "ok"
    # the same command again skips both (finished folders are never retrained, nor rewritten)
    written = {n: (runs_dir / n / records.SUMMARY).stat().st_mtime_ns for n in runs}
    again = cli(args, cwd=tmp_path)
    assert {n: (runs_dir / n / records.SUMMARY).stat().st_mtime_ns for n in runs} == written
    assert sorted(p.name for p in (runs_dir).iterdir()) == runs, again.stderr


@pytest.mark.parametrize("args,rc,message", [
    (["data=cifar10", "data.root={tmp}/nowhere", "data.download=false"], 1, "CIFAR10 not found"),
    (["data=synthetic", "data.batch_size=100000"], 2, "data.batch_size=100000 is larger than"),
    (["model.depth=6"], 2, "model.depth=6 is not valid for vgg"),
    (["optim.lr=abc"], 2, "optim.lr='abc' has the wrong type"),
])
def test_cli_single_run_bad_input_exits_nonzero_with_clear_message(tmp_path, args, rc, message):
    out = cli([*(a.format(tmp=tmp_path) for a in args), f"results_dir={tmp_path}", "device=cpu",
               "progress=off"], cwd=tmp_path, check=False)
    both = out.stdout + out.stderr
    assert out.returncode == rc, both[-3000:]
    assert "Traceback" not in both and both.count(message) == 1
    assert out.stderr.startswith(f"bnexp: {message}")
    if rc == 2:  # a rejected setting is no result of a single run: its scratch folder is gone
        assert list((tmp_path / "scratch").iterdir()) == []
        return
    [run_dir] = list((tmp_path / "scratch").iterdir())
    summary = records.read_summary(run_dir)
    assert summary["status"] == "failed" and message in summary["error"]
    assert "Traceback" in (run_dir / "run.log").read_text()  # the full story stays in the log
    # a failed record says where it came from, as a finished one does
    assert summary["versions"]["torch"] and summary["started_at"] <= summary["finished_at"]
    assert "git_commit" in summary and summary["wall_time_s"] >= 0
    assert summary["overrides"][:len(args)] == [a.format(tmp=tmp_path) for a in args]
    picked = dict(a.split("=", 1) for a in args)
    assert summary["choices"]["norm"] == "bn" and summary["choices"]["data"] == picked.get("data", "synthetic")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_one_line_and_a_setting_error(tmp_path):
    out = cli(["device=cuda", f"results_dir={tmp_path}"], cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stdout + out.stderr and (out.stdout + out.stderr).count("device=cuda but") == 1


def test_cli_diverged_run_exits_0_and_keeps_no_nan_weights(tmp_path):
    out = cli([*TINY, "norm=none", "optim.lr=1e6", "optim.epochs=1", f"results_dir={tmp_path}",
               "progress=off"], cwd=tmp_path)
    [run_dir] = list((tmp_path / "scratch").iterdir())
    assert out.returncode == 0 and records.read_summary(run_dir)["status"] == "diverged"
    assert not (run_dir / records.MODEL).exists() and not (run_dir / records.LAST).exists()
    from bnexp.training.checkpoint import load_model_state

    with pytest.raises(FileNotFoundError, match="diverged"):
        load_model_state(run_dir)


def test_cli_single_runs_started_together_get_their_own_folders(tmp_path):
    args = [*TINY, "optim.epochs=1", f"results_dir={tmp_path}", "progress=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bnexp", *args, f"seed={i}"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = sorted((tmp_path / "scratch").iterdir())
    assert len(dirs) == 2
    assert sorted(records.read_summary(d)["config"]["seed"] for d in dirs) == [0, 1]
    assert all(records.read_summary(d)["status"] == "ok" for d in dirs)


def test_cli_single_run_in_a_locked_folder_fails_loudly(tmp_path):
    from bnexp.jobs import launch

    busy = tmp_path / "busy"
    with launch.run_lock(busy) as held:
        assert held
        out = cli([f"hydra.run.dir={busy}", "device=cpu"], cwd=tmp_path, check=False)
    assert out.returncode == 1 and "is locked by another live process" in out.stderr
    assert records.read_summary(busy) is None


def test_summary_records_provenance_given_by_the_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    given = {"overrides": ["norm=dropout", "seed=1"], "choices": {"norm": "dropout", "data": "synthetic"}}
    summary = train.fit(make_config([*TINY, "norm=dropout", "optim.epochs=1", "checkpoint=false"]),
                        run_dir, given)
    on_disk = records.read_summary(run_dir)
    assert on_disk["overrides"] == given["overrides"] and on_disk["choices"] == given["choices"]
    assert set(records.SUMMARY_KEYS) <= set(on_disk) and summary["precision"] == "fp32"


def test_write_json_atomic_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        records.write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0o600
    assert not list(tmp_path.glob(".a.json.*"))


def vgg_bn_inputs(model, x):
    """The input of every BN layer of a VGG (no dropout) in train mode with plain batch
    statistics, written out with F.conv2d / F.batch_norm."""
    inputs = []
    for block in model.features:
        if "pool" in block._modules:
            x = F.max_pool2d(x, 2)
        x = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
        inputs.append(x.double())
        n = block.norm
        x = F.relu(F.batch_norm(x, None, None, n.weight, n.bias, training=True, eps=n.eps))
    return inputs


@pytest.mark.parametrize("freeze_after,step", [(0.75, 48), (0.7, 45), (0.0, 0), (1.0, None)])
def test_freeze_step_is_where_set_progress_freezes(freeze_after, step):
    assert train.freeze_step(freeze_after, 64) == step
    if step is not None:
        assert step / 64 >= freeze_after and (step == 0 or (step - 1) / 64 < freeze_after)


def test_frozen_bn_freezes_precise_statistics_and_training_loss_does_not_rise(tmp_path, monkeypatch):
    """FrozenBN as Wu & Johnson: with a tiny momentum the EMA is stale (97% of its weight still on
    the initial 0/1 buffers after 48 steps), so freezing it, as the old code did, sends the
    training loss up (measured: 1.34 -> 2.68); frozen precise statistics keep it falling."""
    real, seen = train.freeze_precisely, []

    def spy(model, split, pipe, samples, batch_size, seed):
        assert not any(m.frozen for _, m in norms.bn_layers(model))  # not frozen before
        real(model, split, pipe, samples, batch_size, seed)
        assert all(m.frozen for _, m in norms.bn_layers(model))
        batches = list(stats.input_batches(split, samples, batch_size, pipe, seed, "freeze", augment=True))
        with torch.no_grad():
            per_layer = zip(*[vgg_bn_inputs(model, x) for x in batches])
            want = [torch.var_mean(torch.cat(xs), dim=(0, 2, 3), correction=1) for xs in per_layer]
        seen.append([(m.running_mean.double().clone(), m.running_var.double().clone(), w)
                     for (_, m), w in zip(norms.bn_layers(model), want)])

    monkeypatch.setattr(train, "freeze_precisely", spy)
    summary, run_dir = run_fit(tmp_path, ["optim.epochs=8", "norm.momentum=0.001", "norm.freeze_after=0.75",
                                          "checkpoint=false", "eval.modes=[ema]"])
    [layers] = seen  # once, before step 48 = 0.75 * 8 epochs * 8 steps
    assert summary["frozen_at_step"] == 48 and summary["frozen_after"] == 0.75
    for mean, var, (want_var, want_mean) in layers:
        torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, want_var, rtol=1e-4, atol=1e-6)
    loss = [r["train_loss"] for r in records.read_jsonl(run_dir / records.METRICS)]
    assert sum(loss[6:]) / 2 <= loss[5], loss  # epochs 6, 7 frozen; epoch 5 with batch statistics
    assert summary["status"] == "ok"
