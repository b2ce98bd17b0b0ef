"""results/README.md is made from the studies' verdicts.json: the claims scorecard first (label,
headline number with its interval, thumbnail, link), then one line per shape, each line short."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnexp.analysis import findings


def verdict(study: str, shape: str, label: str, estimate=-0.009, ci=(-0.015, -0.003), k=5, n=5) -> dict:
    """One shape's verdict in the verdicts.json schema (helper ``verdicts`` writes these)."""
    return {"study": study, "shape": shape, "source": "Kosson et al. 2024", "claim": "G", "label": label,
            "contrast": "PN + noise vs PN", "metric": "test_err", "estimate": estimate,
            "ci": list(ci) if ci else None, "n": n, "k": k, "converged": {"pn": 1.0, "pn_gni16": 1.0},
            "train_acc": {"pn": 1.0, "pn_gni16": 0.999}, "test": {"name": "paired t", "p": 0.01},
            "budget": "30 epochs", "text": f"{shape}: {label}"}


def write_study(results: Path, name: str, verdicts: list | None, runs=()) -> Path:
    folder = results / name / "fashion_mnist-small"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "headline.png").write_bytes(b"png")
    (folder / "report.md").write_text(f"# {name}\n\n**Question.** Does {name} hold?\n")
    (folder / "report.json").write_text(json.dumps({"question": f"Does {name} hold?",
                                                    "figures": ["figures/headline.png"]}))
    if verdicts is not None:
        (folder / "verdicts.json").write_text(json.dumps(verdicts))
    for i, (start, end) in enumerate(runs):
        run = folder / "runs" / f"seed={i}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"status": "ok", "started_at": start, "finished_at": end}))
    return folder


@pytest.fixture
def results(tmp_path):
    shapes = ["PN generalizes worse than BN", "noise injected into LN or PN lowers their test error",
              "GNI beats ghost BN", "normalization without batch noise regularizes"]
    labels = ["inconclusive", "shown", "shown", "not tested"]
    # side by side: 1200 s, then a run resumed after a 1000 s break: +60 s, not +1060
    write_study(tmp_path, "norm_vs_noise", [verdict("norm_vs_noise", s, lab) for s, lab in zip(shapes, labels)],
                runs=[(100.0, 700.0), (160.0, 1300.0), (2300.0, 2360.0)])
    write_study(tmp_path, "noise", [verdict("noise", "noise grows as the batch shrinks " * 30, "shown")])
    write_study(tmp_path, "lr_sensitivity", None)  # ran, no verdicts.json yet
    return tmp_path


def scorecard(text: str) -> dict[str, str]:
    head = text.split("## Every expected shape")[0]
    return {line.split(" | ")[0].lstrip("| "): line for line in head.splitlines() if line.startswith("| ")}


def test_the_page_opens_with_the_scorecard_of_every_claim(results):
    text = findings.build("fashion_mnist-small", results)
    rows = scorecard(text)
    assert text.index("| claim | label |") < text.index("## Every expected shape") < text.index("## Studies")
    assert set(rows) >= {c.text for c in findings.CLAIMS}
    # noise regularizes: norm_vs_noise shape 1, its number in points with the interval and the seeds
    row = rows["Batch noise regularizes"]
    assert "**shown**" in row and "PN + noise vs PN: -0.9 points [-1.5, -0.3] on test_err, 5 of 5 seeds" in row
    assert 'src="norm_vs_noise/fashion_mnist-small/figures/headline.png"' in row
    assert "(norm_vs_noise/fashion_mnist-small/report.md)" in row
    # normalization regularizes: shape 3 is "not tested"; no number given
    assert "**not tested**" in rows["Normalization regularizes"]
    assert f"**{findings.PENDING}**" in rows["BN allows larger learning rates"]  # lr_sensitivity: no verdicts yet
    assert "**not run yet**" in rows["BN folds into the conv"]                 # fusion: no folder
    assert all(len(line) <= findings.MAX_LINE for line in text.splitlines() if line.startswith("|"))
    assert "noise grows as the batch shrinks" in text and "…" in text  # the long shape is cut, not dropped


def test_each_claim_is_answered_by_a_shape_a_study_declares():
    """Every (study, index) of the table names a study the project knows."""
    for claim in findings.CLAIMS:
        assert claim.answers and all(s in findings.ORDER and i >= 0 for s, i in claim.answers), claim


def test_studies_list_the_sweep_wall_time_and_what_was_not_run(results):
    text = findings.build("fashion_mnist-small", results).split("## Studies")[1]
    # (1300 - 100 + 60) / 60: not the runs' 1800 s summed, nor the break
    assert "| [norm_vs_noise](norm_vs_noise/fashion_mnist-small/report.md) | Does norm_vs_noise hold? | 21 min |" in text
    assert "Not run at this setting yet:" in text and "`batch_size_true` (measured: no arm converges" in text


def test_the_command_writes_results_readme(results, capsys):
    path = findings.main(["--results", str(results)])
    assert path == results / "README.md" and path.read_text().startswith("# What bnexp found (fashion_mnist-small)")


@pytest.mark.parametrize("claim", findings.CLAIMS, ids=lambda c: c.key)
def test_every_claim_points_at_a_declared_shape_of_its_study(claim):
    """Each (study, index) of the scorecard names a shape its study script declares, and that
    shape's sentence shares a key word with the claim (a guard against an index that drifted
    when a study's shapes were reordered)."""
    from conftest import experiment

    keywords = {"norm_regularizes": ("regulariz", "narrows"), "noise_regularizes": ("noise",),
                "larger_lr": ("learning rate",), "less_dropout": ("gap",), "accuracy": ("best", "ahead"),
                "stable_inputs": ("distribution",), "small_batch": ("batch", "nbs"), "noniid": ("degrade", "i.i.d"),
                "train_test": ("ema", "precise"), "finetune": ("fine-tune", "target"), "fold": ("fold", "fus"),
                "smooth": ("gradient", "one lr"), "ics": ("covariate",), "shift": ("robust", "shift"), "affine": ("gamma", "beta"),
                "speed": ("faster",)}[claim.key]
    for study, index in claim.answers:
        shapes = experiment(study).STUDY.shapes
        assert index < len(shapes), (study, index)
        assert any(k in shapes[index].shape.lower() for k in keywords), (study, shapes[index].shape)


def test_a_claim_headlines_a_shape_that_answers_before_one_not_tested(results):
    """Normalization regularizes: norm_vs_noise's shape 3 is "not tested"; once bn_vs_dropout's
    shape 0 (its next answer) has a label, the scorecard shows that one, with its study."""
    write_study(results, "bn_vs_dropout", [verdict("bn_vs_dropout", "BN alone narrows the gap", "inconclusive")])
    row = scorecard(findings.build("fashion_mnist-small", results))["Normalization regularizes"]
    assert "**inconclusive**" in row and "(bn_vs_dropout/fashion_mnist-small/report.md)" in row
