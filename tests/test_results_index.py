"""results/README.md is made from the reports: each verdict line and the sweep's wall time."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import experiment

ROOT = Path(__file__).resolve().parents[1]
results_index = experiment("results_index")

REPORT = """# noise

**Question.** Is BN's regularization the noise of its batch statistics?

**Command.**

```bash
bnexp -m study=noise data=fashion_mnist scale=small
```

## Figures

![test_acc_vs_noise](figures/test_acc_vs_noise.png) ([pdf](figures/test_acc_vs_noise.pdf))

## Expected shapes

- **shown**: noise grows as the batch shrinks (Hoffer et al. 2017). slope -0.5 [-0.6, -0.4].
- **not shown**: more noise regularizes (Santurkar et al. 2018). Why not: the interval holds 0.
"""


def test_index_row_carries_every_verdict_the_command_and_the_sweep_wall_time(tmp_path):
    folder = tmp_path / "noise" / "fashion_mnist-small"
    # side by side: 1200 s, then a run resumed after a 1000 s break: +60 s, not +1060
    for i, (start, end) in enumerate([(100.0, 700.0), (160.0, 1300.0), (2300.0, 2360.0)]):
        run = folder / "runs" / f"seed={i}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(
            {"status": "ok", "started_at": start, "finished_at": end, "metrics": {},
             "precision": "fp32" if i else "bf16"}))
    (folder / "report.md").write_text(REPORT)
    (tmp_path / "demo" / "synthetic-smoke").mkdir(parents=True)  # another setting: not listed
    (tmp_path / "demo" / "synthetic-smoke" / "report.md").write_text(REPORT)
    text = results_index.build("fashion_mnist-small", tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| [`")]
    assert len(rows) == 1
    row = rows[0]
    assert "[`noise`](noise/fashion_mnist-small/report.md)" in row
    assert "noise/fashion_mnist-small/figures/test_acc_vs_noise.png" in row
    assert "**shown**: noise grows as the batch shrinks (Hoffer et al. 2017). slope -0.5 [-0.6, -0.4]." in row
    assert "**not shown**: more noise regularizes" in row and "the interval holds 0" in row
    assert 'make study S=noise ARGS="data=fashion_mnist scale=small"' in row
    # (1300 - 100 + 60) / 60: not the runs' 1800 s summed, nor the break; and the runs' precisions
    assert "| 21 min<br>bf16, fp32 |" in row
    assert "Not run at this setting yet:" in text and "`demo`" in text
    assert "`batch_size_true` (measured: no arm converges" in text  # why, where it was measured
