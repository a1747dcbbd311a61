"""Writing our networks back in the official single-file layout (the bundled tiny model is stored this way), with
the `ModelConfig` in the safetensors metadata so that the file loads back into exactly the same model.

The names are the key map run backwards (keymap.py), the UNet's numbered for the topology of `config`: a file any
tool that reads CompVis checkpoints can open, for SD v1's sizes and for smaller models alike.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..configs import METADATA_KEY, ModelConfig
from ..files import replacing
from .keymap import SINGLE_FILE_PREFIXES, KeyMap, UNetLayout, single_file_keymaps
from .tensor_file import CheckpointError, key_list, read_json


def reference_keys() -> dict[str, dict[str, list[int]]]:
    """The official SD v1 key names and shapes, by section (unet, vae, text_encoder, ddpm_buffers, …)."""
    return read_json(Path(__file__).parent / "keys" / "sd-v1-checkpoint-keys.json")


def official_names(module: nn.Module, keymap: KeyMap, what: str) -> dict[str, str]:
    """{our name → official key (without the network's prefix)}: the key map run backwards, every name checked by
    running it forwards again. A tensor the official layout has no place for is an error."""
    names = {ours: keymap.to_official(ours) for ours in module.state_dict()}
    homeless = [ours for ours, official in names.items() if official is None or keymap.to_ours(official) != ours]
    if homeless:
        raise CheckpointError(f"the {what} has tensors with no official name: {key_list(homeless)}")
    return names


def save_official(path: str | os.PathLike, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                  config: ModelConfig, *, overwrite: bool = False) -> Path:
    """Write the three networks as one official-layout .safetensors file with `config` in its metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True, or choose a new name)")
    keymaps = single_file_keymaps(UNetLayout.of(config.unet))
    tensors = {}
    for network, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        state = module.state_dict()
        for ours, official in official_names(module, keymaps[network], network).items():
            tensor = state[ours].detach().cpu()
            if network == "vae" and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]  # the VAE's attention: our Linear [o, i] is a 1×1 conv officially
            tensors[SINGLE_FILE_PREFIXES[network] + official] = tensor.contiguous()
    with replacing(path) as tmp:                     # never a half-written file under the real name
        save_file(tensors, str(tmp), metadata={METADATA_KEY: config.to_json()})
    return path
