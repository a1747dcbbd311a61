"""LoRA parity with diffusers: the same random LoRA file loaded into our pipeline (lora.load_lora) and into diffusers'
StableDiffusionPipeline (`load_lora_weights`, the scale applied the diffusers way with `set_adapters`) gives the
same image. Also: our table of layer names is exactly diffusers' / transformers' set of Linear and Conv2d layers.

Tiny random model for every format (fast); one full-size SD v1 case at 128² (slow)."""
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch import lora
from ldm_scratch.checkpoint.lora_keys import lora_targets
from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary
from test_lora import LAYERS, kohya_state, old_processor_spelling, to_peft
from test_pipeline_parity import SIZE, compare, diffusers_components, diffusers_pipeline, full_size_pair, noise

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_parity")
    vocabulary = write_vocabulary(folder / "tokenizer")
    path = write_tiny_checkpoint(folder / "tiny.safetensors", seed=3)
    ours = tiny_pipeline(path, vocabulary)
    return ours, diffusers_components(load_file(str(path)), ours.config, vocabulary), vocabulary


def test_our_layer_names_are_diffusers_layer_names(models):
    ours, components, _ = models
    table = lora_targets({"unet": ours.unet, "text_encoder": ours.text_encoder})
    layers = lambda net: {n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    ours_unet = {k.removeprefix("unet.") for k in table if k.startswith("unet.")}
    assert ours_unet == layers(components["unet"])
    text = layers(components["text_encoder"])
    text = {n if n.startswith("text_model.") else "text_model." + n for n in text}   # transformers ≥ 5.6: flat
    assert {k.removeprefix("text_encoder.") for k in table if k.startswith("text_encoder.text_model.")} == text


ARGS = dict(prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=7.5,
            height=SIZE, width=SIZE)
STEPS = 2


@pytest.fixture(scope="module")
def plain_image(models):
    return models[0].txt2img(**ARGS, steps=STEPS, sampler="ddim", latents=noise(1, SIZE, SIZE, seed=1),
                             output_type="np", progress=False)


def run_both(ours, components, path, scale, steps=STEPS):
    """Our image and diffusers' with the LoRA at `path` loaded at `scale`, then both LoRAs removed again."""
    args, eps = ARGS, noise(1, SIZE, SIZE, seed=1)
    name = lora.load_lora(ours, path, scale=scale)
    try:
        mine = ours.txt2img(**args, steps=steps, sampler="ddim", latents=eps, output_type="np", progress=False)
    finally:
        lora.unload_lora(ours, name)
    pipe = diffusers_pipeline("txt2img", components, "ddim")
    pipe.load_lora_weights(str(path), adapter_name="x")
    try:
        pipe.set_adapters(["x"], adapter_weights=[scale])
        reference = pipe(**args, num_inference_steps=steps, latents=eps.clone(), output_type="np").images
    finally:
        pipe.delete_adapters("x")
    return mine, reference


# Measured (CPU, torch 2.13, diffusers 0.42.1, peft 0.21.2, tiny model at 96², 2 DDIM steps): max |ours − diffusers|
# 6.0e-6 (kohya), 5.5e-6 (PEFT), 5.7e-6 (old processor names); the LoRA itself moves pixels by 0.19–0.61, so the
# pipelines' 1e-4 bound (test_pipeline_parity.TOLERANCE) tells a right update from a wrong one (a wrong α/r or scale
# is off by > 1e-2).
@pytest.mark.parametrize("spelling, scale", [("kohya", 0.8), ("peft", 1.3), ("old diffusers", 0.6)])
def test_lora_image_matches_diffusers(models, plain_image, tmp_path, spelling, scale):
    ours, components, _ = models
    state = kohya_state(ours, alpha=2.0 if spelling == "kohya" else None, seed=7)
    state = {"kohya": lambda s: s, "peft": to_peft, "old diffusers": lambda s: old_processor_spelling(to_peft(s))}[
        spelling](state)
    if spelling == "old diffusers":   # diffusers reads the old processor names only for attention layers
        state = {k: v for k, v in state.items() if "_lora." in k}
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    mine, reference = run_both(ours, components, path, scale)
    compare(mine, reference, f"LoRA ({spelling}, scale {scale})")
    effect = float(abs(mine - plain_image).max())
    print(f"the LoRA moves pixels by up to {effect:.3f}")
    assert effect > 1e-2, "the LoRA changed nothing: the comparison would prove nothing"


def test_two_loras_at_once_match_diffusers_adapters(models, plain_image, tmp_path):
    """Several LoRAs on the same layers add up: ours W + 0.8·Δ_a − 0.5·Δ_b, diffusers set_adapters([a, b],
    [0.8, −0.5]). Measured: max |ours − diffusers| = 8.3e-6 (same 1e-4 bound as above)."""
    ours, components, _ = models
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file(kohya_state(ours, seed=21), str(paths[0]))
    save_file(to_peft(kohya_state(ours, LAYERS[:8], alpha=None, seed=22)), str(paths[1]))
    eps = noise(1, SIZE, SIZE, seed=1)
    lora.load_lora(ours, paths[0], scale=0.8)
    lora.load_lora(ours, paths[1], scale=-0.5)
    try:
        mine = ours.txt2img(**ARGS, steps=STEPS, sampler="ddim", latents=eps, output_type="np", progress=False)
    finally:
        lora.unload_lora(ours)
    pipe = diffusers_pipeline("txt2img", components, "ddim")
    pipe.load_lora_weights(str(paths[0]), adapter_name="a")
    pipe.load_lora_weights(str(paths[1]), adapter_name="b")
    try:
        pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
        reference = pipe(**ARGS, num_inference_steps=STEPS, latents=eps.clone(), output_type="np").images
    finally:
        pipe.delete_adapters(["a", "b"])
    compare(mine, reference, "two LoRAs at once")
    assert float(abs(mine - plain_image).max()) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# full size (slow): random SD v1 weights in the official layout, a random kohya LoCon-style file
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_kohya_lora_matches_diffusers(tmp_path):
    ours, components, vocabulary = full_size_pair(tmp_path)
    # LAYERS names tiny-model layers that exist at full size too: attention, MLP, 1×1 and 3×3 convs,
    # time_emb_proj, down/upsample, text encoder attention and MLP (UNet and text encoder)
    lora_path = tmp_path / "locon.safetensors"
    save_file(kohya_state(ours, LAYERS, rank=8, alpha=4.0, seed=11), str(lora_path))
    args = dict(prompt="a watercolor fox", negative_prompt="blurry", guidance_scale=7.5, height=128, width=128)
    eps = noise(1, 128, 128, seed=5)
    start = time.perf_counter()
    lora.load_lora(ours, lora_path, scale=0.75)
    mine = ours.txt2img(**args, steps=2, sampler="ddim", latents=eps, output_type="np", progress=False)
    middle = time.perf_counter()
    pipe = diffusers_pipeline("txt2img", components, "ddim")
    pipe.load_lora_weights(str(lora_path), adapter_name="locon")
    pipe.set_adapters(["locon"], adapter_weights=[0.75])
    reference = pipe(**args, num_inference_steps=2, latents=eps.clone(), output_type="np").images
    print(f"\nours {middle - start:.1f} s, diffusers {time.perf_counter() - middle:.1f} s")
    # measured: max |ours − diffusers| = 1.25e-5 (image std 0.24; ours 110 s, diffusers 150 s on a loaded 2-core
    # machine), within the pipelines' 1e-4 (test_pipeline_parity.TOLERANCE)
    compare(mine, reference, "full-size kohya LoRA 128²")
