"""Re-score a finished run's saved model with precise BN at other sample sizes (``precise_vs_n.json``).

A tool that uses a finished run: ``assemble.load_run`` rebuilds it and the eval mode's own code
(``modes.run_mode``) scores it, so draw 0 at the run's own N reproduces its ``test_acc.<mode>``.
The ``ema_vs_precise`` study calls it after its sweep.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bnexp import records
from bnexp.measure.modes import MODES, run_mode
from bnexp.training.assemble import load_run


def rescore_precise(run_dir, samples: list[int], device: str = "cpu", *, repeats: int = 1,
                    mode: str = "precise") -> list[dict]:
    """Test scores of a finished run's saved model with precise BN over N training images, for
    each N in ``samples`` and draws ``r < repeats`` (draw r uses seed ``run seed + 1000 r``, so
    r = 0 at the run's own N reproduces its ``test_acc.<mode>``): rows ``samples, repeat,
    test_acc, test_loss``. ``mode``: any precise mode. The same code path as the run's own mode
    (``run_mode``), on the model ``load_run`` rebuilds. Cached in ``<run>/precise_vs_n.json``;
    recomputed when the samples, repeats or mode differ.
    """
    if not mode.startswith("precise"):
        raise ValueError(f"mode={mode!r}: rescore_precise takes a precise mode "
                         f"({', '.join(m for m in MODES if m.startswith('precise'))})")
    path = Path(run_dir) / records.PRECISE_VS_N
    key = {"samples": [int(n) for n in samples], "repeats": repeats, "mode": mode}
    if path.exists():
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["rows"]
    run = load_run(run_dir, device)
    cfg, rows = run.config, []
    for n in key["samples"]:
        eval_cfg = dataclasses.replace(cfg.eval, precise_samples=n)
        for r in range(repeats):
            result, _ = run_mode(mode, run.model, run.data, run.pipe, eval_cfg, cfg.data.batch_size,
                                 cfg.seed + 1000 * r, cfg.sampler)
            rows.append({"samples": n, "repeat": r, "test_acc": result["acc"], "test_loss": result["loss"]})
    records.write_json_atomic(path, {**key, "rows": rows})
    return rows
