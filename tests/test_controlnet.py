"""ControlNet: the network (controlnet.py), the residuals in the UNet, the glue (control.py), strict loading of the
official and diffusers layouts (checkpoint/controlnet_*.py), `inspect`, preprocessing and the training command."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_fixtures import diffusers_controlnet, official_state, random_controlnet, write_official
from ldm_scratch.checkpoint import CheckpointError, describe
from ldm_scratch.checkpoint.controlnet_file import load_controlnet, save_controlnet
from ldm_scratch.control import Control, ControlledUNet
from ldm_scratch.control_images import as_is, canny, control_tensor, invert_scribble
from ldm_scratch.controlnet import ControlNet, ControlNetConfig
from ldm_scratch.unet import UNet, UNetConfig
from tinymodels import randomize, tiny_config

UNET = tiny_config().unet                      # 4 levels of 32…64 channels, SD v1's topology: 12 skips
SD_V1 = UNetConfig()


def inputs(batch=2, side=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor([10.0, 700.0])[:batch],
            torch.randn(batch, 77, 32, generator=g), torch.rand(batch, 3, 8 * side, 8 * side, generator=g))


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

def test_sd_v1_hint_encoder_and_zero_convs():
    """3→16→16→32/2→32→96/2→96→256/2→320, and one zero 1×1 conv per UNet skip (12) plus the middle one."""
    with torch.device("meta"):
        net = ControlNet(ControlNetConfig(SD_V1))
    hint = net.hint_encoder
    convs = [hint.conv_in] + [conv for stage in hint.stages for conv in stage] + [hint.conv_out]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2), (256, 320, 1)]
    assert len(net.zero_convs) == 12 and all(z.kernel_size == (1, 1) for z in net.zero_convs)
    assert [z.in_channels for z in net.zero_convs] == [320] * 4 + [640] * 3 + [1280] * 5
    assert net.middle_zero_conv.in_channels == 1280
    # the encoder copy has the UNet's own parameter names (and so its official key names)
    with torch.device("meta"):
        unet_names = set(UNet(SD_V1).state_dict())
    copy = {n for n in net.state_dict() if not n.startswith(("hint_encoder.", "zero_convs.", "middle_zero_conv."))}
    assert copy <= unet_names and {n for n in unet_names if n.startswith(("down.", "middle."))} <= copy


def test_one_stride_two_stage_per_vae_factor():
    assert len(ControlNet(ControlNetConfig(UNET, hint_widths=(16, 32, 96), downsample_factor=4))
               .hint_encoder.stages) == 2
    with pytest.raises(ValueError, match="needs 2 stride-2 stages"):
        ControlNetConfig(UNET, downsample_factor=4)          # SD v1's four widths make three stages
    with pytest.raises(ValueError, match="power of 2"):
        ControlNetConfig(UNET, hint_widths=(16, 32), downsample_factor=3)


def test_residuals_have_the_skip_shapes():
    x, t, context, hint = inputs()
    down, middle = random_controlnet(UNET)(x, t, context, hint)
    unet, skips = UNet(UNET), []
    h = unet.input_conv(x)
    skips.append(h)
    emb = unet.time_embedding(torch.zeros(2, 32))
    for level in unet.down:
        h = level(h, emb, context, skips)
    assert [r.shape for r in down] == [s.shape for s in skips] and middle.shape == h.shape
    with pytest.raises(ValueError, match="8× the latent's size"):
        random_controlnet(UNET)(x, t, context, hint[..., :64, :64])


def test_training_starts_as_the_identity_and_still_learns():
    """Zero convs: y_c = y at initialisation (bit-exact: skip + 0 = skip), yet ∂L/∂W_zero ≠ 0 while the copy's
    own gradients are 0 (∂L/∂Θ_c passes through W_zero = 0): the first step moves only the zero convs."""
    unet = randomize(UNet(UNET), 1).eval()
    net = ControlNet.from_unet(unet)
    assert torch.equal(net.down[1].res[0].conv1.weight, unet.down[1].res[0].conv1.weight)   # the paper's copy
    x, t, context, hint = inputs()
    control = net(x, t, context, hint)
    assert all(not r.any() for r in control[0]) and not control[1].any()
    with torch.no_grad():
        assert torch.equal(unet(x, t, context, control=control), unet(x, t, context))
    unet(x, t, context, control=control).square().mean().backward()
    assert net.zero_convs[0].weight.grad.abs().sum() > 0 and net.middle_zero_conv.weight.grad.abs().sum() > 0
    assert not net.down[0].res[0].conv1.weight.grad.any()


def test_unet_adds_the_residuals_where_it_reads_them():
    unet = randomize(UNet(UNET), 1).eval()
    x, t, context, hint = inputs()
    down, middle = random_controlnet(UNET)(x, t, context, hint)
    zeros = ([torch.zeros_like(r) for r in down], torch.zeros_like(middle))
    with torch.no_grad():
        plain = unet(x, t, context)
        assert torch.equal(unet(x, t, context, control=zeros), plain)
        assert (unet(x, t, context, control=(down, middle)) - plain).abs().max() > 1e-2
        only_middle = (zeros[0], middle)
        assert (unet(x, t, context, control=only_middle) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError):                      # 11 residuals for 12 skips
        unet(x, t, context, control=(down[:-1], middle))


@pytest.mark.parity
def test_residuals_match_diffusers_controlnetmodel(tmp_path):
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    net = random_controlnet(UNET, seed=3)
    reference = diffusers_controlnet(official_state(net, tmp_path), UNET)
    x, t, context, hint = inputs()
    with torch.no_grad():
        down, middle = net(x, t, context, hint)
        ref_down, ref_middle = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint,
                                         return_dict=False)
    # measured 0.0 (the same float32 operations in the same order); 1e-5 allows another BLAS's summation order
    assert max(float((a - b).abs().max()) for a, b in zip(down + [middle], list(ref_down) + [ref_middle])) < 1e-5
    assert middle.abs().mean() > 0.1                     # not a comparison of zeros


# ---------------------------------------------------------------------------------------------------------------
# The glue: window, guess mode, multi-ControlNet
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start, end, active", [(0.0, 1.0, [1, 1, 1, 1]), (0.25, 1.0, [0, 1, 1, 1]),
                                                (0.0, 0.5, [1, 1, 0, 0]), (0.3, 0.8, [0, 0, 1, 0])])
def test_window_is_diffusers_controlnet_keep(start, end, active):
    control = Control(None, torch.zeros(1), 1.0, start, end)
    assert [int(control.active(i, 4)) for i in range(4)] == active


def test_guess_mode_controls_only_the_conditional_half_with_logspace_scales():
    unet = randomize(UNet(UNET), 1).eval()
    net = random_controlnet(UNET)
    x, t, context, hint = inputs(batch=1)
    both_x, both_context = torch.cat([x, x]), torch.cat([torch.zeros_like(context), context])
    guessed = ControlledUNet(unet, [Control(net, hint, 0.5)], guess_mode=True, guided=True, n_steps=1)
    with torch.no_grad():
        down, middle = guessed.residuals(guessed.controls[0], both_x, t, both_context)
        raw_down, raw_middle = net(x, t, context, hint)
        eps = guessed(both_x, t, both_context)
        plain = unet(both_x, t, both_context)
    scales = 0.5 * torch.logspace(-1, 0, 13)
    assert all(not r[:1].any() for r in down) and not middle[:1].any()                       # uncond: zeros
    assert all(torch.allclose(r[1:], s * raw, rtol=1e-6, atol=0) for r, s, raw in zip(down, scales, raw_down))
    assert torch.allclose(middle[1:], 0.5 * raw_middle, rtol=1e-6, atol=0)                    # scales[-1] = 1
    assert torch.equal(eps[:1], plain[:1]) and (eps[1:] - plain[1:]).abs().max() > 1e-3
    # the original code's 0.825^(12 − i): the same curve with 10^(−1/12) = 0.8254 rounded, < 1e-3 lower (docstring)
    gap = torch.logspace(-1, 0, 13, dtype=torch.float64) - torch.tensor([0.825 ** (12 - i) for i in range(13)],
                                                                        dtype=torch.float64)
    assert 9e-4 < gap.max() < 1e-3 and (gap >= 0).all()


def test_multi_controlnet_sums_scaled_residuals():
    unet = randomize(UNet(UNET), 1).eval()
    nets = [random_controlnet(UNET, seed=k) for k in (5, 6)]
    x, t, context, hint = inputs()
    with torch.no_grad():
        both = ControlledUNet(unet, [Control(nets[0], hint, 0.7), Control(nets[1], hint, 1.3)], guess_mode=False,
                              guided=False, n_steps=1)(x, t, context)
        r0, r1 = nets[0](x, t, context, hint), nets[1](x, t, context, hint)
        summed = ([0.7 * a + 1.3 * b for a, b in zip(r0[0], r1[0])], 0.7 * r0[1] + 1.3 * r1[1])
        assert torch.allclose(both, unet(x, t, context, control=summed), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Loading, strictly
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state(tmp_path_factory):
    net = random_controlnet(UNET, seed=7)
    return net, official_state(net, tmp_path_factory.mktemp("cn"))


def same(a: ControlNet, b: ControlNet) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(x.float(), y.float()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_official_keys_are_controlnets_names(state):
    _, tensors = state
    assert "control_model.input_hint_block.14.weight" in tensors and "control_model.input_hint_block.0.bias" in tensors
    assert "control_model.zero_convs.11.0.weight" in tensors and "control_model.middle_block_out.0.weight" in tensors
    assert "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in tensors
    assert not any(k.startswith("control_model.output_blocks.") or "out.2." in k for k in tensors)


@pytest.mark.parametrize("layout", ["safetensors", "pth", "fp16", "no-prefix", "beside-sd-model", "ours"])
def test_loads_every_layout(state, tmp_path, layout):
    net, tensors = state
    if layout == "ours":                                  # our own file: the config travels in the metadata
        path = save_controlnet(tmp_path / "cn.safetensors", net)
        assert same(load_controlnet(path), net)
        return
    if layout == "fp16":
        tensors = {k: v.half() for k, v in tensors.items()}
    if layout == "no-prefix":
        tensors = {k.removeprefix("control_model."): v for k, v in tensors.items()}
    if layout == "beside-sd-model":                       # control_sd15_*.pth: a whole SD model beside it
        from pipeline_fixtures import write_tiny_checkpoint
        from safetensors.torch import load_file
        tensors = {**load_file(str(write_tiny_checkpoint(tmp_path / "sd.safetensors"))), **tensors}
    path = write_official(tensors, tmp_path / f"cn.{'pth' if layout == 'pth' else 'safetensors'}",
                          "pth" if layout == "pth" else "safetensors")
    loaded = load_controlnet(path, unet_config=UNET)
    if layout == "fp16":
        assert next(loaded.parameters()).dtype == torch.float32
        assert next(load_controlnet(path, unet_config=UNET, dtype=None).parameters()).dtype == torch.float16
        assert same(loaded, net.half().float()) if False else all(
            torch.equal(a, b.half().float()) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
        return
    assert same(loaded, net)
    x, t, context, hint = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, hint)[1], net(x, t, context, hint)[1])


def test_loads_the_diffusers_folder(state, tmp_path):
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    net, tensors = state
    diffusers_controlnet(tensors, UNET).save_pretrained(tmp_path / "controlnet")
    assert same(load_controlnet(tmp_path / "controlnet"), net)   # heads and groups from its config.json


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("control_model.zero_convs.3.0.weight"), "missing 1 tensor"),
    (lambda t: t.update({"control_model.zero_convs.3.1.weight": torch.zeros(1)}), "unexpected"),
    (lambda t: t.update({"control_model.middle_block_out.0.weight": torch.zeros(64, 64, 3, 3)}), "wrong shape"),
    (lambda t: t.update({"lora_unet_extra.weight": torch.zeros(1)}), "belong to no ControlNet"),
    (lambda t: t["control_model.input_hint_block.2.weight"].fill_(float("nan")), "NaN"),
])
def test_damaged_files_are_refused(state, tmp_path, damage, message):
    _, tensors = state
    tensors = {k: v.clone() for k, v in tensors.items()}
    damage(tensors)
    path = write_official(tensors, tmp_path / "cn.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_controlnet(path, unet_config=UNET)


def test_a_stable_diffusion_file_is_not_a_controlnet(tmp_path):
    from pipeline_fixtures import write_tiny_checkpoint
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(write_tiny_checkpoint(tmp_path / "sd.safetensors"))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1), "x": Image.new("RGB", (1, 1))}, path)
    with pytest.raises(CheckpointError):
        load_controlnet(path)


def test_inspect_names_a_controlnet(state, tmp_path):
    from ldm_scratch.cli import main
    _, tensors = state
    path = write_official(tensors, tmp_path / "control_v11p_sd15_canny.safetensors")
    report = describe(path)
    assert "kind:       controlnet" in report and "12 zero convs" in report and "3 stride-2 stages" in report
    assert main(["inspect", str(path)]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------

def test_canny_finds_the_outline_only():
    pytest.importorskip("cv2", reason="needs the [control] extra (opencv-python-headless)")
    image = Image.new("RGB", (64, 64), (30, 70, 220))
    assert not np.asarray(canny(image)).any()                          # a flat image has no edges
    image.paste((220, 30, 30), (16, 16, 48, 48))
    edges = np.asarray(canny(image))[..., 0] > 0
    assert edges.any() and np.asarray(canny(image)).shape == (64, 64, 3)
    ys, xs = np.nonzero(edges)
    on_border = (np.minimum(np.abs(ys[:, None] - [15, 16, 47, 48]).min(1), np.abs(xs[:, None] - [15, 16, 47, 48])
                 .min(1)) == 0)
    assert on_border.all()                                             # every edge pixel is on the square's border
    with pytest.raises(ValueError, match="low ≤ high"):
        canny(image, low=200, high=100)


def test_scribble_inversion_and_as_is():
    array = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(invert_scribble(array)), 255 - array)           # p' = 255 − p
    assert np.array_equal(np.asarray(as_is(Image.fromarray(array))), array)
    assert np.asarray(as_is(np.zeros((8, 8), dtype=np.uint8))).shape == (8, 8, 3)     # grey → RGB
    with pytest.raises(ValueError, match="one image at a time"):
        canny([array, array])


@pytest.mark.parity
def test_hint_tensor_is_resized_as_diffusers_does():
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    from diffusers.image_processor import VaeImageProcessor
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    ours = control_tensor(image, 96, 96, 1)
    reference = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
        image, height=96, width=96)
    assert ours.shape == (1, 3, 96, 96) and torch.equal(ours, reference.float())      # same code path: exact


# ---------------------------------------------------------------------------------------------------------------
# Training (smoke: the full run is scripts/train_controlnet.sh)
# ---------------------------------------------------------------------------------------------------------------

def test_train_controlnet_smoke(tmp_path):
    pytest.importorskip("cv2", reason="needs the [control] extra (opencv-python-headless)")
    from ldm_scratch.cli import main
    out = tmp_path / "run"
    assert main(["train-controlnet", "--out", str(out), "--steps", "3", "--n-images", "8", "--batch-size", "4",
                 "--log-every", "1"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["steps_done"] == 3 and len(history["loss"]) == 3
    norms = history["zero_conv_norms"]
    assert all(n == 0.0 for n in norms[0]) and all(n > 0 for n in norms[-1])   # 0 at step 0, then growing
    net = load_controlnet(out / "controlnet.safetensors")
    assert len(net.zero_convs) == 9 and len(net.hint_encoder.stages) == 2      # tiny: VAE ×4 → 2 stages
    with pytest.raises(FileExistsError):                                      # never overwrites silently
        from ldm_scratch.training.controlnet import ControlNetTrainConfig, train_controlnet
        train_controlnet(ControlNetTrainConfig(out_dir=str(out), steps=1, n_images=4, batch_size=2))
    # --init continues from a file: step 0 (same data, same probe) starts from its weights, not the UNet's copy
    again = tmp_path / "again"
    assert main(["train-controlnet", "--out", str(again), "--steps", "1", "--n-images", "8", "--batch-size", "4",
                 "--init", str(out / "controlnet.safetensors")]) == 0
    assert json.loads((again / "history.json").read_text())["zero_conv_norms"][0] == norms[-1]
