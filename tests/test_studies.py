"""Every study in conf/study/ composes, sweeps what exists, and (slow) runs end to end.

Fast: each ``conf/study/<name>.yaml`` is composed through Hydra at full and at smoke scale; its
``hydra.sweeper.params`` must resolve to non-empty sweeps over keys the config has (or config
groups with those options), with >= 3 seeds, and the config of the sweep's first combination
(and every value of each plain key on top of it) must pass ``bnexp.config.parse_config``. Each
study needs ``experiments/<name>.py`` whose docstring gives the command and the expected outcome.

Slow (``make smoke``): every study's script runs at smoke scale on synthetic data in a temporary
results_dir and leaves report.md, runs.csv and at least one PNG figure, with no failed run.
"""
from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from bnexp.config import parse_config
from conftest import compose_config, experiment

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STUDIES = sorted(p.stem for p in (CONF / "study").glob("*.yaml"))
# "full": the study as it is (full scale unless it pins another, as demo pins small); "small":
# the real-data scale every study budgets in its grid.small (composing needs no dataset)
SCALES = {"full": [], "smoke": ["data=synthetic", "scale=smoke"],
          "small": ["data=fashion_mnist", "scale=small"]}
_ABSENT = object()


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def sweep_axes(name: str, scale: str, overrides=None) -> tuple[dict, object]:
    """``({key: [values...]}, composed config)`` of study ``name`` at ``scale`` (its SCALES
    overrides, or ``overrides``): the resolved ``hydra.sweeper.params`` expanded with Hydra's
    own override grammar."""
    overrides = SCALES[scale] if overrides is None else overrides
    cfg = compose_config([f"study={name}", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
    axes = {}
    for ov in _parser().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        values = list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
        axes[ov.get_key_element().lstrip("+~")] = values
    return axes, cfg


def is_group(key: str) -> bool:
    return (CONF / key).is_dir()


def parse(cfg) -> object:
    """``parse_config`` of a composed config (its hydra node dropped first)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return parse_config(OmegaConf.to_container(cfg, resolve=True))


def _override(key: str, value) -> str:
    text = "null" if value is None else str(value)
    return f"{key}={text}"


@pytest.fixture(scope="module", params=[(n, s) for n in STUDIES for s in SCALES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def study(request):
    name, scale = request.param
    if scale == "small" and "small" not in OmegaConf.load(CONF / "study" / f"{name}.yaml").get("grid", {}):
        pytest.skip(f"conf/study/{name}.yaml has no grid.small yet")
    axes, cfg = sweep_axes(name, scale)
    return name, scale, axes, cfg


def test_there_are_studies():
    assert {"demo", "stat_modes_vs_batch", "batch_size", "noniid", "lr_sensitivity"} <= set(STUDIES)


def test_study_sweeps_existing_keys_with_three_seeds(study):
    name, scale, axes, cfg = study
    pinned = "small" if name == "demo" else scale  # the demo pins the real-data scale
    assert cfg.study_name == name and cfg.scale_name in (scale, pinned)
    assert axes and all(axes.values()), f"{name}: empty sweep axis in {axes}"
    assert len(set(axes.get("seed", []))) >= 3, f"{name} at {scale}: seeds {axes.get('seed')}"
    for key, values in axes.items():
        if is_group(key):
            missing = [v for v in values if not (CONF / key / f"{v}.yaml").exists()]
            assert not missing, f"{name}: {key} has no option(s) {missing}"
        else:
            assert OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT, \
                f"{name}: swept key {key} is not in the config"


def test_study_first_combination_parses_and_each_value_too(study):
    name, scale, axes, _ = study
    first = [_override(k, v[0]) for k, v in axes.items()]
    cfg = compose_config([f"study={name}", *SCALES[scale], *first])
    parsed = parse(cfg)
    assert parsed.study_name == name
    if scale == "smoke":
        assert (parsed.scale_name, parsed.data.name) == ("smoke", "synthetic")
    if scale == "small":  # a subset or the whole set, within Fashion-MNIST's 60,000 images
        assert (parsed.scale_name, parsed.data.name) == ("small", "fashion_mnist")
        assert parsed.data.train_size is None or 0 < parsed.data.train_size <= 60_000
    for key, values in axes.items():
        if is_group(key):
            continue
        for value in values:  # plain keys: every value on top of the first combination
            variant = cfg.copy()
            OmegaConf.update(variant, key, value, force_add=False)
            assert field(parse(variant), key) == value, f"{name}: {key}={value}"


def field(config, key: str):
    """``config.a.b`` for the dotted ``key`` "a.b" of a parsed Config."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("name", STUDIES)
def test_study_script_documents_command_and_expectation(name):
    script = ROOT / "experiments" / f"{name}.py"
    assert script.exists(), f"conf/study/{name}.yaml has no experiments/{name}.py"
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree) or ""
    assert f"make study S={name}" in doc or (name == "demo" and "make demo" in doc), doc[:300]
    assert "Expected" in doc, f"experiments/{name}.py: the docstring states no expected outcome"
    # the study is declared once (bnexp.analysis.study.Study) and run through the shared path
    studies = [n.value for n in tree.body if isinstance(n, ast.Assign)
               and any(getattr(t, "id", None) == "STUDY" for t in n.targets)]
    assert studies and isinstance(studies[0], ast.Call) and studies[0].func.id == "Study"
    assert ast.literal_eval(studies[0].args[0]) == name
    assert "run_study(STUDY" in script.read_text()


# Studies with a grid.small budget (PHASE2: `data=fashion_mnist scale=small`); the others follow.
SMALL_STUDIES = ["batch_size", "batch_size_true", "noniid", "stat_modes_vs_batch"]


@pytest.mark.parametrize("name", SMALL_STUDIES)
def test_small_scale_budget_composes_and_parses(name):
    """Each value of every swept axis at small scale, on top of the first combination, parses;
    the budget comes from grid.small (epochs and a training subset), not the full-scale one."""
    overrides = ["data=fashion_mnist", "scale=small"]
    cfg = compose_config([f"study={name}", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    axes = {ov.get_key_element(): list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
            for ov in _parser().parse_overrides([f"{k}={v}" for k, v in params.items()])}
    assert len(set(axes["seed"])) >= 3
    small = OmegaConf.to_container(cfg.grid.small, resolve=True)
    for key, values in axes.items():
        for value in values:
            first = [_override(k, value if k == key else v[0]) for k, v in axes.items()]
            parsed = parse(compose_config([f"study={name}", *overrides, *first]))
            assert (parsed.scale_name, parsed.data.name) == ("small", "fashion_mnist")
            assert parsed.optim.epochs == small["epochs"]
            assert parsed.data.train_size == small["train_size"] is not None


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_end_to_end_at_smoke_scale(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "data=synthetic",
           "scale=smoke", f"results_dir={tmp_path}", "progress=off", "launcher=joblib"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    # data=synthetic is given, so the demo keeps it too (its real-data default is not applied)
    study_dir = tmp_path / name / "synthetic-smoke"  # one folder per (study, data, scale)
    report = (study_dir / "report.md").read_text()
    assert report.startswith(f"# {name}") and "## Answer" in report and "## Comparisons" in report
    assert list((study_dir / "figures").glob("*.png")), "no figure"
    with open(study_dir / "runs.csv") as f:
        statuses = [row["status"] for row in csv.DictReader(f)]
    assert statuses and set(statuses) <= {"ok", "diverged"}, statuses
    assert " 0 failed, 0 incomplete, 0 pending" in report
    assert "## What every arm reached" in report
    from bnexp.analysis.verdicts import LABELS

    verdicts = json.loads((study_dir / "verdicts.json").read_text())
    assert len(verdicts) == len(experiment(name).STUDY.shapes)
    assert all(v["label"] in LABELS and f"- **{v['label']}** — {v['shape']}" in report for v in verdicts)
    assert report.splitlines().index("## Answer") < 15  # the answer first, as a paper opens


# ------------------------------------------------------------------------------ one folder per sweep
def test_two_sweeps_of_other_data_or_scale_get_their_own_folders_and_reports(tmp_path):
    """Two sweeps of one study, at two scales, land in ``<study>/<data>-<scale>/`` folders that
    ``bnexp.analysis.run_study.study_dir`` finds by composing the config, each with its own report of
    its own runs only."""
    import matplotlib

    matplotlib.use("Agg")
    from bnexp.analysis.run_study import study_dir

    from bnexp.analysis.study import Study, analyze

    tiny = ["data=synthetic", "data.synthetic_train=128", "data.synthetic_test=64", "model.width=8",
            "model.depth=4", "optim.epochs=1", "eval.modes=[ema]", "device=cpu", "progress=off",
            f"results_dir={tmp_path}", "hydra.sweeper.params.seed='0,1'"]
    folders = []
    for scale in ("smoke", "full"):
        overrides = [f"scale={scale}", "data.batch_size=32"]
        subprocess.run([sys.executable, "-m", "bnexp", "-m", "study=finetune_source", *tiny, *overrides],
                       cwd=ROOT, check=True, capture_output=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        folder = study_dir("finetune_source", [*tiny, *overrides])
        assert folder == tmp_path / "finetune_source" / f"synthetic-{scale}"
        report = analyze(Study("finetune_source", "Toy question."), folder, "cmd").read_text()
        assert "**Runs.** 2 done" in report, report[:600]
        # a prepare step that sets a run apart (lr_sensitivity's longer budget) leaves Methods
        # and provenance describing every run of the folder
        def apart(data):
            data.extra["apart"], data.runs = data.runs.iloc[1:], data.runs.iloc[:1]
            return data
        report = analyze(Study("finetune_source", "Toy question.", prepare=apart), folder, "cmd").read_text()
        assert "2 seed(s) per arm" in report and "(2 runs)" in report, report[:900]
        assert pd_runs(folder) == {"scale_name": {scale}, "n": 2}
        folders.append(folder)
    assert folders[0] != folders[1]


def pd_runs(folder: Path) -> dict:
    with open(folder / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    return {"scale_name": {r["scale_name"] for r in rows}, "n": len(rows)}


def test_norm_vs_noise_small_grid_memorizes_real_data_and_probes_every_arm():
    """scale=small: every arm on a Fashion-MNIST subset without augmentation (memorizing must be
    possible), 5 seeds, the forward_noise probe on, and every arm's preset parses."""
    axes, _ = sweep_axes("norm_vs_noise", "small", ["data=fashion_mnist", "scale=small"])
    assert set(axes["norm"]) == {"none", "ln", "pn", "pn_online", "bn", "ghost_bn16", "none_gni16",
                                 "ln_gni16", "pn_gni16", "bn_gni16"} and len(axes["seed"]) == 5
    for norm in axes["norm"]:
        parsed = parse(compose_config(["study=norm_vs_noise", "data=fashion_mnist", "scale=small",
                                       f"norm={norm}"]))
        assert parsed.data.name == "fashion_mnist" and not parsed.data.augment
        assert parsed.data.train_size and parsed.data.train_size <= 10000
        assert parsed.probes.enabled and {"forward_noise", "grad_noise"} <= set(parsed.probes.names)
        assert (parsed.norm.ghost_noise == 16) == norm.endswith("_gni16")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.py")))
def test_every_experiment_script_imports(name):
    """A script that cannot even be imported (a helper renamed in another script it imports from)
    fails here, not only in the slow end-to-end runs."""
    assert experiment(name).__name__ == name
