"""``bnexp-analyze`` on the folders people really have: several commands into one sweep folder,
folder names with dashes, swept keys that take null, named studies' curated reports, and the
committed fusion study (issue 23, faults 3-5).

Fake studies are written through ``bnexp.records`` (``test_analysis.write_run``) with known
numbers; the oracle is the list of runs written and their accuracies.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bnexp.analysis import generic as A  # noqa: E402
from bnexp.analysis.study import sweep_runs  # noqa: E402
from test_analysis import write_multirun, write_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _multirun(study: Path, seeds: str) -> dict:
    """The toy sweep's multirun.yaml with ``seed`` swept over ``seeds``, as a dict."""
    write_multirun(study)
    cfg = yaml.safe_load((study / "multirun.yaml").read_text())
    del cfg["hydra"]["sweeper"]["params"]["seed"]
    cfg["hydra"]["overrides"]["task"].append(f"seed={seeds}")  # as typed on the command line
    cfg["hydra"]["sweep"] = {"dir": str(study), "subdir": "runs/${hydra.job.override_dirname}"}
    return cfg


# ----------------------------------------------------------------------------- fault 3
def test_seeds_added_by_a_second_command_stay_in_the_report(tmp_path):
    """Command 1 runs seed 0, command 2 adds seeds 1 and 2 (and overwrites multirun.yaml): every
    run of both is analysed, and the table's n is 3."""
    from bnexp.jobs.launch import SweepProgress

    study = tmp_path / "toy"
    accs = {0: 0.80, 1: 0.82, 2: 0.87}
    for seed, acc in accs.items():
        for batch in (8, 128):
            for norm in ("bn", "none"):
                write_run(study, batch, norm, seed, "ok", acc)
    for seeds in ("0", "1,2"):  # two `bnexp -m` commands; Hydra rewrites multirun.yaml each time
        cfg = OmegaConf.create({**_multirun(study, seeds), "progress": "off"})
        SweepProgress().on_multirun_start(cfg)
        (study / "multirun.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg)))
    assert len(list((study / "sweeps").glob("*.yaml"))) == 2
    assert len(A.expected_run_names(study)) == 12
    assert A.status_counts(study)["done"] == 12 and A.status_counts(study)["pending"] == 0
    runs = A.collect_runs(study)[0]
    kept, why = sweep_runs(study, runs)
    assert why == {} and len(kept) == 12
    report = A.analyze(study).read_text()
    table = pd.read_csv(study / "runs.csv")
    assert len(table) == 12
    # the comparisons table (mean ± interval per arm), not the Methods' arms table
    table_rows = [line for line in report.splitlines()
                  if (line.startswith("| 8 ") or line.startswith("| 128 ")) and "±" in line]
    assert len(table_rows) == 4 and all(line.endswith("| 3 |") for line in table_rows)  # n = 3 seeds
    assert "seed=0\n" in report and "seed=1,2\n" in report  # both commands are shown


def test_a_folder_whose_name_has_a_dash_keeps_its_runs(tmp_path):
    """No multirun.yaml, a name that is not ``<data>-<scale>``: the name decides nothing."""
    study = tmp_path / "my-runs"
    write_run(study, 8, "bn", 0, "ok", 0.8)
    write_run(study, 8, "bn", 1, "ok", 0.9)
    runs = A.collect_runs(study)[0]
    kept, why = sweep_runs(study, runs)
    assert why == {} and len(kept) == 2
    # a real <data>-<scale> name still excludes a run of another dataset
    real = tmp_path / "cifar10-smoke"
    write_run(real, 8, "bn", 0, "ok", 0.8)
    with pytest.warns(UserWarning, match="excluded"):
        kept, why = sweep_runs(real, A.collect_runs(real)[0])
    assert len(kept) == 0 and "data.name=synthetic (sweep: cifar10)" in next(iter(why.values()))


# ----------------------------------------------------------------------------- fault 4
def _with_null_key(runs: pd.DataFrame) -> pd.DataFrame:
    """``fusion`` swept over {null, conv}: the bn runs took null."""
    return runs.assign(fusion=np.where(runs["norm"] == "bn", None, "conv"))


def test_heatmap_with_a_swept_key_that_takes_null(tmp_path):
    runs = pd.DataFrame({"batch": [8, 8, 128, 128, 8, 128], "fusion": [None, None, None, None, "conv", "conv"],
                         "status": "ok", "test_acc": [0.5, 0.7, 0.8, 0.9, 0.3, 0.4]})
    fig = A.plot_heatmap(runs, row="fusion", col="batch", value="test_acc")
    ax = fig.axes[0]
    image = np.asarray(ax.get_images()[0].get_array())
    # rows sort numbers, strings, then null last
    np.testing.assert_allclose(image, [[30.0, 40.0], [60.0, 85.0]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv", "null"]


def test_the_committed_fusion_study_is_analysed_without_touching_its_report(tmp_path):
    src = ROOT / "results" / "fusion" / "fashion_mnist-small"
    study = tmp_path / "fusion" / "fashion_mnist-small"
    shutil.copytree(src, study)
    curated = (study / "report.md").read_text()
    figures = {p.name: p.read_bytes() for p in (study / "figures").iterdir() if p.is_file()}
    assert A.main([str(study)]) == 0
    assert (study / "report.md").read_text() == curated
    assert {p.name: p.read_bytes() for p in (study / "figures").iterdir() if p.is_file()} == figures
    assert list((study / "figures" / "generic").glob("*.png"))
    generic = (study / A.GENERIC_REPORT).read_text()
    assert generic.startswith("# fashion_mnist-small") and "## Comparisons" in generic


def test_analyze_results_keeps_curated_reports_and_goes_on_after_a_failure(tmp_path, monkeypatch, capsys):
    for name in ("a", "b", "c"):
        sweep = tmp_path / name / "synthetic-smoke"
        write_run(sweep, 8, "bn", 0, "ok", 0.8)
        write_run(sweep, 128, "bn", 0, "ok", 0.9)
        write_multirun(sweep)
    named = tmp_path / "c" / "synthetic-smoke" / "report.md"
    named.write_text("# c\n\nThe curated report.\n")
    real = A.analyze

    def analyze(study, *args, **kwargs):
        if Path(study).parent.name == "a":
            raise RuntimeError("boom")
        return real(study, *args, **kwargs)

    monkeypatch.setattr(A, "analyze", analyze)
    assert A.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.count("analysis failed") == 1 and "RuntimeError: boom" in err
    assert (tmp_path / "b" / "synthetic-smoke" / "report.md").exists()
    assert named.read_text() == "# c\n\nThe curated report.\n"
    assert (named.parent / A.GENERIC_REPORT).exists()
    assert A.main([str(named.parent), "--force"]) == 0
    assert named.read_text().startswith("# synthetic-smoke")


# ----------------------------------------------------------------------------- fault 5
def test_eval_mode_figure_draws_one_line_per_mode_and_arm(tmp_path, monkeypatch):
    """BN runs have ema and precise accuracies, no-norm runs ema only: the ema line of BN must
    be the mean of BN's ema values alone."""
    rows = []
    for batch in (8, 128):
        for seed in range(2):
            rows.append({"run": f"bn{batch}{seed}", "status": "ok", "norm": "bn", "data.batch_size": batch,
                         "seed": seed, "test_acc": 0.8, "test_acc.ema": 0.80 + 0.01 * seed + batch / 1000,
                         "test_acc.precise": 0.85})
            rows.append({"run": f"no{batch}{seed}", "status": "ok", "norm": "none", "data.batch_size": batch,
                         "seed": seed, "test_acc": 0.5, "test_acc.ema": 0.50 + 0.01 * seed,
                         "test_acc.precise": np.nan})
    runs = pd.DataFrame(rows)
    runs.attrs.update(override_keys=["norm", "data.batch_size", "seed"], metric_keys=["test_acc"])
    figs = {}
    monkeypatch.setattr(A, "save_figure", lambda fig, d, stem: figs.setdefault(stem, fig) and [d / stem])
    A.default_figures(runs, pd.DataFrame(), pd.DataFrame(), tmp_path, "test_acc", "data.batch_size",
                      "norm", ["data.batch_size", "norm"])
    ax = figs["test_acc_by_eval_mode"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"ema, norm=bn", "ema, norm=none", "precise, norm=bn"}
    bn_ema = runs[runs["norm"] == "bn"].groupby("data.batch_size")["test_acc.ema"].mean() * 100
    np.testing.assert_allclose(lines["ema, norm=bn"].get_ydata(), bn_ema.to_numpy())
