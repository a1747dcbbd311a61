"""Returning freed memory to the operating system, for a lower peak resident memory (RSS) on CPU.

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks below its mmap threshold from a heap
it keeps: freed blocks stay resident, for reuse, and the threshold itself rises to 32 MiB once a large block has
been freed. At full size the UNet's activations (10–120 MiB per step) and the VAE decoder's row bands are such
blocks, so freed memory piles up between the layers that need the most. `malloc_trim(0)` hands the free pages
back, in about a millisecond. Measured with scripts/measure_load_memory.py --txt2img (full size, 512²): trimming
before each of the decoder's banded blocks, instead of once before the decoder, lowered the peak of the whole
txt2img (at the decoder's first full-resolution ResBlock) from 5017 to 4912 MiB.
"""
from __future__ import annotations

import ctypes
import functools
import sys


def release_freed_memory() -> None:
    """Hand memory that has been freed back to the operating system (Linux with glibc; elsewhere nothing happens).

    Called by `install` (the weights' channels_last conversion leaves their old copies' space behind) and by the
    banded VAE decoder (vae_bands.py) before each of its large blocks at inference."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None without one (not Linux, or another C library such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
