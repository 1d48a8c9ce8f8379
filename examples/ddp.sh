#!/usr/bin/env bash
# image_classifier.py on two processes of this machine, started by `ember launch`, with
# strategy "ddp": each process holds the whole model, and gradients are averaged over
# the processes at each step.
#
#   bash examples/ddp.sh                   # from the repository, after `make demo`
#   PYTHON=python3 OUT=/tmp/ddp bash examples/ddp.sh --epochs 2 --more-epochs 1
#
# Each process reads its half of every epoch (the Trainer shards the loader) with batches of
# 32, so the global batch is 64: the batch of the one-process run. The first fit, the resumed
# fit from checkpoints/last-step=N, early stopping and the top-3 checkpoints work as in one
# process; rank 0 prints and writes the checkpoints. Extra arguments go to the script.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
OUT="${OUT:-runs/ddp}"

rm -rf "$OUT"
# `python -m ember` is the `ember` command of this interpreter (no PATH needed).
# CPU processes talk over gloo on 127.0.0.1; one thread each keeps two processes from fighting
# over the cores.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" -m ember launch --num_processes 2 \
    "$HERE/image_classifier.py" --strategy ddp --accelerator cpu --batch-size 32 \
    --root "$OUT" "$@"
