#!/usr/bin/env bash
# make gpu-check: the CUDA path end to end, in at most 5 minutes on one GPU.
#   1. the gpu-marked tests            (pytest -m gpu; at most 90 s)
#   2. one short CUDA run of the demo   (VGG + BN, synthetic data, 1 epoch, device=cuda; at most 90 s)
#      whose summary must say status ok on a cuda device
#   3. the bench on CUDA                (one round at batch 32 and 128, 1-epoch accuracy run; at most 110 s)
# Without a CUDA device it says so and exits 3 at once (before anything is run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing checked" >&2
    exit 3
fi
"$PY" -c 'import torch; print("gpu-check on", torch.cuda.get_device_name(0), "torch", torch.__version__)'
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== 1/3 gpu-marked tests"
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider

echo "== 2/3 a short CUDA run of the demo (norm=bn, batch 128, 1 epoch)"
timeout 90 "$PY" -m bnexp data=synthetic norm=bn optim.epochs=1 device=cuda progress=off \
    "hydra.run.dir=$out/run"
"$PY" - "$out/run" <<'PY'
import sys
from bnexp import records
summary = records.read_summary(sys.argv[1])
assert summary and summary["status"] == "ok", f"the CUDA run did not finish ok: {summary and summary['status']}"
assert not summary["device"].startswith("cpu"), f"the run used {summary['device']}, not CUDA"
print(f"ok on {summary['device']} ({summary['precision']}): test_acc {summary['metrics']['test_acc']:.3f}, "
      f"{summary['train_images_per_s']:.0f} img/s")
PY

echo "== 3/3 bench on CUDA"
timeout 110 "$PY" -m bnexp.tools.bench --rounds 1 --batches 32,128 --accuracy-epochs 1 device=cuda
echo "gpu-check: ok"
