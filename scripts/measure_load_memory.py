"""Peak memory of loading a full-size checkpoint, as a multiple of the file size.

    python scripts/measure_load_memory.py [FILE]     (default: writes a synthetic fp32 SD v1.5 file to /tmp)

Loading runs in a fresh process so its peak RSS (/proc/self/status VmHWM) is the load's alone. Target: ≤ 1.3 × file.
"""
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
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


def main() -> None:
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        path = Path("/tmp/ldm_scratch_synthetic_fp32.safetensors")
        if not path.exists():
            subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic_checkpoint.py"), str(path)],
                           check=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    base, peak, weights, seconds = out.stdout.split()
    size = path.stat().st_size
    print(f"file {path} {size / 2**30:.2f} GiB; weights in memory {int(weights) / 2**30:.2f} GiB; "
          f"load {float(seconds):.1f} s")
    print(f"peak RSS {int(peak) / 2**30:.2f} GiB (process before loading: {int(base) / 2**30:.2f} GiB) "
          f"= {int(peak) / size:.2f} × file size")


if __name__ == "__main__":
    main()
