"""The Python API (``bnexp.compose``, ``bnexp.run``), the sweep objective and ``bnexp --help``.

The API must leave the same records as the command line: the CLI run in a subprocess is the
oracle for the folder an in-process ``bnexp.run`` writes.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bnexp
from bnexp import __main__ as entry
from bnexp import records
from bnexp.config import ConfigError
from conftest import TINY, compose_config, make_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING = {"seconds", "images_per_s"}
ONE_EPOCH = [*TINY, "optim.epochs=1", "progress=off"]


def files_of(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def hydra_file(run_dir: Path, name: str):
    return yaml.safe_load((run_dir / ".hydra" / name).read_text())


def test_import_bnexp_loads_neither_torch_nor_hydra():
    code = "import sys, bnexp; print(sorted(m for m in ('torch', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "[]"


def test_compose_gives_the_config_the_cli_would_run():
    assert bnexp.compose(["norm=gn", "optim.lr=0.05"]) == make_config(["norm=gn", "optim.lr=0.05"])
    cfg = bnexp.compose(["norm=gn"])
    assert cfg.norm.name == "gn" and cfg.optim.lr == 0.05 * 2  # conf/optim: lr 0.1


def test_compose_rejects_unknown_keys_and_bad_values_naming_the_setting():
    with pytest.raises(ConfigError, match="allowed keys in optim: .*lr"):
        bnexp.compose(["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="model.dropout=1.5"):
        bnexp.compose(["model.dropout=1.5"])


def test_run_writes_the_records_of_a_cli_run_from_any_working_directory(tmp_path, monkeypatch):
    cli_dir = tmp_path / "cli"
    args = [*ONE_EPOCH, f"results_dir={tmp_path / 'api'}"]
    subprocess.run([sys.executable, "-m", "bnexp", *args, f"hydra.run.dir={cli_dir}"], cwd=tmp_path,
                   env=ENV, check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # run_dir None: the CLI's single-run folder under results_dir
    summary = bnexp.run(args)
    [api_dir] = list((tmp_path / "api" / "scratch").iterdir())

    assert summary == records.read_summary(api_dir) and summary["status"] == "ok"
    assert files_of(api_dir) == files_of(cli_dir)
    cli = records.read_summary(cli_dir)
    assert set(summary) == set(cli)
    assert summary["overrides"] == cli["overrides"] == args
    assert summary["choices"] == cli["choices"] and summary["config"] == cli["config"]
    # the same seed and one thread each: the same numbers
    assert summary["metrics"] == pytest.approx(cli["metrics"], abs=1e-6)
    rows, cli_rows = (records.read_jsonl(d / records.METRICS) for d in (api_dir, cli_dir))
    assert len(rows) == len(cli_rows) == 1
    for row, cli_row in zip(rows, cli_rows):
        assert set(row) == set(cli_row)
        assert {k: v for k, v in row.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in cli_row.items() if k not in TIMING})
    for name in ("config.yaml", "overrides.yaml"):
        assert hydra_file(api_dir, name) == hydra_file(cli_dir, name)
    api_hydra, cli_hydra = (hydra_file(d, "hydra.yaml")["hydra"] for d in (api_dir, cli_dir))
    assert set(api_hydra) == set(cli_hydra) and api_hydra["runtime"]["output_dir"] == str(api_dir)
    assert api_hydra["runtime"]["choices"] == cli_hydra["runtime"]["choices"]
    log = (api_dir / "run.log").read_text()
    assert "epoch 1/1" in log and log.startswith("[")  # bnexp's log in Hydra's file format


def test_run_records_a_failure_and_raises_it(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size=100000"):
        bnexp.run([*ONE_EPOCH, "data.batch_size=100000"], run_dir=tmp_path / "bad")
    summary = records.read_summary(tmp_path / "bad")
    assert summary["status"] == "failed" and "data.batch_size=100000" in summary["error"]


# ------------------------------------------------------------------------------ sweep objective

def _as_sweep_job(tmp_path: Path, name: str, overrides: list[str]):
    """The task config and the Hydra config of job ``name`` of a -m sweep of ``overrides``."""
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = compose_config(overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path / name)
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task, cfg


def _task_return(task, cfg) -> float:
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    try:
        return entry._hydra_main(task)  # what Hydra's launcher hands its sweeper
    finally:
        HydraConfig.instance().cfg = None


def test_task_function_returns_test_acc_for_optuna_and_no_number_when_a_run_fails(tmp_path):
    ok = _as_sweep_job(tmp_path, "ok", ONE_EPOCH)
    value = _task_return(*ok)
    recorded = records.read_summary(tmp_path / "ok")
    assert recorded["status"] == "ok" and value == recorded["metrics"]["test_acc"]
    assert recorded["metrics"]["test_acc"] == recorded["metrics"][f"test_acc.{recorded['default_mode']}"]
    assert _task_return(*ok) == value  # a finished run is skipped: its recorded value again
    bad = _as_sweep_job(tmp_path, "bad", [*ONE_EPOCH, "optim.lr=-1"])
    value = _task_return(*bad)  # not a number: Optuna's sweeper then tells the trial FAIL
    assert isinstance(value, str) and "failed" in value
    with pytest.raises(ValueError):
        float(value)
    assert records.read_summary(tmp_path / "bad")["status"] == "failed"


@pytest.mark.parametrize("summary", [None, {"status": "diverged", "metrics": {}},
                                     {"status": "failed", "metrics": {}}])
def test_objective_is_nan_without_an_ok_run(summary):
    assert math.isnan(entry.objective(summary))


# ------------------------------------------------------------------------------ --help

def test_help_lists_groups_overrides_studies_and_where_records_go(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnexp", "--help"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, check=True).stdout
    conf = Path(entry.__file__).resolve().parents[1] / "conf"
    for group in ("data", "norm", "sampler", "study", "scale", "launcher"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in out  # every option of the group, as conf/ has it
    for study in (p.stem for p in (conf / "study").glob("*.yaml") if p.stem != "finetune_source"):
        assert study in out.split("== Studies")[1]
    common = next(line.split()[0] for line in out.splitlines() if line.strip().startswith("data="))
    assert set(common.removeprefix("data=").split("|")) == {p.stem for p in (conf / "data").glob("*.yaml")}
    # the sweep layout the launcher writes (tests/test_train: <study>/<data>-<scale>/runs)
    assert "== Where records go ==" in out and "results/<study_name>/<data>-<scale>/runs/" in out
    assert "bnexp -sc install=bash" in out and "Powered by Hydra" not in out


def test_help_lists_come_from_the_allowed_values():
    """``${bnexp_names:KEY}`` in the help template: each list as config/the registries hold it."""
    from bnexp import config
    from bnexp.jobs.resolvers import names

    out = subprocess.run([sys.executable, "-m", "bnexp", "--help"], capture_output=True, text=True,
                         env=ENV, check=True).stdout
    assert f"norm={'|'.join(config.NORMS)} " in out
    assert f"(any of {', '.join(config.EVAL_MODES)})" in out
    conf = Path(entry.__file__).resolve().parents[1] / "conf"
    assert names("study", ", ") == ", ".join(sorted(p.stem for p in (conf / "study").glob("*.yaml")))
    assert names("study", ", ") in out.split("== Studies")[1]


@pytest.mark.parametrize("what", ["all", "job"])
def test_cfg_resolve_needs_no_import_but_the_entry_points(tmp_path, what):
    """``bnexp --cfg all --resolve`` resolves conf/'s own resolvers (registered by the entry point,
    not as a side effect of a sweep module); a fresh process composing through the API too."""
    out = subprocess.run([sys.executable, "-m", "bnexp", "--cfg", what, "--resolve", "results_dir=R"],
                         cwd=tmp_path, capture_output=True, text=True, env=ENV, check=True).stdout
    composed = yaml.safe_load(out)
    if what == "all":
        assert composed["hydra"]["output_subdir"] == ".hydra"
        assert composed["hydra"]["run"]["dir"].startswith("R/scratch/")
    assert composed["results_dir"] == "R"
    code = ("from omegaconf import OmegaConf; from bnexp import api; "
            "cfg = api._compose(['results_dir=R'], with_hydra=True); "
            "print(OmegaConf.select(cfg, 'hydra.output_subdir'), OmegaConf.select(cfg, 'hydra.sweep.dir'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                         check=True).stdout
    assert out.split() == [".hydra", "R/scratch/synthetic-full"]
