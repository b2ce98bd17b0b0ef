"""Re-run one finished run as it ran and compare its numbers with the record (``bnexp-reproduce``).

    bnexp-reproduce results/batch_size/fashion_mnist-small/runs/<run>
    bnexp-reproduce <run> --out /tmp/again --tolerance 0.01

The run folder's ``.hydra/overrides.yaml`` holds the command line of that run (the sweep's
overrides plus its own); the launcher override is dropped (one run, in this process). What the
launcher or ``auto`` decided is not on that line but in ``summary.json``: the threads the run
used (a joblib sweep gives each job 1), its precision (``auto`` -> ``bf16``) and device; they are
added as overrides (``as_ran``) unless the command line already set them. The new
run goes to ``--out`` (default: a temporary folder, removed afterwards), then each final metric
the record has (``test_acc`` and the eval modes', ``train_acc``, ``train_loss``) is printed beside
the new value. Exit status 0 when every accuracy is within ``--tolerance`` (a fraction: 0.01 is
one point), 1 otherwise, 2 when the folder is not a finished run. On the same kind of machine,
torch version and code the numbers are usually identical: one-thread CPU runs are deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

COMPARED = ("test_acc", "train_acc", "train_loss")  # plus every test_acc.<mode> of the record


def recorded(run_dir: Path) -> tuple[list[str], dict]:
    """(overrides without the launcher, the record's final metrics); ValueError when the folder
    is not a finished run."""
    summary, overrides = run_dir / "summary.json", run_dir / ".hydra" / "overrides.yaml"
    if not summary.is_file() or not overrides.is_file():
        raise ValueError(f"{run_dir}: no summary.json and .hydra/overrides.yaml (not a finished run)")
    record = json.loads(summary.read_text())
    if record.get("status") != "ok":
        raise ValueError(f"{run_dir}: status {record.get('status')!r}, not ok: nothing to compare")
    given = [o for o in yaml.safe_load(overrides.read_text()) or []
             if o.split("=", 1)[0].lstrip("+~") not in ("launcher", "hydra/launcher")]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in given}
    return given + [f"{k}={v}" for k, v in as_ran(record).items() if k not in keys], record["metrics"]


def as_ran(record: dict) -> dict:
    """``{threads, precision, device}`` as the run resolved them (its summary), where known:
    a one-thread run re-made with torch's default would not be the same computation."""
    device = str(record.get("device") or "")
    out = {}
    threads = re.search(r"(\d+) threads", device)
    if threads:
        out["threads"] = int(threads.group(1))
    elif int((record.get("config") or {}).get("threads") or 0) > 0:
        out["threads"] = int(record["config"]["threads"])
    if record.get("precision") in ("fp32", "bf16"):
        out["precision"] = record["precision"]
    if device:
        out["device"] = "cpu" if device.startswith("cpu") else "cuda"
    return out


def compare(old: dict, new: dict, tolerance: float) -> tuple[list[tuple], bool]:
    """Rows (metric, recorded, re-run, difference) and whether every accuracy is within
    ``tolerance``."""
    keys = [k for k in old if k in COMPARED or k.startswith("test_acc.")]
    rows, ok = [], True
    for key in keys:
        a, b = old.get(key), new.get(key)
        diff = (b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else math.nan
        if "acc" in key and not abs(diff) <= tolerance:  # NaN (missing) fails too
            ok = False
        rows.append((key, a, b, diff))
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnexp-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where the re-run goes (kept)")
    parser.add_argument("--record", action="store_true",
                        help="write the outcome to <run_dir>/reproduced.json (the study report cites it)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest |difference| of an accuracy, as a fraction (0.01 = 1 point)")
    args = parser.parse_args(argv)
    try:
        overrides, old = recorded(args.run_dir)
    except ValueError as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 2
    print("bnexp " + " ".join(overrides), flush=True)
    import bnexp

    out = args.out or Path(tempfile.mkdtemp(prefix="bnexp-reproduce-"))
    try:
        again = bnexp.run(overrides, run_dir=out)
        new = again.get("metrics", {})
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    rows, ok = compare(old, new, args.tolerance)
    width = max(len(r[0]) for r in rows) if rows else 6
    print(f"{'metric':<{width}}  {'recorded':>10}  {'re-run':>10}  {'difference':>11}")
    for key, a, b, diff in rows:
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"  # noqa: E731
        print(f"{key:<{width}}  {fmt(a)}  {fmt(b)}  {diff:+11.4f}")
    points = f"{100 * args.tolerance:g} point" + ("" if 100 * args.tolerance == 1 else "s")
    print(f"reproduced: every accuracy within {points}" if ok else
          f"NOT reproduced: an accuracy differs by more than {points}, or is missing")
    if args.record:
        diffs = [abs(d) for _, _, _, d in rows if not math.isnan(d)]
        (args.run_dir / "reproduced.json").write_text(json.dumps(
            {"at": again.get("git_commit"), "within_tolerance": ok, "tolerance": args.tolerance,
             "max_abs_diff": max(diffs) if diffs else None}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
