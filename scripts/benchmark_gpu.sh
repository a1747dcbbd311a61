#!/usr/bin/env bash
# fp16 at 512² on a CUDA GPU, ours vs diffusers on the same full-size random SD v1.5 weights, in one run:
#   - UNet step with classifier-free guidance ([2, 4, 64, 64]): median seconds → it/s (denoising steps per second)
#   - a whole txt2img (tokenize, encode, STEPS DDIM steps with CFG, VAE decode): seconds, and steps / second
#   - peak GPU memory of that txt2img (torch.cuda.max_memory_allocated, reset after loading), and after loading
# Each library runs in its own fresh process (so one's cached blocks do not count against the other); ours first,
# then diffusers, then ours again (the two ours runs show how much the GPU's clocks drift).
#
#   scripts/benchmark_gpu.sh [RESULTS_DIR]        (env: STEPS=30 REPEATS=5 WARMUP=2 CHECKPOINT=…)
#
# Needs: torch with CUDA, diffusers + transformers (the [reference] extra). Writes the synthetic weights once
# (scripts/synthetic_checkpoint.py, ≈ 4.3 GB fp32 in /tmp, as scripts/benchmark.py). Nothing is downloaded.
# Not run yet (no GPU was lent to this project so far): it has been checked by reading, and its Python part on the
# CPU with the tiny model (DRY_RUN=1, see the end of this file). On one H200 it should take ≈ 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp}/benchmark_gpu}"
mkdir -p "$OUT_DIR"
export STEPS="${STEPS:-30}" REPEATS="${REPEATS:-5}" WARMUP="${WARMUP:-2}" DRY_RUN="${DRY_RUN:-0}"
export CHECKPOINT="${CHECKPOINT:-/tmp/ldm_scratch_synthetic_fp32.safetensors}"

if [ "$DRY_RUN" != 1 ]; then
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script needs a GPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT_DIR/gpu.csv"
  python3 -c "import sys; sys.path[:0] = ['scripts', '.']; from pathlib import Path; import benchmark; \
benchmark.synthetic_file(Path('$CHECKPOINT'))"
fi

run_one() {  # $1 = ours | diffusers; writes $OUT_DIR/$1-$2.json
python3 - "$1" "$OUT_DIR/$1-$2.json" <<'PY'
import json, os, statistics, sys, time
from pathlib import Path

import torch

sys.path[:0] = ["scripts", "."]
import benchmark  # the loaders and inputs of the CPU benchmark: the same weights, the same prompts

library, result = sys.argv[1], Path(sys.argv[2])
steps, repeats, warmup = int(os.environ["STEPS"]), int(os.environ["REPEATS"]), int(os.environ["WARMUP"])
dry = os.environ["DRY_RUN"] == "1"
device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.float16)
cuda = device == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(run, n):
    """Seconds of each of n calls (after the GPU finished the previous work)."""
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


start = time.perf_counter()
if dry:  # the bundled tiny model and a tiny diffusers pipeline on its weights: checks the code paths only
    pipe = benchmark.tiny_pair_for_dry_run()[0 if library == "ours" else 1]
else:
    checkpoint = Path(os.environ["CHECKPOINT"])
    # ours as load_pipeline gives it (channels_last, row-banded VAE); diffusers as from_single_file gives it
    pipe = (benchmark.load_ours(checkpoint, dtype, device, True) if library == "ours"
            else benchmark.load_theirs(checkpoint, dtype, device, False))
sync()
load_s = time.perf_counter() - start
after_load = torch.cuda.memory_allocated() if cuda else 0
data = benchmark.inputs(dtype, device)
x, t, context = data["x"], data["t"], data["context"]
if dry:
    x, context = x[:, :, :8, :8], context[..., :pipe.unet.config.context_dim if library == "ours"
                                                else pipe.unet.config.cross_attention_dim]
if library == "ours":
    unet_step = lambda: pipe.unet(x, t, context)
    txt2img = lambda: pipe.txt2img(benchmark.PROMPT, benchmark.NEGATIVE, steps=steps, sampler="ddim", seed=0,
                                   output_type="np", progress=False)
else:
    unet_step = lambda: pipe.unet(x, t, encoder_hidden_states=context).sample
    txt2img = lambda: pipe(benchmark.PROMPT, negative_prompt=benchmark.NEGATIVE, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(0), output_type="np").images

with torch.inference_mode():
    timed(unet_step, warmup)
    unet_s = statistics.median(timed(unet_step, repeats * 4))
    timed(txt2img, 1)                                  # warm-up: kernels chosen, allocator grown
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    txt2img_all = timed(txt2img, max(1, repeats // 2))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    image = txt2img()
report = {"library": library, "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
          "dtype": str(dtype), "torch": torch.__version__, "steps": steps, "load_s": load_s,
          "unet_step_s": unet_s, "unet_it_per_s": 1 / unet_s,
          "txt2img_s": statistics.median(txt2img_all), "txt2img_all": txt2img_all,
          "txt2img_it_per_s": steps / statistics.median(txt2img_all),
          "memory_after_load_gib": after_load / 2**30, "peak_txt2img_gib": peak / 2**30,
          "image_finite": bool(torch.isfinite(torch.as_tensor(image)).all())}
result.write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k != "txt2img_all"}))
PY
}

run_one ours 1
run_one diffusers 1
run_one ours 2

python3 - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
ours = [json.loads((folder / f"ours-{i}.json").read_text()) for i in (1, 2)]
theirs = json.loads((folder / "diffusers-1.json").read_text())
print(f"\n{theirs['device']}, {theirs['dtype']}, 512², {theirs['steps']} DDIM steps with CFG")
print(f"{'':34} {'ours (run 1 / run 2)':>24} {'diffusers':>10} {'ours/diffusers':>15}")
for key, label, unit in (("unet_it_per_s", "UNet step with CFG", "it/s"), ("txt2img_it_per_s", "txt2img", "it/s"),
                         ("txt2img_s", "txt2img", "s"), ("peak_txt2img_gib", "peak memory, txt2img", "GiB"),
                         ("memory_after_load_gib", "memory after load", "GiB"), ("load_s", "load", "s")):
    a, b = ours[0][key], ours[1][key]
    ratio = (a + b) / 2 / theirs[key] if theirs[key] else float("nan")
    print(f"{label + ' (' + unit + ')':34} {a:11.3f} / {b:10.3f} {theirs[key]:10.3f} {ratio:14.3f}×")
print("(it/s: above 1× ours is faster; seconds and GiB: below 1× ours takes less)")
print("images finite:", all(r["image_finite"] for r in ours + [theirs]))
summary = {"ours": ours, "diffusers": theirs}
(folder / "summary.json").write_text(json.dumps(summary, indent=2))
PY
# DRY_RUN=1 scripts/benchmark_gpu.sh /tmp/gpu_dry   runs every line above on the CPU with the tiny model
# (float32, 2 steps): it checks the code, not the speed.
