"""Write a synthetic checkpoint laid out exactly like an official SD v1 single file, filled with random numbers.

The official weights cannot be downloaded here, so tests and benchmarks use files with the official names and shapes
(ldm_scratch/checkpoint/keys/sd-v1-checkpoint-keys.json) and random values. EVERY tensor is random (the original UNet
zero-initialises its output layers, which would let parity checks pass vacuously), scaled so activations stay O(1).

    python scripts/synthetic_checkpoint.py out.safetensors [--dtype fp16] [--ema] [--buffers] [--inpainting]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_scratch.checkpoint import ema_key, reference_keys


def random_tensor(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape)
    noise = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        return noise / math.sqrt(math.prod(shape[1:]))  # ~ unit-variance outputs for unit-variance inputs
    if name.endswith("weight"):
        return 1 + 0.1 * noise  # norm gains near 1
    return 0.1 * noise


def synthetic_state(*, seed: int = 0, dtype: torch.dtype = torch.float32, ema: bool = False, buffers: bool = False,
                    inpainting: bool = False, text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    keys = reference_keys()
    shapes = {k: v for section in ("unet", "vae", "text_encoder") for k, v in keys[section].items()}
    if inpainting:
        shapes.update(keys["inpainting"]["changed_shapes"])
    generator = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(k, shape, generator) for k, shape in shapes.items()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if ema:
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            state[ema_key(key)] = state[key] * 0.5  # distinguishable from the live weights
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    if buffers:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        for name in keys["ddpm_buffers"]:
            state[name] = {"betas": betas, "alphas_cumprod": alphas_cumprod}.get(name, torch.zeros(1000)).float()
    if not text_model_prefix:
        state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                 for k, v in state.items()}
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--ema", action="store_true", help="add model_ema.* copies of the UNet (non-pruned files)")
    parser.add_argument("--buffers", action="store_true", help="add the 12 DDPM schedule buffers")
    parser.add_argument("--inpainting", action="store_true", help="9-channel UNet input (sd-v1-5-inpainting)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another name")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    state = synthetic_state(seed=args.seed, dtype=dtype, ema=args.ema, buffers=args.buffers,
                            inpainting=args.inpainting)
    save_file(state, str(args.out))
    print(f"wrote {args.out}: {len(state)} tensors, {args.out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
