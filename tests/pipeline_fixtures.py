"""Shared by the pipeline, pipeline-parity and CLI tests: a tiny random model saved in the official single-file
layout (so it goes through the same loader as real checkpoints) and a small, self-contained CLIP-style vocabulary.

The vocabulary keeps the tests offline: the 256 byte characters, the same with `</w>`, merges that spell out the
words used in the test prompts, and the two special tokens, written as Hugging Face `vocab.json` + `merges.txt` so
that both our tokenizer and transformers' CLIPTokenizer read the very same files.
"""
import json
from pathlib import Path

import torch

from ldm_scratch.checkpoint import save_official
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.tokenizer import BYTE_TO_CHAR, END_OF_WORD, SPECIAL_TOKENS
from tinymodels import random_networks, tiny_config

WORDS = ["a", "red", "circle", "on", "blue", "background", "watercolor", "fox", "blurry", "green", "square",
         "photo", "of", "cat", "ugly"]


def write_vocabulary(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a small byte-level BPE vocabulary; returns their paths."""
    byte_chars = [BYTE_TO_CHAR[b] for b in range(256)]
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    merges = []
    for word in WORDS:                      # merge each word left to right: ("r","e") → "re", ("re","d</w>") → …
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1], *symbols[2:]]
    tokens += list(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges_txt = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return vocab, merges_txt


def write_tiny_checkpoint(path: Path, in_channels: int = 4, seed: int = 0) -> Path:
    """A tiny random SD v1-topology model (64×64 native size) as an official-layout .safetensors file."""
    config = tiny_config(in_channels)
    text_encoder, unet, vae = random_networks(config, seed)
    return save_official(path, text_encoder, unet, vae, config)


def tiny_pipeline(checkpoint: Path, vocabulary: tuple[Path, Path]):
    return load_pipeline(checkpoint, tokenizer=vocabulary)


def sample_image(height: int, width: int, seed: int = 0):
    """A smooth RGB test image (PIL), so the VAE sees something image-like."""
    from PIL import Image
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(3, max(1, height // 16), max(1, width // 16), generator=generator)
    big = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def sample_mask(height: int, width: int):
    """White (repaint) rectangle in the middle, black (keep) around it."""
    from PIL import Image
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask
