"""LCM (latent consistency models): the `lcm` sampler step for step against diffusers' LCMScheduler, its own rules
(timestep grid, boundary condition, limits), and the full LCM UNet's guidance embedding (`time_embedding.cond_proj`)
against diffusers' UNet2DConditionModel with `time_cond_proj_dim`, loaded from a diffusers folder.

Measured max relative difference over the whole trajectory (max |ours − theirs| / max |theirs|, float32 state):
txt2img 1–8 steps ≤ 4.0e-7, img2img ≤ 8.0e-7, v-prediction 4.1e-7; diffusers keeps β and ᾱ in float32 (ours are
float64). Tolerance 1e-5 as tests/test_sampler_parity.py: noise from another draw moves the states by 1.46
(relative), a wrong timestep by far more than 1e-5.
"""

import pytest
import torch

from ldm_scratch.diffusion import Schedule, ScheduleConfig
from ldm_scratch.samplers import LCM, get_sampler
from ldm_scratch.samplers.lcm import consistency_scalings

diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
LCM_CONFIG = {  # SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json (LCM-LoRA uses SD 1.5's: same numbers)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "original_inference_steps": 50, "set_alpha_to_one": True, "steps_offset": 1, "clip_sample": False,
    "timestep_scaling": 10.0, "prediction_type": "epsilon",
}


def model(x_t, t):
    """A t-dependent nonlinearity (not an optimum of anything), so both the input and the timestep count."""
    return 0.8 * x_t - 0.2 + 0.1 * torch.sin(x_t * (float(t) + 1) / 300)


def reference(**config):
    return diffusers.LCMScheduler.from_config({**LCM_CONFIG, **config})


def run_reference(noise, steps, seed, x0=None, strength=1.0, **config):
    """diffusers' LatentConsistencyModel(Img2Img)Pipeline loop on the scheduler alone → (states, denoised's)."""
    sched = reference(**config)
    sched.set_timesteps(steps, strength=strength)
    x = noise * sched.init_noise_sigma if x0 is None else sched.add_noise(x0, noise, sched.timesteps[:1])
    generator, states, denoised = torch.Generator().manual_seed(seed), [], []
    for t in sched.timesteps:
        x, d = sched.step(model(x, t), t, x, generator=generator, return_dict=False)
        states.append(x)
        denoised.append(d)
    return states, denoised


def run_ours(noise, steps, seed, x0=None, strength=1.0, sampler=None):
    sampler, states, denoised = sampler or get_sampler("lcm"), [], []
    out = sampler.sample(model, noise, steps, generator=torch.Generator().manual_seed(seed), x0=x0, strength=strength,
                         callback=lambda i, t, x0_pred: denoised.append(x0_pred),
                         after_step=lambda i, x: states.append(x) or x)
    assert torch.equal(out, states[-1]) and torch.equal(out, denoised[-1])  # the last step ends on f(x, τ)
    return states, denoised


def relative_difference(ours, theirs):
    assert len(ours) == len(theirs)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)) / max(x.abs().max().item() for x in theirs)


def noise(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_txt2img_trajectory_equals_diffusers(steps):
    ours, theirs = run_ours(noise(), steps, 1), run_reference(noise(), steps, 1)
    assert relative_difference(ours[0], theirs[0]) < TOL   # the states (noise re-injected between steps)
    assert relative_difference(ours[1], theirs[1]) < TOL   # f(x_τ, τ) at every step: what the callback shows


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_img2img_trajectory_equals_diffusers(strength):
    """LCM's img2img rule: the grid is cut by strength and all 4 steps run (not int(4 × strength) of them)."""
    x0 = noise(5)
    ours, theirs = run_ours(noise(), 4, 1, x0=x0, strength=strength), run_reference(noise(), 4, 1, x0, strength)
    assert len(ours[0]) == 4 and relative_difference(ours[0], theirs[0]) < TOL


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_v_prediction_equals_diffusers():
    sampler = LCM(Schedule(ScheduleConfig(prediction_type="v_prediction")))
    ours = run_ours(noise(), 4, 1, sampler=sampler)
    theirs = run_reference(noise(), 4, 1, prediction_type="v_prediction")
    assert relative_difference(ours[0], theirs[0]) < TOL


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_timestep_lists_equal_diffusers():
    """Every step count the grid allows, three strengths and two distillation grids: the same integers."""
    for original_steps in (50, 32):
        for strength in (1.0, 0.75, 0.3):
            sched, sampler = reference(original_inference_steps=original_steps), LCM(original_steps=original_steps)
            for steps in range(1, int(original_steps * strength) + 1):
                sched.set_timesteps(steps, strength=strength)
                assert sampler.timesteps(steps, strength).tolist() == sched.timesteps.tolist(), (steps, strength)
    assert LCM().timesteps(4).tolist() == [999, 759, 499, 259]


def test_consistency_scalings_meet_the_boundary_condition():
    assert consistency_scalings(0.0) == (1.0, 0.0)  # f(x, 0) = x exactly
    c_skip, c_out = consistency_scalings(19.0)  # s·t = 190: σ_d²/(190² + σ_d²), 190/√(190² + σ_d²)
    assert c_skip == pytest.approx(0.25 / 36100.25, rel=1e-12) and c_out == pytest.approx(190 / 36100.25**0.5)
    assert consistency_scalings(1.0, timestep_scaling=1.0)[0] == pytest.approx(0.2)  # 0.25 / 1.25


def test_noise_between_steps_comes_from_the_generator():
    a, b, c = (get_sampler("lcm").sample(model, noise(), 4, generator=torch.Generator().manual_seed(s))
               for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    one = [get_sampler("lcm").sample(model, noise(), 1, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    assert torch.equal(*one)  # a single step draws nothing


def test_mask_blend_keeping_everything_returns_x0():
    sampler, x_T, x0 = get_sampler("lcm"), noise(), noise(9)
    out = sampler.sample(model, x_T, 4, after_step=lambda i, x: sampler.noise_to_level(x0, x_T, i),
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0)


def test_bad_step_counts_and_options_are_refused_before_any_model_call():
    def never(x, t):
        raise AssertionError("the model was called")

    with pytest.raises(ValueError, match="use steps ≤ 50"):
        get_sampler("lcm").sample(never, noise(), 51)
    with pytest.raises(ValueError, match=r"50 × strength 0.1 = 5 timesteps; use steps ≤ 5"):
        get_sampler("lcm").sample(never, noise(), 6, x0=noise(1), strength=0.1)
    with pytest.raises(ValueError, match="strength must be in"):
        get_sampler("lcm").sample(never, noise(), 4, x0=noise(1), strength=0.0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        get_sampler("lcm").check_steps(0)
    with pytest.raises(ValueError, match="original_steps must be an int in 1 … 1000"):
        get_sampler("lcm", original_steps=1001)
    with pytest.raises(ValueError, match="does not take option"):
        get_sampler("lcm", timestep_spacing="trailing")  # LCM has its own grid
    get_sampler("lcm").check_steps(50)


# ---------------------------------------------------------------------------------------------------------------
# The full LCM UNet: the guidance scale enters through time_embedding.cond_proj
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_guidance_embedding_equals_diffusers_lcm_pipeline():
    """unet.guidance_embedding(w) against LatentConsistencyModelPipeline.get_guidance_scale_embedding(w − 1), which
    the pipeline feeds as timestep_cond (measured max |difference| 0, dims 256 and 15; bound: float32 rounding)."""
    from diffusers import LatentConsistencyModelPipeline

    from ldm_scratch.unet import guidance_embedding
    w = torch.tensor([1.0, 1.5, 4.0, 8.0, 8.5])
    for dim in (256, 15):  # an odd width gets a zero column
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), theirs, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """A tiny SD v1 diffusers folder whose UNet is a full LCM UNet (time_cond_proj_dim 16, random cond_proj)."""
    pytest.importorskip("transformers", reason="needs the [reference] extra")
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm_scratch.checkpoint import save_official
    from reference_models import reference_networks
    from tinymodels import random_networks, tiny_config
    root = tmp_path_factory.mktemp("lcm")
    config = tiny_config()
    single = save_official(root / "tiny.safetensors", *random_networks(config, seed=3), config)
    text_encoder, unet, vae = reference_networks(load_file(single), config)
    lcm_unet = UNet2DConditionModel(**{**unet.config, "time_cond_proj_dim": 16})
    state = unet.state_dict()
    state["time_embedding.cond_proj.weight"] = torch.randn(32, 16, generator=torch.Generator().manual_seed(4)) / 4
    lcm_unet.load_state_dict(state, strict=True)
    folder = root / "tiny-lcm"
    lcm_unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder, lcm_unet.eval()


@pytest.mark.parity
def test_full_lcm_unet_loads_from_a_diffusers_folder_and_equals_diffusers(lcm_folder):
    """One UNet call with the guidance embedding, ours (loaded strictly from the folder) against diffusers'.
    Measured max |difference| 1.6e-6 on outputs up to 2.3 (float32 rounding); bound 2e-5. A guidance scale of 2
    instead of 8 moves the output by > 1e-2 (asserted below), so the bound does see the guidance path."""
    from diffusers import LatentConsistencyModelPipeline

    from ldm_scratch.checkpoint import load_models
    folder, theirs = lcm_folder
    loaded = load_models(folder)
    assert loaded.config.unet.guidance_embed_dim == 16
    assert torch.equal(loaded.unet.time_embedding.guidance_proj.weight, theirs.time_embedding.cond_proj.weight)
    g = torch.Generator().manual_seed(0)
    z, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor(759)
    with torch.no_grad():
        outputs = {}
        for w in (2.0, 8.0):
            w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1] * 2), 16)
            reference = theirs(z, t, encoder_hidden_states=context, timestep_cond=w_emb).sample
            outputs[w] = loaded.unet(z, t, context, guidance=w)
            torch.testing.assert_close(outputs[w], reference, rtol=0, atol=2e-5)
        assert (outputs[2.0] - outputs[8.0]).abs().max() > 1e-2  # the guidance scale does reach the network
        with pytest.raises(ValueError, match="full LCM UNet needs the guidance scale"):
            loaded.unet(z, t, context)


def test_a_plain_unet_refuses_a_guidance_scale():
    from ldm_scratch.unet import UNet
    from tinymodels import tiny_config
    unet = UNet(tiny_config().unet)
    with pytest.raises(ValueError, match="no guidance embedding"):
        unet(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 77, 32), guidance=8.0)


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_full_lcm_pipeline_equals_diffusers(lcm_folder, tmp_path):
    """End to end: a full LCM UNet makes one UNet call per step with the guidance scale embedded (no CFG), with the
    LCM sampler and the same seed → the same latents as diffusers' LatentConsistencyModelPipeline. Measured max
    |difference| 6.1e-5 on latents up to 107 (the tiny random model's), 5.7e-7 relative; bound 1e-5 relative, as
    the sampler's own parity."""
    import transformers

    import ldm_scratch
    from pipeline_fixtures import write_vocabulary
    folder, _ = lcm_folder
    vocabulary = write_vocabulary(tmp_path)
    ours = ldm_scratch.load_pipeline(folder, tokenizer=vocabulary, fast=False)
    calls = []
    ours.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    theirs = diffusers.LatentConsistencyModelPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer(*map(str, vocabulary), model_max_length=77),
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=reference(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    size = ours.config.image_size
    mine = ours.txt2img("a red circle", steps=4, sampler="lcm", guidance_scale=8.0, seed=3, height=size, width=size,
                        output_type="latent", progress=False)
    assert calls == [1, 1, 1, 1]  # batch 1 in every call: no unconditional half
    expected = theirs("a red circle", num_inference_steps=4, guidance_scale=8.0, height=size, width=size,
                      generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert (mine - expected).abs().max() / expected.abs().max() < 1e-5
