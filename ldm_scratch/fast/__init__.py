"""Opt-in speed and memory machinery for CPU inference; the networks in unet.py, vae.py and clip.py stay plain.

    from ldm_scratch.fast import install
    install(unet=pipe.unet, vae=pipe.vae)     # what load_pipeline does to the networks it builds

Memory. At 512² the VAE decoder's last levels hold the largest activations of the whole pipeline: the last
upsample makes [1, 256, 512, 512] (256 MiB in float32) and every activation after it is [1, 128, 512, 512]
(128 MiB). Without autograd (inference), the installed VAE's ResBlocks, upsamples and decoder output layer
therefore run in bands of rows (vae_bands.py): the same numbers up to rounding, without the full-size
temporaries. Freed memory is handed back to the operating system between the large steps (memory.py).

Speed. channels_last stores activations as [B, h, w, C]: 10–18 % faster convolutions on CPU (scripts/benchmark.py)
and the UNet's [B, C, h, w] → [B, h·w, C] token view becomes free. Same numbers up to rounding, another layout.

The UNet's feed-forward layers run in blocks of rows at inference (feedforward_rows.py): the same numbers, but
their 42 MB hidden layer (SD v1 at 512², bfloat16) no longer comes from fresh kernel pages at every call.
In bfloat16 its self-attention runs as two plain matrix products and a softmax per block of queries
(attention_blocks.py) instead of the fused flash-attention kernel: 1.7–2.2× faster for the 4096-token layers,
with the scores rounded to bfloat16 before the softmax.

Weight prepacking (prepack.py, `install(..., prepack=True)`; `load_pipeline` asks for it with bfloat16 networks on
the CPU): the UNet's convolutions (and bfloat16 linear layers) keep their weights in oneDNN's blocked layout
instead of reordering them at every call; same numbers, one more copy of those weights in memory.

Also here: `decode_tiled` (tiles.py), for images too large to decode whole.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention_blocks import use_attention_blocks
from .feedforward_rows import use_feedforward_rows
from .memory import release_freed_memory
from .prepack import prepack as prepack_weights
from .prepack import unpack as unpack_weights
from .tiles import decode_tiled
from .vae_bands import use_row_bands

__all__ = ["install", "release_freed_memory", "decode_tiled", "use_row_bands", "use_feedforward_rows",
           "use_attention_blocks", "prepack_weights", "unpack_weights"]


def install(*, text_encoder: nn.Module | None = None, unet: nn.Module | None = None,
            vae: nn.Module | None = None, prepack: bool = False) -> None:
    """Put the given networks on the fast path, in place: unet and vae in channels_last, the VAE's layers in row
    bands at inference (`use_row_bands`), the UNet's feed-forward layers in blocks of rows
    (`use_feedforward_rows`) and its bfloat16 self-attention in blocks of queries (`use_attention_blocks`);
    then hand the memory the conversion freed back to the OS.

    Parameters and state_dict keys do not change, so the networks still load, save, train and `.to()` as before
    (with autograd on, the banded layers run the plain code). Installing twice is harmless. text_encoder: accepted
    for symmetry, nothing to install on it today. prepack: also pack the UNet's weights for oneDNN
    (`prepack_weights`: faster steps on CPU for one more copy of its convolution/linear weights).
    """
    del text_encoder                                  # nothing of the text encoder is worth a special path (yet)
    for network in (unet, vae):
        if network is not None:
            network.to(memory_format=torch.channels_last)
    if vae is not None:
        use_row_bands(vae)
    if unet is not None:
        use_feedforward_rows(unet)
        use_attention_blocks(unet)
    if prepack and unet is not None:
        prepack_weights(unet)
    release_freed_memory()                            # the weights' old copies, left behind by the conversion
