"""The compute plan of the issue-26 re-runs at data=fashion_mnist scale=small, from measured times.

For each study, the committed sweep's runs.csv / curves.csv give per run (means): ``wall`` (the
summary's wall_time_s), ``train`` (the epochs' training seconds) and ``other = wall - train``
(start-up, per-epoch test scoring, the final eval modes, probes, precise passes). These were
measured with two jobs of one thread on the 2 cores (launcher=joblib), so a study's wall-clock is
the sum over its runs / 2. A test pass is priced from the run's own training throughput: a
forward pass costs about a third of a training step (``EVAL_SPEEDUP``), so scoring ``n`` test
images costs ``n / (EVAL_SPEEDUP * train_images_per_s)`` seconds, once per scored epoch and once
per final eval mode. What is left of ``other`` (probes, precise passes, start-up) is kept. So

    run = train * train_factor + fixed + (scored + modes) * test_size / (EVAL_SPEEDUP * ips)
    fixed = max(other - (scored_now + modes) * test_size_now / (EVAL_SPEEDUP * ips), STARTUP)

``runs`` is the new sweep's size and ``grid`` the lr-grid runs of ``grid.tune`` (each costs about a study run).

    .venv/bin/python tools/compute_plan.py            # the table, in markdown
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STARTUP = 5.0  # seconds of a run outside training and evaluation (imports, data, model)
EVAL_SPEEDUP = 3.0  # test images per second / training images per second (forward vs forward + backward)
FULL_TEST = 10_000
BUDGET_MIN = 60  # per study, wall-clock on 2 cores
TOTAL_BUDGET_MIN = 8 * 60
# A run on a CPU with AVX512-BF16 (precision=auto: bf16) against one on an AVX2-only CPU (fp32),
# same design: measured 2026-12-05 from the re-runs, batch_size 72 s a run (bf16, 63 runs in 38
# min) against the plan's 140 s from its fp32 runs (0.51), bn_vs_dropout 56 s against ~150 s
# (0.4). So each row is shown on both kinds of CPU: the committed runs' own, and the other.
BF16_VS_FP32 = 0.5

# study -> the re-run's design: runs of the new sweep, lr-grid runs, scored epochs (None: as
# now; eval.score_every sets it), test_size (default: all 10,000), train_factor (default 1),
# reuse (conf unchanged: the committed runs are skipped as finished, 0 minutes), why.
PLAN = {
    "demo": dict(runs=2 * 3 * 5, grid=2 * 4 * 2 * 2, scored=4, reuse=True,
                 why="re-run done (12 + 2 min measured): batch 8,128 x bn,none,dropout x 5 seeds; none and "
                     "dropout tuned: 4 lrs x 2 seeds x 2 batches"),
    "norm_vs_noise": dict(runs=10 * 5 + 2 * 5, grid=(2 * 4 + 3 * 3) * 2, scored=None, reuse=True,
                          why="re-run done (ea95878, 45 min measured): 10 arms x 5 seeds, pn and bn 10; "
                              "5 arms tuned; 60 epochs"),
    "bn_vs_dropout": dict(runs=2 * 4 * 3 * 5, grid=3 * 2, scored=None, reuse=True,
                          why="re-run done (34c8f5c, 59 min measured): 5 seeds, 120 epochs with a 5-epoch "
                              "warmup, none tuned at p=0 (3 lrs x 2 seeds)"),
    # the committed runs hold the 10 runs of grid.extra (4x the grid's epochs): their mean time per
    # run already prices them, so the 110 runs count once (before the re-run: 100 + 10 x 4)
    "lr_sensitivity": dict(runs=10 * 2 * 5 + 10, grid=0, scored=None, reuse=True,
                           why="re-run done (c046ba8, 49 min measured): lr grid + 0.005, 0.02 around none's "
                               "optimum, x bn,none x 5 seeds, and bn,none at lr 0.01 for 80 epochs x 5 seeds "
                               "(grid.extra; priced as 40 grid runs)"),
    "batch_size": dict(runs=9 * 5, grid=(4 + 4 + 3) * 2, scored=6, reuse=True,
                       why="re-run done (dcbfa2a, 38 min measured): 5 seeds; GN, LN, none tuned; GN's and "
                           "LN's grids widened at f4df02a (4 grid runs, 3 min): both choices stay, bracketed"),
    "batch_size_true": dict(runs=4 * 5 * 5, grid=(3 + 4 + 3) * 2, scored=1, reuse=True,
                            why="re-run done (1560657, 30 min measured beside a fresh clone's test and demo): "
                                "5 seeds; GN, LN, none tuned at batch 128; no augmentation, until 99% clean "
                                "train (cap 154 epochs): every run reached it, 22-44 s a run"),
    "stat_modes_vs_batch": dict(runs=70, grid=0, scored=2, reuse=True,
                                why="re-run done (32654c8, 50 min measured): 5 seeds, test after epochs 20 and 40"),
    "noise": dict(runs=30, grid=0, scored=None, reuse=True,
                  why="re-run done (1e69ec8, 28 min measured): 5 seeds, all 10,000 test images every epoch"),
    "noniid": dict(runs=45, grid=0, scored=4, reuse=True,
                   why="re-run done (7e407a6, 52 min of runs over two sessions, 139 s a run): 5 seeds, test "
                       "every 4th epoch; the GN pair at fp32 x 5 seeds (results/noniid/<data>-<scale>-gn_fp32, "
                       "a sweep of its own) 10 runs, 12 min"),
    "activations": dict(runs=10, grid=0, scored=None, reuse=True, why="as committed (all 10,000 test images already)"),
    "ema_vs_precise": dict(runs=5, grid=0, scored=None, reuse=True,
                           why="re-run done (a578de5, 40 min measured with the precise re-scoring): 5 seeds "
                               "on all 10,000 test images (committed before: 4 seeds on 5,000), 666-818 s a run"),
    "fusion": dict(runs=8, grid=0, scored=None, test_size=5000, reuse=True,
                   why="seeds 3, 4 added (bd7cfea, 23 min measured, 10 of them folding and timing): 5 seeds; "
                       "no verdict reads test accuracy, so the test set stays at 5,000"),
    "finetune_source": dict(runs=5, grid=0, scored=None, reuse=True, why="5 seeds (3, 4 added at 32766f6)"),
    "finetune": dict(runs=60, grid=0, scored=None, reuse=True,
                     why="re-run done: seeds 0-2 at 27140ab (23 min with their sources), 3-4 at 32766f6 "
                         "(9 min with theirs)"),
}


def measured(study: str) -> dict:
    """Per-run means of the committed small sweep of ``study``."""
    folder = ROOT / "results" / study / "fashion_mnist-small"
    runs, curves = pd.read_csv(folder / "runs.csv"), pd.read_csv(folder / "curves.csv")
    train = curves.groupby("run")["seconds"].sum()
    scored = curves.groupby("run")["test_acc"].apply(lambda s: s.notna().sum())
    wall = runs.set_index("run")["wall_time_s"]
    test = runs["data.test_size"].iloc[0] if "data.test_size" in runs else None
    modes = runs["eval.modes"].iloc[0].count(",") + 1 if "eval.modes" in runs else 4
    return {"n": len(runs), "wall": wall.mean(), "train": train.mean(), "other": (wall - train).mean(),
            "scored": scored.mean(), "test_size": FULL_TEST if pd.isna(test) or test is None else int(test),
            "modes": modes, "eval_ips": EVAL_SPEEDUP * runs["train_images_per_s"].mean(),
            "precision": "bf16" if "precision" in runs and (runs["precision"] == "bf16").mean() > 0.5 else "fp32"}


def estimate(m: dict, plan: dict) -> float:
    """Seconds of one re-run run (the module docstring's formula)."""
    scored = m["scored"] if plan["scored"] is None else min(plan["scored"], m["scored"])
    fixed = max(m["other"] - (m["scored"] + m["modes"]) * m["test_size"] / m["eval_ips"], STARTUP)
    test = (scored + m["modes"]) * plan.get("test_size", FULL_TEST) / m["eval_ips"]
    return m["train"] * plan.get("train_factor", 1.0) + fixed + test


def table() -> pd.DataFrame:
    rows = []
    for study, plan in PLAN.items():
        m = measured(study)
        per_run = estimate(m, plan)
        runs = plan["runs"] + plan["grid"]
        minutes = runs * per_run / 120
        bf16 = m["precision"] == "bf16"
        rows.append({"study": study, "committed runs": m["n"], "committed min": m["wall"] * m["n"] / 120,
                     "new runs": plan["runs"], "grid runs": plan["grid"], "s/run": per_run,
                     "measured on": m["precision"], "min (2 jobs)": minutes,
                     "min (bf16 CPU)": minutes if bf16 else minutes * BF16_VS_FP32,
                     "min (fp32 CPU)": minutes / BF16_VS_FP32 if bf16 else minutes,
                     "reused": bool(plan.get("reuse")), "design": plan["why"]})
    return pd.DataFrame(rows)


def measured_minutes(data: str = "fashion_mnist-small") -> pd.DataFrame:
    """Per study, the committed runs' own time: the sum of every finished run's ``wall_time_s``
    over the study's folder and its siblings (``-lr_grid``, ``-gn_fp32``, ...) / 2 jobs, read
    from the runs' summary.json. What a fresh ``make studies`` costs on the CPU kind they ran on
    (runs timed beside other work count as measured, so this is an upper bound)."""
    import json
    rows = []
    for study_dir in sorted((ROOT / "results").iterdir()):
        for folder in sorted(study_dir.glob(f"{data}*")):
            walls = [json.loads(f.read_text()).get("wall_time_s") or 0.0
                     for f in folder.glob("runs/*/summary.json")]
            if walls:
                rows.append({"study": study_dir.name, "folder": folder.name, "runs": len(walls),
                             "min (2 jobs)": sum(walls) / 120})
    return pd.DataFrame(rows)


def main() -> int:
    m = measured_minutes()
    per_study = m.groupby("study")["min (2 jobs)"].sum()
    print("measured, the committed runs (sum of wall_time_s / 2 jobs, grids and sibling sweeps included):")
    print("| study | runs | min |\n|---|---|---|")
    for study, g in m.groupby("study"):
        print(f"| {study} | {g['runs'].sum()} | {g['min (2 jobs)'].sum():.0f} |")
    print(f"\nall studies: {per_study.sum():.0f} min ({per_study.sum() / 60:.1f} h) against "
          f"{TOTAL_BUDGET_MIN / 60:.0f} h; over {BUDGET_MIN} min: "
          f"{', '.join(per_study[per_study > BUDGET_MIN].index) or 'none'}\n")
    t = table()
    cols = list(t.columns)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in t.iterrows():
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r) + " |")
    for cpu in ("bf16", "fp32"):
        col = f"min ({cpu} CPU)"
        total = t.loc[~t["reused"], col].sum()
        print(f"\non a {cpu} CPU: re-runs left {total:.0f} min ({total / 60:.1f} h; reused studies not "
              f"counted, fresh they add {t.loc[t['reused'], col].sum():.0f} min) against "
              f"{TOTAL_BUDGET_MIN / 60:.0f} h for all; over {BUDGET_MIN} min: "
              f"{', '.join(t.loc[t[col] > BUDGET_MIN, 'study']) or 'none'}")
    return 0 if t.loc[~t["reused"], "min (bf16 CPU)"].sum() <= TOTAL_BUDGET_MIN else 1


if __name__ == "__main__":
    sys.exit(main())
