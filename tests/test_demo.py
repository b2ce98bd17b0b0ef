"""``make demo`` on a fresh clone: it trains into a git-ignored folder of the newcomer's own, never
over the committed reference (results/demo/), and puts each arm's numbers beside that reference.

Oracles: git itself (``git check-ignore``, ``git ls-files``) for the paths, and the committed
runs.csv read with the csv module for the numbers.
"""
from __future__ import annotations

import csv
import re
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "demo" / "fashion_mnist-small"


@pytest.fixture
def demo():
    from conftest import experiment

    return experiment("demo")


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_make_demo_writes_only_to_an_ignored_folder(demo):
    recipe = re.search(r"(?ms)^demo:.*?(?=^\S)", (ROOT / "Makefile").read_text()).group(0)
    assert f"experiments/demo.py results_dir={demo.SCRATCH} $(ARGS)" in recipe
    from bnexp.analysis.run_study import study_dir

    where = study_dir("demo", [f"results_dir={demo.SCRATCH}"])
    assert where == ROOT / "results" / "scratch" / "demo" / "fashion_mnist-small"
    written = ["report.md", "runs.csv", "curves.csv", "multirun.yaml", "sweeps/20260101-000000.yaml",
               "figures/test_acc_vs_batch.png", "runs/data.batch_size=8,norm=bn,seed=0/summary.json",
               "runs/data.batch_size=8,norm=bn,seed=0/.hydra/config.yaml"]
    for rel in written:
        path = (where / rel).relative_to(ROOT)
        assert _git("check-ignore", "-q", "--no-index", str(path)).returncode == 0, f"{path} is not ignored"
    assert _git("ls-files", "results/scratch").stdout == ""
    # the reference itself is tracked (what the demo is compared with)
    assert _git("ls-files", "--error-unmatch", str((REFERENCE / "runs.csv").relative_to(ROOT))).returncode == 0


def _reference_means() -> dict:
    rows = list(csv.DictReader((REFERENCE / "runs.csv").open()))
    out: dict = {}
    for r in rows:
        if r["status"] == "ok":
            out.setdefault((r["norm"], int(r["data.batch_size"])), []).append(float(r["test_acc"]))
    return out


def test_each_arm_is_put_beside_the_committed_reference(demo, tmp_path):
    ref = pd.read_csv(REFERENCE / "runs.csv")
    mine = ref.assign(test_acc=ref["test_acc"] - 0.02).iloc[1:]  # 2 points lower, one run fewer
    lines = demo.beside_reference(mine, tmp_path / "scratch" / "demo" / "fashion_mnist-small")
    means = _reference_means()
    assert len(lines) == len(means) == 6
    dropped = (ref.iloc[0]["norm"], int(ref.iloc[0]["data.batch_size"]))
    for (norm, batch), accs in means.items():
        yours = accs[1:] if (norm, batch) == dropped else accs
        expected = (f"{norm} at batch {batch}: yours {100 * (statistics.mean(yours) - 0.02):.1f}% "
                    f"(n={len(yours)}), committed {100 * statistics.mean(accs):.1f}% (n={len(accs)})")
        assert expected in lines
    # the reference folder is not compared with itself; another data/scale has no reference
    assert demo.beside_reference(ref, REFERENCE) == []
    assert demo.beside_reference(ref, tmp_path / "synthetic-smoke") == []


def test_make_demo_reuses_the_reference_lr_grid_once_and_never_into_the_reference(demo, tmp_path):
    """The committed grid runs are copied into the newcomer's grid folder (file for file) when it
    does not exist; an existing folder is left alone, and a run into the reference itself (`make
    study S=demo`) copies nothing."""
    reference = tmp_path / "ref"
    run = reference / "fashion_mnist-small-lr_grid" / "runs" / "norm=none,optim.lr=0.03,seed=100"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "ok"}')
    argv = [f"results_dir={tmp_path / 'scratch'}", "launcher=joblib"]
    grid = demo.reuse_reference_grid(argv, reference)
    assert grid == tmp_path / "scratch" / "demo" / "fashion_mnist-small-lr_grid"
    copied = grid / "runs" / run.name / "summary.json"
    assert copied.read_text() == (run / "summary.json").read_text()
    copied.write_text("mine")
    assert demo.reuse_reference_grid(argv, reference) is None and copied.read_text() == "mine"
    assert demo.reuse_reference_grid([*argv, "--analyze-only"], reference) is None
    # a run into the reference itself: its grid folder is the source, nothing is copied
    own = [f"results_dir={tmp_path}"]
    (tmp_path / "demo").mkdir()
    (reference / "fashion_mnist-small-lr_grid").rename(tmp_path / "demo" / "fashion_mnist-small-lr_grid")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert demo.reuse_reference_grid(own, tmp_path / "demo") is None
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
