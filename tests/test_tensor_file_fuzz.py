"""Fuzzing the safetensors reader: a small valid file's header is damaged 1,500 ways (seeded, so every run sees the
same files) and each result must be a CheckpointError that names the problem, or exactly what the file says.

Two oracles:
- the original tensors: when the damaged header still declares every tensor with its original name, dtype and
  shape, what we read must be the original tensors bit for bit (no tensor may read another's bytes). The file's
  tensors all have different byte sizes, so no valid re-layout can hand one tensor another's bytes unnoticed;
- the `safetensors` library: whenever it accepts a file, we accept it too with identical tensors and metadata, and
  whenever it refuses, we refuse. Deliberate exceptions, where we are stricter than the library: a duplicated key
  (the format forbids them; the library keeps the last one), an unknown field in an entry (the library ignores it),
  and the packed 4-bit dtype F4 (not read here).
"""
import json
import random
import struct
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_scratch.checkpoint import CheckpointError, TensorFile

SEED = 14
COUNT = 1500
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "C64",
               "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "f32", "F33", "", 5, None, ["F32"]]
# What we say, by kind of problem: every refusal must name one of these.
PROBLEMS = ("too short", "header length", "not UTF-8", "not valid JSON", "not a JSON object", "duplicate",
            "__metadata__", "its entry is not", "unknown field", "missing field", "unknown dtype", "shape",
            "data_offsets", "overlap", "hole", "truncated", "after the last tensor", "lone surrogate")
DELIBERATE = ("duplicate", "unknown field", "unknown dtype 'F4'")


def original_tensors():
    """Every tensor a different byte size (48, 10, 12, 24, 7, 0, 4, 3, 16), several dtypes, an empty and a 0-d one."""
    g = torch.Generator().manual_seed(SEED)
    return {"unet.w": torch.randn(3, 4, generator=g), "vae.h": torch.randn(5, generator=g).half(),
            "clip.b": torch.randn(2, 3, generator=g).bfloat16(), "steps": torch.arange(3) * 1000,
            "bytes": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8), "empty": torch.zeros(0, 3),
            "scale": torch.tensor(0.18215), "flags": torch.tensor([True, False, True]),
            "i16": torch.randint(-999, 999, (2, 2, 2), generator=g, dtype=torch.int16)}


# --- building a file from a header written as nested (key, value) pair lists, so keys can be duplicated -------------

class Obj(list):
    """A JSON object as a list of pairs (JSON allows duplicate keys; a dict could not show them)."""


def as_obj(value):
    if isinstance(value, dict):
        return Obj((k, as_obj(v)) for k, v in value.items())
    return value


def dump(value) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def file_bytes(header: Obj, data: bytes) -> bytes:
    raw = dump(header).encode()  # json.dumps escapes every non-ASCII character, a lone surrogate included
    return struct.pack("<Q", len(raw)) + raw + data


# --- the mutations -------------------------------------------------------------------------------------------------

def entries(header):
    return [(i, v) for i, (k, v) in enumerate(header) if k != "__metadata__" and isinstance(v, Obj)]


def field(entry, name):
    return next(i for i, (k, _) in enumerate(entry) if k == name)


def mutate_structure(rng: random.Random, header: Obj, data_size: int) -> Obj:
    """One change to the parsed header: offsets, shapes, dtypes, fields, entries, metadata."""
    header = copy_obj(header)
    index, entry = rng.choice(entries(header))
    name = header[index][0]
    kind = rng.randrange(17)
    if kind == 0:  # nudge one offset
        offsets = entry[field(entry, "data_offsets")][1]
        offsets[rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif kind == 1:  # an offset set to something odd
        offsets = entry[field(entry, "data_offsets")][1]
        offsets[rng.randrange(2)] = rng.choice([0, data_size, data_size + 1, 2**64, 2**63, -1, 1.5, "8", None, True])
    elif kind == 2:  # move a tensor
        offsets = entry[field(entry, "data_offsets")][1]
        shift = rng.choice([-4, -1, 1, 2, 4, 7, 16])
        offsets[0] += shift
        offsets[1] += shift
    elif kind == 3:  # swap two tensors' offsets
        _, other = rng.choice(entries(header))
        a, b = field(entry, "data_offsets"), field(other, "data_offsets")
        entry[a], other[b] = ("data_offsets", other[b][1]), ("data_offsets", entry[a][1])
    elif kind == 4:  # change one size of the shape
        shape = entry[field(entry, "shape")][1]
        if shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2, -3])
        else:
            shape.append(rng.choice([0, 1, 2]))
    elif kind == 5:  # reshape: same element count or not
        shape = entry[field(entry, "shape")][1]
        new = rng.choice([shape[::-1], shape + [1], [1] + shape, shape[:-1], [0] + shape, [-1], [2.0], [True], "3",
                          [2**63, 0], [2**32, 2**32, 0], [0, 2**32, 2**32], []])
        entry[field(entry, "shape")] = ("shape", list(new) if isinstance(new, list) else new)
    elif kind == 6:  # another dtype name
        entry[field(entry, "dtype")] = ("dtype", rng.choice(DTYPE_NAMES))
    elif kind == 7:  # delete an entry
        del header[index]
    elif kind == 8:  # delete a field
        del entry[rng.randrange(len(entry))]
    elif kind == 9:  # duplicate an entry (same name twice), possibly with another place
        copy = copy_obj(entry)
        if rng.random() < 0.5:
            copy[field(copy, "data_offsets")][1][:] = [data_size, data_size]
        header.insert(rng.randrange(len(header) + 1), (name, copy))
    elif kind == 10:  # duplicate a field
        entry.insert(rng.randrange(len(entry) + 1), copy_obj(rng.choice(entry)))
    elif kind == 11:  # an extra field
        entry.append((rng.choice(["offset", "x", "dtype ", "Shape"]), rng.choice([1, "F32", [0, 4], None])))
    elif kind == 12:  # rename (valid: a different file) or add an empty tensor somewhere
        if rng.random() < 0.5:
            header[index] = (rng.choice(["unet.w", "renamed", "", "__metadata_", "\ud800"]), entry)
        else:
            at = rng.choice([0, 10, 48, data_size, data_size + 4])
            header.insert(rng.randrange(len(header) + 1),
                          ("new", as_obj({"dtype": "F32", "shape": [0], "data_offsets": [at, at]})))
    elif kind == 13:  # the entry becomes something else
        header[index] = (name, rng.choice([[], "F32", None, 3, [entry[0]], Obj()]))
    elif kind == 14:  # data_offsets of another form
        new = rng.choice([[0], [0, 4, 8], [], {"0": 4}, "0,4", [0.0, 4.0], [1, 0]])
        entry[field(entry, "data_offsets")] = ("data_offsets", as_obj(new))
    elif kind == 15:  # the metadata
        meta = rng.choice([None, 3, [], as_obj({"note": 1}), as_obj({"note": None}), Obj([("a", "1"), ("a", "2")]),
                           as_obj({"note": {"x": "y"}}), as_obj({"other": "text", "": ""})])
        at = next((i for i, (k, _) in enumerate(header) if k == "__metadata__"), None)
        if at is None:
            header.insert(0, ("__metadata__", meta))
        else:
            header[at] = ("__metadata__", meta)
    else:  # two changes at once
        header = mutate_structure(rng, mutate_structure(rng, header, data_size), data_size)
    return header


def copy_obj(value):
    if isinstance(value, Obj):
        return Obj((k, copy_obj(v)) for k, v in value)
    if isinstance(value, tuple):
        return tuple(copy_obj(v) for v in value)
    if isinstance(value, list):
        return [copy_obj(v) for v in value]
    return value


def mutate_bytes(rng: random.Random, whole: bytes, n: int) -> bytes:
    """One change to the file's bytes: the length, the JSON text, or the file's end."""
    kind = rng.randrange(8)
    head, text, data = whole[:8], bytearray(whole[8:8 + n]), whole[8 + n:]
    if kind == 0:  # another header length
        m = rng.choice([n + rng.randint(-9, 9), 0, 1, len(whole), len(whole) - 7, 2**63, 2**64 - 1, 100_000_001,
                        n + len(data), rng.randrange(2**64)])
        return struct.pack("<Q", m) + whole[8:]
    if kind == 1:  # one byte of the JSON xor'ed
        i = rng.randrange(n)
        text[i] ^= rng.choice([1, 2, 4, 8, 16, 32, 64, 128, rng.randrange(1, 256)])
    elif kind == 2:  # one byte of the JSON replaced by a JSON-ish character
        text[rng.randrange(n)] = ord(rng.choice('{}[]:,"0123456789- \t\\ue'))
    elif kind == 3:  # a byte deleted or inserted, the length left as it was
        i = rng.randrange(n)
        text = text[:i] + text[i + 1:] if rng.random() < 0.5 else text[:i] + bytes([rng.randrange(256)]) + text[i:]
        return head + bytes(text) + data
    elif kind == 4:  # the file cut short
        return whole[:rng.randrange(len(whole))]
    elif kind == 5:  # bytes appended
        return whole + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 6:  # padding around the JSON, the length updated (spaces are valid; the others are not)
        pad = rng.choice([b" ", b"  \n", b"\t", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\x0c"])
        text = pad + text if rng.random() < 0.3 else text + pad
        return struct.pack("<Q", len(text)) + bytes(text) + data
    else:  # the length's high bytes
        head = bytearray(head)
        head[rng.randrange(8)] ^= 1 << rng.randrange(8)
        return bytes(head) + whole[8:]
    return head + bytes(text) + data


def mutants(valid: bytes):
    rng = random.Random(SEED)
    n = int.from_bytes(valid[:8], "little")
    header = as_obj(json.loads(valid[8:8 + n]))
    data = valid[8 + n:]
    for _ in range(COUNT):
        if rng.random() < 0.55:
            yield file_bytes(mutate_structure(rng, header, len(data)), data)
        else:
            yield mutate_bytes(rng, valid, n)


# --- reading with both readers --------------------------------------------------------------------------------------

def read_ours(path):
    try:
        file = TensorFile(path)
        return {key: file.get(key) for key in file.keys()}, file.metadata
    except CheckpointError as error:
        return str(error), None


def read_library(path):
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as error:  # any refusal counts: SafetensorError, or torch refusing a dtype/shape
        return f"{type(error).__name__}: {error}", None


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].reshape(-1).view(torch.uint8).tolist() == b[k].reshape(-1).view(torch.uint8).tolist() for k in a)


def declared(tensors: dict) -> dict:
    return {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def test_every_damaged_header_is_refused_by_name_or_read_exactly(tmp_path):
    original = original_tensors()
    save_file(original, tmp_path / "valid.safetensors", metadata={"note": "fuzz"})
    valid = (tmp_path / "valid.safetensors").read_bytes()
    path = tmp_path / "mutant.safetensors"
    files = list(mutants(valid))
    assert len(set(files)) >= 1000, "the mutations must give at least 1,000 different files"
    tally = Counter()
    for i, content in enumerate(files):
        path.write_bytes(content)
        ours, ours_meta = read_ours(path)  # any exception other than CheckpointError fails the test here
        theirs, their_meta = read_library(path)
        where = f"mutant {i} ({content[:200]!r}...)"
        if isinstance(ours, str):
            assert "is not a readable safetensors file" in ours and "corrupt or was tampered with" in ours, where
            assert "re-download" in ours, where
            assert any(problem in ours for problem in PROBLEMS), f"{where}: the message names no problem: {ours}"
            if isinstance(theirs, str):
                tally["refused by both"] += 1
            else:
                assert any(word in ours for word in DELIBERATE), f"{where}: the library reads it, we refuse: {ours}"
                tally["refused by us only (deliberately)"] += 1
            continue
        assert not isinstance(theirs, str), f"{where}: we read a file the library refuses ({theirs})"
        assert same_tensors(ours, theirs) and ours_meta == their_meta, f"{where}: we read other numbers than the library"
        if declared(ours) == declared(original):
            assert same_tensors(ours, original), f"{where}: same names, dtypes and shapes, but other numbers"
            tally["read: the original tensors"] += 1
        else:
            tally["read: another valid file (renamed, reshaped, retyped)"] += 1
    print(dict(tally))
    # Each kind of outcome happens, so none of the branches above is dead.
    assert tally["refused by both"] > 500 and tally["read: the original tensors"] > 20
    assert tally["refused by us only (deliberately)"] > 10 and tally["read: another valid file (renamed, reshaped, retyped)"] > 10


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.complex64, torch.int8, torch.float64])
def test_every_dtype_torch_holds_reads_as_the_library_reads_it(tmp_path, dtype):
    tensor = torch.arange(6).reshape(2, 3).to(dtype)
    save_file({"t": tensor, "e": torch.zeros(0, dtype=dtype)}, tmp_path / "d.safetensors")
    ours, _ = read_ours(tmp_path / "d.safetensors")
    theirs, _ = read_library(tmp_path / "d.safetensors")
    assert same_tensors(ours, theirs) and ours["t"].dtype == dtype
