"""Peak memory of loading a full-size checkpoint, as a multiple of the file size — and, with --txt2img, where the
peak of a whole 512² txt2img lies.

    python scripts/measure_load_memory.py [FILE]                 (default: writes a synthetic fp32 SD v1.5 file to /tmp)
    python scripts/measure_load_memory.py [FILE] --txt2img [--steps 2] [--threads 1]

Everything runs in a fresh process so its peak RSS (/proc/self/status VmHWM) is that work's alone. Target for the
load: ≤ 1.3 × file.

--txt2img loads the file with `load_pipeline` (what a user gets), runs one 512² txt2img (DDIM, CFG) and prints the
peak resident memory of each stage: the load, each text-encoder call, each UNet step, and each block of the VAE
decoder. Between stages the peak is reset (writing "5" to /proc/self/clear_refs sets VmHWM to the current RSS;
Linux only), so a stage's peak is the highest RSS reached while it ran.
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_CHILD = """
import sys, time, torch
from ldm_scratch.checkpoint import load_models
def peak_rss():  # VmHWM: this process image's peak RSS in bytes (ru_maxrss would include the parent's on Linux)
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]) * 1024
base = peak_rss()
start = time.perf_counter()
models = load_models(sys.argv[1], dtype=torch.float32)
seconds = time.perf_counter() - start
n = sum(p.numel() * p.element_size() for m in (models.text_encoder, models.unet, models.vae) for p in m.parameters())
print(base, peak_rss(), n, seconds)
"""

STAGES_CHILD = """
import sys, torch
from ldm_scratch import load_pipeline
path, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
rows = []
def mark(stage):  # the peak since the previous mark, the RSS now (MiB); then reset the peak to the RSS now
    status = {l.split(':')[0]: int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('Vm')}
    rows.append((stage, status['VmHWM'], status['VmRSS']))
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
def watch(module, name):
    module.register_forward_pre_hook(lambda *args: mark(None))
    module.register_forward_hook(lambda *args: mark(name))
pipe = load_pipeline(path)
pipe.tokenizer
mark('load_pipeline')
watch(pipe.text_encoder, 'text encoder')
watch(pipe.unet, 'UNet step (CFG, batch 2)')
for i, level in reversed(list(enumerate(pipe.vae.decoder.levels))):
    for block in [*level.res_blocks] + ([level.upsample] if level.upsample is not None else []):
        watch(block, f'VAE decoder level {i} ({2 ** (3 - i) * 64}²): ' + type(block).__name__)
with torch.inference_mode():
    pipe.txt2img('a watercolor painting of a fox in the snow', 'blurry', steps=steps, sampler='ddim', seed=0,
                 output_type='np', progress=False)
mark('the rest (decoder mid/output, pre/post-processing)')
weights = sum(p.numel() * p.element_size() for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters())
print(f"weights {weights / 2 ** 20:.0f} MiB")
print(f"{'stage':58} {'peak MiB':>9} {'RSS after':>10}")
for stage, peak, rss in rows:
    if stage is not None:
        print(f"{stage:58} {peak:9.0f} {rss:10.0f}")
print(f"{'whole run':58} {max(peak for _, peak, _ in rows):9.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=Path("/tmp/ldm_scratch_synthetic_fp32.safetensors"))
    parser.add_argument("--txt2img", action="store_true", help="also run one 512² txt2img, peak per stage")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    path = args.file
    if not path.exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic_checkpoint.py"), str(path)], check=True)
    if args.txt2img:
        if not Path("/proc/self/clear_refs").exists():
            sys.exit("--txt2img needs Linux (/proc/self/clear_refs resets the peak between stages)")
        subprocess.run([sys.executable, "-c", STAGES_CHILD, str(path), str(args.steps), str(args.threads)],
                       check=True, cwd=ROOT)
        return
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    base, peak, weights, seconds = out.stdout.split()
    size = path.stat().st_size
    print(f"file {path} {size / 2**30:.2f} GiB; weights in memory {int(weights) / 2**30:.2f} GiB; "
          f"load {float(seconds):.1f} s")
    print(f"peak RSS {int(peak) / 2**30:.2f} GiB (process before loading: {int(base) / 2**30:.2f} GiB) "
          f"= {int(peak) / size:.2f} × file size")


if __name__ == "__main__":
    main()
