"""Checkpoints: official Stable Diffusion v1 files (and diffusers folders) in, official single files out.

A package split by idea; this front door gathers the names the rest of ldm_scratch, the tests and the scripts use:

    tensor_file.py   reading and validating a tensor file (.safetensors, .ckpt)       TensorFile, CheckpointError
    keymap.py        official names ↔ ours, both ways, and config from shapes        UNET_RULES, VAE_RULES, …
    loading.py       whole models from a single file or a diffusers folder, strictly  load_models, identify
    saving.py        our networks back in the official single-file layout             save_official
    inspection.py    `ldm-scratch inspect`: what a file holds                         describe
    controlnet_keys.py   a ControlNet's official / diffusers names ↔ ours (the UNet's rules reused)
    controlnet_file.py   ControlNets in and out, strictly                     load_controlnet, save_controlnet
    openclip_keys.py SD 2's OpenCLIP text tower: its names ↔ ours, fused q/k/v split     map_openclip, FusedView
    prediction.py    ε or v for a file, and why (explicit, .yaml beside it, name, …)    choose_prediction_type
    upscaler_keys.py the SD 2 ×4 upscaler: its extra buffers, switches read off shapes, yaml numbers
    keys/            the official SD v1/v2 key names and shapes, CompVis' v1/v2 (and ×4 upscaler) inference yamls
"""
from .controlnet_file import load_controlnet, save_controlnet
from .inspection import describe
from .keymap import (CLIP_RULES, DDPM_SCHEDULE_BUFFERS, DIFFUSERS_CLIP_RULES, DIFFUSERS_UNET_RULES,
                     DIFFUSERS_VAE_RULES, EMA_PREFIX, IGNORED_KEYS, SINGLE_FILE_PREFIXES, UNET_RULES, VAE_RULES,
                     KeyMap, Rule, UNetLayout, clip_config_from_shapes, diffusers_unet_rules, diffusers_vae_rules,
                     ema_key, map_component, map_single_file, rename, single_file_keymaps, unet_config_from_shapes,
                     unet_keymap, vae_config_from_shapes)
from .loading import (DIFFUSERS_FOLDERS, UNSUPPORTED, LoadedModel, _all_finite, _network_classes, _same_numbers,
                      check_mapping, fill_module, identify, load_models, plan_single_file)
from .saving import official_names, reference_keys, save_official
from .tensor_file import CheckpointError, TensorFile, read_json

__all__ = [
    "CLIP_RULES", "DDPM_SCHEDULE_BUFFERS", "DIFFUSERS_CLIP_RULES", "DIFFUSERS_FOLDERS", "DIFFUSERS_UNET_RULES",
    "DIFFUSERS_VAE_RULES", "EMA_PREFIX", "IGNORED_KEYS", "SINGLE_FILE_PREFIXES", "UNET_RULES", "UNSUPPORTED",
    "VAE_RULES", "CheckpointError", "KeyMap", "LoadedModel", "Rule", "TensorFile", "UNetLayout", "_all_finite",
    "_network_classes", "_same_numbers", "check_mapping", "clip_config_from_shapes", "describe",
    "diffusers_unet_rules", "diffusers_vae_rules", "ema_key", "fill_module", "identify", "load_controlnet", "load_models",
    "map_component", "map_single_file", "official_names", "plan_single_file", "read_json", "reference_keys",
    "rename", "save_controlnet", "save_official", "single_file_keymaps", "unet_config_from_shapes", "unet_keymap",
    "vae_config_from_shapes",
]
