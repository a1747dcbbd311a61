"""A run's resume state on disk, without pickle: one `ckpt.safetensors` file, tensors plus a JSON record.

Why not torch.save: a pickle runs whatever code it names when it is loaded, so a planted or tampered `ckpt.pt` in a
run directory would run code the moment training resumes. A safetensors file holds only named arrays of numbers
(the `safetensors` library checks the header: offsets inside the file, sizes = numel × itemsize, known dtypes), and
the rest of the state is JSON, read with `json.loads`: loading can build tensors and plain values, nothing else.

    tensors   vae/<key>, text_encoder/<key>, unet/<key>      the networks' state dicts
              optimizer/<param index>/<name>                  AdamW's per-parameter state (step, exp_avg, exp_avg_sq)
              generator/<rank>                                each rank's torch.Generator state (uint8 [5056] on CPU)
    metadata  {STATE_KEY: JSON}                               format version, stage, step, TrainConfig, ModelConfig,
                                                              the optimizer's param_groups and non-tensor state,
                                                              the number of generators, the losses so far

Floats go through JSON as Python's repr, which reads back to the same double, so a resumed run's loss history is
bit-identical. Files are written atomically (files.write_atomically): a crash mid-save leaves the previous checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..files import write_atomically

STATE_KEY = "ldm_scratch.train_state"
FORMAT_VERSION = 1
NETWORKS = ("vae", "text_encoder", "unet")


# ------------------------------------------------------------------------------------------------------------------
# the resume state ⇄ (tensors, JSON)
# ------------------------------------------------------------------------------------------------------------------

def encode_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """What Run.checkpoint_now gathers → (named CPU tensors, a JSON-able record). Inverse: decode_state."""
    tensors = {}
    for network in NETWORKS:
        for key, value in state[network].items():
            tensors[f"{network}/{key}"] = value.detach().cpu().contiguous()
    plain_state = {}
    for index, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[name] = value
    for rank, generator_state in enumerate(state["generators"]):
        tensors[f"generator/{rank}"] = generator_state.cpu().clone()  # own storage: the library refuses shared
    record = {"version": FORMAT_VERSION, "stage": state["stage"], "step": state["step"],
              "train_config": json.loads(state["train_config"]), "model_config": json.loads(state["model_config"]),
              "param_groups": state["optimizer"]["param_groups"], "optimizer_values": plain_state,
              "generators": len(state["generators"]), "vae_loss": state["vae_loss"], "loss": state["loss"]}
    return tensors, record


def decode_state(tensors: dict[str, torch.Tensor], record: dict) -> dict:
    """(named tensors, JSON record) → the state dict Run.restore reads (configs as JSON strings, as they were)."""
    state = {network: {} for network in NETWORKS}
    optimizer_state: dict[int, dict] = {}
    generators: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind in NETWORKS:
            state[kind][rest] = tensor
        elif kind == "optimizer":
            index, _, field = rest.partition("/")
            optimizer_state.setdefault(int(index), {})[field] = tensor
        elif kind == "generator":
            generators[int(rest)] = tensor
        else:
            raise CheckpointError(f"unexpected tensor {name!r}")
    for index, values in record["optimizer_values"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    if sorted(generators) != list(range(record["generators"])):
        raise CheckpointError(f"it should hold {record['generators']} generator states, it holds {len(generators)}")
    # JSON has no tuples: AdamW's betas come back as a list, which it reads the same way; tuples restored for equality
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in record["param_groups"]]
    state.update(stage=record["stage"], step=record["step"], train_config=json.dumps(record["train_config"]),
                 model_config=json.dumps(record["model_config"]), vae_loss=list(record["vae_loss"]),
                 loss=list(record["loss"]), generators=[generators[r] for r in range(record["generators"])],
                 optimizer={"state": optimizer_state, "param_groups": groups})
    return state


# ------------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------------

def save_state(path: Path, state: dict) -> None:
    """The resume state as one safetensors file (JSON record in its metadata), written atomically."""
    from safetensors.torch import save
    tensors, record = encode_state(state)
    write_atomically(path, save(tensors, metadata={STATE_KEY: json.dumps(record)}))


def refuse_pickle(path: Path) -> CheckpointError:
    """The error for a torch pickle where a resume state was expected (an older version's `ckpt.pt`)."""
    return CheckpointError(
        f"{path} is a Python pickle (the resume state of an older ldm_scratch, or a planted file): unpickling can "
        f"run arbitrary code, so it is not opened. Resume states are now ckpt.safetensors; finish that run with the "
        f"version that wrote it, or start afresh in this folder with --no-resume --force (train(..., resume=False, "
        f"force=True)), or choose another --out")


def _record(path: Path, header: dict) -> dict:
    """The JSON record of a resume-state header, checked for the fields decode_state reads."""
    try:
        record = json.loads((header.get("__metadata__") or {})[STATE_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is a safetensors file but not a training resume state (no valid "
                              f"{STATE_KEY!r} metadata); start afresh with --no-resume --force, or choose another "
                              f"--out") from None
    needed = ("version", "stage", "step", "train_config", "model_config", "param_groups", "optimizer_values",
              "generators", "vae_loss", "loss")
    missing = [name for name in needed if name not in record] if isinstance(record, dict) else list(needed)
    if missing:
        raise CheckpointError(f"{path}: the resume state lacks {', '.join(missing)}; the file is damaged — start "
                              f"afresh with --no-resume --force")
    if record["version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: resume-state format version {record['version']!r}, this ldm_scratch reads "
                              f"version {FORMAT_VERSION}; resume it with the version that wrote it")
    return record


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    """(header JSON, tensors or {}) of a resume-state file; every problem becomes a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise refuse_pickle(path)
    damaged = (f"{path} is damaged or not a safetensors file ({{}}); start afresh with --no-resume --force, or "
               f"choose another --out")
    with open(path, "rb") as file:
        data = file.read() if tensors else file.read(8)
        if data[:4] == b"PK\x03\x04":  # a zip: what torch.save writes, i.e. a pickle
            raise refuse_pickle(path)
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > 100_000_000:  # the library's own limit on header size
            raise CheckpointError(damaged.format(f"header size {size if len(data) >= 8 else 'missing'}"))
        if not tensors:
            data += file.read(size)
    try:
        loaded = load(data) if tensors else {}     # the library checks offsets, sizes and dtypes
        header = json.loads(data[8:8 + size])
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(damaged.format(error)) from None
    if not isinstance(header, dict):
        raise CheckpointError(damaged.format("the header is not a JSON object"))
    return header, loaded


def load_state(path: Path) -> dict:
    """What save_state wrote, as the state dict Run.restore reads (tensors on the CPU)."""
    header, tensors = _read(path, tensors=True)
    record = _record(path, header)
    try:
        return decode_state(tensors, record)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}; the file is damaged — start afresh with --no-resume --force") \
            from None
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: the resume state is damaged ({type(error).__name__}: {error}); start "
                              f"afresh with --no-resume --force") from None


def read_train_config_json(path: Path) -> str:
    """The TrainConfig (JSON) a resume-state file was written with, read from its header only."""
    header, _ = _read(path, tensors=False)
    return json.dumps(_record(path, header)["train_config"])
