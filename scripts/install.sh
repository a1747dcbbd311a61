#!/usr/bin/env bash
# Install ldm_scratch (editable) with optional extras, reusing an installed torch.
#   bash scripts/install.sh                 # runtime only
#   bash scripts/install.sh test            # + test tools
#   bash scripts/install.sh test,reference  # + diffusers/transformers for the parity tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}

# torch first, and only if missing: a bare `torch` requirement can pull a multi-GB CUDA build. 2.13.0 is the
# version the project is tested with (on the development machines pip finds a local CPU wheel of it). To use another
# build (CUDA, ROCm, MPS), install it before running this script; it is kept.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
if [ -n "$extras" ]; then target=".[${extras}]"; else target="."; fi
"$PY" -m pip install --quiet --disable-pip-version-check -e "$target"
# open_clip (the reference for SD 2's text tower) without its dependencies: it requires torchvision, and pip would
# replace the installed torch (e.g. the CPU wheel) with the torch that torchvision pins. The tests import only its
# text tower module, which needs nothing but torch.
if [[ ",${extras}," == *",reference,"* ]]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "open-clip-torch==3.3.0"
fi
