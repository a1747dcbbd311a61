"""InstructPix2Pix (ldm_scratch/instruct.py): the three-way guidance, input checks, loading, the CLI, and parity
with diffusers' StableDiffusionInstructPix2PixPipeline on the same weights (tiny at 96², full size at 128², slow).
"""
import math
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_scratch.instruct import instruct_model_function
from pipeline_fixtures import sample_image, tiny_pipeline, write_tiny_checkpoint, write_vocabulary

INSTRUCTION = "a green square"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{in_channels: (path, pipeline)} for the 8-channel (instruct), 4-channel and 9-channel tiny models."""
    folder = tmp_path_factory.mktemp("instruct")
    vocabulary = write_vocabulary(folder / "tokenizer")
    out = {"vocabulary": vocabulary}
    for channels in (8, 4, 9):
        path = write_tiny_checkpoint(folder / f"tiny-{channels}.safetensors", channels, seed=channels)
        out[channels] = (path, tiny_pipeline(path, vocabulary))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the model function: batch order and the equation
# ---------------------------------------------------------------------------------------------------------------

class RecordingUNet:
    """A stand-in UNet whose ε depends on which context and image latents each row got, so the three ε's differ."""

    def __init__(self):
        self.inputs = None

    def __call__(self, x, t, context):
        self.inputs = (x.clone(), context.clone())
        image_part = x[:, 4:].mean(dim=(1, 2, 3), keepdim=True)
        text_part = context.mean(dim=(1, 2))[:, None, None, None]
        return x[:, :4] + 10 * image_part + 100 * text_part


def test_model_function_batch_order_and_three_way_equation():
    x, c_image = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3) + 1
    uncond, cond = torch.zeros(2, 5, 6), torch.ones(2, 5, 6)             # [∅; c_T] as StepContexts gives them
    unet = RecordingUNet()
    s_text, s_image = 7.5, 1.5
    eps = instruct_model_function(unet, torch.cat([uncond, cond]), c_image, s_text, s_image,
                                  dtype=torch.float32, guided=True)(x, torch.tensor(500))
    x_in, context = unet.inputs
    assert x_in.shape == (6, 8, 3, 3)
    torch.testing.assert_close(context, torch.cat([cond, uncond, uncond]), rtol=0, atol=0)        # [c_T, ∅, ∅]
    torch.testing.assert_close(x_in[:, 4:], torch.cat([c_image, c_image, torch.zeros_like(c_image)]),
                               rtol=0, atol=0)                                                 # [c_I, c_I, 0]
    e_text = x + 10 * c_image.mean(dim=(1, 2, 3), keepdim=True) + 100
    e_image = x + 10 * c_image.mean(dim=(1, 2, 3), keepdim=True)
    e_none = x
    expected = e_none + s_image * (e_image - e_none) + s_text * (e_text - e_image)
    torch.testing.assert_close(eps, expected)


def test_guidance_rescale_brings_the_three_way_result_to_the_conditional_std():
    """φ = 1: ε̃ rescaled per sample to the std of ε(c_I, c_T); φ = 0.7: the blend 0.7·rescaled + 0.3·ε̃; φ = 0 is
    the plain formula (the test above)."""
    generator = torch.Generator().manual_seed(0)
    x, c_image = torch.randn(2, 4, 3, 3, generator=generator), torch.rand(2, 4, 3, 3, generator=generator) + 1
    contexts = torch.cat([torch.zeros(2, 5, 6), torch.rand(2, 5, 6, generator=generator)])

    def unet(x_in, t, context):           # each condition scales ε, so the three ε's differ in std
        return x_in[:, :4] * (1 + x_in[:, 4:].mean(dim=(1, 2, 3), keepdim=True)
                              + context.mean(dim=(1, 2))[:, None, None, None])

    def eps(phi):
        return instruct_model_function(unet, contexts, c_image, 4.0, 6.0, dtype=torch.float32,
                                       guided=True, guidance_rescale=phi)(x, torch.tensor(500))
    plain, full, blend = eps(0.0), eps(1.0), eps(0.7)
    e_text = unet(torch.cat([x, c_image], dim=1), None, contexts[2:])         # ε(c_I, c_T)
    std = lambda e: e.std(dim=(1, 2, 3))
    torch.testing.assert_close(std(full), std(e_text))
    torch.testing.assert_close(full, plain * (std(e_text) / std(plain))[:, None, None, None])
    torch.testing.assert_close(blend, 0.7 * full + 0.3 * plain)
    assert (std(plain) - std(e_text)).abs().min() > 1e-2                     # the rescale did something


@pytest.mark.parametrize("phi", [-0.1, 1.5, "0.7", True])
def test_refuses_bad_guidance_rescale(tiny, phi):
    with pytest.raises(ValueError, match="guidance_rescale must be a number in \\[0, 1\\]"):
        tiny[8][1].instruct(sample_image(64, 64), INSTRUCTION, guidance_rescale=phi, steps=1, progress=False)


def test_model_function_unguided_is_one_conditional_call():
    x, c_image, cond = torch.randn(1, 4, 3, 3), torch.rand(1, 4, 3, 3), torch.ones(1, 5, 6)
    unet = RecordingUNet()
    eps = instruct_model_function(unet, cond, c_image, 1.0, 1.0, dtype=torch.float32, guided=False)(x, torch.tensor(1))
    assert unet.inputs[0].shape == (1, 8, 3, 3)
    torch.testing.assert_close(eps, x + 10 * c_image.mean() + 100)


def test_scales_one_one_equals_the_guided_formula(tiny):
    """s_T = s_I = 1 skips the three-way batch; the formula gives ε(c_I, c_T) alone, so the results agree."""
    _, pipe = tiny[8]
    image = sample_image(64, 64, seed=1)
    args = dict(steps=1, sampler="ddim", seed=3, output_type="latent", progress=False)
    fast = pipe.instruct(image, INSTRUCTION, guidance_scale=1.0, image_guidance_scale=1.0, **args)
    nearly = pipe.instruct(image, INSTRUCTION, guidance_scale=1.0, image_guidance_scale=1.0 + 1e-7, **args)
    assert (fast - nearly).abs().max() < 1e-4
    guided = pipe.instruct(image, INSTRUCTION, **args)
    assert (fast - guided).abs().max() > 1e-2           # the guidance changes the result


def test_instruct_runs_and_is_reproducible(tiny):
    _, pipe = tiny[8]
    image = sample_image(48, 64, seed=2)
    first = pipe.instruct(image, [INSTRUCTION, "a red circle"], num_images=2, steps=1, seed=5, output_type="np",
                          progress=False)
    assert first.shape == (4, 48, 64, 3) and np.isfinite(first).all()
    again = pipe.instruct(image, [INSTRUCTION, "a red circle"], num_images=2, steps=1, seed=5, output_type="np",
                          progress=False)
    np.testing.assert_array_equal(first, again)          # same code, same dtype, same seeds


def test_strength_starts_from_the_image_latents(tiny):
    """strength s: the sampler starts from z = latent_scale·E(x).mode noised to the first step that runs, as
    img2img. A small strength (1 low-noise step of 20) returns nearly z; None starts from pure noise; strength 1
    runs every step and differs from None only by the image's signal left at the first timestep."""
    _, pipe = tiny[8]
    image = sample_image(64, 64, seed=4)
    args = dict(steps=20, sampler="ddim", seed=2, output_type="latent", progress=False)
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        z = pipe.latent_scale * pipe.vae.encode(x).mode()
    near = pipe.instruct(image, INSTRUCTION, strength=0.05, **args)
    noise_start = pipe.instruct(image, INSTRUCTION, **args)
    full = pipe.instruct(image, INSTRUCTION, strength=1.0, **args)
    distance = lambda latents: (latents - z).abs().mean().item()
    assert distance(near) < 0.2 * distance(noise_start)          # measured 0.037 against 13 (random weights)
    assert 0 < (full - noise_start).abs().max()


@pytest.mark.parametrize("strength, error", [(0.0, ValueError), (1.5, ValueError), ("1", TypeError)])
def test_refuses_bad_strength(tiny, strength, error):
    with pytest.raises(error, match="strength"):
        tiny[8][1].instruct(sample_image(64, 64), INSTRUCTION, strength=strength, steps=2, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors before any network runs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, words", [(4, "regular text-to-image model"), (9, "inpainting model")])
def test_refuses_a_model_without_image_channels(tiny, channels, words):
    _, pipe = tiny[channels]
    with pytest.raises(ValueError, match=f"InstructPix2Pix checkpoint.*{words}"):
        pipe.instruct(sample_image(64, 64), INSTRUCTION, steps=1, progress=False)


def test_refuses_a_missing_image(tiny):
    with pytest.raises(ValueError, match="needs the image to edit"):
        tiny[8][1].instruct(None, INSTRUCTION, steps=1, progress=False)


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf, "1.5", True])
def test_refuses_bad_image_guidance(tiny, scale):
    with pytest.raises(ValueError, match="image_guidance_scale must be a finite number ≥ 0"):
        tiny[8][1].instruct(sample_image(64, 64), INSTRUCTION, image_guidance_scale=scale, steps=1, progress=False)


def test_refuses_bad_text_guidance(tiny):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        tiny[8][1].instruct(sample_image(64, 64), INSTRUCTION, guidance_scale=math.nan, steps=1, progress=False)


def test_refuses_latents_of_the_wrong_shape(tiny):
    with pytest.raises(ValueError, match="latents"):
        tiny[8][1].instruct(sample_image(64, 64), INSTRUCTION, latents=torch.zeros(1, 4, 4, 4), steps=1,
                            progress=False)


# ---------------------------------------------------------------------------------------------------------------
# inspect and the command line
# ---------------------------------------------------------------------------------------------------------------

def test_inspect_names_an_instruct_checkpoint(tiny):
    from ldm_scratch.checkpoint.inspection import describe
    assert "InstructPix2Pix" in describe(tiny[8][0])
    assert "InstructPix2Pix" not in describe(tiny[4][0])


def test_cli_instruct_writes_a_png(tiny, tmp_path, capsys):
    from ldm_scratch.cli import main
    image = tmp_path / "in.png"
    sample_image(64, 64).save(image)
    vocabulary_folder = str(tiny["vocabulary"][0].parent)
    common = ["--image", str(image), "--vocab", vocabulary_folder, "--steps", "2", "--seed", "1"]
    out = tmp_path / "edited.png"
    assert main(["instruct", INSTRUCTION, *common, "--checkpoint", str(tiny[8][0]), "--image-guidance", "1.2",
                 "--out", str(out)]) == 0
    from PIL import Image
    assert Image.open(out).size == (64, 64)
    assert main(["instruct", INSTRUCTION, *common, "--checkpoint", str(tiny[4][0]), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "needs an InstructPix2Pix checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------------------------

# Measured (CPU, torch 2.13, diffusers 0.42.1, tiny model at 96², 3 steps, 2 threads): max |ours − diffusers| over
# the image arrays 1.07e-5 (euler), 5.4e-6 (ddim, batch 2), 1.12e-5 (euler_a), 4.2e-6 (dpmpp_2m, s_I = 1): the same
# float32 operations in a different order. 1e-4 (as the pipeline parity tests) leaves a margin for other BLAS builds;
# a wrong batch order, a latent scale on c_I or a sampled (not mode) c_I moves pixels by > 1e-2.
TOLERANCE = 1e-4


def diffusers_instruct(components: dict, sampler: str):
    import diffusers
    from test_pipeline_parity import SCHEDULERS, SD15_SCHEDULER_CONFIG
    names = {**SCHEDULERS, "euler_a": "EulerAncestralDiscreteScheduler"}
    scheduler = getattr(diffusers, names[sampler]).from_config(SD15_SCHEDULER_CONFIG)
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**components, scheduler=scheduler, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours: np.ndarray, reference: np.ndarray, label: str, tolerance: float = TOLERANCE) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    print(f"\n{label}: max |ours − diffusers| = {diff:.2e} (image std {reference.std():.3f})")
    assert diff < tolerance, f"{label}: images differ by {diff:.3g}"
    return diff


@pytest.fixture(scope="module")
def reference(tiny):
    from test_pipeline_parity import diffusers_components
    path, ours = tiny[8]
    return diffusers_components(load_file(str(path)), ours.config, tiny["vocabulary"])


@pytest.mark.parity
@pytest.mark.parametrize("sampler, s_text, s_image, batch", [
    ("euler", 7.5, 1.5, 1), ("ddim", 5.0, 2.0, 2), ("euler_a", 7.5, 1.5, 1), ("dpmpp_2m", 3.0, 1.0, 1)])
def test_instruct_matches_diffusers(tiny, reference, sampler, s_text, s_image, batch):
    _, ours = tiny[8]
    image = sample_image(96, 96, seed=4)
    args = dict(negative_prompt="blurry", guidance_scale=s_text, image_guidance_scale=s_image)
    mine = ours.instruct(image, INSTRUCTION, **args, steps=3, sampler=sampler, seed=30, num_images=batch,
                         output_type="np", progress=False)
    generators = [torch.Generator().manual_seed(30 + i) for i in range(batch)]   # our seed: image i ↔ 30 + i
    theirs = diffusers_instruct(reference, sampler)(
        prompt=INSTRUCTION, image=image, **args, num_inference_steps=3, num_images_per_prompt=batch,
        generator=generators, output_type="np").images
    compare(mine, theirs, f"instruct {sampler} s_T {s_text} s_I {s_image} batch {batch}")


@pytest.mark.parity
def test_diffusers_folder_loads_the_same_model(tiny, reference, tmp_path):
    """An InstructPix2Pix diffusers folder (written by diffusers' save_pretrained) gives our single file's result."""
    _, ours = tiny[8]
    diffusers_instruct(reference, "euler").save_pretrained(tmp_path / "folder", safe_serialization=True)
    from ldm_scratch.pipeline import load_pipeline
    folder = load_pipeline(tmp_path / "folder", tokenizer=tiny["vocabulary"])
    assert folder.config.unet.in_channels == 8
    image = sample_image(96, 96, seed=6)
    args = dict(steps=2, sampler="euler", seed=1, output_type="np", progress=False)
    # the same tensors through two loaders: identical (measured 0.0)
    np.testing.assert_array_equal(folder.instruct(image, INSTRUCTION, **args),
                                  ours.instruct(image, INSTRUCTION, **args))


@pytest.mark.parity
@pytest.mark.slow
def test_full_size_instruct_matches_diffusers(tmp_path):
    """SD v1's real shapes with an 8-channel input convolution, random weights, official layout WITHOUT our
    metadata (so the config comes from the shapes, as for instruct-pix2pix-00-22000.safetensors); 128², 2 steps."""
    from safetensors.torch import save_file
    from synthetic_checkpoint import synthetic_state
    from test_pipeline_parity import diffusers_components
    from ldm_scratch.pipeline import load_pipeline

    state = synthetic_state(seed=0)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.randn(320, 8, 3, 3, generator=torch.Generator().manual_seed(1)) / math.sqrt(8 * 9)
    path = tmp_path / "instruct-full.safetensors"
    save_file(state, str(path))
    vocabulary = write_vocabulary(tmp_path / "tokenizer")
    ours = load_pipeline(path, tokenizer=vocabulary)
    assert ours.config.unet.in_channels == 8
    components = diffusers_components(state, ours.config, vocabulary)
    del state
    image = sample_image(128, 128, seed=7)
    args = dict(negative_prompt="blurry", guidance_scale=7.5, image_guidance_scale=1.5)
    start = time.perf_counter()
    mine = ours.instruct(image, "a watercolor fox", **args, steps=2, sampler="euler", seed=3, output_type="np",
                         progress=False)
    middle = time.perf_counter()
    theirs = diffusers_instruct(components, "euler")(
        prompt="a watercolor fox", image=image, **args, num_inference_steps=2,
        generator=torch.Generator().manual_seed(3), output_type="np").images
    print(f"\nours {middle - start:.1f} s, diffusers {time.perf_counter() - middle:.1f} s")
    # measured: max diff 1.42e-5 (CPU, 2 threads; ~5 s for each pipeline, 46 s for the whole test with loading)
    compare(mine, theirs, "full-size instruct euler 128²")
