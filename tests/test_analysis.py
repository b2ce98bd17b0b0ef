"""Analysis half: run folders -> tables, statistics, figures and report, against hand computations.

A fake study is written through ``bnexp.records`` with known numbers: batch {8, 128} x norm
{bn, none} x seeds {0, 1, 2}, one diverged, one failed, one incomplete (no summary) and one run
of the sweep that has no folder yet (pending).
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from bnexp.analysis import generic as A  # noqa: E402
from bnexp import records  # noqa: E402

# (batch, norm, seed, status, test_acc); (128, none, 1) is pending: in the sweep, no folder.
RUNS = [(8, "bn", 0, "ok", 0.80), (8, "bn", 1, "ok", 0.82), (8, "bn", 2, "ok", 0.87),
        (128, "bn", 0, "ok", 0.90), (128, "bn", 1, "ok", 0.91), (128, "bn", 2, "failed", None),
        (8, "none", 0, "ok", 0.70), (8, "none", 1, "ok", 0.72), (8, "none", 2, "diverged", None),
        (128, "none", 0, "ok", 0.75), (128, "none", 2, "incomplete", None)]
EPOCHS = 3
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 30: 2.042}  # two-sided 95% t table


def write_run(study: Path, batch: int, norm: str, seed: int, status: str, acc) -> Path:
    """One run folder as bnexp writes it; accuracy curves rise linearly to ``acc``."""
    overrides = [f"data.batch_size={batch}", f"norm={norm}", f"seed={seed}", "study=toy", "scale=smoke"]
    name = ",".join(sorted(o for o in overrides if not o.startswith("study=")))
    run = study / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "scale": "full",  # scale: a config key that the override must win over
              "precision": "auto", "device": "auto",  # what was asked; the summary says what ran
              "data": {"name": "synthetic", "batch_size": batch},
              "norm": {"name": norm, "momentum": 0.1}, "optim": {"lr": 0.1, "milestones": [0.5, 0.75]}}
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for epoch in range(1, EPOCHS + 1):
        value = (acc if acc is not None else 0.1) * epoch / EPOCHS
        records.write_epoch(run, {"epoch": epoch, "step": 10 * epoch, "test_acc": value,
                                  "train_loss": 1.0 - value})
    records.write_probes(run, [{"step": s, "epoch": 1, "layer": layer, "name": "noise",
                                "value": (i + 1) * 0.1 * (s + 1) + 0.01 * seed}
                               for s in range(3) for i, layer in enumerate(["conv1", "conv2"])])
    if status == "incomplete":
        return run
    metrics = {} if acc is None else {
        "test_acc": acc, "train_acc": acc + 0.05, "gen_gap": 0.05, "test_loss": 1.0 - acc,
        "test_acc.ema": acc, "test_acc.precise": acc + 0.01}
    records.write_json_atomic(run / records.SUMMARY, {
        "status": status, "metrics": metrics, "config": config, "overrides": overrides,
        "wall_time_s": 12.5, "git_commit": "abc123", "error": "boom" if status == "failed" else None,
        "precision": "bf16", "device": "cpu (2 cores, 1 threads)"})
    return run


def write_multirun(study: Path) -> None:
    """multirun.yaml as Hydra saves it: sweeper params (one interpolated) + task overrides."""
    cfg = {"scale_name": "smoke", "grid": {"smoke": {"batch": "8,128"}},
           "hydra": {"sweeper": {"params": {"data.batch_size": "${grid.${scale_name}.batch}",
                                            "norm": "bn,none", "seed": "0,1,2"}},
                     "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["study=toy", "scale=smoke"]},
                     "job": {"config": {"override_dirname": {
                         "kv_sep": "=", "item_sep": ",", "exclude_keys": ["study", "threads"]}}}}}
    (study / "multirun.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture
def study(tmp_path) -> Path:
    study = tmp_path / "toy"
    for row in RUNS:
        write_run(study, *row)
    write_multirun(study)
    return study


@pytest.fixture
def runs(study) -> pd.DataFrame:
    return A.collect_runs(study)[0]


def ok_accs(batch, norm) -> list[float]:
    return [acc for b, n, _, st, acc in RUNS if (b, n, st) == (batch, norm, "ok")]


# ----------------------------------------------------------------------------- collecting
def test_collect_runs_columns_statuses_and_types(runs):
    assert len(runs) == len(RUNS)
    by_key = {(r["data.batch_size"], r["norm"], r["seed"]): r for _, r in runs.iterrows()}
    for batch, norm, seed, status, acc in RUNS:
        row = by_key[batch, norm, seed]
        assert row["status"] == status
        assert (math.isnan(row["test_acc"]) if acc is None else row["test_acc"] == pytest.approx(acc))
    for col in ("run", "status", "data.batch_size", "norm", "seed", "study", "scale", "test_acc",
                "test_acc.ema", "test_acc.precise", "gen_gap", "wall_time_s", "norm.name",
                "norm.momentum", "optim.lr", "data.name", "optim.milestones"):
        assert col in runs, col
    assert list(runs.columns).count("seed") == 1
    assert set(runs["scale"]) == {"smoke"}  # the override beats config's scale=full
    assert runs["data.batch_size"].dtype.kind == "i" and runs["test_acc"].dtype.kind == "f"
    assert json.loads(runs["optim.milestones"].iloc[0]) == [0.5, 0.75]
    incomplete = runs[runs["status"] == "incomplete"].iloc[0]
    assert incomplete["norm.name"] == "none"  # config from .hydra/config.yaml when no summary
    finished = runs[runs["status"] != "incomplete"]
    assert set(finished["precision"]) == {"bf16"}  # what ran, not the config's "auto"
    assert set(finished["device"]) == {"cpu (2 cores, 1 threads)"}
    assert incomplete["precision"] == "auto"  # no summary yet: only what was asked is known
    assert A.swept_columns(runs) == ["data.batch_size", "norm"]


def test_collect_curves_and_probes(study):
    _, curves = A.collect_runs(study)
    assert len(curves) == len(RUNS) * EPOCHS
    assert {"run", "status", "norm", "data.batch_size", "seed", "epoch", "test_acc"} <= set(curves)
    last = curves[(curves["epoch"] == EPOCHS) & (curves["status"] == "ok")]
    assert sorted(last["test_acc"]) == pytest.approx(sorted(a for *_, s, a in RUNS if s == "ok"))
    probes = A.collect_probes(study)
    assert len(probes) == len(RUNS) * 6 and set(probes["layer"]) == {"conv1", "conv2"}


def test_with_error_is_one_minus_each_accuracy_column(runs):
    err = A.with_error(runs)
    for col in ("test_acc", "test_acc.ema", "test_acc.precise"):
        got = err[col.replace("acc", "err", 1)]
        expected = [math.nan if pd.isna(a) else 1.0 - a for a in runs[col]]
        np.testing.assert_allclose(got.to_numpy(dtype=float), expected, equal_nan=True)
    assert "train_err" not in err and "test_acc" in err  # only the metric asked for; acc kept
    assert err.attrs == runs.attrs and A.is_percent("test_err.batch")


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_table(df, expected):
    assert A.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert A.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_closed_forms_and_normal_limit(p):
    assert A.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert A.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert A.t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-5)
    assert A.t_cdf(A.t_quantile(p, 3.7), 3.7) == pytest.approx(p, abs=1e-12)


def test_summarize_matches_hand_computation(runs):
    s = A.summarize(runs, by=["data.batch_size", "norm"], metrics=["test_acc"])
    row = A.select(s, {"data.batch_size": 8, "norm": "bn"}).iloc[0]
    vals = ok_accs(8, "bn")
    half = T975[2] * statistics.stdev(vals) / math.sqrt(3)
    assert row["test_acc.mean"] == pytest.approx(statistics.mean(vals))
    assert row["test_acc.std"] == pytest.approx(statistics.stdev(vals))
    assert row["test_acc.n"] == 3
    assert (row["test_acc.ci_lo"], row["test_acc.ci_hi"]) == pytest.approx(
        (statistics.mean(vals) - half, statistics.mean(vals) + half), abs=1e-5)
    diverged = A.select(s, {"data.batch_size": 8, "norm": "none"}).iloc[0]
    assert (diverged["test_acc.n"], diverged["n_diverged"], diverged["n_runs"]) == (2, 1, 3)
    failed = A.select(s, {"data.batch_size": 128, "norm": "bn"}).iloc[0]
    assert (failed["test_acc.n"], failed["n_failed"]) == (2, 1)
    single = A.select(s, {"data.batch_size": 128, "norm": "none"}).iloc[0]
    assert single["test_acc.n"] == 1 and single["n_incomplete"] == 1
    assert single["test_acc.mean"] == pytest.approx(0.75)
    assert math.isnan(single["test_acc.std"]) and math.isnan(single["test_acc.ci_lo"])


def test_summarize_can_include_diverged_runs():
    df = pd.DataFrame({"g": ["a"] * 3, "status": ["ok", "ok", "diverged"], "m": [1.0, 3.0, 0.1]})
    assert A.summarize(df, ["g"], ["m"])["m.mean"].iloc[0] == pytest.approx(2.0)
    both = A.summarize(df, ["g"], ["m"], include_diverged=True).iloc[0]
    assert both["m.mean"] == pytest.approx(np.mean([1.0, 3.0, 0.1])) and both["n_diverged"] == 1


# ----------------------------------------------------------------------------- sweep status
def test_status_counts_include_pending(study):
    assert A.status_counts(study) == {"done": 8, "diverged": 1, "failed": 1, "incomplete": 1,
                                      "pending": 1}
    (study / "multirun.yaml").unlink()
    assert A.status_counts(study)["pending"] is None


def test_override_dirname_matches_hydra():
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    job = ["seed=1", "+extra='a=b'", "study=x", "norm=gn", "data.batch_size=8", "~model.width"]
    parsed = OverridesParser.create().parse_overrides(job)
    for sep in [(",", "="), ("/", ":")]:
        assert A.override_dirname(job, ["study"], *sep) == get_overrides_dirname(
            parsed, exclude_keys=["study"], item_sep=sep[0], kv_sep=sep[1])


def test_expected_run_names_match_a_real_hydra_sweep(tmp_path):
    """Launch an actual Hydra multirun and compare its folders with our expansion."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent("""
        a: 1
        b: x
        seed: 0
        scale_name: smoke
        grid: {smoke: {a: "1,2"}}
        hydra:
          sweep: {dir: out, subdir: "runs/${hydra.job.override_dirname}"}
          sweeper: {params: {a: "${grid.${scale_name}.a}", seed: "0,1"}}
          job: {config: {override_dirname: {exclude_keys: [threads]}}}
        """))
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra
        @hydra.main(config_path="conf", config_name="config", version_base=None)
        def main(cfg):
            pass
        main()
        """))
    subprocess.run([sys.executable, "app.py", "-m", "b=x,y", "+threads=2", "seed=3,4"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    made = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert len(made) == 8 and sorted(A.expected_run_names(tmp_path / "out")) == made


# ----------------------------------------------------------------------------- figures
def _saved(fig, tmp_path, stem) -> Path:
    png = A.save_figure(fig, tmp_path / "figs", stem)[0]
    assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").exists()
    return png


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_metric_vs_lines_bands_and_diverged_marks(runs, tmp_path):
    fig = A.plot_metric_vs(runs, "data.batch_size", "test_acc", hue="norm")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert _legend_texts(ax) == ["bn", "none", "diverged runs"]
    assert ax.get_legend().get_title().get_text() == "normalization [norm]"
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "test accuracy (%)"
    lines = {l.get_label(): l for l in ax.get_lines()}
    np.testing.assert_allclose(lines["bn"].get_ydata(),
                               [100 * np.mean(ok_accs(8, "bn")), 100 * np.mean(ok_accs(128, "bn"))])
    marks = [l for l in ax.get_lines() if l.get_marker() == "x" and len(l.get_xdata())]
    assert [list(m.get_xdata()) for m in marks] == [[8]]  # the one diverged run: none at batch 8
    assert len(ax.collections) == 2  # one CI band per norm
    # every finished run drawn as a dot at its own value (the seeds behind the mean and band)
    dots = [(x, y) for l in ax.get_lines() if l.get_marker() == "." for x, y in zip(l.get_xdata(), l.get_ydata())]
    expected = [(b, 100 * a) for b in (8, 128) for n in ("bn", "none") for a in ok_accs(b, n)]
    np.testing.assert_allclose(sorted(dots), sorted(expected))
    _saved(fig, tmp_path, "metric_vs")


def test_bands_stay_within_what_an_accuracy_can_be():
    runs = pd.DataFrame({"x": [1] * 3 + [2] * 3, "status": "ok",
                         "test_acc": [0.05, 0.5, 0.95, 0.9, 0.97, 0.99]})
    s = A.summarize(runs, ["x"], ["test_acc"])
    assert s["test_acc.ci_lo"].iloc[0] < 0 and s["test_acc.ci_hi"].iloc[1] > 1  # t interval
    ax = A.plot_metric_vs(runs, "x", "test_acc").axes[0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() == pytest.approx(100.0)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [50.0, 100 * np.mean([0.9, 0.97, 0.99])])


def test_plot_curves_mean_over_seeds(study, tmp_path):
    _, curves = A.collect_runs(study)
    fig = A.plot_curves(curves[curves["data.batch_size"] == 8], y="test_acc", hue="norm")
    ax = fig.axes[0]
    assert _legend_texts(ax) == ["bn", "none"] and len(ax.collections) == 2
    bn = next(l for l in ax.get_lines() if l.get_label() == "bn")
    np.testing.assert_allclose(bn.get_ydata(), [100 * np.mean(ok_accs(8, "bn")) * e / EPOCHS
                                                for e in range(1, EPOCHS + 1)])
    _saved(fig, tmp_path, "curves")


def test_plot_curves_joins_the_scored_epochs_only():
    """Rows of epochs not scored (eval.score_every > 1: test_acc null) are left out, so the line
    joins the scored epochs instead of breaking into isolated points."""
    curves = pd.DataFrame({"run": ["a"] * 4 + ["b"] * 4, "epoch": list(range(4)) * 2, "norm": "bn",
                           "test_acc": [None, 0.5, None, 0.7, None, 0.6, None, 0.9]})
    line = A.plot_curves(curves, y="test_acc", hue="norm").axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [1, 3])
    np.testing.assert_allclose(line.get_ydata(), [55.0, 80.0])


def test_plot_curves_legend_outside_sits_right_of_the_axes():
    """legend_outside puts even a short legend beside the axes (bands that fill the plot leave
    matplotlib's 'best' only spots on the data); the default keeps a short legend inside."""
    curves = pd.DataFrame({"run": list("aabb"), "epoch": [1, 2] * 2, "norm": ["bn"] * 2 + ["gn"] * 2,
                           "test_acc": [0.5, 0.6, 0.55, 0.7]})
    for outside in (False, True):
        fig = A.plot_curves(curves, y="test_acc", hue="norm", legend_outside=outside)
        renderer = FigureCanvasAgg(fig).get_renderer()
        ax = fig.axes[0]
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert (legend.x0 >= axes.x1) == outside, (legend, axes)


def test_plot_bars_heights_and_error_bars(runs, tmp_path):
    fig = A.plot_bars(runs, "norm", "test_acc", hue="data.batch_size")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    expected = sorted(round(100 * np.mean(ok_accs(b, n)), 6) for b in (8, 128) for n in ("bn", "none"))
    assert heights == pytest.approx(expected)
    assert _legend_texts(ax) == ["8", "128", "diverged runs"]
    _saved(fig, tmp_path, "bars")


def test_plot_heatmap_cells(runs, tmp_path):
    fig = A.plot_heatmap(runs, row="norm", col="data.batch_size", value="test_acc")
    image = fig.axes[0].get_images()[0].get_array()
    expected = [[100 * np.mean(ok_accs(b, n)) for b in (8, 128)] for n in ("bn", "none")]
    np.testing.assert_allclose(np.asarray(image), expected)
    assert len(fig.axes[0].texts) == 4
    _saved(fig, tmp_path, "heatmap")


def test_plot_probe_lines_per_layer_and_panels(study, tmp_path):
    probes = A.collect_probes(study)
    fig = A.plot_probe(probes, "noise", hue="layer", col="norm")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert [l.get_label() for l in ax.get_lines()] == ["conv1", "conv2"]
    assert _legend_texts(fig.axes[-1]) == ["conv1", "conv2"]
    _saved(fig, tmp_path, "probe")


# ----------------------------------------------------------------------------- words and report
def test_compare_statement_welch_against_hand_computation():
    runs = pd.DataFrame({"norm": ["bn"] * 3 + ["none"] * 3, "status": "ok",
                         "test_acc": [0.80, 0.82, 0.84, 0.70, 0.72, 0.74]})
    # equal std and n=3: Welch's dof is exactly 2 * (3 - 1) = 4, so the table value applies
    half = T975[4] * math.sqrt(2 * statistics.variance([0.80, 0.82, 0.84]) / 3) * 100
    text = A.compare_statement(runs, "test_acc", "norm", "none", "bn")
    assert text.startswith("bn beats none on test_acc") and "n=3" in text and "Welch" in text
    assert f"by 10.0 +/- {half:.1f} points" in text
    runs["test_loss"] = 1 - runs["test_acc"]
    assert A.compare_statement(runs, "test_loss", "norm", "bn", "none").startswith("bn beats none")
    close = runs.assign(test_acc=[0.80, 0.85, 0.75, 0.79, 0.84, 0.76])
    assert "not distinguishable" in A.compare_statement(close, "test_acc", "norm", "bn", "none")


def test_compare_statement_on_study_summary(runs):
    s = A.summarize(runs, ["data.batch_size", "norm"], ["test_acc"])
    text = A.compare_statement(s, "test_acc", "norm", "bn", "none", at={"data.batch_size": 8})
    a, b = ok_accs(8, "bn"), ok_accs(8, "none")
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 2
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    diff, half = np.mean(a) - np.mean(b), A.t_quantile(0.975, dof) * math.sqrt(va + vb)
    assert f"by {100 * diff:.1f} +/- {100 * half:.1f} points at data.batch_size=8" in text
    assert "n=3 vs 2" in text and "1 diverged none run(s) excluded" in text
    single = A.compare_statement(s, "test_acc", "norm", "bn", "none", at={"data.batch_size": 128})
    assert "too few runs for an interval" in single


def test_markdown_table_without_tabulate():
    df = pd.DataFrame({"norm": ["bn", "a|b"], "acc": [0.5, float("nan")]})
    assert A.markdown_table(df) == ("| norm | acc |\n| :--- | ---: |\n| bn | 0.5 |\n| a\\|b | - |")


def test_write_report_contents(study, runs):
    s = A.summarize(runs, ["norm"], ["test_acc"])
    table = A.format_summary(s, ["norm"], ["test_acc"])
    assert table["test_acc (%, mean ± CI)"].iloc[0].startswith(f"{100 * np.mean(ok_accs(8, 'bn') + ok_accs(128, 'bn')):.1f} ± ")
    fig = A.save_figure(A.plot_bars(runs, "norm", "test_acc"), study / "figures", "bars")[0]
    path = A.write_report(study, "toy", "Does bn help?", "bnexp -m study=toy", [fig], table,
                          "bn beats none.")
    text = path.read_text()
    assert path == study / "report.md"
    for piece in ("Does bn help?", "bnexp -m study=toy", "8 done", "1 diverged", "1 failed",
                  "1 incomplete", "1 pending", "bn beats none.", "abc123", "](figures/bars.png)",
                  "(figures/bars.pdf)", "| norm | test_acc (%, mean ± CI) | n |"):
        assert piece in text, piece


def test_analyze_pipeline_and_cli(study, capsys):
    assert A.main([str(study.parent)]) == 0  # results/ holding studies: analyzes each
    path = study / "report.md"
    assert str(path) in capsys.readouterr().out
    text = path.read_text()
    csv = pd.read_csv(study / "runs.csv")
    assert sorted(csv["status"]) == sorted(r[3] for r in RUNS)
    assert len(pd.read_csv(study / "curves.csv")) == len(RUNS) * EPOCHS
    assert "bnexp -m study=toy scale=smoke" in text and "Highest mean test_acc: data.batch_size=128, norm=bn (90.5 +/- " in text
    pngs = sorted(p.name for p in (study / "figures").glob("*.png"))
    assert pngs == sorted(["test_acc_vs_data-batch_size.png", "test_acc_heatmap.png",
                           "test_acc_by_eval_mode.png", "test_acc_curves.png", "probe_noise.png"])
    assert all(f"](figures/{p})" in text for p in pngs)
    assert A.main(["--status", str(study)]) == 0
    assert "done=8 diverged=1 failed=1 incomplete=1 pending=1" in capsys.readouterr().out


def test_analysis_never_imports_the_training_code():
    code = ("import sys, bnexp.analysis.generic; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith('bnexp.') and m.split('.')[-1] in ('train', 'models', 'norms', 'data', "
            "'sampling')]; print(bad)")  # bnexp's modules only: scipy has a scipy.sparse.data
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_format_summary_gives_points_one_decimal_in_every_row():
    runs = pd.DataFrame({"norm": ["a"] * 3 + ["b"] * 3, "status": "ok",
                         "gen_gap": [0.002, 0.003, 0.004, 0.017, 0.018, 0.019]})
    table = A.format_summary(A.summarize(runs, ["norm"], ["gen_gap"]), ["norm"], ["gen_gap"])
    half = T975[2] * 0.001 / math.sqrt(3) * 100  # std of (2, 3, 4) thousandths is 1 thousandth
    assert list(table["gen_gap (points, mean ± CI)"]) == [f"0.3 ± {half:.1f}", f"1.8 ± {half:.1f}"]


def test_report_flags_runs_from_several_commits(study):
    run = next(d for d in sorted((study / "runs").iterdir()) if (d / records.SUMMARY).exists())
    summary = records.read_summary(run)
    records.write_json_atomic(run / records.SUMMARY, {**summary, "git_commit": "def456-dirty"})
    text = A.write_report(study, "toy", "q", "cmd", [], pd.DataFrame({"a": [1]}), "s").read_text()
    assert "runs at abc123, def456-dirty;" in text and "some runs had uncommitted changes" in text
    detail = json.loads((study / "provenance.json").read_text())["detail"]
    assert "come from 2 commits" in detail and "uncommitted" in detail


def test_report_names_each_runs_device_and_precision(study):
    """A study whose runs recorded two precisions says how many ran in each: bf16 and fp32 runs
    of one config do not give the same numbers (precision=auto picks by CPU)."""
    done = [d for d in sorted((study / "runs").iterdir()) if records.read_summary(d)]
    for i, run in enumerate(done):
        summary = records.read_summary(run)
        records.write_json_atomic(run / records.SUMMARY, {**summary, "device": "cpu (2 cores, 1 threads)",
                                                          "precision": "bf16" if i < 2 else "fp32"})
    text = A.write_report(study, "toy", "q", "cmd", [], pd.DataFrame({"a": [1]}), "s").read_text()
    assert (f"**Trained on.** cpu (2 cores, 1 threads), bf16 (2 runs); cpu (2 cores, 1 threads), fp32 "
            f"({len(done) - 2} runs).") in text


def test_save_figure_writes_the_same_bytes_twice(runs, tmp_path):
    fig = A.plot_bars(runs, "norm", "test_acc")
    first = [p.read_bytes() for p in A.save_figure(fig, tmp_path / "a", "bars")]
    second = [p.read_bytes() for p in A.save_figure(fig, tmp_path / "b", "bars")]
    assert first == second and first[1].startswith(b"%PDF")
    assert b"CreationDate" not in first[1]  # what would differ between runs a second apart


# ----------------------------------------------------------------------------- scipy intervals
def test_paired_and_welch_intervals_match_direct_formulas():
    """Paired: mean of per-seed differences +/- t_{0.975, n-1} sd / sqrt(n) (table t); Welch with
    equal n and std: dof exactly 2(n - 1), half-width t_{0.975, 4} sqrt(2 s^2 / n)."""
    a, b = [0.80, 0.84, 0.83], [0.78, 0.80, 0.82]
    rows = pd.DataFrame([{"arm": arm, "seed": i, "status": "ok", "test_acc": v}
                         for arm, vals in (("a", a), ("b", b)) for i, v in enumerate(vals)])
    d = A.paired_diff(rows, "test_acc", "arm", "a", "b")
    diffs = [x - y for x, y in zip(a, b)]
    half = T975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert (d.mean, d.lo, d.hi) == pytest.approx((statistics.mean(diffs),) * 3 +
                                                 np.array([0, -half, half]), abs=1e-4)
    w = A.welch_diff(rows.assign(test_acc=[0.80, 0.82, 0.84, 0.70, 0.72, 0.74]), "test_acc", "arm", "a", "b")
    half = T975[4] * math.sqrt(2 * statistics.variance([0.80, 0.82, 0.84]) / 3)
    assert (w.mean, w.half) == pytest.approx((0.10, half), abs=1e-4) and w.sign == 1


def test_summary_interval_is_the_t_interval_of_the_values():
    values = [0.1, 0.4, 0.35, 0.2, 0.3]
    s = A.summarize(pd.DataFrame({"g": "x", "m": values}), ["g"], ["m"]).iloc[0]
    half = T975[4] * statistics.stdev(values) / math.sqrt(5)
    assert s["m.ci_hi"] - s["m.mean"] == pytest.approx(half, abs=1e-4)
    assert s["m.values"] == tuple(values)


# ----------------------------------------------------------------------------- training check
def test_untrained_arms_are_compared_at_equal_budget():
    """STUDIES.md retired "an arm that did not train is not compared": the difference is stated
    (paired and Welch alike, with the interval an independent t computation gives) and marked
    as read at equal budget, naming the arm."""
    rows = pd.DataFrame([{"arm": arm, "seed": s, "status": "ok", "test_acc": acc + 0.01 * s * s,
                          "trained": arm != "c"} for arm, acc in (("a", 0.9), ("b", 0.5), ("c", 0.1))
                         for s in range(3)])
    assert "beats" in A.compare_statement(rows, "test_acc", "arm", "a", "b")
    assert "equal budget" not in A.compare_statement(rows, "test_acc", "arm", "a", "b")
    for text in (A.compare_statement(rows, "test_acc", "arm", "a", "c"),
                 A.paired_statement(rows, "test_acc", "arm", "a", "c")):
        assert "a beats c" in text and "at equal budget: c did not learn in every seed" in text
        assert "80.0" in text  # a - c = 0.8 in every seed


# ----------------------------------------------------------------------------- one sweep, one folder
def test_runs_of_another_data_or_scale_are_excluded(study):
    """A run whose config has another dataset than the folder's sweep stays out of the report."""
    from bnexp.analysis.study import sweep_runs

    runs = A.collect_runs(study)[0]
    odd = runs.copy()
    odd.loc[0, "data.name"] = "cifar10"
    odd.loc[1, "scale_name"] = "full"
    cfg = yaml.safe_load((study / "multirun.yaml").read_text())
    cfg["data"] = {"name": "synthetic"}
    (study / "multirun.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(UserWarning, match="excluded"):
        kept, why = sweep_runs(study, odd.assign(scale_name=["smoke"] + ["full"] + ["smoke"] * (len(odd) - 2)))
    assert set(why) == {odd.loc[0, "run"], odd.loc[1, "run"]} and len(kept) == len(runs) - 2
    assert "data.name=cifar10 (sweep: synthetic)" in why[odd.loc[0, "run"]]


def test_status_finds_sweeps_in_the_study_data_scale_layout(tmp_path, capsys):
    """``bnexp-analyze --status results/`` reaches ``results/<study>/<data>-<scale>/``."""
    for leaf in ("synthetic-smoke", "fashion_mnist-small"):
        sweep = tmp_path / "toy" / leaf
        write_run(sweep, 8, "bn", 0, "ok", 0.8)
        write_multirun(sweep)
    assert A.main(["--status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for leaf in ("synthetic-smoke", "fashion_mnist-small"):
        assert f"{tmp_path / 'toy' / leaf}: done=1" in out


@pytest.fixture
def last_code_commit():
    """(the analysis code commit, its first parent, git's own list of the code files it changed)
    of this repository; skipped outside a git checkout."""
    import subprocess

    from bnexp.analysis import provenance

    root = Path(provenance.__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.split()  # noqa: E731
    head = provenance._code_commit()
    if not head:
        pytest.skip("not a git checkout")
    parent = git("rev-parse", f"{head}^")[0]
    return head, parent, git("diff", "--name-only", parent, head, "--", "bnexp", "conf", "experiments")


def test_report_names_the_code_changed_since_the_runs_and_whether_it_is_analysis_only(monkeypatch,
                                                                                      last_code_commit):
    """Against this repository's own history: the first parent of the analysis code commit vs
    that commit, compared with git's own list of files it changed."""
    from bnexp.analysis import provenance

    head, parent, files = last_code_commit
    monkeypatch.setattr(provenance, "same_code", lambda *a, **k: False)  # tested on its own below
    text = provenance._changed_since([parent], head)
    assert all(f"`{f}`" in text for f in files)
    analysis_only = all(f.startswith(provenance.ANALYSIS_CODE) for f in files)
    assert ("all on the analysis side" in text) == analysis_only
    assert provenance._changed_since([head], head) == ""  # runs at the analysis code: nothing to say
    monkeypatch.setattr(provenance, "ANALYSIS_CODE", ("nowhere/",))
    assert "some on the training side" in provenance._changed_since([parent], head)


@pytest.mark.parametrize("study, changed, side", [
    ("batch_size", ["conf/study/fusion.yaml", "bnexp/analysis/plots.py"], "analysis"),
    ("fusion", ["conf/study/fusion.yaml"], "training"),
    ("finetune", ["conf/study/finetune_source.yaml"], "training"),   # its sources' config
    ("batch_size", ["conf/study/batch_size_true.yaml"], "analysis"),  # a name prefix is no tie
    ("finetune_source", ["conf/study/finetune.yaml"], "analysis"),    # the sources do not read it
    ("finetune_source", ["conf/study/finetune_source.yaml"], "training"),
    ("batch_size", ["conf/norm/bn.yaml", "conf/study/fusion.yaml"], "training"),
    ("", ["conf/study/fusion.yaml"], "training"),                    # no study named: no exemption
])
def test_report_exempts_only_other_studies_configs(monkeypatch, study, changed, side):
    import subprocess
    from types import SimpleNamespace

    from bnexp.analysis import provenance

    fake = lambda *a, **k: SimpleNamespace(returncode=0, stdout="\n".join(f"M\t{f}" for f in changed))  # noqa: E731
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(provenance, "same_code", lambda *a, **k: False)
    text = provenance._changed_since(["a" * 40], "b" * 40, study)
    assert all(f"`{f}`" in text for f in changed)
    assert ("some on the training side" in text) == (side == "training")


def test_report_accounts_for_what_differs_between_the_runs_commits(monkeypatch, last_code_commit):
    """Runs from several commits: the files that differ between them, against git's own list for
    this repository's last code commit and its parent, classified as _changed_since classifies."""
    from bnexp.analysis import provenance

    head, parent, files = last_code_commit
    monkeypatch.setattr(provenance, "same_code", lambda *a, **k: False)
    text = provenance._changed_between([head, parent + "-dirty"])
    assert text.startswith(". What differs between those commits")
    assert all(f"`{f}`" in text for f in files) and text.count("`") == 2 * len(files)
    assert ("all on the analysis side" in text) == all(f.startswith(provenance.ANALYSIS_CODE) for f in files)
    assert provenance._changed_between([head]) == "" and provenance._changed_between([head, "unknown"]) == ""
    monkeypatch.setattr(provenance, "ANALYSIS_CODE", ("nowhere/",))
    assert "some on the training side" in provenance._changed_between([parent, head])


def test_figures_mark_the_arms_some_of_whose_seeds_did_not_train():
    """An arm the report does not compare must not read as a result in its figure: hatched bars
    and heatmap cells, open markers on lines, and a legend entry, exactly for the groups with a
    run whose ``trained`` is False (NaN: not checked, unmarked)."""
    from bnexp.analysis import plots

    df = pd.DataFrame({"norm": ["bn"] * 4 + ["none"] * 4, "batch": [8, 8, 128, 128] * 2,
                       "seed": [0, 1] * 4, "status": "ok",
                       "test_acc": [0.9, 0.91, 0.89, 0.9, 0.5, 0.6, 0.1, 0.12],
                       "trained": [True, True, True, float("nan"), True, False, False, False]})
    bad = {("none", 8), ("none", 128)}
    fig = plots.plot_bars(df, "batch", "test_acc", hue="norm")
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if p.get_hatch() and p.get_label() != plots.UNTRAINED_LABEL]
    assert len(hatched) == len(bad)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.UNTRAINED_LABEL in labels
    heat = plots.plot_heatmap(df, "norm", "batch", "test_acc").axes[0]
    texts = {t.get_text() for t in heat.texts}
    assert sum("untrained" in t for t in texts) == len(bad)
    joined = "|".join(texts)
    assert "n=2\n1 untrained" in joined and "n=2\n2 untrained" in joined
    assert sum(1 for p in heat.patches if p.get_hatch()) == len(bad)
    line = plots.plot_metric_vs(df, "batch", "test_acc", hue="norm").axes[0]
    open_marks = [ln for ln in line.lines if ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
    assert sorted(x for ln in open_marks for x in ln.get_xdata()) == [8, 128]
    clean = df.assign(trained=True)
    assert not any(p.get_hatch() for p in plots.plot_bars(clean, "batch", "test_acc", hue="norm").axes[0].patches)


def test_line_bands_stay_within_the_values_a_loss_can_take():
    """Three seeds that disagree give a t interval reaching below 0; a loss cannot, so the band
    is cut at 0 (and left alone above), as accuracies are cut to [0, 100] %."""
    from bnexp.analysis import plots

    df = pd.DataFrame({"norm": "none", "lr": [0.1] * 3 + [1.0] * 3, "seed": [0, 1, 2] * 2, "status": "ok",
                       "train_loss": [0.01, 0.02, 2.3, 0.5, 0.6, 0.7]})
    ax = plots.plot_metric_vs(df, "lr", "train_loss", hue="norm").axes[0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    mean, std = np.mean([0.01, 0.02, 2.3]), np.std([0.01, 0.02, 2.3], ddof=1)
    assert mean - T975[2] * std / math.sqrt(3) < 0  # the unclipped interval would cross 0
    assert band.min() == pytest.approx(0.0)
    assert band.max() == pytest.approx(mean + T975[2] * std / math.sqrt(3), rel=1e-3)  # in nats, not x 100
    assert not plots.is_percent("train_loss") and plots.is_percent("gen_gap.precise")
    assert plots.value_range("train_loss") == (0.0, None) and plots.value_range("test_acc.ema") == (0.0, 1.0)
    # one error rate minus another (ema_vs_precise's excess_err) can be negative: its band too
    assert plots.value_range("excess_err") == (-1.0, 1.0) and plots.is_percent("excess_err")


CODE_V1 = '''"""Module docstring."""
def f(x):
    """Doubles."""
    return 2 * x  # twice
'''


@pytest.mark.parametrize("path, before, after, same", [
    ("a.py", CODE_V1, CODE_V1.replace("Doubles.", "Twice x.").replace("# twice", "# 2x"), True),
    ("a.py", CODE_V1, CODE_V1.replace('"""Module docstring."""', "# no docstring"), True),
    ("a.py", CODE_V1, CODE_V1.replace("2 * x", "3 * x"), False),
    ("a.py", CODE_V1, CODE_V1.replace("return 2 * x  # twice", '"""not the first statement"""'), False),
    ("a.py", CODE_V1, CODE_V1 + "def (:\n", False),                      # does not parse
    ("s.yaml", "# @package _global_\na: 1  # one\n# note\n", "# @package _global_\n# longer note\na: 1\n", True),
    ("s.yaml", "a: 1  # one\n", "a: 2  # one\n", False),
    ("s.yaml", "# @package _global_\na: 1\n", "# @package foo\na: 1\n", False),  # Hydra reads it
    ("s.yaml", "a: [1, 2]\n", "a:\n  - 1\n  - 2\n", True),                       # same data
    ("Makefile", "x\n", "x\n", False),                                   # not a kind it reads
])
def test_same_code_ignores_comments_and_docstrings_only(monkeypatch, path, before, after, same):
    from bnexp.analysis import provenance

    versions = {"a": before, "b": after}
    monkeypatch.setattr(provenance, "_git", lambda cmd, spec: versions[spec.split(":")[0]])
    assert provenance.same_code(path, "a", "b") == same
    assert provenance.same_code(path, "a", "a") == (path != "Makefile")


def test_report_lists_comment_only_changes_apart(monkeypatch):
    from bnexp.analysis import provenance

    files = {"conf/study/noise.yaml": False, "bnexp/measure/modes.py": False, "bnexp/analysis/plots.py": True}
    monkeypatch.setattr(provenance, "_changed_files", lambda commits, against: dict(sorted(files.items())))
    text = provenance._changed_since(["a" * 40], "b" * 40, "noise")
    assert "all on the analysis side, in other studies' configs or in comments only" in text
    files["bnexp/training/fit.py"] = True
    text = provenance._changed_since(["a" * 40], "b" * 40, "noise")
    training, _, rest = text.partition("; and on the analysis side or in other studies' configs: ")
    assert training.endswith("some on the training side (re-run the study if they change what it "
                             "computes): `bnexp/training/fit.py`")
    assert rest == "`bnexp/analysis/plots.py`; and in comments or docstrings only: `bnexp/measure/modes.py`, `conf/study/noise.yaml`"


def test_report_names_which_changed_files_are_training_side(monkeypatch):
    import subprocess
    from types import SimpleNamespace

    from bnexp.analysis import provenance

    changed = ["bnexp/analysis/plots.py", "bnexp/measure/modes.py", "conf/study/fusion.yaml", "conf/study/noise.yaml"]
    fake = lambda *a, **k: SimpleNamespace(returncode=0, stdout="\n".join(f"M\t{f}" for f in changed))  # noqa: E731
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(provenance, "same_code", lambda *a, **k: False)
    text = provenance._changed_since(["a" * 40], "b" * 40, "noise")
    training, _, harmless = text.partition("; and on the analysis side or in other studies' configs: ")
    assert training.endswith(": `bnexp/measure/modes.py`, `conf/study/noise.yaml`")
    assert harmless == "`bnexp/analysis/plots.py`, `conf/study/fusion.yaml`"


def test_a_code_check_counts_from_the_rerun_commit_when_nothing_later_is_training_side(tmp_path, monkeypatch):
    """results/code_checks.json: configs run at the commit of the study's re-run and at a later
    one with identical records. The report cites it only from that commit, only when every run
    of the check was identical, and only when what changed after it cannot move the numbers."""
    from bnexp.analysis import provenance

    study = tmp_path / "results" / "toy" / "synthetic-smoke"
    for row in RUNS:
        write_run(study, *row)
    run = next(d for d in sorted((study / "runs").iterdir()) if (d / records.SUMMARY).exists())
    (run / "reproduced.json").write_text(json.dumps({"at": "a" * 40, "max_abs_diff": 0.0}))
    check = {"from": "a" * 40, "to": "b" * 40, "change": "a knob, default off", "machine": "fp32 here",
             "runs": [{"study": "toy", "overrides": ["norm=bn", "seed=0"], "identical": True}]}
    checks = tmp_path / "results" / provenance.CODE_CHECKS

    def cited(later: dict, *rows, between: dict | None = None) -> str:
        """``later``: what changed from a check's ``to`` to HEAD; ``between``: from the runs'
        commits to a check's ``from`` (default: the same as ``later``)."""
        checks.write_text(json.dumps(list(rows)))
        provenance._BRIDGES.clear()
        monkeypatch.setattr(provenance, "_changed_files", lambda commits, against: later)
        monkeypatch.setattr(provenance, "_only_harmless", lambda a, b, study: not provenance._split(
            later if between is None else between, study)[2])
        return provenance._code_checked(study, "c" * 40, ["abc123"])

    assert cited({"bnexp/analysis/plots.py": True}, check) == (
        ". Code checked from aaaaaaa to bbbbbbb (a knob, default off): the same configs run at both "
        "commits, fp32 here, gave identical records (toy: norm=bn seed=0)")
    assert cited({"bnexp/training/fit.py": True}, check) == ""  # a training-side change after the check
    # from another commit: only across a stretch where nothing can move the numbers (a bridge)
    assert cited({}, {**check, "from": "d" * 40}, between={"bnexp/training/fit.py": True}) == ""
    assert cited({}, {**check, "from": "d" * 40}, between={"bnexp/analysis/plots.py": True}).startswith(
        ". Code checked from ddddddd to bbbbbbb")
    # from the runs' own commit (here abc123): a check that needs no re-run of the study
    assert cited({}, {**check, "from": "abc123" + "0" * 34}).startswith(". Code checked from abc1230 to bbbbbbb")
    assert cited({}, {**check, "runs": [{**check["runs"][0], "identical": False}]}) == ""


def test_report_reads_like_a_paper_and_remakes_byte_for_byte(study, runs):
    """The answer (one line per shape, label and effect with its interval and k of n seeds) starts
    within the first 15 lines; provenance is one line, its detail in provenance.json; the same
    records give the same bytes (no time, no path of this machine)."""
    fig = A.save_figure(A.plot_bars(runs, "norm", "test_acc"), study / "figures", "bars")[0]
    verdicts = [{"study": "toy", "shape": "BN beats no normalization", "label": "shown", "contrast": "BN vs none",
                 "metric": "test_err", "estimate": -0.012, "ci": [-0.02, -0.004], "n": 5, "k": 5, "text": ""},
                {"label": "inconclusive", "text": "BN and GN are within a point of each other."}]

    def make() -> bytes:
        return A.write_report(study, "toy", "Does bn help?", "bnexp -m study=toy", [fig], pd.DataFrame({"a": [1]}),
                              "s", verdicts=verdicts, runs=runs).read_bytes()

    first = make()
    text = first.decode()
    lines = text.splitlines()
    answer = next(i for i, line in enumerate(lines) if line.startswith("- **"))
    assert answer < 15 and lines[answer - 2] == "## Answer"
    assert lines[answer] == ("- **shown**: BN beats no normalization. BN vs none: -1.2 points [-2.0, -0.4] "
                             "on test_err, 5 of 5 seeds")
    assert lines[answer + 1] == "- **inconclusive**: BN and GN are within a point of each other."
    assert text.index("![bars](figures/bars.png)") < text.index("## Comparisons") < text.index("## Methods")
    prov = [line for line in lines if line.startswith("**Provenance.**")]
    assert len(prov) == 1 and "runs at abc123" in prov[0] and "(provenance.json)" in prov[0]
    assert json.loads((study / "provenance.json").read_text())["runs_at"]["abc123"] > 0
    assert str(study) not in text and str(Path.home()) not in text
    assert make() == first


@pytest.mark.parametrize("lrs, crowded", [
    ([0.001, 0.003, 0.005, 0.01, 0.02, 0.03, 0.1, 0.3, 1.0, 3.0], True),  # lr_sensitivity's grid: 0.02 / 0.03 touch
    ([0.001, 0.01, 0.1, 1.0], False)])                                       # one label per decade
def test_lr_tick_labels_turn_only_where_neighbours_would_overlap(lrs, crowded):
    """lr_sensitivity's test_acc_vs_lr printed "0.0030.005" and "0.020.03" on its log axis."""
    runs = pd.DataFrame({"optim.lr": lrs * 2, "status": "ok", "test_acc": np.linspace(0.5, 0.9, 2 * len(lrs))})
    fig = A.plot_metric_vs(runs, "optim.lr", "test_acc", logx=10)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{v:g}" for v in lrs]
    assert {t.get_rotation() for t in ax.get_xticklabels()} == ({35.0} if crowded else {0.0})
    # the rule, computed apart: the narrowest neighbour gap on the log axis, in points, against
    # the pair's label width (0.6 em a character at 10 pt, 4 pt apart)
    width_pt = ax.get_position().width * fig.get_figwidth() * 72
    logs = np.log10(lrs)
    gaps = np.diff(logs) / (logs[-1] - logs[0]) * width_pt * 0.9
    need = [0.6 * 10 * (len(f"{a:g}") + len(f"{b:g}")) / 2 + 4 for a, b in zip(lrs, lrs[1:])]
    assert any(g < n for g, n in zip(gaps, need)) == crowded


def test_point_labels_do_not_overlap_and_each_names_its_own_point():
    """noise's test_acc_vs_noise printed "ghost_bn16ghost_bn4" where two arms' labels met."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    fig = Figure(figsize=(5.6, 3.6))  # a panel of noise's figure
    ax = fig.subplots()
    pts = [("bn", 0.026, 84.0), ("ghost_bn64", 0.037, 84.1), ("ghost_bn16", 0.072, 84.3),
           ("ghost_bn4", 0.137, 84.8), ("far", 0.33, 82.3)]
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "o")
    ax.set_xlim(0, 0.35), ax.set_ylim(80, 86)
    anns = A.label_points(ax, pts)
    assert [a.get_text() for a in anns] == [p[0] for p in pts]
    assert [tuple(a.xy) for a in anns] == [(p[1], p[2]) for p in pts]  # anchored at its own point
    r = FigureCanvasAgg(fig).get_renderer()
    for a in anns:
        a.update_positions(r)
    boxes = [Text.get_window_extent(a, r) for a in anns]  # the texts (an annotation's own box holds its leader)
    assert all(b.y0 > 100 for b in boxes)  # in display space (pixels), not the raw offsets (-24..18)
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    # a label left on its usual spot (right-above) has no leader line; a moved one has one
    assert anns[-1].arrow_patch is None and anns[-1].xyann == (4, 5)
    assert all((a.arrow_patch is None) == (a.xyann == (4, 5)) for a in anns)
