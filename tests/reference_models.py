"""The reference implementation of a model of ours: diffusers' UNet2DConditionModel and AutoencoderKL converted by
diffusers' own single-file code, and transformers' CLIPTextModel, all from one official-layout state dict.
Used by the parity tests; needs the [reference] extra (callers importorskip first)."""
from pathlib import Path

import torch

from ldm_scratch.configs import ModelConfig

YAML = Path(__file__).resolve().parents[1] / "ldm_scratch" / "checkpoint" / "keys" / "v1-inference.yaml"


def original_config(config: ModelConfig) -> dict:
    """CompVis' v1-inference.yaml as a dict, with our config's sizes written into it. CompVis states where the UNet
    attends as downsampling factors (attention_resolutions [4, 2, 1] for levels 2, 1, 0)."""
    import yaml
    original = yaml.safe_load(YAML.read_text())
    unet = original["model"]["params"]["unet_config"]["params"]
    unet.update(in_channels=config.unet.in_channels, out_channels=config.unet.out_channels,
                model_channels=config.unet.model_channels, channel_mult=list(config.unet.channel_mult),
                num_res_blocks=config.unet.num_res_blocks,
                attention_resolutions=[2 ** level for level in config.unet.attention_levels],
                num_heads=config.unet.n_heads, transformer_depth=config.unet.transformer_depth,
                context_dim=config.unet.context_dim)
    first_stage = original["model"]["params"]["first_stage_config"]["params"]
    first_stage["embed_dim"] = config.vae.z_channels
    first_stage["ddconfig"].update(ch=config.vae.base_channels, ch_mult=list(config.vae.channel_mult),
                                   num_res_blocks=config.vae.num_res_blocks, z_channels=config.vae.z_channels,
                                   in_channels=config.vae.in_channels, out_ch=config.vae.out_channels)
    original["model"]["params"]["scale_factor"] = config.latent_scale
    return original


def reference_networks(state: dict[str, torch.Tensor], config: ModelConfig):
    """(text_encoder, unet, vae) as transformers / diffusers modules holding the tensors of `state`, converted by
    diffusers' single-file functions. CompVis fixes GroupNorm at 32 groups, so the yaml has no place for them: our
    group counts go straight into diffusers' config (norm_num_groups)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    original = original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    unet_config["norm_num_groups"] = config.unet.norm_groups
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state)
    vae_config["norm_num_groups"] = config.vae.norm_groups
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text = config.text_encoder
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.n_layers,
        num_attention_heads=text.n_heads, intermediate_size=text.mlp_width, max_position_embeddings=text.max_positions,
        hidden_act="quick_gelu", layer_norm_eps=text.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    text_state = {k: v for k, v in sfu.convert_ldm_clip_checkpoint(state).items() if "position_ids" not in k}
    if not hasattr(text_encoder, "text_model"):  # transformers ≥ 5.6 has no inner text_model
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text_encoder.load_state_dict(text_state, strict=True)
    return text_encoder.eval(), unet.eval(), vae.eval()
