"""Tiled VAE decode: peak memory that follows the tile, not the image, for images too large to decode whole.

    x̂ = decode_tiled(vae, z, tile=32, overlap=8)      z [B, 4, h, w] → x̂ [B, 3, 8h, 8w]

The price is a small difference from `vae.decode(z)`: the decoder's GroupNorms and its attention see one tile at
a time (tests/test_fast.py measures it). Nothing calls it by default; row bands (vae_bands.py) already keep a
512² decode small with the exact numbers.
"""
from __future__ import annotations

import torch
from torch import nn


def decode_tiled(vae: nn.Module, z: torch.Tensor, tile: int, overlap: int = 8) -> torch.Tensor:
    """Decode z [B, 4, h, w] in overlapping tiles of tile × tile latent pixels and blend them:

        x̂ = Σ_k m_k ⊙ D(z_k) / Σ_k m_k

    where z_k is the k-th tile (placed at its offset) and m_k its blending mask: 1 inside, falling linearly
    towards 0 across the `overlap` band (latent pixels; × 8 in the image) on every side that has a neighbouring
    tile, so that seams fade rather than cut. A tile covering z gives exactly vae.decode(z).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"decode_tiled: need 0 ≤ overlap < tile, got overlap={overlap}, tile={tile} "
                         "(latent pixels; e.g. tile=32, overlap=8 for 256-pixel tiles)")
    height, width = z.shape[-2:]
    if tile >= height and tile >= width:
        return vae.decode(z)
    f = vae.config.downsample_factor                                      # 8 image pixels per latent pixel
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    out = weight = None
    for top in rows:
        for left in cols:
            piece = vae.decode(z[:, :, top:top + tile, left:left + tile])
            mask = (_ramp(piece.shape[-2], f * overlap, top > 0, top + tile < height, piece)[:, None]
                    * _ramp(piece.shape[-1], f * overlap, left > 0, left + tile < width, piece)[None, :])
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], f * height, f * width)
                weight = piece.new_zeros(f * height, f * width)
            window = (slice(f * top, f * top + piece.shape[-2]), slice(f * left, f * left + piece.shape[-1]))
            out[..., window[0], window[1]] += piece * mask                # Σ m_k ⊙ D(z_k)
            weight[window] += mask                                        # Σ m_k  (> 0 everywhere)
            del piece                                                     # free the tile before the next
    return out / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` covering 0…size with at least `overlap` shared between neighbours; the
    last tile is moved back to end at `size` (so every tile has full length)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, band: int, fade_start: bool, fade_end: bool, like: torch.Tensor) -> torch.Tensor:
    """A 1-D blending weight [length]: 1, with a linear ramp over the first/last `band` pixels when that side
    meets a neighbouring tile. The ramp runs from 1/(band+1) up to band/(band+1): never 0, so every pixel keeps
    some weight even where the last tile overlaps its neighbour by more than `band`."""
    ramp = torch.ones(length, dtype=like.dtype, device=like.device)
    band = min(band, length // 2)
    if band > 0:
        up = torch.arange(1, band + 1, dtype=like.dtype, device=like.device) / (band + 1)
        if fade_start:
            ramp[:band] = up
        if fade_end:
            ramp[length - band:] = up.flip(0)
    return ramp
