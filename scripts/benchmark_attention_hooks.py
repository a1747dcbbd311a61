"""What the attention hooks cost when none is set: the UNet step with today's `attention` (which checks for a hook)
against the same step with the check taken out (the function as it was before hooks), interleaved in one process.

    python3 scripts/benchmark_attention_hooks.py                       # the bundled tiny UNet, 64² image
    python3 scripts/benchmark_attention_hooks.py --full --latent 32    # SD v1.5's UNet (random weights), 256² image

Reports the median time of each and their ratio (1.00 = no cost), and the time of the hooked (explicit softmax)
path with a hook that only looks, for scale; then the same for one attention call alone (1000 interleaved calls
on the UNet's first attention layer's shapes), where the check is the only difference and load noise is smaller.
Run it under `flock /tmp/heavy.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange

import ldm_scratch
from ldm_scratch import attention as attention_module
from ldm_scratch import spatial_transformer


def attention_before_hooks(q, k, v, n_heads, causal=False, chunk=None, layer=None):
    """attention() as it was before hooks existed (no slicing here): split heads, fused SDPA, merge heads."""
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=n_heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "b h n d -> b n (h d)")


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="SD v1.5's UNet with random weights (≈ 3.4 GB)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 16 tiny, 32 full)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.full:
        from ldm_scratch.unet import UNet, UNetConfig
        unet, context_dim, side = UNet(UNetConfig()).eval(), 768, args.latent or 32
    else:
        pipe = ldm_scratch.load_pipeline()
        unet, context_dim, side = pipe.unet, pipe.config.unet.context_dim, args.latent or 16
    x, t, context = torch.randn(2, 4, side, side), torch.tensor([500, 500]), torch.randn(2, 77, context_dim)

    def step():
        with torch.inference_mode():
            unet(x, t, context)

    def before():
        spatial_transformer.attention = attention_before_hooks
        try:
            step()
        finally:
            spatial_transformer.attention = attention_module.attention

    def looking():
        with attention_module.hooks(unet, lambda *args: None):
            step()

    for run in (step, before, looking):          # warm-up
        run()
    times = {"now (check, no hook)": [], "before hooks": [], "hook that only looks": []}
    for _ in range(args.repeats):
        for name, run in zip(times, (step, before, looking)):
            times[name].append(timed(run))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["before hooks"]
    print(f"UNet step, batch 2, latent {side}², {'SD v1.5 size' if args.full else 'tiny'}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    for name, value in medians.items():
        print(f"  {name:<22} {value * 1000:9.1f} ms   ratio to before: {value / base:.3f}")

    layer = next(m for name, m in unet.named_modules() if name.endswith("self_attn"))
    width = layer.to_q.out_features
    q = torch.randn(2, (side // 2) ** 2 if not args.full else side ** 2, width)
    calls = {"now (check, no hook)": lambda: attention_module.attention(q, q, q, layer.n_heads, layer=layer),
             "before hooks": lambda: attention_before_hooks(q, q, q, layer.n_heads)}
    call_times = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(1000):
            for name, run in calls.items():
                call_times[name].append(timed(run))
    call_medians = {name: statistics.median(values) for name, values in call_times.items()}
    print(f"one attention call, q/k/v {list(q.shape)}, {layer.n_heads} heads, median of 1000:")
    for name, value in call_medians.items():
        print(f"  {name:<22} {value * 1e6:9.1f} µs   ratio to before: {value / call_medians['before hooks']:.3f}")


if __name__ == "__main__":
    main()
