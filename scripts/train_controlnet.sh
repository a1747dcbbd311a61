#!/usr/bin/env bash
# Train the tiny model's Canny ControlNet from scratch and grade it on hidden layouts (scripts/eval_controlnet.py).
#   bash scripts/train_controlnet.sh [RUN_DIR] [FLAGS for train-controlnet]      (default runs/controlnet)
# Budget: 40 core-minutes of CPU time (= 20 minutes on 2 cores) or --minutes of wall time, whichever ends first;
# the wall time, CPU time and load average are printed, since a shared machine gives the run less than 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/controlnet}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
OMP_NUM_THREADS=${THREADS:-2} python3 -m ldm_scratch train-controlnet --out "$RUN_DIR" --threads "${THREADS:-2}" "${@:2}"
end=$(date +%s)
echo "training wall time: $((end - start)) s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
OMP_NUM_THREADS=${THREADS:-2} python3 scripts/eval_controlnet.py "$RUN_DIR/controlnet.safetensors" --n 100 \
    --json "$RUN_DIR/eval.json"
