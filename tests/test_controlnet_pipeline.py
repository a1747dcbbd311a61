"""ControlNet in the pipelines: the API (pipe.txt2img / img2img / inpaint with controlnet=…) and end-to-end parity
with diffusers' StableDiffusionControlNetPipeline, …Img2ImgPipeline and …InpaintPipeline on the same weights.

The tiny random SD model and a random ControlNet (every weight non-zero, zero convs included) are written in the
official layouts; diffusers' copies are made from the same tensors by its own single-file conversion
(tests/controlnet_fixtures.py, tests/test_pipeline_parity.py). Same starting noise or seeds, deterministic samplers.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from controlnet_fixtures import diffusers_controlnet, official_state, random_controlnet
from pipeline_fixtures import sample_image, sample_mask, tiny_pipeline, write_tiny_checkpoint, write_vocabulary

SIZE = 96   # as test_pipeline_parity: at 64² the tiny UNet's 1×1 deepest level makes GroupNorm ill-conditioned
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
# Measured (CPU, torch 2.13, diffusers 0.42.1, 96², 4 DDIM steps): max |ours − diffusers| over the [0, 1] image
# arrays: txt2img single 8.3e-6, multi 5.7e-6, guess mode 8.1e-6, window 6.6e-6; img2img 7.6e-6, img2img guess mode
# 9.8e-6; inpaint 8.8e-6; full size (128², 2 steps) 9.9e-6. The bound leaves room for other BLAS builds and is far
# below what a wrong scale, window or guess-mode rule changes (≥ 1e-2 on these random weights).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    from test_pipeline_parity import diffusers_components
    folder = tmp_path_factory.mktemp("cn-parity")
    vocabulary = write_vocabulary(folder / "tokenizer")
    path = write_tiny_checkpoint(folder / "tiny.safetensors", 4, seed=4)
    ours = tiny_pipeline(path, vocabulary)
    reference = diffusers_components(load_file(str(path)), ours.config, vocabulary)
    nets = [random_controlnet(ours.config.unet, seed=10 + k) for k in range(2)]
    reference_nets = [diffusers_controlnet(official_state(net, folder), ours.config.unet) for net in nets]
    hints = [sample_image(SIZE, SIZE, seed=20), sample_image(64, 64, seed=21)]   # the second one gets resized
    return ours, reference, nets, reference_nets, hints


def reference_pipeline(kind: str, components: dict, controlnet, sampler: str = "ddim"):
    import diffusers
    from test_pipeline_parity import SCHEDULERS, SD15_SCHEDULER_CONFIG
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(SD15_SCHEDULER_CONFIG)
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    # a list of ControlNets: the pipeline wraps it in its MultiControlNetModel (residuals summed)
    pipe = cls(**components, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours: np.ndarray, reference: np.ndarray, label: str) -> float:
    diff = float(np.abs(ours.astype(np.float64) - reference).max())
    print(f"\n{label}: max |ours − diffusers| = {diff:.2e}")
    assert diff < TOLERANCE, f"{label}: images differ by {diff:.3g}"
    return diff


CASES = {   # name → (which nets, our keyword arguments; diffusers' are derived from them)
    "single": ([0], dict(controlnet_scale=0.8)),
    "multi": ([0, 1], dict(controlnet_scale=[0.7, 1.2])),
    "guess_mode": ([0], dict(guess_mode=True, controlnet_scale=1.0)),
    "window": ([0], dict(control_start=0.25, control_end=0.6)),
}


def _arguments(setup, which, options):
    ours, reference, nets, reference_nets, hints = setup
    pick = lambda items: items[which[0]] if len(which) == 1 else [items[k] for k in which]
    theirs = dict(controlnet_conditioning_scale=options.get("controlnet_scale", 1.0),
                  guess_mode=options.get("guess_mode", False),
                  control_guidance_start=options.get("control_start", 0.0),
                  control_guidance_end=options.get("control_end", 1.0))
    return pick(nets), pick(reference_nets), pick(hints), theirs


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(setup, case):
    ours, reference, *_ = setup
    which, options = CASES[case]
    net, reference_net, hint, theirs = _arguments(setup, which, options)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    mine = ours.txt2img(PROMPT, NEGATIVE, steps=4, guidance_scale=7.5, sampler="ddim", latents=latents,
                        height=SIZE, width=SIZE, output_type="np", progress=False, controlnet=net,
                        control_image=hint, **options)
    pipe = reference_pipeline("txt2img", reference, reference_net)
    ref = pipe(PROMPT, image=hint, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
               latents=latents, height=SIZE, width=SIZE, output_type="np", **theirs).images
    compare(mine, ref, f"txt2img {case}")


@pytest.mark.parity
def test_control_changes_the_image(setup):
    """The comparison above can fail: with the ControlNet the image differs from the one without."""
    ours, _, nets, _, hints = setup
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    common = dict(steps=3, sampler="ddim", latents=latents, height=SIZE, width=SIZE, output_type="np",
                  progress=False)
    plain = ours.txt2img(PROMPT, **common)
    controlled = ours.txt2img(PROMPT, controlnet=nets[0], control_image=hints[0], **common)
    assert np.abs(plain - controlled).max() > 1e-2


@pytest.mark.parity
@pytest.mark.parametrize("case", ["single", "guess_mode"])
def test_img2img_matches_diffusers(setup, case):
    ours, reference, *_ = setup
    which, options = CASES[case]
    net, reference_net, hint, theirs = _arguments(setup, which, options)
    init = sample_image(SIZE, SIZE, seed=5)
    mine = ours.img2img(PROMPT, init, NEGATIVE, strength=0.75, steps=4, sampler="ddim", seed=3, output_type="np",
                        progress=False, controlnet=net, control_image=hint, **options)
    pipe = reference_pipeline("img2img", reference, reference_net)
    ref = pipe(PROMPT, image=init, control_image=hint, negative_prompt=NEGATIVE, strength=0.75,
               num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np", **theirs).images
    compare(mine, ref, f"img2img {case}")


@pytest.mark.parity
def test_inpaint_matches_diffusers(setup):
    ours, reference, *_ = setup
    net, reference_net, hint, theirs = _arguments(setup, [0], {})
    image, mask = sample_image(SIZE, SIZE, seed=6), sample_mask(SIZE, SIZE)
    mine = ours.inpaint(PROMPT, image, mask, NEGATIVE, steps=4, sampler="ddim", seed=3, output_type="np",
                        progress=False, controlnet=net, control_image=hint)
    pipe = reference_pipeline("inpaint", reference, reference_net)
    ref = pipe(PROMPT, image=image, mask_image=mask, control_image=hint, negative_prompt=NEGATIVE,
               num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np",
               height=SIZE, width=SIZE, **theirs).images
    compare(mine, ref, "inpaint")


# ---------------------------------------------------------------------------------------------------------------
# API: bad arguments are refused before anything runs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(control_image=Image.new("RGB", (SIZE, SIZE))), "without controlnet"),
    (dict(controlnet="net"), "needs control_image"),
    (dict(controlnet="net", control_image=Image.new("RGB", (SIZE, SIZE)), control_start=0.6, control_end=0.5),
     "0 ≤ start < end ≤ 1"),
    (dict(controlnet=["net", "net"], control_image=Image.new("RGB", (SIZE, SIZE))), "one per ControlNet"),
    (dict(controlnet="net", control_image=Image.new("RGB", (SIZE, SIZE)), controlnet_scale=[1.0, 2.0]),
     "controlnet_scale: got 2 values"),
])
def test_bad_controlnet_arguments(setup, options, message):
    ours, _, nets, _, _ = setup
    options = {k: ([nets[0]] * len(v) if v == ["net", "net"] else nets[0] if v == "net" else v)
               for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        ours.txt2img(PROMPT, steps=2, height=SIZE, width=SIZE, progress=False, **options)


def test_controlnet_for_another_unet_is_refused(setup):
    from ldm_scratch.unet import UNetConfig
    ours, *_ = setup
    other = random_controlnet(UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), n_heads=2, context_dim=32))
    with pytest.raises(ValueError, match="made for another UNet"):
        ours.txt2img(PROMPT, steps=2, height=SIZE, width=SIZE, progress=False, controlnet=other,
                     control_image=Image.new("RGB", (SIZE, SIZE)))


# ---------------------------------------------------------------------------------------------------------------
# full size (slow): SD v1's real shapes and an SD v1 ControlNet (361 M parameters), random weights, 128², 2 steps
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parity
def test_full_size_controlnet_txt2img_matches_diffusers(tmp_path):
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    from safetensors.torch import save_file
    from test_pipeline_parity import full_size_pair
    from ldm_scratch import load_controlnet

    ours, components, vocabulary = full_size_pair(tmp_path)
    net = random_controlnet(ours.config.unet, seed=1)           # SD v1's sizes: 8 heads, 32 groups, 3 stages
    tensors = official_state(net, tmp_path)
    del net
    cn_path = tmp_path / "control_sd15_random.safetensors"
    save_file(tensors, str(cn_path))                             # official layout, no metadata
    controlnet = load_controlnet(cn_path)                        # SD v1 defaults from the shapes
    reference_net = diffusers_controlnet(tensors, ours.config.unet)
    del tensors
    hint = sample_image(128, 128, seed=2)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mine = ours.txt2img(PROMPT, NEGATIVE, steps=2, sampler="ddim", latents=latents, height=128, width=128,
                        output_type="np", progress=False, controlnet=controlnet, control_image=hint,
                        controlnet_scale=0.9)
    ref = reference_pipeline("txt2img", components, reference_net)(
        PROMPT, image=hint, negative_prompt=NEGATIVE, num_inference_steps=2, latents=latents.clone(), height=128,
        width=128, output_type="np", controlnet_conditioning_scale=0.9).images
    compare(mine, ref, "full-size txt2img 128²")


# ---------------------------------------------------------------------------------------------------------------
# CLI: --controlnet PATH --control-image IMG [--control-scale S] [--control-preprocess canny]
# ---------------------------------------------------------------------------------------------------------------

def test_cli_generates_with_a_controlnet(setup, tmp_path):
    pytest.importorskip("cv2", reason="needs the [control] extra (opencv-python-headless)")
    from ldm_scratch.checkpoint.controlnet_file import save_controlnet
    from ldm_scratch.cli import main
    ours, _, nets, _, hints = setup
    folder = tmp_path / "tokenizer"
    vocab, merges = write_vocabulary(folder)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors", 4, seed=4)
    net_path = save_controlnet(tmp_path / "cn.safetensors", nets[0])
    hints[0].save(tmp_path / "hint.png")
    base = ["generate", PROMPT, "--checkpoint", str(checkpoint), "--vocab", str(vocab), "--steps", "2",
            "--sampler", "ddim", "--seed", "1", "--height", str(SIZE), "--width", str(SIZE)]
    assert main(base + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--out", str(tmp_path / "cn.png"), "--controlnet", str(net_path), "--control-image",
                        str(tmp_path / "hint.png"), "--control-scale", "0.8"]) == 0
    assert main(base + ["--out", str(tmp_path / "canny.png"), "--controlnet", str(net_path), "--control-image",
                        str(tmp_path / "hint.png"), "--control-preprocess", "canny"]) == 0
    plain, controlled = (np.asarray(Image.open(tmp_path / name), dtype=np.float32) for name in ("plain.png", "cn.png"))
    api = ours.txt2img(PROMPT, steps=2, sampler="ddim", seed=1, height=SIZE, width=SIZE, progress=False,
                       controlnet=nets[0], control_image=hints[0], controlnet_scale=0.8)[0]
    assert np.array_equal(np.asarray(api), controlled.astype(np.uint8))         # the CLI is the API
    assert np.abs(plain - controlled).max() > 2
    # one control image per ControlNet, checked before any model is loaded
    assert main(base + ["--out", str(tmp_path / "x.png"), "--controlnet", str(net_path)]) == 2
    assert not (tmp_path / "x.png").exists()
