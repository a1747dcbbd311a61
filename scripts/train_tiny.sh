#!/usr/bin/env bash
# Train the bundled tiny model from scratch and install it as ldm_scratch/bundled/tiny-shapes.safetensors, then grade it.
#   bash scripts/train_tiny.sh [RUN_DIR] [FLAGS] (default runs/tiny-shapes; re-running resumes from
#                                                RUN_DIR/ckpt.safetensors, and refuses FLAGS that change its recipe)
# The recipe is TrainConfig's defaults (ldm_scratch/train.py); wall time and load average are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/tiny-shapes}
NPROC=${NPROC:-2}       # data-parallel processes (DDP, gloo): one per core
THREADS=${THREADS:-1}   # tiny convolutions: 1 thread per process beats 2 threads in one process on a busy machine
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ldm_scratch.train \
    --out "$RUN_DIR" --threads "$THREADS" --no-progress "${@:2}"
end=$(date +%s)
echo "training wall time: $((end - start)) s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
# replacing the bundled model is the point of this script; copy, then rename, so it is never half-written
cp "$RUN_DIR/model.safetensors" ldm_scratch/bundled/tiny-shapes.safetensors.partial
mv ldm_scratch/bundled/tiny-shapes.safetensors.partial ldm_scratch/bundled/tiny-shapes.safetensors
python3 -m ldm_scratch inspect ldm_scratch/bundled/tiny-shapes.safetensors
python3 scripts/eval_tiny.py ldm_scratch/bundled/tiny-shapes.safetensors --reconstruction 600 --json "$RUN_DIR/eval.json"
