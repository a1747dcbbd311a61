"""Reading tensor files: the official single file (.safetensors, or a .ckpt torch pickle) and the weight files of a
diffusers folder, as a lazy {key → tensor} view whose shapes are known before any data is read.

Everything that can be wrong with a file itself (missing, truncated, not the format its name says, an unsafe
pickle) raises `CheckpointError` here, with what to do about it. What the tensors *mean* is keymap.py's business.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the problem and what to do about it."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}

class TensorFile:
    """Lazy view of the tensors of one file: shapes are known without reading data; `get` reads one tensor.

    `.safetensors` is parsed here: the header, then one tensor at a time with plain reads (no pickle, no memory map).
    `.ckpt`/`.pt`/`.bin` are torch pickles and are only opened with `torch.load(weights_only=True)`, which refuses
    arbitrary Python objects.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file. Check the path, or see weights/README.md for where "
                                  "to put the official weights.")
        self.metadata: dict[str, str] = {}
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        elif self.path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise CheckpointError(f"{self.path}: unknown file type '{self.path.suffix}'. Expected a .safetensors file "
                                  "(preferred), a .ckpt, or a diffusers folder with unet/, vae/, text_encoder/.")

    def _open_safetensors(self) -> None:
        """Read the safetensors header: 8 bytes little-endian length N, N bytes of JSON {name: {dtype, shape,
        data_offsets}}, then the raw tensor bytes. Tensors are later read one at a time with plain file reads
        (no memory map), so loading never holds the file's pages and our copy of the weights at once."""
        size = self.path.stat().st_size
        problem = None
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100_000_000):
                problem = "its header length is not plausible"
            else:
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    problem = "its header is not valid JSON"
        if problem is None:
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + n
            try:
                self._entries = {k: (_SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                                 for k, v in header.items()}
            except (KeyError, TypeError, ValueError):
                problem = "its header does not describe tensors"
        if problem is None:
            end = max((e[3] for e in self._entries.values()), default=0)
            if self._data_start + end > size:
                problem = (f"it is truncated: the header promises {self._data_start + end:,} bytes but the file has "
                           f"{size:,} (an interrupted download? compare its size and sha256 with the source)")
        if problem is not None:
            raise CheckpointError(f"{self.path} ({size:,} bytes) is not a readable safetensors file: {problem}. "
                                  "Re-download it, or check that it is not another format renamed to .safetensors.")
        self.shapes = {k: e[1] for k, e in self._entries.items()}
        self.dtypes = {k: str(e[0]).removeprefix("torch.") for k, e in self._entries.items()}
        self._get = self._read_safetensors_tensor

    def _read_safetensors_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # little-endian, as on every CPU we run
        return tensor

    def _open_pickle(self) -> None:
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise CheckpointError(
                f"{self.path}: torch.load(weights_only=True) refused this file ({type(error).__name__}: "
                f"{str(error)[:200]}). It may be truncated, or it pickles arbitrary Python objects, which we never "
                "unpickle. Convert it to .safetensors in an environment you trust, or download the .safetensors "
                "release.") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]  # CompVis .ckpt: {'state_dict': {...}, 'global_step': ...}
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{self.path}: expected a dictionary of tensors (optionally under 'state_dict').")
        self._tensors = data
        self.shapes = {k: tuple(v.shape) for k, v in data.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in data.items()}
        self._get = self._tensors.__getitem__

    def keys(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def key_list(keys: Iterable[str], limit: int = 12) -> str:
    """'a, b, c, … (n more)': the offending keys of an error message, sorted, at most `limit` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
