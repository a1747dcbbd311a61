"""Key names of TAESD, the tiny autoencoder (fast/taesd.py), in the three layouts it is published in.

Ours are the original's: `encoder.N.…` / `decoder.N.…`, N the index in madebyollin/taesd's nn.Sequential (the
decoder's index 0 is its tanh clamp, which has no weights). So

    taesd_encoder.pth / .safetensors    N.…                 → encoder.N.…      (1.conv.0.weight: Block 1's first conv)
    taesd_decoder.pth / .safetensors    N.…                 → decoder.N.…      (1.weight [64, 4, 3, 3]: its first conv)
    diffusers AutoencoderTiny folder    encoder.layers.N.…  → encoder.N.…
                                        decoder.layers.N.…  → decoder.(N+1).…  (DecoderTiny clamps in forward, so
                                                                               its layer list starts one later)

Nothing else is allowed in these files; the strict loader (checkpoint/loading.py: check_mapping, fill_module)
names any leftover or missing tensor.
"""
from __future__ import annotations

from typing import Iterable

from .keymap import Rule

DIFFUSERS_TAESD_RULES: list[Rule] = [
    (r"^encoder\.layers\.(\d+)\.", r"encoder.\1."),
    (r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.{int(m[1]) + 1}."),   # + the clamp at decoder.0
]


def official_taesd_rules(half: str) -> list[Rule]:
    """taesd_encoder.* / taesd_decoder.*: one half's nn.Sequential state dict, keys `N.…` → `{half}.N.…`."""
    return [(r"^(\d+)\.", half + r".\1.")]


def taesd_layout(keys: Iterable[str]) -> str | None:
    """What a TAESD file holds, from its key names: "encoder" (taesd_encoder: its first layer is the image conv
    `0.weight`), "decoder" (taesd_decoder: nothing at index 0, the clamp), "diffusers" (AutoencoderTiny's
    `encoder.layers.*` / `decoder.layers.*`), or None (not TAESD)."""
    keys = set(keys)
    if keys and all(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return "diffusers"
    if not keys or not all(k.split(".")[0].isdigit() for k in keys):
        return None
    return "encoder" if "0.weight" in keys else "decoder"
