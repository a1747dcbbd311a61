"""The SD 2 ×4 upscaler: a tiny random upscaler in the official layout (x4-upscaling.yaml's structure at small
widths: 7-channel UNet input, 8 heads, attention at levels 1–3 with self-attention off at levels 1 and 2, a
1000-row noise-level embedding, a 3-level ×4 VAE, an OpenCLIP-style text tower, the low_scale_model.* buffers)
loaded by our strict loader and run against diffusers' StableDiffusionUpscalePipeline on the same weights.

diffusers' networks are built by its own single-file conversion (`create_unet_diffusers_config_from_ldm` reads
disable_self_attentions → only_cross_attention and num_classes → num_class_embeds from the yaml;
`convert_ldm_unet_checkpoint` maps label_emb.weight → class_embedding.weight); the text tower as SD 2's tests
build it (transformers' CLIPTextModel via `convert_open_clip_checkpoint`). Schedulers: DDIM for the model
(v-prediction, β 0.0001 → 0.02 "scaled_linear" = CompVis' "linear", as diffusers' single-file code configures this
model) and DDPMScheduler for the low-res noise (the same β), as diffusers' single-file loader builds them.

Measured max |ours − diffusers| (CPU float32, torch 2.13, diffusers 0.42.1): one UNet call 3.2e-6 (outputs ≈ 1);
whole pipeline, 24² → 96², 3 steps, CFG 9: DDIM 1.4e-5, DPM++ 2M 1.2e-5, Euler 1.7e-5 over [0, 1] pixels.
Tolerance 1e-4 as for SD 2; noise level 20 vs 21 moves pixels by more than 1e-3 (asserted), so the bound can see
a wrong ᾱ_n or label. Full size (slow test, official shapes, 32² → 128², 2 DDIM steps): 1.4e-5.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import CheckpointError, describe, load_models, save_official
from ldm_scratch.clip import CLIPTextConfig
from ldm_scratch.configs import ModelConfig
from ldm_scratch.diffusion import Schedule
from ldm_scratch.pipeline import StableDiffusion, load_pipeline
from ldm_scratch.unet import UNet, UNetConfig
from ldm_scratch.upscale import NOISE_AUGMENTATION
from ldm_scratch.vae import VAEConfig
from pipeline_fixtures import sample_image, write_vocabulary
from tinymodels import random_networks

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

KEYS = Path(__file__).resolve().parents[1] / "ldm_scratch" / "checkpoint" / "keys"
TOLERANCE = 1e-4   # measured ≤ 1.7e-5 (module docstring)
LOW = 24           # the low-res input's side; the output is 96²
TEXT_WIDTH = 128   # ≠ the widths (64) of the levels without self-attention, so their keys' shape shows it


def tiny_upscaler_config() -> ModelConfig:
    """x4-upscaling.yaml's structure at tiny widths: UNet 32·[1, 2, 2, 4] (8 heads), attention at levels 1–3,
    self-attention off at 1, 2; VAE 32·[1, 2, 4]; text 128 wide (2 heads of 64, GELU)."""
    return ModelConfig(
        text_encoder=CLIPTextConfig(width=TEXT_WIDTH, n_layers=2, n_heads=2, mlp_width=4 * TEXT_WIDTH,
                                    activation="gelu"),
        unet=UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2, 4), attention_levels=(1, 2, 3),
                        n_heads=8, context_dim=TEXT_WIDTH, linear_projection=True, num_classes=1000,
                        disable_self_attention=(1, 2)),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 4)), latent_scale=0.08333, beta_start=0.0001,
        beta_end=0.02, image_size=512, kind="sd-v2-upscaler", prediction_type="v_prediction",
        name="tiny-x4-upscaler")


def low_scale_buffers() -> dict[str, torch.Tensor]:
    """The 8 noise-augmentation buffers an official upscaler file holds (float32, as CompVis registers them)."""
    alpha_bar = Schedule(NOISE_AUGMENTATION).alpha_bar
    betas = 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    values = dict(betas=betas, alphas_cumprod=alpha_bar, alphas_cumprod_prev=torch.cat([torch.ones(1), alpha_bar[:-1]]),
                  sqrt_alphas_cumprod=alpha_bar.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - alpha_bar).sqrt(),
                  log_one_minus_alphas_cumprod=(1 - alpha_bar).log(), sqrt_recip_alphas_cumprod=(1 / alpha_bar).sqrt(),
                  sqrt_recipm1_alphas_cumprod=(1 / alpha_bar - 1).sqrt())
    return {f"low_scale_model.{name}": v.float() for name, v in values.items()}


def write_tiny_upscaler(path: Path, seed: int = 0) -> dict:
    """The official upscaler layout, without our metadata (as a downloaded file). Returns the state."""
    from test_sd2_text import random_tower, sd2_state
    config = tiny_upscaler_config()
    text_encoder, unet, vae = random_networks(config, seed)
    scratch = path.with_suffix(".scratch.safetensors")
    save_official(scratch, text_encoder, unet, vae, config)
    state = {k: v for k, v in load_file(str(scratch)).items() if not k.startswith("cond_stage_model.")}
    scratch.unlink()
    state.update(sd2_state(random_tower(width=TEXT_WIDTH, heads=2, layers=3, seed=seed)))
    state.update(low_scale_buffers())
    save_file(state, str(path))
    return state


def original_config(config: ModelConfig) -> dict:
    """x4-upscaling.yaml with the tiny sizes written in (diffusers' converter reads the UNet/VAE config from it)."""
    import yaml
    original = yaml.safe_load((KEYS / "x4-upscaling.yaml").read_text())
    unet = original["model"]["params"]["unet_config"]["params"]
    unet.update(model_channels=config.unet.model_channels, context_dim=config.unet.context_dim)
    original["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(ch=config.vae.base_channels)
    return original


def diffusers_unet_and_vae(state: dict, config: ModelConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    original = original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    assert unet_config["only_cross_attention"] == [True, True, True, False]
    assert unet_config["num_class_embeds"] == 1000 and unet_config["class_embed_type"] is None
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state, scaling_factor=config.latent_scale)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return unet.eval(), vae.eval()


def diffusers_upscaler(state, config, vocabulary, sampler="ddim"):
    import diffusers
    from test_sd2_pipeline import SD2_SCHEDULER, reference_tokenizer
    from test_sd2_text import transformers_as_diffusers_converts
    unet, vae = diffusers_unet_and_vae(state, config)
    scheduler_config = {**SD2_SCHEDULER, "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"}
    cls = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
           "euler": diffusers.EulerDiscreteScheduler}[sampler]
    low_res = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                      beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=transformers_as_diffusers_converts(state, TEXT_WIDTH, 2, 3).eval(),
        tokenizer=reference_tokenizer(vocabulary), unet=unet, low_res_scheduler=low_res,
        scheduler=cls.from_config(scheduler_config), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_tokenizer(vocabulary):
    from ldm_scratch.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(vocabulary)
    tokenizer.pad_id = 0
    return tokenizer


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """(path, state, our pipeline, vocabulary) of a tiny upscaler in the official layout."""
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    folder = tmp_path_factory.mktemp("upscaler")
    vocabulary = write_vocabulary(folder / "tokenizer")
    path = folder / "tiny-x4-upscaler-ema.safetensors"
    state = write_tiny_upscaler(path)
    return path, state, load_pipeline(path, tokenizer=ours_tokenizer(vocabulary)), vocabulary


def plain_upscaler_pipe() -> StableDiffusion:
    """Our tiny upscaler built in memory (no file, no reference library): for the argument checks."""
    config = tiny_upscaler_config()
    return StableDiffusion(*random_networks(config, 0), config)


def compare(ours, reference, label):
    diff = float(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(reference, dtype=np.float64)).max())
    print(f"\n{label}: max |ours − diffusers| = {diff:.2e}")
    assert diff < TOLERANCE, f"{label}: {diff:.3g}"
    return diff


# ---------------------------------------------------------------------------------------------------------------
# The network: class embedding and cross-attention-only blocks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_unet_matches_diffusers_only_cross_attention_and_class_embedding(upscaler):
    """One call of our UNet against diffusers' UNet2DConditionModel(only_cross_attention=[T, T, T, F],
    num_class_embeds=1000, class_embed_type=None) with the same tensors. Measured 3.2e-6 (outputs ≈ 1)."""
    path, state, ours, _ = upscaler
    reference, _ = diffusers_unet_and_vae(state, ours.config)
    block = ours.unet.down[1].attn[0].blocks[0]
    assert not block.self_attends and block.self_attn.to_k.in_features == TEXT_WIDTH       # attn1 reads the text
    assert ours.unet.down[3].attn[0].blocks[0].self_attends and ours.unet.middle.attn.blocks[0].self_attends
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, 16, generator=generator)
    context = torch.randn(2, 77, TEXT_WIDTH, generator=generator)
    t, labels = torch.tensor([500, 30]), torch.tensor([20, 350])
    with torch.no_grad():
        mine = ours.unet(x, t, context, class_labels=labels)
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=labels).sample
        other_level = ours.unet(x, t, context, class_labels=labels + 1)
    diff = compare(mine, theirs, "upscaler UNet call")
    assert diff < 2e-5 and (mine - other_level).abs().max() > 1e-3   # the label enters the output


@pytest.mark.parity
def test_noise_augmentation_schedule_is_compvis_linear():
    """x4-upscaling.yaml says "linear" β from 0.0001 to 0.02; CompVis' make_beta_schedule("linear") is
    linspace(√β_start, √β_end, T)², which diffusers calls "scaled_linear" (and configures this model's two
    schedulers with). Ours equals that to float32 rounding (1.8e-7); plain linear β would be far off (0.36)."""
    diffusers = pytest.importorskip("diffusers")
    ours = Schedule(NOISE_AUGMENTATION).alpha_bar.float()
    compvis = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    plain = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert (ours - compvis.alphas_cumprod).abs().max() < 1e-6 and (ours - plain.alphas_cumprod).abs().max() > 0.3
    assert abs(float(ours[20]) - 0.9973) < 1e-4 and tiny_upscaler_config().schedule().alpha_bar.equal(
        Schedule(NOISE_AUGMENTATION).alpha_bar)       # the model's own schedule has the same numbers


def test_unet_class_label_errors():
    with torch.device("meta"):
        plain = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=32))
    unet = plain_upscaler_pipe().unet
    x, context = torch.zeros(1, 7, 8, 8), torch.zeros(1, 77, TEXT_WIDTH)
    with pytest.raises(ValueError, match="takes a class label.*pass class_labels="):
        unet(x, 10, context)
    for bad in (1000, -1, 2.5, [1, 2, 3]):
        with pytest.raises(ValueError, match=r"class_labels must be whole numbers in \[0, 1000\)"):
            unet(x, 10, context, class_labels=torch.tensor(bad))
    with pytest.raises(ValueError, match="has no class embedding"):
        plain(torch.zeros(1, 4, 8, 8, device="meta"), 10, torch.zeros(1, 77, 32, device="meta"), class_labels=3)


def test_config_fields_round_trip_and_are_checked():
    config = tiny_upscaler_config()
    again = ModelConfig.from_json(config.to_json())
    assert again == config and again.unet.disable_self_attention == (1, 2) and again.unet.num_classes == 1000
    bad = config.to_json().replace('"disable_self_attention": [1, 2]', '"disable_self_attention": [1, 7]')
    with pytest.raises(ValueError, match="disable_self_attention.*names levels of a 4-level UNet"):
        ModelConfig.from_json(bad)


# ---------------------------------------------------------------------------------------------------------------
# The file: recognised, strictly loaded, described
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_the_file_is_recognised_and_loaded_strictly(upscaler, tmp_path):
    path, state, ours, _ = upscaler
    c = ours.config
    assert c.kind == "sd-v2-upscaler" and c.prediction_type == "v_prediction" and c.latent_scale == 0.08333
    assert (c.beta_start, c.beta_end, c.vae.downsample_factor, c.unet.n_heads, c.unet.head_dim) == (
        0.0001, 0.02, 4, 8, None)
    assert c.unet.disable_self_attention == (1, 2) and not c.unet.disable_middle_self_attention
    assert c.unet.num_classes == 1000 and c.tokenizer_pad_id == 0
    report = describe(path)
    assert "kind:       sd-v2-upscaler  (SD 2 ×4 upscaler" in report and "use pipe.upscale" in report
    assert "prediction: v_prediction (the SD 2 ×4 upscaler predicts v" in report and "unmapped:   0" in report
    assert "allowed, not loaded: 22 " in report      # the 8 low_scale_model.* buffers + 14 unused OpenCLIP tensors
    bad = dict(state)
    bad["low_scale_model.extra"] = torch.zeros(3)           # only the 8 named buffers are allowed
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="belong to no network.*low_scale_model.extra"):
        load_models(tmp_path / "bad.safetensors")
    del bad["low_scale_model.extra"], bad["model.diffusion_model.label_emb.weight"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="has no model.diffusion_model.label_emb.weight.*incomplete"):
        load_models(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# The pipeline against diffusers' StableDiffusionUpscalePipeline
# ---------------------------------------------------------------------------------------------------------------

ARGS = dict(prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=9.0)


@pytest.mark.parity
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])   # euler: x_t scaled, x_lr' not
def test_upscale_matches_diffusers(upscaler, sampler):
    path, state, ours, vocabulary = upscaler
    image = sample_image(LOW, LOW, seed=1)
    mine = ours.upscale(ARGS["prompt"], image, ARGS["negative_prompt"], noise_level=20, steps=3, sampler=sampler,
                        guidance_scale=9.0, seed=4, output_type="np", progress=False)
    assert mine.shape == (1, 4 * LOW, 4 * LOW, 3)
    reference = diffusers_upscaler(state, ours.config, vocabulary, sampler)(
        **ARGS, image=image, noise_level=20, num_inference_steps=3, generator=torch.Generator().manual_seed(4),
        output_type="np").images
    compare(mine, reference, f"upscaler {sampler} {LOW}² → {4 * LOW}²")
    if sampler == "ddim":
        other = ours.upscale(ARGS["prompt"], image, ARGS["negative_prompt"], noise_level=21, steps=3,
                             sampler=sampler, seed=4, output_type="np", progress=False)
        assert np.abs(mine - other).max() > 1e-3          # the noise level is seen (ᾱ_n and the label)


@pytest.mark.parity
def test_diffusers_folder_gives_the_same_image(upscaler, tmp_path):
    """diffusers' save_pretrained of the same model (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    low_res_scheduler/) read by our folder loader: the same config and image as the single file."""
    path, state, single, vocabulary = upscaler
    diffusers_upscaler(state, single.config, vocabulary).save_pretrained(tmp_path / "x4-folder")
    assert (tmp_path / "x4-folder" / "low_res_scheduler").is_dir()
    report = describe(tmp_path / "x4-folder")
    assert "kind:       sd-v2-upscaler" in report and "prediction: v_prediction" in report
    folder = load_pipeline(tmp_path / "x4-folder", tokenizer=ours_tokenizer(vocabulary))
    for field in ("kind", "prediction_type", "latent_scale", "beta_start", "beta_end", "unet", "vae"):
        assert getattr(folder.config, field) == getattr(single.config, field), field
    args = dict(noise_level=20, steps=2, sampler="ddim", seed=3, output_type="np", progress=False)
    a = single.upscale("a fox", sample_image(LOW, LOW), **args)
    b = folder.upscale("a fox", sample_image(LOW, LOW), **args)
    assert np.abs(a - b).max() < 1e-6       # measured 0.0: the same tensors through the same code


# ---------------------------------------------------------------------------------------------------------------
# Early, clear errors
# ---------------------------------------------------------------------------------------------------------------

def test_a_normal_model_refuses_upscale_naming_the_fix():
    pipe = load_pipeline()                                   # the bundled tiny model: 4-channel, no noise level
    with pytest.raises(ValueError, match=r"pipe.upscale needs the SD 2 ×4 upscaler.*load_pipeline\(path\)"):
        pipe.upscale("a fox", sample_image(16, 16))


@pytest.mark.parametrize("level", [351, -1, 20.5, True, "20", None])
def test_noise_level_outside_0_350_is_refused(level):
    with pytest.raises(ValueError, match=r"noise_level must be a whole number in \[0, 350\]"):
        plain_upscaler_pipe().upscale("a fox", sample_image(16, 16), noise_level=level)


def test_the_upscaler_refuses_the_other_tasks_before_any_work():
    pipe, image = plain_upscaler_pipe(), sample_image(16, 16)
    for run in (lambda: pipe.txt2img("a fox"), lambda: pipe.img2img("a fox", image),
                lambda: pipe.inpaint("a fox", image, image)):
        with pytest.raises(ValueError, match=r"×4 upscaler .*use pipe.upscale\(prompt, image, noise_level=20\)"):
            run()


def test_missing_or_wrong_image_is_refused():
    pipe = plain_upscaler_pipe()
    with pytest.raises(ValueError, match="needs the low-resolution image"):
        pipe.upscale("a fox")
    with pytest.raises(TypeError, match="image: expected a PIL image"):
        pipe.upscale("a fox", 42)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        pipe.upscale("a fox", np.zeros((2, 2, 3), dtype=np.float32))     # smaller than one latent pixel


def test_upscale_without_a_reference_library_runs_and_is_4x():
    """Our own upscaler (no file, no diffusers): 16² → 64², two images from one prompt, seeds reproduce."""
    pipe = plain_upscaler_pipe()
    args = dict(noise_level=0, steps=2, seed=7, output_type="pt", progress=False)
    a = pipe.upscale("a fox", sample_image(16, 12), num_images=2, **args)
    b = pipe.upscale("a fox", sample_image(16, 12), num_images=2, **args)
    assert a.shape == (2, 3, 64, 48) and torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_cli_upscale_writes_a_4x_png(tmp_path, capsys):
    """`ldm-scratch upscale PROMPT --image IMG --noise-level 20` on our own upscaler file (config in its metadata)."""
    from PIL import Image

    from ldm_scratch.cli import main
    config = tiny_upscaler_config()
    checkpoint = save_official(tmp_path / "up.safetensors", *random_networks(config, 0), config)
    image = tmp_path / "small.png"
    sample_image(16, 20).save(image)
    vocabulary = str(write_vocabulary(tmp_path / "tokenizer")[0].parent)
    common = ["a fox", "--checkpoint", str(checkpoint), "--image", str(image), "--vocab", vocabulary,
              "--steps", "2", "--seed", "1"]
    assert main(["upscale", *common, "--noise-level", "20", "--out", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size == (80, 64)
    assert main(["upscale", *common, "--noise-level", "400", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["upscale", *common, "--height", "64", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "noise_level must be a whole number in [0, 350]" in err and "takes no --height/--width" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Full size (slow): x4-upscaling.yaml's real shapes with random weights, 32² → 128², 2 steps
# ---------------------------------------------------------------------------------------------------------------

def full_size_upscaler_state(seed: int = 0) -> dict:
    """Random tensors in the official upscaler layout at full size: our UNet and VAE (tinymodels' init) with the
    yaml's sizes, OpenCLIP ViT-H's text tower as open_clip initialises it, the low_scale_model buffers."""
    from test_sd2_pipeline import full_size_v2_state
    unet_config = UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_levels=(1, 2, 3),
                             n_heads=8, context_dim=1024, linear_projection=True, num_classes=1000,
                             disable_self_attention=(0, 1, 2))      # the yaml's [True, True, True, False]
    state = full_size_v2_state(seed, unet_config=unet_config, vae_config=VAEConfig(channel_mult=(1, 2, 4)))
    state.update(low_scale_buffers())
    return state


@pytest.mark.slow
@pytest.mark.parity
def test_full_size_upscaler_matches_diffusers(tmp_path):
    """The official shapes (diffusers' own single-file code recognises the layout as "upscale"), 32² → 128², 2 DDIM
    steps, CFG 9, noise level 20. Measured max |ours − diffusers| (CPU float32, 1 thread): 1.4e-5; ours 7.2 s,
    diffusers 7.5 s per call, 63 s for the whole test with the full-size text tower (run under flock /tmp/heavy.lock)."""
    import time

    import diffusers
    from diffusers.loaders import single_file_utils as sfu
    from test_sd2_pipeline import SD2_SCHEDULER, reference_tokenizer
    from test_sd2_text import transformers_as_diffusers_converts
    state = full_size_upscaler_state()
    assert sfu.infer_diffusers_model_type(state) == "upscale"
    assert list(state["model.diffusion_model.input_blocks.0.0.weight"].shape) == [256, 7, 3, 3]
    assert list(state["model.diffusion_model.label_emb.weight"].shape) == [1000, 1024]
    assert list(state["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape) == [
        512, 1024]                                            # level 1: attn1 reads the 1024-wide context
    path = tmp_path / "x4-upscaler-ema.safetensors"
    save_file(state, str(path))
    vocabulary = write_vocabulary(tmp_path / "tokenizer")
    ours = load_pipeline(path, tokenizer=ours_tokenizer(vocabulary))
    c = ours.config
    assert (c.kind, c.prediction_type, c.latent_scale, c.unet.n_heads, c.unet.disable_self_attention) == (
        "sd-v2-upscaler", "v_prediction", 0.08333, 8, (1, 2))  # level 0 has no attention: nothing to disable
    import yaml
    original = yaml.safe_load((KEYS / "x4-upscaling.yaml").read_text())
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, state, scaling_factor=0.08333)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text_encoder = transformers_as_diffusers_converts(state, 1024, 16, 24)
    del state
    reference = diffusers.StableDiffusionUpscalePipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=reference_tokenizer(vocabulary), unet=unet.eval(),
        low_res_scheduler=diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        scheduler=diffusers.DDIMScheduler.from_config({**SD2_SCHEDULER, "beta_start": 0.0001, "beta_end": 0.02,
                                                       "prediction_type": "v_prediction"}))
    reference.set_progress_bar_config(disable=True)
    image = sample_image(32, 32, seed=2)
    start = time.perf_counter()
    mine = ours.upscale(ARGS["prompt"], image, ARGS["negative_prompt"], noise_level=20, steps=2, sampler="ddim",
                        seed=5, output_type="np", progress=False)
    middle = time.perf_counter()
    theirs = reference(**ARGS, image=image, noise_level=20, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(5), output_type="np").images
    print(f"\nours {middle - start:.1f} s, diffusers {time.perf_counter() - middle:.1f} s")
    assert mine.shape == (1, 128, 128, 3)
    compare(mine, theirs, "full-size ×4 upscaler ddim 32² → 128²")
