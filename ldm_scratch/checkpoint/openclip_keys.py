"""SD 2's text encoder in the official single file: OpenCLIP ViT-H/14's text tower under `cond_stage_model.model.`,
in open_clip's own names, mapped onto our CLIPTextModel (clip.py, configured by `openclip_text_config`).

    cond_stage_model.model.token_embedding.weight                      [49408, 1024]  → token_embedding.weight
    cond_stage_model.model.positional_embedding                        [77, 1024]     → position_embedding.weight
    cond_stage_model.model.transformer.resblocks.{i}.ln_1.*            [1024]         → blocks.{i}.norm1.*
    cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_weight  [3072, 1024] → blocks.{i}.attn.q/k/v.weight
    cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_bias    [3072]       → blocks.{i}.attn.q/k/v.bias
    cond_stage_model.model.transformer.resblocks.{i}.attn.out_proj.*                  → blocks.{i}.attn.out.*
    cond_stage_model.model.transformer.resblocks.{i}.ln_2.*                           → blocks.{i}.norm2.*
    cond_stage_model.model.transformer.resblocks.{i}.mlp.c_fc.*        [4096, 1024]   → blocks.{i}.mlp.fc1.*
    cond_stage_model.model.transformer.resblocks.{i}.mlp.c_proj.*      [1024, 4096]   → blocks.{i}.mlp.fc2.*
    cond_stage_model.model.ln_final.*                                                 → final_norm.*

Two things differ from a plain renaming:
- open_clip uses PyTorch's nn.MultiheadAttention, which stores q, k and v stacked in one `in_proj_weight`
  [3C, C] (rows 0…C−1 are W_q, then W_k, then W_v) and one `in_proj_bias` [3C]. Our attention has three Linear
  layers, so each fused tensor feeds three of ours: written `<file key>#0`, `#1`, `#2` for "rows k·C … (k+1)·C−1",
  and `FusedView` reads them so.
- SD 2 reads the penultimate block (clip.py), so the file's last block (`resblocks.23`) is never used, and neither
  are `text_projection` (CLIP's image–text projection of the pooled end-of-text vector) and `logit_scale` (the
  contrastive loss's temperature). They are allowed by name, with that reason (`unused_openclip_keys`).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from .keymap import KeyMap, Parts
from .tensor_file import CheckpointError

OPENCLIP_PREFIX = "cond_stage_model.model."
OPENCLIP_LAYER: Parts = (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.out_proj.", "attn.out."),
                         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
OPENCLIP_RULES = KeyMap(blocks=(
    ("token_embedding.", "token_embedding.", ()),
    ("positional_embedding", "position_embedding.weight", ()),    # a bare nn.Parameter in open_clip: no ".weight"
    ("transformer.resblocks.{}.", "blocks.{}.", OPENCLIP_LAYER),
    ("ln_final.", "final_norm.", ())))
# nn.MultiheadAttention's fused projection → our three (after OPENCLIP_RULES renamed the block).
FUSED_QKV = {"attn.in_proj_weight": ("attn.q.weight", "attn.k.weight", "attn.v.weight"),
             "attn.in_proj_bias": ("attn.q.bias", "attn.k.bias", "attn.v.bias")}
UNUSED = {"text_projection": "CLIP's projection of the pooled text vector into the joint space (SD reads tokens)",
          "logit_scale": "the temperature of CLIP's contrastive loss"}
LAST_BLOCK_REASON = "OpenCLIP's last block: SD 2 reads the penultimate block's output (layer: penultimate)"


def last_block(keys: Iterable[str], prefix: str = OPENCLIP_PREFIX) -> int:
    """The index of the file's last transformer block (23 for ViT-H/14)."""
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return max((int(m[1]) for key in keys if (m := pattern.match(key))), default=-1)


def unused_openclip_keys(keys: Iterable[str], prefix: str = OPENCLIP_PREFIX) -> dict[str, str]:
    """{file key: why SD 2 does not use it} for the tensors of the text tower that no module of ours takes."""
    keys = list(keys)
    last = f"{prefix}transformer.resblocks.{last_block(keys, prefix)}."
    unused = {key: LAST_BLOCK_REASON for key in keys if key.startswith(last)}
    unused.update({prefix + name: reason for name, reason in UNUSED.items() if prefix + name in keys})
    return unused


def map_openclip(keys: Iterable[str], prefix: str = OPENCLIP_PREFIX) -> dict[str, str]:
    """{our name → file key} for the text tower (fused keys split as `key#k`), the last block and the unused
    tensors left out."""
    keys = [k for k in keys if k.startswith(prefix) and "#" not in k]    # the file's keys, not FusedView's slices
    skipped = unused_openclip_keys(keys, prefix)
    mapping: dict[str, str] = {}
    for key in keys:
        if key in skipped:
            continue
        ours = OPENCLIP_RULES.to_ours(key[len(prefix):])
        block, _, part = ours.partition(".attn.")
        fused = FUSED_QKV.get("attn." + part) if part else None
        targets = [(f"{block}.{name}", f"{key}#{k}") for k, name in enumerate(fused)] if fused else [(ours, key)]
        for name, source in targets:
            if name in mapping:
                raise CheckpointError(f"both '{mapping[name]}' and '{source}' map to '{name}'")
            mapping[name] = source
    return mapping


class FusedView:
    """A tensor file seen with the fused q/k/v tensors split: `shapes` and `get` also answer `key#k` (the k-th of
    three equal slices along dim 0), and pass every other key through to the file."""

    def __init__(self, file):
        self.file = file
        self.shapes = dict(file.shapes)
        for key, shape in file.shapes.items():
            if key.endswith(("in_proj_weight", "in_proj_bias")):
                if not shape or shape[0] % 3:
                    raise CheckpointError(f"'{key}' has shape {list(shape)}: a fused q/k/v projection must have "
                                          "3·C rows")
                self.shapes.update({f"{key}#{k}": (shape[0] // 3, *shape[1:]) for k in range(3)})

    @staticmethod
    def split_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
        """The shapes a FusedView of a file with these shapes answers."""
        return FusedView(type("Shapes", (), {"shapes": shapes})()).shapes

    def get(self, key: str) -> torch.Tensor:
        name, _, k = key.partition("#")
        tensor = self.file.get(name)
        return tensor.chunk(3, dim=0)[int(k)] if k else tensor   # rows k·C … (k+1)·C − 1: W_q, W_k, W_v


def source_keys(mapping: dict[str, str]) -> set[str]:
    """The file keys a mapping reads (a split `key#k` reads `key`)."""
    return {key.partition("#")[0] for key in mapping.values()}
