#!/usr/bin/env bash
# A run stopped by SIGTERM and resumed ends with the same weights as a run never stopped.
#
#   bash examples/resume.sh                 # from the repository, after `make demo`
#   PYTHON=python3 OUT=/tmp/resume bash examples/resume.sh --samples 512
#
# Three runs of image_classifier.py (one process each, same seed, same data):
#   1. uninterrupted, for --epochs 3;
#   2. the same, but it sends SIGTERM to itself after step $STOP_AT; ember finishes that step,
#      saves checkpoints/last-step=N and exits non-zero;
#   3. a new process with --ckpt-path last continues run 2 to the end.
# Then the final model.safetensors of runs 1 and 3 are compared tensor by tensor.
# Extra arguments go to every run (e.g. --samples 512 --batch-size 32).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
OUT="${OUT:-runs/resume}"
STOP_AT="${STOP_AT:-20}"
SCRIPT="$HERE/image_classifier.py"
COMMON=(--epochs 3 --more-epochs 0 --accelerator cpu "$@")

rm -rf "$OUT"
echo "== 1. uninterrupted run"
"$PYTHON" "$SCRIPT" --root "$OUT/uninterrupted" "${COMMON[@]}"

echo "== 2. a run that receives SIGTERM after step $STOP_AT"
if "$PYTHON" "$SCRIPT" --root "$OUT/interrupted" --sigterm-after-step "$STOP_AT" "${COMMON[@]}"; then
    echo "FAILED: the interrupted run exited with 0; SIGTERM should stop it" >&2
    exit 1
fi
ls -d "$OUT"/interrupted/checkpoints/last-step=*

echo "== 3. the same command with --ckpt-path last, in a new process"
"$PYTHON" "$SCRIPT" --root "$OUT/interrupted" --ckpt-path last "${COMMON[@]}"

echo "== 4. compare the final weights"
"$PYTHON" - "$OUT/uninterrupted/final/model.safetensors" "$OUT/interrupted/final/model.safetensors" <<'PY'
import sys

import torch
from safetensors.torch import load_file

first, second = (load_file(path) for path in sys.argv[1:])
differ = [name for name in first if not torch.equal(first[name], second.get(name))]
if first.keys() != second.keys() or differ:
    sys.exit(f"FAILED: the weights differ: {sorted(differ or first.keys() ^ second.keys())}")
print(f"OK: {len(first)} tensors, bit for bit equal")
PY
