"""The run directory format: how a run is written and read back. No pandas here.

One folder per run::

    <run>/
      .hydra/config.yaml       the composed config (Hydra)      .hydra/overrides.yaml  the overrides
      .hydra/hydra.yaml        Hydra's own settings
      run.log                  the run's log (tracebacks of failed runs end up here)
      metrics.jsonl            one JSON object per epoch (EPOCH_KEYS, plus `test_acc.<mode>` ...)
      probes.jsonl             long-format probe rows: step, epoch, layer, name, value (opt-in)
      precise_stats.json       per-layer tables of the precise-BN passes (stats.evaluate_modes)
      summary.json             written last, atomically: SUMMARY_KEYS (see below)
      model.pt / last.pt       final weights / resumable state (never in git)
      fused.json               BN-folding rows per statistics mode (bnexp-fuse, post hoc)
      precise_vs_n.json        test scores with precise BN at several N (tools.rescore.rescore_precise)

Every file name above is spelled once, in the constants below; other modules import them.

``summary.json`` is the commit point: a run counts as finished exactly when it exists with a
``status`` of ``ok`` or ``diverged`` (``failed`` runs are retried with ``rerun_failed=true``).
Its ``metrics`` dict is flat: ``train_acc``, ``train_loss``, ``test_acc``, ``test_loss``,
``gen_gap`` (train_acc - test_acc, in accuracy points of the same scale), then
``test_acc.<mode>`` / ``test_loss.<mode>`` for each eval mode, and anything else a run measured.
Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("bnexp")

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
PROBES = "probes.jsonl"
PRECISE_STATS = "precise_stats.json"
MODEL = "model.pt"
LAST = "last.pt"
FUSED = "fused.json"
PRECISE_VS_N = "precise_vs_n.json"
SWEEP_RECORDS = "sweeps"  # <sweep dir>/sweeps/<time>.yaml: every -m command's multirun.yaml
CORRUPTIONS = "corruptions.json"  # robustness: accuracy per corruption, severity and eval mode
AFFINE = "affine.json"            # the learned gamma and beta of every norm layer, per-layer quantiles
STATUSES = ("ok", "diverged", "failed")
FINISHED = ("ok", "diverged")
EPOCH_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
              "seconds", "images_per_s")
SUMMARY_KEYS = ("status", "metrics", "config", "overrides", "choices", "wall_time_s",
                "train_images_per_s", "git_commit", "versions", "device", "precision",
                "skipped_modes", "error", "started_at", "finished_at")


def provenance(started_at: float, *, overrides=(), choices=None, device: str | None = None,
               precision: str | None = None, wall_time_s: float | None = None) -> dict:
    """The summary fields that say where a run came from and when, shared by ``ok``/``diverged``
    summaries (``train.fit``) and ``failed`` ones (the entry point): ``git_commit``,
    ``versions``, ``device`` and ``precision`` (as resolved; None where a run failed before
    knowing), ``started_at``, ``finished_at``, ``wall_time_s`` (default: since ``started_at``),
    ``overrides`` (the run's command-line/sweep overrides, as in ``.hydra/overrides.yaml`` when
    it ran) and ``choices`` (the config-group options it composed, ``{"norm": "dropout"}``)."""
    from bnexp.runtime import git_commit, versions  # loads torch: only when a record is written

    finished = time.time()
    return {"git_commit": git_commit(), "versions": versions(), "device": device,
            "precision": precision, "started_at": started_at, "finished_at": finished,
            "wall_time_s": finished - started_at if wall_time_s is None else wall_time_s,
            "overrides": list(overrides), "choices": dict(choices or {})}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never half.
    The file gets the mode a plain ``open`` would give it (0o666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=False, allow_nan=False)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes it 0o600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    try:  # Linux states it; os.umask can only read it by setting it, which races with threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows as JSON lines (non-finite floats become null, so the file stays valid JSON)."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(_jsonable(row), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary, or None when it has not finished (no summary.json yet). An empty or
    corrupt file (a crash or a full disk outside ``write_json_atomic``) counts as unfinished,
    with a warning: a sweep trains the run again."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        summary = err
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        why = summary if isinstance(summary, Exception) else "not a summary object"
        log.warning("%s is empty or corrupt (%s): the run counts as unfinished", path, why)
        return None
    return summary


def is_finished(run_dir: Path, rerun_failed: bool = False) -> bool:
    """True when a sweep should skip this run: it has a summary with a final status."""
    summary = read_summary(run_dir) or {}
    return summary.get("status") in (FINISHED if rerun_failed else STATUSES)


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line/sweep overrides of a run (``.hydra/overrides.yaml``), as ``key=value``."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    # The file is a YAML list of plain strings; parse it without importing yaml in the hot path.
    import yaml

    return list(yaml.safe_load(path.read_text()) or [])


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every run folder below ``root``: folders holding a ``.hydra`` dir or a summary."""
    root = Path(root)
    found = {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob(SUMMARY)}
    yield from sorted(found)


def write_epoch(run_dir: Path, row: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS, [row])


def write_probes(run_dir: Path, rows: list[dict]) -> None:
    if rows:
        append_jsonl(Path(run_dir) / PROBES, rows)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj
