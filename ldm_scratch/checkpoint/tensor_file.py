"""Reading tensor files: the official single file (.safetensors, or a .ckpt torch pickle) and the weight files of a
diffusers folder, as a lazy {key → tensor} view whose shapes are known before any data is read.

Everything that can be wrong with a file itself (missing, truncated, not the format its name says, a damaged or
tampered safetensors header, an unsafe pickle) raises `CheckpointError` here, with what to do about it. What the tensors *mean* is keymap.py's business.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the problem and what to do about it."""


# The safetensors dtype names torch can hold (those added in later versions only when this torch has them), → the
# torch dtype. F4 (packed 4-bit) is left out: its shape counts nibbles, which torch would hold two to a byte.
_SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64"), ("I64", "int64"), ("I32", "int32"), ("I16", "int16"),
    ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"))
    if hasattr(torch, attr)}


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
        """Read and check the header: 8 bytes little-endian length N, N bytes of JSON {name: {dtype, shape,
        data_offsets}}, then the raw tensor bytes. Tensors are later read one at a time with plain file reads
        (no memory map), so loading never holds the file's pages and our copy of the weights at once.

        Every byte of the data section must belong to exactly one tensor (see `_check_layout`), so a header that
        was edited by hand or damaged cannot make one tensor read another's bytes, or bytes that are not there."""
        size = self.path.stat().st_size
        try:
            n, header = _read_header(self.path, size)
            self.metadata, self._entries = _parse_header(header, data_size=size - 8 - n)
        except _BadHeader as problem:
            raise CheckpointError(
                f"{self.path} ({size:,} bytes) is not a readable safetensors file: {problem}. The file is corrupt "
                "or was tampered with: re-download it (compare its size and sha256 with the source), and check "
                "that it is not another format renamed to .safetensors.") from None
        self._data_start = 8 + n
        self.shapes = {k: e[1] for k, e in self._entries.items()}
        self.dtypes = {k: str(e[0]).removeprefix("torch.") for k, e in self._entries.items()}
        self._get = self._read_safetensors_tensor

    def _read_safetensors_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # little-endian, as on every CPU we run
        if got != end - begin:  # never hand out a tensor whose tail is whatever memory held before
            raise CheckpointError(f"{self.path}: tensor {key!r} needs {end - begin:,} bytes but only {got:,} could be "
                                  "read: the file was shortened after it was opened. Re-download it.")
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


# ---------------------------------------------------------------------------------------------------------------
# Checking a safetensors header, rule by rule, as the format's specification (huggingface/safetensors README) and
# its reference reader define it. Each rule that fails raises _BadHeader with words naming the rule and the tensor.
# ---------------------------------------------------------------------------------------------------------------

_MAX_HEADER_BYTES = 100_000_000  # the reference reader's cap; real headers are a few hundred kB at most
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_MAX_SIZE = 2**64 - 1  # sizes and offsets are u64 in the format
_MAX_DIM = 2**63 - 1  # torch's sizes are int64


class _BadHeader(Exception):
    """One broken rule of the format; the text names it (TensorFile wraps it in a CheckpointError)."""


class _Pairs(list):
    """A JSON object kept as its list of (key, value) pairs in file order, so a duplicated key stays visible
    (a dict would silently keep the last one, which is exactly how a tampered header hides a second tensor)."""


def _json_int(text: str) -> int | float:
    """JSON integers, read as the spec's unsigned sizes: '-0' stays negative (Python would read 0; it comes back as
    -0.0, which no check takes for a size), and 22+ characters cannot be a u64 (Python refuses to parse 4,300+
    digits with a ValueError of its own, so such a number is never parsed)."""
    if text == "-0":
        return -0.0
    return int(text) if len(text) <= 21 else (-1 if text.startswith("-") else _MAX_SIZE + 1)


def _no_constants(text: str):
    raise _BadHeader(f"its header is not valid JSON ({text} is not a JSON value)")


def _read_header(path: Path, size: int) -> tuple[int, _Pairs]:
    """The header length N (u64, little-endian) and the header parsed into nested `_Pairs`."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _BadHeader("it is too short to hold even the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise _BadHeader(f"its header length {n:,} is not plausible (the file holds {size - 8:,} bytes after "
                             f"the length, and headers over {_MAX_HEADER_BYTES:,} bytes are refused)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")  # strict: no lone surrogates, no overlong forms, no BOM stripping
        header = json.loads(text, object_pairs_hook=_Pairs, parse_int=_json_int, parse_constant=_no_constants)
    except UnicodeDecodeError as error:
        raise _BadHeader(f"its header is not UTF-8 text (byte {error.start} of the header)") from None
    except RecursionError:
        raise _BadHeader("its header is not valid JSON (nested far too deep)") from None
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise _BadHeader(f"its header is not valid JSON ({error})") from None
    if not isinstance(header, _Pairs):
        raise _BadHeader(f"its header is a JSON {type(header).__name__}, not a JSON object of tensors")
    return n, header


def _parse_header(header: _Pairs, data_size: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """{__metadata__ strings} and {name: (torch dtype, shape, begin, end)}, after checking every rule."""
    _no_duplicates(header, "tensor name")
    metadata, entries = {}, {}
    for name, value in header:
        _unicode(name, "a tensor name")
        if name == "__metadata__":
            metadata = _metadata(value)
        else:
            entries[name] = _entry(name, value)
    _check_layout(entries, data_size)
    return metadata, entries


def _no_duplicates(pairs: _Pairs, what: str, where: str = "") -> None:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _BadHeader(f"{where}duplicate {what} {key!r} (the format forbids duplicate keys; a reader that "
                             "kept only one of them would load whichever it met last)")
        seen.add(key)


def _unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadHeader(f"{what} {text!r} holds a lone surrogate escape, which is not Unicode text") from None


def _metadata(value) -> dict[str, str]:
    """`__metadata__`: an optional free-form map of strings to strings (null means absent)."""
    if value is None:
        return {}
    if not isinstance(value, _Pairs):
        raise _BadHeader("its __metadata__ is not a JSON object of strings")
    _no_duplicates(value, "key", "__metadata__ has a ")
    for key, text in value:
        if not isinstance(text, str):
            raise _BadHeader(f"its __metadata__ value for {key!r} is not a string")
        _unicode(key, "a __metadata__ key")
        _unicode(text, f"the __metadata__ value of {key!r},")
    return dict(value)


def _entry(name: str, value) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One tensor's {dtype, shape, data_offsets}: exactly these three fields, a known dtype, sizes that are
    non-negative integers, and end − begin = numel × itemsize."""
    where = f"tensor {name!r}: "
    if not isinstance(value, _Pairs):
        raise _BadHeader(f"{where}its entry is not a JSON object with dtype, shape and data_offsets")
    _no_duplicates(value, "field", where)
    fields = dict(value)
    for field in fields:
        if field not in _ENTRY_FIELDS:
            raise _BadHeader(f"{where}unknown field {field!r} (an entry holds only dtype, shape, data_offsets)")
    for field in _ENTRY_FIELDS:
        if field not in fields:
            raise _BadHeader(f"{where}missing field {field!r}")
    dtype = _SAFETENSORS_DTYPES.get(fields["dtype"]) if isinstance(fields["dtype"], str) else None
    if dtype is None:
        raise _BadHeader(f"{where}unknown dtype {fields['dtype']!r} (known: {', '.join(_SAFETENSORS_DTYPES)})")
    shape, offsets = fields["shape"], fields["data_offsets"]
    if not isinstance(shape, list) or not all(_is_size(d, _MAX_DIM) for d in shape):
        raise _BadHeader(f"{where}shape {_short(shape)} is not a list of non-negative integers (each below 2**63)")
    numel = 1
    for d in shape:  # the running product must stay a u64, as in the reference reader, even if a later size is 0
        numel *= d
        if numel > _MAX_SIZE:
            raise _BadHeader(f"{where}shape {shape} has more elements than a 64-bit size can count")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o, _MAX_SIZE) for o in offsets)):
        raise _BadHeader(f"{where}data_offsets {_short(offsets)} is not a pair [begin, end] of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _BadHeader(f"{where}data_offsets {offsets} end before they begin")
    if end - begin != numel * dtype.itemsize:
        raise _BadHeader(f"{where}data_offsets {offsets} hold {end - begin:,} bytes but {fields['dtype']} × "
                         f"{shape} needs {numel * dtype.itemsize:,}")
    return dtype, tuple(shape), begin, end


def _is_size(value, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit  # type(...) is int: JSON true/false are not sizes


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, _Pairs) else json.dumps(dict(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layout(entries: dict[str, tuple], data_size: int) -> None:
    """The tensors must tile the data section: sorted by offset, each begins where the previous one ends (no hole,
    no overlap), the first at 0, and the last ends exactly at the end of the file (nothing missing, nothing after).
    Empty tensors take no bytes and may sit at any boundary."""
    expected, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < expected:
            raise _BadHeader(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {previous!r}, which "
                             f"ends at {expected:,}")
        if begin > expected:
            raise _BadHeader(f"tensor {name!r}: data_offsets [{begin}, {end}] leave a hole of {begin - expected:,} "
                             f"unindexed bytes before it (from {expected:,})")
        expected, previous = end, name
    if expected > data_size:
        raise _BadHeader(f"it is truncated: the header promises {expected:,} bytes of tensor data but the file has "
                         f"{data_size:,} (an interrupted download?)")
    if expected < data_size:
        raise _BadHeader(f"it has {data_size - expected:,} bytes after the last tensor (at {expected:,}) that no "
                         "tensor of the header describes")
