"""tools/compute_plan.py's measured minutes: every finished run's wall time over a study's folder
and its siblings, halved for the two jobs, against a hand sum."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("compute_plan", ROOT / "tools" / "compute_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_minutes_sums_each_studys_folders_and_halves_for_two_jobs(tmp_path, monkeypatch):
    walls = {("a", "fashion_mnist-small"): [60.0, 120.0], ("a", "fashion_mnist-small-lr_grid"): [30.0],
             ("b", "fashion_mnist-small"): [240.0], ("b", "synthetic-smoke"): [999.0]}  # other data: left out
    for (study, folder), ws in walls.items():
        for i, w in enumerate(ws):
            run = tmp_path / "results" / study / folder / "runs" / f"seed={i}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"status": "ok", "wall_time_s": w}))
    (tmp_path / "results" / "a" / "fashion_mnist-small" / "runs" / "unfinished").mkdir()  # no summary
    cp = _tool()
    monkeypatch.setattr(cp, "ROOT", tmp_path)
    m = cp.measured_minutes()
    per_study = m.groupby("study")["min (2 jobs)"].sum()
    assert per_study.to_dict() == {"a": (60 + 120 + 30) / 120, "b": 240 / 120}
    assert m.groupby("study")["runs"].sum().to_dict() == {"a": 3, "b": 1}
