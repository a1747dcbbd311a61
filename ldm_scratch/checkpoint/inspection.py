"""`ldm-scratch inspect FILE`: what a checkpoint file or diffusers folder holds, without loading its weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..configs import METADATA_KEY
from .keymap import EMA_PREFIX, IGNORED_KEYS, SINGLE_FILE_PREFIXES, map_component, map_single_file
from .loading import (DIFFUSERS_FOLDERS, PARTS, UNSUPPORTED, config_from_metadata, diffusers_rules,
                      diffusers_weights_file, identify)
from .tensor_file import CheckpointError, TensorFile, key_list


def describe(path: str | os.PathLike) -> str:
    """A human-readable report: kind, dtypes, parameters per network, and every tensor no rule accounts for."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    file = TensorFile(path)
    kind = identify(file.shapes)
    total = sum(_numel(s) for s in file.shapes.values())
    note = "" if kind.startswith("sd-v1") else f"  ({UNSUPPORTED[kind]}" + (
        "; not a whole model)" if kind in PARTS else "; not supported yet)")
    lines = [f"{path}", f"  kind:       {kind}{note}",
             f"  tensors:    {len(file.shapes):,} ({total:,} numbers, dtypes {_dtypes(file, file.keys())})"]
    if kind not in ("sd-v1", "sd-v1-inpainting"):
        prefixes = sorted({k.split(".")[0] for k in file.keys()})
        lines.append(f"  top-level prefixes: {', '.join(prefixes)}")
        return "\n".join(lines)
    return "\n".join(lines + _describe_sd_v1(file))


def _describe_folder(path: Path) -> str:
    """A diffusers folder, network by network. Raises CheckpointError for a folder that is not one (none of the
    three sub-folders) and for one the loader would refuse (a network missing or unreadable), report included."""
    subs = [sub for sub, _ in DIFFUSERS_FOLDERS.values()]
    if not any((path / sub).is_dir() for sub in subs):
        contents = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        held = "it is empty" if not contents else f"it holds {', '.join(contents[:8])}" + (
            ", …" if len(contents) > 8 else "")
        raise CheckpointError(f"{path} is not a diffusers model folder: it has none of the sub-folders {'/, '.join(subs)}/ "
                              f"({held}). Pass a diffusers model folder or a single .safetensors / .ckpt file.")
    lines, problems = [f"{path}: diffusers folder"], []
    for name, (sub, stem) in DIFFUSERS_FOLDERS.items():
        try:
            file = TensorFile(diffusers_weights_file(path / sub, stem))
        except CheckpointError as error:
            lines.append(f"  {name}: {error}")
            problems.append(name)
            continue
        mapping = map_component(file.keys(), "", diffusers_rules(name, file.keys()))
        unmapped = sorted(set(file.keys()) - set(mapping.values()))
        lines.append(f"  {name:13s} {_count(file, mapping.values()):>13,} parameters  "
                     f"{_dtypes(file, mapping.values())}  ({file.path.name})")
        if unmapped:
            lines.append(f"    unmapped: {key_list(unmapped)}")
    if problems:
        raise CheckpointError("\n".join(lines) + f"\nnot a loadable diffusers model: {', '.join(problems)} "
                              "missing or unreadable (a diffusers folder needs unet/, vae/ and text_encoder/).")
    return "\n".join(lines)


def _describe_sd_v1(file: TensorFile) -> list[str]:
    """The lines for an SD v1 single file: parameters per network, EMA, allowed extras, config, unmapped."""
    lines = []
    mappings = map_single_file(file.keys())
    for network, prefix in SINGLE_FILE_PREFIXES.items():
        keys = mappings[network].values()
        lines.append(f"  {network:13s} {_count(file, keys):>13,} parameters  {_dtypes(file, keys)}  ({prefix}*)")
    used = {k for m in mappings.values() for k in m.values()}
    ema = [k for k in file.keys() if k.startswith(EMA_PREFIX)]
    ignored = [k for k in file.keys() if k in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    unmapped = [k for k in file.keys() if k not in used and k not in IGNORED_KEYS and not k.startswith(EMA_PREFIX)]
    ema_line = f"yes, {len(ema):,} tensors (load with use_ema=True)" if ema else "no"
    lines.append(f"  EMA copy:   {ema_line}")
    lines.append(f"  allowed, not loaded: {len(ignored)} ({key_list(ignored, 4) or 'none'})")
    if METADATA_KEY in file.metadata:
        try:
            config_from_metadata(file.metadata, file.path)
            lines.append(f"  config (metadata): {file.metadata[METADATA_KEY]}")
        except CheckpointError as error:   # shown, not raised: saying what is wrong is inspect's job
            lines.append(f"  config (metadata): INVALID, loading refuses it: {str(error).partition(': ')[2]}")
    lines.append(f"  unmapped:   {len(unmapped)}"
                 + (f" — {key_list(unmapped)}" if unmapped else " (every tensor accounted for)"))
    return lines


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _count(file: TensorFile, keys: Iterable[str]) -> int:
    return sum(_numel(file.shapes[k]) for k in keys)


def _dtypes(file: TensorFile, keys: Iterable[str]) -> str:
    return "/".join(sorted({file.dtypes[k] for k in keys})) or "-"
