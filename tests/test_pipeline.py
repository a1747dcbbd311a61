"""The pipeline's own promises, on a tiny random model: seeds reproduce, a batch equals single runs, output types,
the callback, CFG batching, img2img's step count, mask blending keeps the known region, precision fallbacks, and a
clear error for every kind of bad input; on the bundled model, the fast path (load_pipeline's default) gives the
plain networks' images. (Equality with diffusers' images: test_pipeline_parity.py.)"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scratch import vae as vae_module
from ldm_scratch.images import images_to_tensor, masks_to_tensor
from ldm_scratch.pipeline import NonFiniteOutputError, load_pipeline

from pipeline_fixtures import sample_image, sample_mask, tiny_pipeline, write_tiny_checkpoint, write_vocabulary

FAST = dict(steps=2, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    return dict(vocabulary=write_vocabulary(folder / "tokenizer"),
                regular=write_tiny_checkpoint(folder / "tiny.safetensors"),
                inpainting=write_tiny_checkpoint(folder / "tiny-inpainting.safetensors", in_channels=9, seed=9))


@pytest.fixture(scope="module")
def pipe(files):
    return tiny_pipeline(files["regular"], files["vocabulary"])


@pytest.fixture(scope="module")
def pipe9(files):
    return tiny_pipeline(files["inpainting"], files["vocabulary"])


# ---------------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])   # euler_a also draws noise at every step
def test_same_seed_gives_bit_identical_images(pipe, sampler):
    first = pipe.txt2img("a red circle", sampler=sampler, seed=7, output_type="np", **FAST)
    again = pipe.txt2img("a red circle", sampler=sampler, seed=7, output_type="np", **FAST)
    other = pipe.txt2img("a red circle", sampler=sampler, seed=8, output_type="np", **FAST)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_a_batch_equals_single_runs_with_per_image_seeds(pipe, sampler):
    """seed=s for a batch of 3 images = seeds s, s+1, s+2 one at a time. The UNet sees a batch of 6 instead of 2,
    so float32 sums are grouped differently (batched matrix products): measured max diff 5.2e-6 (ddim) and 4.2e-6
    (euler_a) on CPU; 5e-5 leaves room for other BLAS builds and is far below the 1e-2 a different noise row makes."""
    size = dict(height=96, width=96)  # not 64²: see SIZE in test_pipeline_parity.py (ill-conditioned GroupNorm)
    batch = pipe.txt2img("a blue fox", num_images=3, sampler=sampler, seed=100, output_type="np", **size, **FAST)
    singles = np.concatenate([pipe.txt2img("a blue fox", sampler=sampler, seed=100 + i, output_type="np", **size,
                                           **FAST) for i in range(3)])
    assert np.abs(batch - singles).max() < 5e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-2      # and the images do differ


def test_img2img_batch_equals_single_runs(pipe):
    image = sample_image(96, 96)
    batch = pipe.img2img("a fox", image, num_images=2, seed=5, output_type="np", **FAST)
    singles = np.concatenate([pipe.img2img("a fox", image, seed=5 + i, output_type="np", **FAST) for i in range(2)])
    assert np.abs(batch - singles).max() < 5e-5          # measured 5.5e-6, as above


def test_generator_forms(pipe):
    """A list of generators = seeds; one generator draws the whole batch's ε in one go; latents= is that ε."""
    by_seed = pipe.txt2img("a fox", num_images=2, seed=3, sampler="ddim", output_type="np", **FAST)
    by_list = pipe.txt2img("a fox", num_images=2, sampler="ddim", output_type="np", **FAST,
                           generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    assert np.array_equal(by_seed, by_list)
    one = pipe.txt2img("a fox", num_images=2, sampler="ddim", output_type="np", **FAST,
                       generator=torch.Generator().manual_seed(3))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    explicit = pipe.txt2img("a fox", num_images=2, sampler="ddim", output_type="np", latents=eps, seed=999, **FAST)
    assert np.array_equal(one, explicit)                  # latents override the seed
    assert np.array_equal(one[0], by_seed[0])             # row 0 of one generator = the first seed's draw
    assert not np.allclose(one[1], by_seed[1])


# ---------------------------------------------------------------------------------------------------------------
# Outputs, callback, CFG batching, strength
# ---------------------------------------------------------------------------------------------------------------

def test_output_types_agree(pipe):
    args = dict(prompt=["a red circle", "a green square"], seed=1, height=64, width=96, **FAST)
    arrays = pipe.txt2img(**args, output_type="np")
    tensors = pipe.txt2img(**args, output_type="pt")
    images = pipe.txt2img(**args, output_type="pil")
    latents = pipe.txt2img(**args, output_type="latent")
    assert arrays.shape == (2, 64, 96, 3) and arrays.dtype == np.float32 and 0 <= arrays.min() <= arrays.max() <= 1
    assert tensors.shape == (2, 3, 64, 96) and torch.equal(tensors.permute(0, 2, 3, 1), torch.from_numpy(arrays))
    assert [im.size for im in images] == [(96, 64)] * 2 and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[1]), (arrays[1] * 255).round().astype(np.uint8))
    assert latents.shape == (2, 4, 8, 12)
    decoded = (pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(decoded, tensors)                  # "latent" is what the decoder then turns into the image


def test_default_size_is_the_models_native_resolution(pipe):
    assert pipe.txt2img("a fox", seed=0, output_type="np", **FAST).shape == (1, 64, 64, 3)


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.txt2img("a fox", seed=0, steps=3, sampler="ddim", progress=False,
                 callback=lambda i, t, x0_pred: seen.append((i, float(t), tuple(x0_pred.shape))))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == [667.0, 334.0, 1.0]    # DDIM, leading spacing, steps_offset 1 (SD v1.5)
    assert seen[0][2] == (1, 4, 8, 8)


@pytest.mark.parametrize("guidance_scale, rows", [(7.5, 4), (1.0, 2)])
def test_cfg_is_one_batched_unet_call_and_guidance_one_skips_it(pipe, guidance_scale, rows):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        pipe.txt2img("a fox", num_images=2, seed=0, guidance_scale=guidance_scale, sampler="ddim", **FAST)
    finally:
        handle.remove()
    assert calls == [rows, rows]                          # one UNet call per step: [uncond; cond] or cond alone


def test_cfg_follows_eq_4_4(pipe):
    """The guided ε̂ = ε(∅) + s·(ε(c) − ε(∅)): checked from the single-step DDIM update's x̂₀ at s = 0, 1, 3."""
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = {}
    for s in (0.0, 1.0, 3.0):
        got = []
        pipe.txt2img("a red circle", negative_prompt="blurry", guidance_scale=s, latents=eps, sampler="ddim",
                     steps=1, progress=False, output_type="latent", callback=lambda i, t, x: got.append(x))
        x0[s] = got[0]
    # x̂₀ is affine in ε̂, so x̂₀(s) = x̂₀(0) + s·(x̂₀(1) − x̂₀(0))
    torch.testing.assert_close(x0[3.0], x0[0.0] + 3.0 * (x0[1.0] - x0[0.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("strength, steps_run", [(0.5, 2), (0.75, 3), (1.0, 4)])
def test_img2img_runs_int_steps_times_strength(pipe, strength, steps_run):
    seen = []
    out = pipe.img2img("a fox", sample_image(64, 64), strength=strength, steps=4, seed=0, progress=False,
                       output_type="np", callback=lambda i, t, x: seen.append(i))
    assert len(seen) == steps_run and out.shape == (1, 64, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_mask_blending_keeps_the_known_region_exactly(pipe, sampler):
    """Regular model: after the last step the kept region (mask 0) is the image's own latents, bit for bit."""
    image, mask = sample_image(64, 64, seed=1), sample_mask(64, 64)
    latents = pipe.inpaint("a red circle", image, mask, seed=11, sampler=sampler, output_type="latent", **FAST)
    x = images_to_tensor([image], 64, 64, "image", 1)
    image_latents = pipe.encode_images(x, [torch.Generator().manual_seed(11)], 1)   # the first draw of seed 11
    keep = torch.nn.functional.interpolate(masks_to_tensor([mask], 64, 64, 1), size=(8, 8)) == 0
    keep = keep.expand_as(latents)
    assert torch.equal(latents[keep], image_latents[keep])
    assert (latents[~keep] - image_latents[~keep]).abs().max() > 0.1     # and the hole was repainted


def test_inpainting_model_uses_nine_channels_and_refuses_txt2img(pipe9):
    calls = []
    handle = pipe9.unet.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        out = pipe9.inpaint("a fox", sample_image(64, 64), sample_mask(64, 64), seed=0, output_type="np", **FAST)
    finally:
        handle.remove()
    assert out.shape == (1, 64, 64, 3) and calls[0] == (2, 9, 8, 8)
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        pipe9.txt2img("a fox", **FAST)


def test_images_of_another_size_are_resized_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="resizing it to 64×64"):
        out = pipe.inpaint("a fox", sample_image(128, 128), sample_mask(32, 32), height=64, width=64, seed=0,
                           output_type="np", **FAST)
    assert out.shape == (1, 64, 64, 3)
    # img2img defaults to the image's own size, rounded down to a multiple of 8 (diffusers' rule)
    with pytest.warns(UserWarning, match="resizing"):
        assert pipe.img2img("a fox", sample_image(67, 98), seed=0, output_type="np", **FAST).shape == (1, 64, 96, 3)


def test_mask_is_binarised_and_white_means_repaint():
    mask = Image.fromarray(np.array([[0, 127, 128, 255]] * 8, dtype=np.uint8).repeat(2, axis=1))
    values = masks_to_tensor([mask], 8, 8, 1)[0, 0, 0].tolist()
    assert values == [0, 0, 0, 0, 1, 1, 1, 1]             # ≥ 0.5 (128/255) → 1 = repaint


# ---------------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------------

def test_half_precision_vae_overflow_is_redone_in_float32(files):
    pipe = tiny_pipeline(files["regular"], files["vocabulary"])
    latents = pipe.txt2img("a fox", seed=0, output_type="latent", **FAST)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(1e5)        # activations far beyond float16's 65,504
    reference = pipe.decode_latents(latents)
    assert torch.isfinite(reference).all() and reference.abs().max() > 7e4
    pipe.vae.half()
    with pytest.warns(UserWarning, match="overflowed in torch.float16; redoing it in float32"):
        decoded = pipe.decode_latents(latents)
    assert pipe.vae_dtype == torch.float16                # the VAE is back in half precision afterwards
    # the fp32 redo sees fp16-rounded weights: relative error ~ 2⁻¹¹ of max |x|
    torch.testing.assert_close(decoded, reference, rtol=2e-3, atol=2e-3 * reference.abs().max().item())


def test_nan_latents_raise_instead_of_a_black_image(files):
    pipe = tiny_pipeline(files["regular"], files["vocabulary"])
    with torch.no_grad():
        pipe.unet.output_conv.bias[0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="NaN/inf"):
        pipe.txt2img("a fox", seed=0, **FAST)


def test_bfloat16_pipeline_runs_and_stays_close(files):
    pipe = load_pipeline(files["regular"], dtype=torch.bfloat16, tokenizer=files["vocabulary"])
    full = load_pipeline(files["regular"], tokenizer=files["vocabulary"])
    low = pipe.txt2img("a fox", seed=0, sampler="ddim", output_type="np", **FAST)
    high = full.txt2img("a fox", seed=0, sampler="ddim", output_type="np", **FAST)
    assert pipe.dtype == torch.bfloat16 and np.isfinite(low).all()
    assert np.abs(low - high).mean() < 0.05               # bfloat16 keeps ~3 digits


# ---------------------------------------------------------------------------------------------------------------
# The fast path: load_pipeline() against load_pipeline(fast=False), on the bundled model
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled(files):
    """The bundled tiny model (64² native: its decoder's last levels are taller than the fast path's 16-row bands,
    so they do run banded), read with the test vocabulary so no download is needed."""
    return dict(fast=load_pipeline(tokenizer=files["vocabulary"]),
                plain=load_pipeline(fast=False, tokenizer=files["vocabulary"]))


def test_fast_false_leaves_the_networks_plain(bundled):
    plain, fast = bundled["plain"], bundled["fast"]
    blocks = [m for m in plain.vae.modules() if isinstance(m, vae_module.ResBlock)]
    assert blocks and all(type(m) is vae_module.ResBlock for m in blocks)      # vae.py's own layers, not banded
    assert not any(type(m).__module__.startswith("ldm_scratch.fast") for net in (plain.unet, plain.vae)
                   for m in net.modules())
    assert any(type(m) is not vae_module.ResBlock for m in fast.vae.modules() if isinstance(m, vae_module.ResBlock))
    for pipe, channels_last in ((plain, False), (fast, True)):
        weights = [p for net in (pipe.unet, pipe.vae) for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1
                   and p.shape[-1] > 1]                                        # 3×3 convolutions: layout visible
        assert all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in weights)
        x = torch.randn(1, 4, 8, 8)
        with torch.inference_mode():
            eps = pipe.unet(x, torch.tensor(500), torch.zeros(1, 77, pipe.config.unet.context_dim))
        assert eps.is_contiguous(memory_format=torch.channels_last) == channels_last


# Measured (CPU, 1 and 2 threads, seeds 0/10/20/30 × 2 images, both samplers): max |fast − plain| over the [0, 1]
# pixel arrays 2.8e-5 (4 steps at 64²; 6.2e-5 at 128², not run here). The only differences are float32 rounding:
# channels_last convolutions add up in another order, and the banded decoder sums GroupNorm's statistics in two
# passes. 1e-4 leaves room for other BLAS builds and is 40× below one 8-bit level (1/255); a wrong band or halo
# row moves pixels by 1e-2 or more.
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])   # euler_a also draws noise at every step
def test_fast_and_plain_pipelines_give_the_same_images(bundled, sampler):
    args = dict(num_images=2, seed=10, sampler=sampler, steps=4, progress=False, output_type="np")  # seeds 10, 11
    fast = bundled["fast"].txt2img("a red circle on a blue background", **args)
    plain = bundled["plain"].txt2img("a red circle on a blue background", **args)
    assert fast.shape == plain.shape == (2, 64, 64, 3)
    assert np.abs(fast - plain).max() < 1e-4


def test_fast_and_plain_vae_decode_agree(bundled):
    """pipe.vae.decode(z) itself is on the fast path. Measured max |fast − plain| / max |plain| over 6 latent
    sizes (8…24 × 8…28, batch 2), 1 and 2 threads: 1.4e-5 (the rounding above); bound 5e-5."""
    z = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast, plain = bundled["fast"].vae.decode(z), bundled["plain"].vae.decode(z)
    factor = bundled["plain"].config.vae.downsample_factor
    assert fast.shape == plain.shape == (2, 3, 16 * factor, 24 * factor)
    assert ((fast - plain).abs().max() / plain.abs().max()).item() < 5e-5


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, message", [
    (lambda p: p.txt2img("a fox", height=60, **FAST), ValueError, "height must be a positive multiple of 8"),
    (lambda p: p.txt2img("a fox", width=0, **FAST), ValueError, "width must be a positive multiple of 8"),
    (lambda p: p.txt2img([], **FAST), ValueError, "empty list"),
    (lambda p: p.txt2img(["a", "b"], negative_prompt=["x", "y", "z"], **FAST), ValueError, "3 negative prompts"),
    (lambda p: p.txt2img("a fox", sampler="dpm_fast", **FAST), ValueError, "unknown sampler 'dpm_fast'"),
    (lambda p: p.txt2img("a fox", seed=1, generator=torch.Generator(), **FAST), ValueError, "not both"),
    (lambda p: p.txt2img("a fox", num_images=2, generator=[torch.Generator()], **FAST), ValueError, "one per image"),
    (lambda p: p.txt2img("a fox", latents=torch.zeros(1, 4, 4, 4), height=64, **FAST), ValueError,
     r"latents must be a tensor of shape \[1, 4, 8, 4\]"),
    (lambda p: p.txt2img("a fox", output_type="jpeg", **FAST), ValueError, "output_type"),
    (lambda p: p.img2img("a fox", sample_image(64, 64), strength=1.5, **FAST), ValueError,
     r"strength must be in \[0, 1\]"),
    (lambda p: p.img2img("a fox", sample_image(64, 64), strength=-0.1, **FAST), ValueError, "strength"),
    (lambda p: p.img2img("a fox", sample_image(64, 64), strength=0.2, **FAST), ValueError, "rounds down to 0 steps"),
    (lambda p: p.img2img("a fox", sample_image(64, 128), height=64, width=64, **FAST), ValueError,
     "aspect ratios differ"),
    (lambda p: p.inpaint("a fox", sample_image(64, 64), sample_mask(64, 32), **FAST), ValueError,
     "mask_image is 32×64 .* aspect ratios differ"),
    (lambda p: p.img2img("a fox", np.full((64, 64, 3), 2.0, dtype=np.float32), **FAST), ValueError, r"\[0, 1\]"),
])
def test_bad_input_is_explained(pipe, call, error, message):
    with pytest.raises(error, match=message):
        call(pipe)


def test_unreadable_or_missing_image_files(pipe, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read .*junk.png as an image"):
        pipe.img2img("a fox", junk, **FAST)
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        pipe.inpaint("a fox", sample_image(64, 64), tmp_path / "missing.png", **FAST)


def test_an_overlong_plain_prompt_warns(pipe):
    """prompt_syntax="plain" cuts at 75 tokens and says so; the default "a1111" reads every token in chunks of 75
    (tests/test_prompts.py), so it has nothing to warn about."""
    with pytest.warns(UserWarning, match="tokens long but CLIP reads at most 75"):
        pipe.txt2img("a " * 80, seed=0, prompt_syntax="plain", **FAST)
