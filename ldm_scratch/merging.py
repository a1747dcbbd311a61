"""Merging checkpoints, tensor by tensor, by the rules of AUTOMATIC1111's checkpoint merger.

    ldm-scratch merge A B --alpha 0.3 --out merged.safetensors                     weighted sum
    ldm-scratch merge A B --alpha 1.0 --method add-difference --base C --out …      add difference

For every tensor name k of A (the primary model) that holds model weights ('model' in k: the UNet, VAE, text
encoder and EMA copies) and that B also has:

    weighted sum       θ_k = (1 − α) · A_k + α · B_k
    add difference     θ_k = A_k + α · (B_k − C_k)        (C_k taken as 0 when C lacks k: B_k is added whole)

Everything else comes from A unchanged: keys without 'model' (DDPM schedule buffers), CLIP's position_ids (always
arange(77); the web UI skips them, since averaging integers breaks them), and model keys B does not have. Keys only
B has are not written. Inpainting (9 input channels) or InstructPix2Pix (8) as A with a regular model (4) as B: the
first input conv merges its 4 latent channels only and keeps the extra ones from A, the web UI's recipe for making
an inpainting version of a fine-tune (A = sd-v1-5-inpainting, B = the fine-tune, C = v1-5, α = 1). The other way
round (B has the extra channels) is refused: A must be the inpainting model.

Memory. Inputs are read one tensor at a time (safetensors: a plain read of that tensor's bytes, never the whole
file; .ckpt through torch.load(weights_only=True, mmap=True)), and the output is written as it is computed: the
safetensors header (names, dtypes, shapes, offsets) is known before any weight is read, so it goes first and each
merged tensor's bytes follow. At most one tensor of each input and its result are alive at once, so merging two
4 GB models needs a few hundred MB (the largest tensor), not three models' worth. The arithmetic is float32 (the
web UI computes in the files' dtype); the result keeps A's dtype, or float16 with `half=True`.

Models of different kinds (SD v1 and SD 2.x, SDXL, a VAE alone…) are refused before anything is written, as are
tensors of the same name with different shapes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.loading import identify
from .checkpoint.tensor_file import _SAFETENSORS_DTYPES, CheckpointError, TensorFile, key_list
from .files import replacing

METHODS = ("weighted", "add-difference")
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                 "cond_stage_model.transformer.embeddings.position_ids")
DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * a + alpha * b                     # θ = (1 − α)·A + α·B


def add_difference(a: torch.Tensor, b_minus_c: torch.Tensor, alpha: float) -> torch.Tensor:
    return a + alpha * b_minus_c                           # θ = A + α·(B − C)


@dataclass
class MergeReport:
    """What a merge did: tensor counts by treatment, and the model keys of A that B lacks (copied from A)."""
    merged: int = 0
    copied: int = 0
    only_in_a: list[str] = field(default_factory=list)
    extra_channels_kept: bool = False


class MergeError(CheckpointError):
    """Inputs that cannot be merged (different model types, shapes) or a bad merge request."""


def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike, alpha: float,
                      method: str = "weighted", base: str | os.PathLike | None = None, half: bool = False,
                      force: bool = False) -> MergeReport:
    """Merge A and B (and the base C for add-difference) into the safetensors file `out` (see the module docstring).
    Never overwrites `out` unless force=True; the file appears all at once (files.replacing) or not at all."""
    out = Path(out)
    _check_request(out, alpha, method, base, force)
    files = {"A": TensorFile(Path(a)), "B": TensorFile(Path(b))}
    if base is not None:
        files["C"] = TensorFile(Path(base))
    _check_same_kind(files)
    plan = _plan(files, method)
    dtype_of = lambda key: torch.float16 if half and _is_float(files["A"], key) else _dtype(files["A"], key)
    header = _header({key: (dtype_of(key), files["A"].shapes[key]) for key in plan},
                     {**files["A"].metadata, "ldm_scratch.merge": _recipe(files, alpha, method)})
    report = MergeReport(only_in_a=[k for k, how in plan.items() if how == "only in A"])
    with replacing(out) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for key, how in plan.items():
            tensor = _merged_tensor(files, key, how, alpha, method, report)
            _write_tensor(f, tensor.to(dtype_of(key)))
            del tensor                                     # one result alive at a time
    return report


def _check_request(out: Path, alpha: float, method: str, base, force: bool) -> None:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "add-difference" and base is None:
        raise MergeError("add-difference needs the base model C (--base C): the result is A + α·(B − C)")
    if method == "weighted" and base is not None:
        raise MergeError("a base model (--base) is only used by --method add-difference")
    if not math.isfinite(alpha):
        raise MergeError(f"alpha {alpha} is not a number to multiply by (weighted: 0…1; add-difference: usually 1)")
    if out.suffix != ".safetensors":
        raise MergeError(f"{out}: the merged model is written as .safetensors; give the output that suffix")
    if out.exists() and not force:
        raise MergeError(f"{out} already exists: choose another --out, or pass --force to overwrite it")
    if not out.parent.is_dir():
        raise MergeError(f"{out.parent} is not a folder: create it first")


def _check_same_kind(files: dict[str, TensorFile]) -> None:
    """All inputs the same kind of model, inpainting aside (A may be the inpainting version of B's kind)."""
    kinds = {name: identify(file.shapes) for name, file in files.items()}
    plain = {name: kind.removesuffix("-inpainting") for name, kind in kinds.items()}
    if "unknown" in kinds.values() or len(set(plain.values())) > 1:
        raise MergeError("cannot merge different kinds of model: " + ", ".join(
            f"{name} = {file.path.name} is {kinds[name]}" for name, file in files.items())
            + ". Merging adds tensors of the same name and shape, so all inputs must be the same architecture "
            "(e.g. all SD v1 checkpoints).")
    if kinds["A"] == plain["A"] and kinds["B"] != plain["B"]:
        raise MergeError(f"B ({files['B'].path.name}) is an inpainting model and A is not: when merging an "
                         "inpainting model with a normal one, A must be the inpainting model")


def _plan(files: dict[str, TensorFile], method: str) -> dict[str, str]:
    """{key of A → how its tensor is made}: 'merge', 'copy' or 'only in A'. Raises on shapes that differ."""
    a, b = files["A"], files["B"]
    plan, misshapen = {}, []
    for key in a.keys():
        if "model" not in key or key in SKIP_ON_MERGE or not _is_float(a, key):
            plan[key] = "copy"
        elif key not in b:
            plan[key] = "only in A"
        else:
            if a.shapes[key] != b.shapes[key] and not _extra_input_channels(a.shapes[key], b.shapes[key]):
                misshapen.append(f"{key} A {list(a.shapes[key])} B {list(b.shapes[key])}")
            c = files.get("C")
            if c is not None and key in c and c.shapes[key] != b.shapes[key]:
                misshapen.append(f"{key} B {list(b.shapes[key])} C {list(c.shapes[key])}")
            plan[key] = "merge"
    if misshapen:
        raise MergeError(f"{len(misshapen)} tensor(s) have different shapes in the inputs: {key_list(misshapen, 6)}. "
                         "These are different architectures (or sizes) of model and cannot be merged.")
    return plan


def _extra_input_channels(a: tuple, b: tuple) -> bool:
    """A's input conv [C, 9 or 8, k, k] against B's [C, 4, k, k]: inpainting / InstructPix2Pix A, regular B."""
    return len(a) == 4 and len(b) == 4 and a[0] == b[0] and a[2:] == b[2:] and a[1] in (8, 9) and b[1] == 4


def _merged_tensor(files, key: str, how: str, alpha: float, method: str, report: MergeReport) -> torch.Tensor:
    a = files["A"].get(key)
    if how != "merge":
        report.copied += how == "copy"
        return a
    b = files["B"].get(key).float()
    if method == "add-difference":
        c = files["C"].get(key).float() if key in files["C"] else torch.zeros_like(b)
        theirs, combine = b - c, add_difference           # B − C (C_k = 0 where C lacks k, as the web UI does)
        del c
    else:
        theirs, combine = b, weighted_sum
    del b
    if a.shape != theirs.shape:                            # inpainting A: merge the 4 latent channels only
        merged = a.float().clone()
        merged[:, :4] = combine(merged[:, :4], theirs, alpha)
        report.extra_channels_kept = True
    else:
        merged = combine(a.float(), theirs, alpha)
    report.merged += 1
    return merged


def _recipe(files, alpha: float, method: str) -> str:
    names = {name: file.path.name for name, file in files.items()}
    return json.dumps({"method": method, "alpha": alpha, **names}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Writing safetensors as a stream: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
# multiple of 8, as the reference writer does), then each tensor's bytes in header order.
# ---------------------------------------------------------------------------------------------------------------

def _header(entries: dict[str, tuple[torch.dtype, tuple]], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for key, (dtype, shape) in entries.items():
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes, row-major, little-endian (as on every CPU we run)."""
    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _is_float(file: TensorFile, key: str) -> bool:
    return _dtype(file, key).is_floating_point


def _dtype(file: TensorFile, key: str) -> torch.dtype:
    return getattr(torch, file.dtypes[key])


# ---------------------------------------------------------------------------------------------------------------
# `ldm-scratch merge`
# ---------------------------------------------------------------------------------------------------------------

def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="primary model A (.safetensors or .ckpt); its keys and dtypes make the result")
    p.add_argument("b", help="secondary model B")
    p.add_argument("--alpha", type=float, required=True,
                   help="weighted: (1 − α)·A + α·B; add-difference: A + α·(B − C)")
    p.add_argument("--method", choices=METHODS, default="weighted")
    p.add_argument("--base", default=None, help="base model C for --method add-difference")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--half", action="store_true", help="store the result's float tensors as float16")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(run=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    report = merge_checkpoints(args.a, args.b, args.out, args.alpha, method=args.method, base=args.base,
                               half=args.half, force=args.force)
    print(f"wrote {args.out}: {report.merged} tensors merged, {report.copied} copied from A"
          + (f", {len(report.only_in_a)} model tensors only in A kept from A: {key_list(report.only_in_a, 5)}"
             if report.only_in_a else "")
          + (" (A's extra inpainting input channels kept)" if report.extra_channels_kept else ""))
    return 0
