"""Issue 14, the pipeline's side of "errors that come late, wrongly, or not at all": every bad argument gets a
clear error (its type and the words that name the problem and the fix) before any network runs; the memory a size
needs is estimated and refused before it is allocated; a one-sided inpainting mask warns.

"Before any network runs" is checked, not assumed: the `pipe` fixture's UNet and VAE encoder/decoder raise if they
are called while a bad-input case runs.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scratch.arguments import MEMORY_LIMIT_ENV, estimate_memory, memory_limit
from ldm_scratch.configs import ModelConfig

from pipeline_fixtures import sample_image, sample_mask, tiny_pipeline, write_tiny_checkpoint, write_vocabulary

FAST = dict(steps=2, progress=False)
IMAGE = sample_image(64, 64)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    return tiny_pipeline(write_tiny_checkpoint(folder / "tiny.safetensors"), write_vocabulary(folder / "tokenizer"))


@pytest.fixture
def no_networks(pipe):
    """The networks refuse to run: an error must come from the checks, before any heavy work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network ran before the bad input was refused")
    handles = [m.register_forward_pre_hook(refuse) for m in (pipe.unet, pipe.vae.encoder, pipe.vae.decoder,
                                                              pipe.text_encoder)]
    yield pipe
    for handle in handles:
        handle.remove()


# (call, exception type, words of the message: a regular expression)
CASES = [
    # guidance_scale: a finite number
    (lambda p: p.txt2img("a fox", guidance_scale=float("nan"), **FAST), ValueError,
     "guidance_scale must be a finite number"),
    (lambda p: p.txt2img("a fox", guidance_scale=float("inf"), **FAST), ValueError, "finite number.*got inf"),
    (lambda p: p.txt2img("a fox", guidance_scale="7", **FAST), TypeError, "must be a number.*'7'.*float()"),
    (lambda p: p.txt2img("a fox", guidance_scale=None, **FAST), TypeError, "guidance_scale must be a number.*None"),
    (lambda p: p.img2img("a fox", IMAGE, guidance_scale=float("nan"), **FAST), ValueError, "guidance_scale"),
    # seed: an int in torch.Generator's range
    (lambda p: p.txt2img("a fox", seed=2**70, **FAST), ValueError, r"seed must be an int in 0 … 2\*\*64 − 1"),
    (lambda p: p.txt2img("a fox", seed=2**64 - 1, num_images=2, **FAST), ValueError, r"at most 2\*\*64 − 2"),
    (lambda p: p.txt2img("a fox", seed=-1, **FAST), ValueError, "seed must be an int in 0"),
    (lambda p: p.txt2img("a fox", seed="42", **FAST), TypeError, r"seed must be an int .*'42' \(str\)"),
    # counts: bools are not ints here
    (lambda p: p.txt2img("a fox", num_images=True, **FAST), TypeError, r"num_images must be an int ≥ 1, got True"),
    (lambda p: p.txt2img("a fox", steps=True, progress=False), TypeError, r"steps must be an int ≥ 1, got True"),
    (lambda p: p.txt2img("a fox", steps=2.0, progress=False), TypeError, r"steps must be an int.*\(float\)"),
    (lambda p: p.txt2img("a fox", num_images=0, **FAST), ValueError, "num_images must be an int ≥ 1, got 0"),
    # latents: a tensor or numpy array of the right shape, finite; checked before the image is encoded
    (lambda p: p.txt2img("a fox", latents=[[0.0]], **FAST), TypeError, "latents must be a torch tensor.*list"),
    (lambda p: p.txt2img("a fox", latents=np.zeros((1, 4, 8, 8)), height=32, **FAST), ValueError,
     r"latents must be a tensor of shape \[1, 4, 4, 8\].*got \[1, 4, 8, 8\]"),
    (lambda p: p.txt2img("a fox", latents=torch.full((1, 4, 8, 8), float("nan")), **FAST), ValueError,
     "latents hold NaN"),
    (lambda p: p.img2img("a fox", IMAGE, latents=torch.zeros(1, 4, 4, 4), **FAST), ValueError,
     r"latents must be a tensor of shape \[1, 4, 8, 8\]"),
    # strength: 0 denoises nothing, a bool is not a number
    (lambda p: p.img2img("a fox", IMAGE, strength=0, **FAST), ValueError, "strength 0 denoises nothing"),
    (lambda p: p.inpaint("a fox", IMAGE, sample_mask(64, 64), strength=0.0, **FAST), ValueError,
     "strength 0 denoises nothing.*above 0"),
    (lambda p: p.img2img("a fox", IMAGE, strength=True, **FAST), TypeError, "strength must be a number"),
    (lambda p: p.img2img("a fox", IMAGE, strength=float("nan"), **FAST), ValueError, r"strength must be in \[0, 1\]"),
    # images
    (lambda p: p.img2img("a fox", torch.rand(64, 64, 3), **FAST), ValueError, r"channels-first.*permute\(2, 0, 1\)"),
    (lambda p: p.img2img("a fox", np.full((64, 64, 3), np.nan, dtype=np.float32), **FAST), ValueError,
     "NaN or inf"),
    # sizes that cannot fit (the limit from this machine's memory, or the GPU's)
    (lambda p: p.txt2img("a fox", height=40000, width=40000, **FAST), ValueError,
     r"1 image\(s\) of 40000×40000 would need about \d+\.\d GiB.*limit.*LDM_SCRATCH_MAX_MEMORY_GB"),
]


@pytest.mark.parametrize("call, error, words", CASES)
def test_bad_input_is_refused_before_any_network_runs(no_networks, call, error, words):
    with pytest.raises(error, match=words):
        call(no_networks)


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------

def test_memory_estimate_formula():
    """SD v1 (C₀ = 128, C₁ = 256): 3·256 + 128 = 896 float32 numbers per pixel and image."""
    sd = ModelConfig()
    assert estimate_memory(sd, 1, 512, 512) == 512 * 512 * 896 * 4 == 896 * 2**20
    assert estimate_memory(sd, 2, 512, 512, itemsize=2) == 896 * 2**20            # half the bytes, twice the images
    assert round(estimate_memory(sd, 1, 6000, 6000) / 2**30) == 120


def test_a_6000_pixel_init_image_is_refused_before_encoding(no_networks, monkeypatch):
    """The tiny test model's VAE (C₀ = 32, C₁ = 64): 224 numbers per pixel, 30 GiB at 6000² in float32; with a
    2 GiB limit it is refused, and the message says how to get past it (a smaller size, the env variable)."""
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2")
    big = Image.new("RGB", (6000, 6000), "gray")
    with pytest.raises(ValueError, match=r"6000×6000 would need about 30\.0 GiB .* 2\.0 GiB limit "
                                         r"\(LDM_SCRATCH_MAX_MEMORY_GB=2\)\. Give a smaller height/width"):
        no_networks.img2img("a fox", big, **FAST)
    with pytest.raises(ValueError, match="would need about"):
        no_networks.inpaint("a fox", big, Image.new("L", (6000, 6000), 255), **FAST)


def test_the_memory_limit_can_be_raised_or_turned_off(pipe, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "0.001")                                    # 1 MiB: 64² needs 3.5 MiB
    with pytest.raises(ValueError, match="64×64 would need about"):
        pipe.txt2img("a fox", seed=0, **FAST)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "inf")
    assert pipe.txt2img("a fox", seed=0, output_type="np", **FAST).shape == (1, 64, 64, 3)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="LDM_SCRATCH_MAX_MEMORY_GB='lots' is not a number of GiB"):
        pipe.txt2img("a fox", seed=0, **FAST)
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    limit, source = memory_limit(torch.device("cpu"))
    assert source == "this machine's memory" and 2**28 < limit < float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Accepted inputs that used to misbehave
# ---------------------------------------------------------------------------------------------------------------

def test_numpy_latents_are_the_same_noise_as_a_tensor(pipe):
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from_tensor = pipe.txt2img("a fox", latents=eps, sampler="ddim", output_type="np", **FAST)
    from_array = pipe.txt2img("a fox", latents=eps.numpy(), sampler="ddim", output_type="np", **FAST)
    assert np.array_equal(from_tensor, from_array)


def test_a_channels_last_init_tensor_gives_the_same_image(pipe):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain = pipe.img2img("a fox", x, seed=3, output_type="np", **FAST)
    last = pipe.img2img("a fox", x.to(memory_format=torch.channels_last), seed=3, output_type="np", **FAST)
    assert np.array_equal(plain, last)


@pytest.mark.parametrize("fill, words", [(0, "all black .* nothing will be repainted"),
                                         (255, "all white .* the whole image will be repainted")])
def test_a_one_sided_inpainting_mask_warns(pipe, fill, words):
    with pytest.warns(UserWarning, match=words):
        pipe.inpaint("a fox", IMAGE, Image.new("L", (64, 64), fill), seed=0, **FAST)


def test_a_usual_mask_does_not_warn(pipe, recwarn):
    pipe.inpaint("a fox", IMAGE, sample_mask(64, 64), seed=0, **FAST)
    assert not [w for w in recwarn if "mask_image" in str(w.message)]


def test_a_sampler_built_for_the_other_prediction_type_is_refused(pipe):
    """A sampler made without the model's schedule would read a v-model's output as ε: a wrong image, silently."""
    from ldm_scratch.diffusion import Schedule, ScheduleConfig
    from ldm_scratch.samplers import get_sampler
    v_sampler = get_sampler("ddim", schedule=Schedule(ScheduleConfig(prediction_type="v_prediction")))
    with pytest.raises(ValueError, match="built for prediction_type='v_prediction'.*schedule=pipe.schedule"):
        pipe.txt2img("a fox", sampler=v_sampler, **FAST)
