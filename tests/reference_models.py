"""The reference implementation of a model of ours: diffusers' UNet2DConditionModel and AutoencoderKL converted by
diffusers' own single-file code, and transformers' CLIPTextModel, all from one official-layout state dict.
Used by the parity tests; needs the [reference] extra (callers importorskip first)."""
from pathlib import Path

import torch

from ldm_scratch.configs import ModelConfig

YAML = Path(__file__).resolve().parents[1] / "ldm_scratch" / "keys" / "v1-inference.yaml"


def original_config(config: ModelConfig) -> dict:
    """CompVis' v1-inference.yaml as a dict, with our config's sizes written into it."""
    import yaml
    original = yaml.safe_load(YAML.read_text())
    unet = original["model"]["params"]["unet_config"]["params"]
    unet.update(in_channels=config.unet.in_channels, model_channels=config.unet.model_channels,
                channel_mult=list(config.unet.channel_mult), num_heads=config.unet.n_heads,
                context_dim=config.unet.context_dim, num_res_blocks=config.unet.num_res_blocks)
    ddconfig = original["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    ddconfig.update(ch=config.vae.base_channels, ch_mult=list(config.vae.channel_mult),
                    num_res_blocks=config.vae.num_res_blocks)
    original["model"]["params"]["scale_factor"] = config.latent_scale
    return original


def reference_networks(state: dict[str, torch.Tensor], config: ModelConfig):
    """(text_encoder, unet, vae) as transformers / diffusers modules holding the tensors of `state`."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    original = original_config(config)
    unet = UNet2DConditionModel.from_single_file(state, original_config=original).eval()
    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text = config.text_encoder
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.n_layers,
        num_attention_heads=text.n_heads, intermediate_size=text.mlp_width, max_position_embeddings=text.max_positions,
        hidden_act="quick_gelu", layer_norm_eps=text.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    prefix = "cond_stage_model.transformer.text_model."
    text_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k}
    target = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    target.load_state_dict(text_state, strict=True)
    return text_encoder.eval(), unet, vae.eval()
