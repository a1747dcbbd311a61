"""Random ControlNets in the official layout, and diffusers' ControlNetModel made from the same tensors by diffusers'
own single-file conversion (the parity reference). Shared by tests/test_controlnet*.py."""
from pathlib import Path

import torch

from ldm_scratch.checkpoint.controlnet_file import save_controlnet
from ldm_scratch.controlnet import ControlNet, ControlNetConfig
from tinymodels import randomize


def random_controlnet(unet_config, seed: int = 0, hint_widths=(16, 32, 96, 256), factor: int = 8) -> ControlNet:
    """A ControlNet with EVERY parameter random, zero convs included (at zero, a parity test would compare
    nothing)."""
    net = ControlNet(ControlNetConfig(unet_config, hint_widths=hint_widths, downsample_factor=factor))
    return randomize(net, seed).eval()


def official_state(controlnet: ControlNet, folder: Path) -> dict[str, torch.Tensor]:
    """{control_model.*: tensor}: what an official control_*.pth holds."""
    from safetensors.torch import load_file
    path = save_controlnet(folder / "cn-with-metadata.safetensors", controlnet, overwrite=True)
    return load_file(str(path))


def write_official(state: dict, path: Path, fmt: str = "safetensors") -> Path:
    """The state as an official file (no metadata: the config must come from the shapes): .safetensors or .pth."""
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    return path


def diffusers_controlnet(state: dict, unet_config):
    """diffusers' ControlNetModel holding `state`, configured and converted by its single-file functions."""
    import yaml
    from importlib.resources import files
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as sfu
    original = yaml.safe_load(files("ldm_scratch.checkpoint").joinpath("keys").joinpath("v1-inference.yaml")
                              .read_text())
    unet_params = original["model"]["params"]["unet_config"]["params"]
    unet_params.update(in_channels=4, model_channels=unet_config.model_channels,
                       channel_mult=list(unet_config.channel_mult), num_heads=unet_config.n_heads,
                       context_dim=unet_config.context_dim, num_res_blocks=unet_config.num_res_blocks,
                       attention_resolutions=[2 ** level for level in unet_config.attention_levels])
    # create_controlnet_diffusers_config_from_ldm would do this, but in diffusers 0.42.1 it calls
    # create_unet_diffusers_config_from_ldm without its `checkpoint` argument (TypeError); so the same fields,
    # taken from the UNet config it would have made
    unet = sfu.create_unet_diffusers_config_from_ldm(original, state)
    config = {"conditioning_channels": 3, **{key: unet[key] for key in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
        "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
        "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")}}
    config["norm_num_groups"] = unet_config.norm_groups
    model = ControlNetModel(**config)
    model.load_state_dict(sfu.convert_controlnet_checkpoint(state, config), strict=True)
    return model.eval()
