"""Standalone VAE files (ldm_scratch/checkpoint/vae_file.py): the vae-ft-mse-840000-ema-pruned layouts (no prefix,
first_stage_model., .ckpt with loss.* and model_ema.*), a diffusers vae/ folder, and the refusals. Random tiny
weights in the official names."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.checkpoint.vae_file import check_vae_fits, load_vae
from ldm_scratch.vae import VAEConfig
from pipeline_fixtures import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # many tiny tensors: threads only contend

PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny model's VAE tensors under their official names, without the prefix (as a VAE file stores them)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("vae") / "tiny.safetensors", seed=4)
    return {k[len(PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}


def same_weights(vae, state):
    """Our VAE holds exactly the file's numbers (spot checks on renamed tensors of every kind)."""
    pairs = {"encoder.conv_in.weight": "encoder.conv_in.weight",
             "encoder.levels.1.res_blocks.0.skip.weight": "encoder.down.1.block.0.nin_shortcut.weight",
             "decoder.mid.attention.to_q.weight": "decoder.mid.attn_1.q.weight",
             "latent_conv.weight": "post_quant_conv.weight", "posterior_conv.bias": "quant_conv.bias"}
    ours = vae.state_dict()
    for name, key in pairs.items():
        assert torch.equal(ours[name].reshape(state[key].shape), state[key]), name


def test_safetensors_without_prefix(official, tmp_path):
    save_file(official, str(tmp_path / "vae-ft-mse.safetensors"))
    vae, config = load_vae(tmp_path / "vae-ft-mse.safetensors")
    same_weights(vae, official)
    assert config.base_channels == 32 and config.z_channels == 4


def test_safetensors_with_first_stage_model_prefix(official, tmp_path):
    save_file({PREFIX + k: v for k, v in official.items()}, str(tmp_path / "vae.safetensors"))
    same_weights(load_vae(tmp_path / "vae.safetensors")[0], official)


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_with_loss_and_ema_keys(official, tmp_path, wrapped):
    """torch.save of a plain dict of tensors (optionally under 'state_dict', as Lightning writes it), read with
    weights_only=True; the loss's and the EMA's tensors are allow-listed."""
    state = dict(official)
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.encoderconv_inweight"] = torch.randn_like(official["encoder.conv_in.weight"])
    torch.save({"state_dict": state, "global_step": 840000} if wrapped else state, tmp_path / "vae.ckpt")
    same_weights(load_vae(tmp_path / "vae.ckpt")[0], official)


def test_dtype(official, tmp_path):
    save_file(official, str(tmp_path / "vae.safetensors"))
    vae, _ = load_vae(tmp_path / "vae.safetensors", dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16


@pytest.mark.parity
def test_diffusers_vae_folder_decodes_as_diffusers(official, tmp_path):
    """A diffusers AutoencoderKL saved with save_pretrained (the vae/ folder of a model repo) loads, and decodes the
    same latents to the same image as diffusers itself."""
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu
    from reference_models import original_config
    from tinymodels import tiny_config
    config, state = tiny_config(), {PREFIX + k: v for k, v in official.items()}
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original_config(config), state)
    vae_config["norm_num_groups"] = config.vae.norm_groups
    reference = AutoencoderKL(**vae_config)
    reference.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    reference.save_pretrained(tmp_path / "model" / "vae")
    for folder in (tmp_path / "model" / "vae", tmp_path / "model"):       # the vae/ folder, or the model folder
        vae, vae_config = load_vae(folder)
        assert vae_config.norm_groups == config.vae.norm_groups
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, theirs = vae.decode(z), reference.decode(z).sample
        # measured: max |ours − diffusers| = 6.4e-6 on O(1) outputs (float32, same weights, the operations
        # in another order); 5e-5 leaves room for other BLAS builds, while one wrong tensor moves outputs by > 1e-2
        assert (ours - theirs).abs().max() < 5e-5


# ---------------------------------------------------------------------------------------------------------------
# Refusals: clear errors naming the problem
# ---------------------------------------------------------------------------------------------------------------

def test_whole_checkpoint_is_not_a_vae(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="whole model checkpoint.*sd-v1"):
        load_vae(path)


def test_unknown_and_missing_tensors_are_listed(official, tmp_path):
    state = dict(official)
    state["decoder.extra_head.weight"] = torch.zeros(3)
    del state["decoder.conv_out.bias"]
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_vae(tmp_path / "vae.safetensors")
    assert "decoder.extra_head.weight" in str(error.value) and "decoder.conv_out.bias" in str(error.value)


def test_stray_tensors_beside_a_prefixed_vae_are_listed(official, tmp_path):
    state = {PREFIX + k: v for k, v in official.items()}
    state["cond_stage_model.transformer.x"] = torch.zeros(1)
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="belong to no VAE: cond_stage_model.transformer.x"):
        load_vae(tmp_path / "vae.safetensors")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_vae(tmp_path / "empty")


def test_a_vae_of_another_latent_space_is_refused():
    with pytest.raises(CheckpointError, match="16-channel latents"):
        check_vae_fits(VAEConfig(z_channels=16), VAEConfig(), "x.safetensors")
    check_vae_fits(VAEConfig(base_channels=64), VAEConfig(), "x.safetensors")   # other widths: same latent space
