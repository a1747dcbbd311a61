"""SD 2 end to end: tiny random models with SD 2's shapes (OpenCLIP text tower with GELU, 64-channel heads, linear
proj_in/proj_out, a 1024→64-wide context) written in the official v2 single-file layout, loaded by our strict loader
and run against diffusers' StableDiffusionPipeline / StableDiffusionInpaintPipeline holding the same weights
(diffusers' single-file conversion for the UNet and VAE, `convert_open_clip_checkpoint` into transformers'
CLIPTextModel for the text tower), with v-prediction (768-v style) and ε (512-base, 512-inpainting) schedulers.
Also: the prediction-type detection (yaml beside the file, name, explicit), the diffusers folder layout of the same
model, and what `inspect` says.

Measured max |ours − diffusers| over the [0, 1] image arrays (96², 3 steps, CPU float32, torch 2.13, diffusers
0.42.1): v-prediction DDIM 8.8e-6, DPM++ 2M 7.9e-6; ε (512-base style) Euler 8.3e-6; 9-channel inpainting DDIM
9.8e-6 — float32 operations in another order. Tolerance 1e-4, the v1 parity tests' bound: reading v as ε, or any
wrong timestep or mask convention, moves pixels by 1e-2 or more (asserted for v vs ε below).
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import CheckpointError, describe, load_models, save_official
from ldm_scratch.checkpoint.prediction import choose_prediction_type
from ldm_scratch.clip import CLIPTextConfig
from ldm_scratch.configs import ModelConfig
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.tokenizer import load_tokenizer
from ldm_scratch.unet import UNetConfig
from ldm_scratch.vae import VAEConfig
from pipeline_fixtures import sample_image, sample_mask, write_vocabulary
from test_sd2_text import random_tower, sd2_state, transformers_as_diffusers_converts
from tinymodels import random_networks

diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
transformers = pytest.importorskip("transformers", reason="needs the [reference] extra")
pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

YAML = Path(__file__).resolve().parents[1] / "ldm_scratch" / "checkpoint" / "keys"
SIZE = 96
TOLERANCE = 1e-4   # measured ≤ 9.8e-6 in every case here (module docstring)
SD2_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def tiny_v2_config(in_channels: int = 4) -> ModelConfig:
    """SD 2's switches at tiny widths: 64-wide OpenCLIP-style text (1 head of 64, GELU), UNet widths 64/128/128
    with 64-channel heads (1, 2, 2 heads), linear projections, context 64."""
    return ModelConfig(
        text_encoder=CLIPTextConfig(width=64, n_layers=2, n_heads=1, mlp_width=256, activation="gelu"),
        unet=UNetConfig(in_channels=in_channels, model_channels=64, channel_mult=(1, 2, 2), attention_levels=(0, 1, 2),
                        context_dim=64, head_dim=64, linear_projection=True, upcast_attention=True),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4)), kind="sd-v2")


def write_tiny_v2(path: Path, in_channels: int = 4, seed: int = 0) -> dict:
    """The official SD 2 layout, without our metadata (as a downloaded file): UNet and VAE in CompVis' names,
    the text tower in open_clip's (3 blocks: SD 2 reads 2), text_projection and logit_scale. Returns the state."""
    config = tiny_v2_config(in_channels)
    text_encoder, unet, vae = random_networks(config, seed)
    scratch = path.with_suffix(".v1-layout.safetensors")
    save_official(scratch, text_encoder, unet, vae, config)
    state = {k: v for k, v in load_file(str(scratch)).items() if not k.startswith("cond_stage_model.")}
    scratch.unlink()
    state.update(sd2_state(random_tower(width=64, heads=1, layers=3, seed=seed)))
    save_file(state, str(path))
    return state


def original_config(config: ModelConfig, inpainting: bool) -> dict:
    """CompVis' SD 2 yaml with the tiny sizes written in (diffusers' converter reads the UNet/VAE config from it)."""
    import yaml
    name = "v2-inpainting-inference.yaml" if inpainting else "v2-inference-v.yaml"
    original = yaml.safe_load((YAML / name).read_text())
    unet = original["model"]["params"]["unet_config"]["params"]
    unet.update(in_channels=config.unet.in_channels, model_channels=config.unet.model_channels,
                channel_mult=list(config.unet.channel_mult), attention_resolutions=[1, 2, 4],
                context_dim=config.unet.context_dim)
    original["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(
        ch=config.vae.base_channels, ch_mult=list(config.vae.channel_mult))
    return original


def diffusers_components(state: dict, config: ModelConfig, vocabulary, inpainting: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    original = original_config(config, inpainting)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    assert unet_config["use_linear_projection"] and unet_config["attention_head_dim"] == [1, 2, 2]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state, scaling_factor=config.latent_scale)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text_encoder = transformers_as_diffusers_converts(state, 64, 1, 3)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=reference_tokenizer(vocabulary))


def reference_tokenizer(vocabulary):
    """transformers' CLIPTokenizer padding with id 0, as SD 2's tokenizer does ("!" in the real vocabulary)."""
    pad = next(token for token, i in transformers.CLIPTokenizer(str(vocabulary[0]), str(vocabulary[1])).get_vocab()
               .items() if i == 0)
    return transformers.CLIPTokenizer(str(vocabulary[0]), str(vocabulary[1]), pad_token=pad, model_max_length=77)


def diffusers_pipeline(components, sampler, prediction_type, inpainting=False):
    config = {**SD2_SCHEDULER, "prediction_type": prediction_type}
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(config)
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = cls(**components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_tokenizer(vocabulary):
    tokenizer = load_tokenizer(vocabulary)
    tokenizer.pad_id = 0            # what load_pipeline's tokenizer does for SD 2 (ModelConfig.tokenizer_pad_id)
    return tokenizer


@pytest.fixture(scope="module")
def v2_models(tmp_path_factory):
    """{name: (path, state, our pipeline, diffusers components)} for the 768-v-style and the inpainting model."""
    folder = tmp_path_factory.mktemp("sd2")
    vocabulary = write_vocabulary(folder / "tokenizer")
    models = {}
    for name, in_channels in (("tiny-v2-768-v", 4), ("tiny-v2-512-inpainting", 9)):
        path = folder / f"{name}.safetensors"
        state = write_tiny_v2(path, in_channels, seed=in_channels)
        if in_channels == 4:
            shutil.copy(YAML / "v2-inference-v.yaml", path.with_suffix(".yaml"))   # the web UI's convention
        ours = load_pipeline(path, tokenizer=ours_tokenizer(vocabulary))
        models[name] = (path, state, ours, diffusers_components(state, ours.config, vocabulary, in_channels == 9))
    return models, vocabulary


def compare(ours, reference, label):
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    print(f"\n{label}: max |ours − diffusers| = {diff:.2e}")
    assert diff < TOLERANCE, f"{label}: {diff:.3g}"
    return diff


def noise(seed=0):
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


TXT2IMG = dict(prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=7.5,
               height=SIZE, width=SIZE)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_v_prediction_txt2img_matches_diffusers(v2_models, sampler):
    """768-v style: the yaml beside the file (v2-inference-v.yaml, parameterization "v") decides. (Every sampler's
    v-prediction arithmetic is checked against diffusers in test_sd2_samplers.py; here, the whole pipeline.)"""
    path, state, ours, components = v2_models[0]["tiny-v2-768-v"]
    assert ours.config.prediction_type == "v_prediction" and ours.schedule.config.prediction_type == "v_prediction"
    mine = ours.txt2img(**TXT2IMG, steps=3, sampler=sampler, latents=noise(), output_type="np", progress=False)
    reference = diffusers_pipeline(components, sampler, "v_prediction")(
        **TXT2IMG, num_inference_steps=3, latents=noise(), output_type="np").images
    compare(mine, reference, f"sd2 v txt2img {sampler}")
    if sampler == "ddim":
        as_eps = diffusers_pipeline(components, sampler, "epsilon")(
            **TXT2IMG, num_inference_steps=3, latents=noise(), output_type="np").images
        assert np.abs(mine - as_eps).max() > 1e-2       # the prediction type changes the image


def test_512_base_epsilon_txt2img_matches_diffusers(v2_models, tmp_path):
    """512-base style: the same keys as 768-v; named like the official file, it is read as ε."""
    (path, state, _, components), vocabulary = v2_models[0]["tiny-v2-768-v"], v2_models[1]
    base = tmp_path / "v2-1_512-ema-pruned.safetensors"
    shutil.copy(path, base)
    ours = load_pipeline(base, tokenizer=ours_tokenizer(vocabulary))
    assert ours.config.prediction_type == "epsilon" and ours.config.image_size == 512
    assert v2_models[0]["tiny-v2-768-v"][2].config.image_size == 768
    mine = ours.txt2img(**TXT2IMG, steps=3, sampler="euler", latents=noise(1), output_type="np", progress=False)
    reference = diffusers_pipeline(components, "euler", "epsilon")(
        **TXT2IMG, num_inference_steps=3, latents=noise(1), output_type="np").images
    compare(mine, reference, "sd2 ε txt2img euler")


def test_inpainting_9_channel_matches_diffusers(v2_models):
    """512-inpainting: 9 input channels, ε (its yaml has no parameterization; the kind says ε)."""
    path, state, ours, components = v2_models[0]["tiny-v2-512-inpainting"]
    assert ours.is_inpainting_model and ours.config.prediction_type == "epsilon"
    image, mask = sample_image(SIZE, SIZE), sample_mask(SIZE, SIZE)
    mine = ours.inpaint("a green square", image, mask, steps=3, sampler="ddim", seed=3, guidance_scale=7.5,
                        height=SIZE, width=SIZE, output_type="np", progress=False)
    reference = diffusers_pipeline(components, "ddim", "epsilon", inpainting=True)(
        prompt="a green square", image=image, mask_image=mask, guidance_scale=7.5, height=SIZE, width=SIZE,
        num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    compare(mine, reference, "sd2 inpainting ddim")


def test_prediction_type_detection(v2_models, tmp_path):
    """Explicit > yaml beside the file > diffusers scheduler config > kind > official file name > SD 2 default v."""
    path = v2_models[0]["tiny-v2-768-v"][0]
    assert choose_prediction_type(path, "sd-v2") == ("v_prediction", f"{path.stem}.yaml beside the file says "
                                                                     "parameterization: v")
    plain = tmp_path / "my-sd2-finetune.safetensors"
    shutil.copy(path, plain)
    prediction, reason = choose_prediction_type(plain, "sd-v2")
    assert prediction == "v_prediction" and "cannot be told apart" in reason
    assert choose_prediction_type(tmp_path / "v2-1_512-ema-pruned.safetensors", "sd-v2")[0] == "epsilon"
    assert choose_prediction_type(plain, "sd-v2-inpainting")[0] == "epsilon"
    assert choose_prediction_type(plain, "sd-v1")[0] == "epsilon"
    yaml_path = plain.with_suffix(".yaml")
    yaml_path.write_text("model:\n  params:\n    parameterization: \"x0\"\n")
    with pytest.raises(Exception, match="parameterization 'x0' is not one we sample"):
        choose_prediction_type(plain, "sd-v2")
    yaml_path.write_text("model: [unclosed\n")
    with pytest.raises(Exception, match="not valid YAML"):
        choose_prediction_type(plain, "sd-v2")
    yaml_path.write_text("model:\n  params:\n    linear_start: 0.00085\n")   # CompVis' default: eps
    assert choose_prediction_type(plain, "sd-v2")[0] == "epsilon"
    yaml_path.unlink()
    loaded = load_models(plain, prediction_type="epsilon")            # explicit beats everything
    assert loaded.config.prediction_type == "epsilon" and loaded.prediction_reason.startswith("given explicitly")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        load_models(plain, prediction_type="v")
    report = describe(plain)
    assert "kind:       sd-v2" in report and "prediction: v_prediction" in report and "cannot be told" in report
    assert "unmapped:   0" in report


def test_strict_loading_of_the_v2_file(v2_models, tmp_path):
    """Every tensor is used or allowed by name; a stray tensor or a missing fused q/k/v is an error."""
    path, state, ours, _ = v2_models[0]["tiny-v2-768-v"]
    config = ours.config
    assert config.kind == "sd-v2" and config.text_encoder.n_layers == 2 and config.text_encoder.activation == "gelu"
    assert config.unet.head_dim == 64 and config.unet.linear_projection and config.tokenizer_pad_id == 0
    bad = dict(state)
    del bad["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    bad["cond_stage_model.model.extra.weight"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor.*cond_stage_model.model.extra.weight"):
        load_models(tmp_path / "bad.safetensors")
    del bad["cond_stage_model.model.extra.weight"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="missing 3 tensor.*blocks.0.attn.k.weight"):
        load_models(tmp_path / "bad.safetensors")


def test_diffusers_folder_of_the_same_model(v2_models, tmp_path):
    """diffusers' save_pretrained of the converted model, read back by our folder loader: the same image as the
    single file (its scheduler_config.json says v_prediction)."""
    (path, state, single, components), vocabulary = v2_models[0]["tiny-v2-768-v"], v2_models[1]
    diffusers_pipeline(components, "ddim", "v_prediction").save_pretrained(tmp_path / "sd2-folder")
    from_folder = load_pipeline(tmp_path / "sd2-folder", tokenizer=ours_tokenizer(vocabulary))
    assert from_folder.config.kind == "sd-v2" and from_folder.config.prediction_type == "v_prediction"
    assert from_folder.config.unet.head_dim == 64 and from_folder.config.text_encoder.activation == "gelu"
    assert "prediction: v_prediction (scheduler/scheduler_config.json says" in describe(tmp_path / "sd2-folder")
    args = dict(steps=3, sampler="ddim", output_type="np", progress=False, height=SIZE, width=SIZE)
    a = single.txt2img("a fox", latents=noise(), **args)
    b = from_folder.txt2img("a fox", latents=noise(), **args)
    assert np.abs(a - b).max() < 1e-5       # measured 0.0: the same tensors through the same code


# ---------------------------------------------------------------------------------------------------------------
# Full size (slow): SD 2's real shapes with random weights, the 768-v family at 128², 2 steps
# ---------------------------------------------------------------------------------------------------------------

def full_size_v2_state(seed: int = 0, in_channels: int = 4, unet_config=None, vae_config=None) -> dict:
    """Random tensors in the official SD 2 layout at full size: our UNet (865 M; or `unet_config`'s) and VAE (or
    `vae_config`'s) with tinymodels' unit-variance init, OpenCLIP ViT-H's text tower (24 blocks of 1024) as
    open_clip initialises it."""
    from ldm_scratch.checkpoint import SINGLE_FILE_PREFIXES, UNetLayout, official_names, single_file_keymaps
    from ldm_scratch.unet import UNet
    from ldm_scratch.vae import VAE
    from tinymodels import randomize
    unet_config = unet_config or UNetConfig(in_channels=in_channels, context_dim=1024, head_dim=64,
                                            linear_projection=True, upcast_attention=True)
    keymaps = single_file_keymaps(UNetLayout.of(unet_config))
    state = {}
    for network, module in (("unet", UNet(unet_config)), ("vae", VAE(vae_config or VAEConfig()))):
        randomize(module, seed)
        for ours, official in official_names(module, keymaps[network], network).items():
            tensor = module.state_dict()[ours].detach()
            state[SINGLE_FILE_PREFIXES[network] + official] = tensor[:, :, None, None] if (
                network == "vae" and tensor.dim() == 2) else tensor
        del module
    state.update(sd2_state(random_tower(width=1024, heads=16, layers=24, seed=seed)))
    return state


FAMILIES = [("v2-1_768-ema-pruned", 4, "v_prediction"), ("v2-1_512-ema-pruned", 4, "epsilon"),
            ("512-inpainting-ema", 9, "epsilon")]


@pytest.mark.slow
@pytest.mark.parametrize("name, in_channels, prediction_type", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_full_size_matches_diffusers(tmp_path, name, in_channels, prediction_type):
    """One full-size case per SD 2 family, 128², 2 DDIM steps, CFG 7.5. Measured max |ours − diffusers| (CPU,
    float32): 768-v 1.5e-5, 512-base 1.1e-5, 512-inpainting 1.3e-5 (6–8 s per pipeline run; 200 s for the three
    and the full-size text tower, under the heavy lock). The official names decide the prediction type, as for
    the downloaded files."""
    import time
    keys = __import__("json").loads((YAML / "sd-v2-checkpoint-keys.json").read_text())
    state = full_size_v2_state(in_channels=in_channels)
    official = {**keys["unet"], **keys["vae"], **keys["text_encoder"]}
    if in_channels == 9:
        official["model.diffusion_model.input_blocks.0.0.weight"] = [320, 9, 3, 3]
    assert {k: list(v.shape) for k, v in state.items()} == official   # exactly the official names and shapes
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    vocabulary = write_vocabulary(tmp_path / "tokenizer")
    ours = load_pipeline(path, tokenizer=ours_tokenizer(vocabulary))
    assert ours.config.prediction_type == prediction_type
    original = original_config(ours.config, inpainting=in_channels == 9)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state, scaling_factor=0.18215)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text_encoder = transformers_as_diffusers_converts(state, 1024, 16, 24)
    del state
    components = dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=reference_tokenizer(vocabulary))
    reference_pipe = diffusers_pipeline(components, "ddim", prediction_type, inpainting=in_channels == 9)
    args = dict(prompt="a watercolor fox", negative_prompt="blurry", guidance_scale=7.5, height=128, width=128)
    start = time.perf_counter()
    if in_channels == 9:
        image, mask = sample_image(128, 128), sample_mask(128, 128)
        mine = ours.inpaint(args["prompt"], image, mask, negative_prompt="blurry", steps=2, sampler="ddim", seed=5,
                            height=128, width=128, output_type="np", progress=False)
        middle = time.perf_counter()
        reference = reference_pipe(**args, image=image, mask_image=mask, num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(5), output_type="np").images
    else:
        eps = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
        mine = ours.txt2img(**args, steps=2, sampler="ddim", latents=eps, output_type="np", progress=False)
        middle = time.perf_counter()
        reference = reference_pipe(**args, num_inference_steps=2, latents=eps.clone(), output_type="np").images
    print(f"\nours {middle - start:.1f} s, diffusers {time.perf_counter() - middle:.1f} s")
    compare(mine, reference, f"full-size SD 2 {name} ddim 128²")
