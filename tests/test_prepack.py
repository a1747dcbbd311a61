"""Weights packed once for oneDNN (ldm_scratch/fast/prepack.py): the same outputs as the plain layers, a packed copy
that follows every change of the weight, plain autograd, and the pipeline option `load_pipeline(..., prepack=True)`.

Tolerance. The packed path runs oneDNN's convolution / matrix-product kernel on the weight already in the blocked
layout that the plain path reorders it into at every call. Here (AVX-512 BF16) both gave identical outputs, layer by
layer and for the whole SD UNet in bfloat16 (max |packed − plain| = 0.0), except the small bfloat16 channels_last
layers below (2.4e-4 on outputs of size ≈ 0.2: oneDNN chose another kernel). On another CPU oneDNN may pick a
different kernel for a pre-packed weight than for the reordered one, so the checks allow rounding-level
differences (torch.testing's defaults for the dtype) instead of claiming bit-equality.
"""
import copy

import pytest
import torch
from torch import nn

from ldm_scratch.fast.prepack import _PACKED, PackedConv2d, PackedLinear, packed_bytes, prepack, unpack
from ldm_scratch.loader import load_pipeline
from pipeline_fixtures import write_tiny_checkpoint, write_vocabulary
from test_lora import kohya_state, save

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")]
DTYPES = [torch.float32, torch.bfloat16]


def layers(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                         nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Flatten(2),
                         nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 5))


def inputs(dtype, channels_last=False):
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_layers_give_the_plain_layers_outputs(dtype, channels_last):
    net, x = layers().to(dtype), inputs(dtype, channels_last)
    with torch.no_grad():
        plain = net(x)
        prepack(net)
        packed = net(x)
    assert {type(m) for m in net} >= {PackedConv2d, PackedLinear}
    if dtype == torch.bfloat16:     # one bfloat16 rounding step (2⁻⁷) at the outputs' size; measured 2.4e-4 here
        torch.testing.assert_close(packed, plain, atol=2**-7 * plain.abs().max().item(), rtol=2**-7)
    else:
        torch.testing.assert_close(packed, plain)
    # float32 linear layers run through MKL, which reorders nothing: they stay on the plain path (no packed copy)
    linears_packed = sum(m in _PACKED for m in net if isinstance(m, nn.Linear))
    assert linears_packed == (2 if dtype == torch.bfloat16 else 0)
    assert packed_bytes(net) > 0


def test_the_packed_copy_follows_the_weight():
    net, x = layers().to(torch.bfloat16), inputs(torch.bfloat16)
    prepack(net)
    with torch.no_grad():
        net(x)
        net[0].weight.mul_(2)                                       # edited in place (its version counter moves)
        net[6].weight = nn.Parameter(torch.randn_like(net[6].weight))   # replaced (as a LoRA merge does)
        after_edit = net(x)
        unpack(net)
        torch.testing.assert_close(after_edit, net(x))
        prepack(net)
        net(x)
        net.float()                                                 # .to(dtype): new storage for every weight
        torch.testing.assert_close(net(x.float()), unpack(net)(x.float()))


def test_another_input_shape_is_packed_again():
    convs, linear = prepack(layers()[:5]), prepack(nn.Linear(8, 4).bfloat16())
    with torch.no_grad():
        for size in (8, 16, 8):                                     # the conv's packed layout is chosen per shape
            x = torch.randn(1, 8, size, size)
            torch.testing.assert_close(convs(x), unpack(copy.deepcopy(convs))(x))
            rows = torch.randn(size, 3, 8).bfloat16()                   # the linear's per number of rows
            torch.testing.assert_close(linear(rows), unpack(copy.deepcopy(linear))(rows))


def test_training_runs_the_plain_layers_with_gradients():
    net, x = prepack(layers()), inputs(torch.float32)
    reference = unpack(copy.deepcopy(net))
    loss = net(x).square().sum()
    loss.backward()                                                 # the packed ops have no backward: plain path
    reference(x).square().sum().backward()
    assert packed_bytes(net) == 0                                   # nothing was packed while recording
    for a, b in zip(net.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_parameters_state_dict_deepcopy_and_unpack_are_untouched():
    net = layers()
    keys = list(net.state_dict())
    prepack(net)
    with torch.no_grad():
        net(inputs(torch.float32))
    assert list(net.state_dict()) == keys
    twin = copy.deepcopy(net)                                       # the packed copies live outside the modules
    assert type(twin[0]) is PackedConv2d and packed_bytes(twin) == 0
    unpack(net)
    assert {type(m) for m in net if isinstance(m, (nn.Conv2d, nn.Linear))} == {nn.Conv2d, nn.Linear}
    assert packed_bytes(net) == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepack")
    return write_tiny_checkpoint(folder / "tiny.safetensors"), write_vocabulary(folder / "tokenizer")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pipeline_option_gives_the_same_image(model, dtype):
    path, vocabulary = model
    args = dict(prompt="a red circle", steps=4, sampler="ddim", seed=0, output_type="np", progress=False)
    plain = load_pipeline(path, tokenizer=vocabulary, dtype=dtype, prepack=False).txt2img(**args)
    pipe = load_pipeline(path, tokenizer=vocabulary, dtype=dtype, prepack=True)
    assert any(type(m) is PackedConv2d for m in pipe.unet.modules())
    packed = pipe.txt2img(**args)
    assert packed_bytes(pipe.unet) > 0
    # pixels in [0, 1]; float32 rounding-level, or one bfloat16 step of the last layers' outputs
    torch.testing.assert_close(torch.from_numpy(packed), torch.from_numpy(plain),
                               atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)


def test_bfloat16_pipelines_are_packed_by_default(model):
    """prepack=None (the default): packed for bfloat16 on the CPU, not for float32 nor off the fast path."""
    path, vocabulary = model

    def packed(**options) -> bool:
        pipe = load_pipeline(path, tokenizer=vocabulary, **options)
        return any(type(m) is PackedConv2d for m in pipe.unet.modules())
    assert packed(dtype=torch.bfloat16)
    assert not packed(dtype=torch.float32) and not packed()
    assert not packed(dtype=torch.bfloat16, prepack=False)
    assert not packed(dtype=torch.bfloat16, fast=False)                # the plain networks, as fast=False promises
    assert packed(dtype=torch.float32, prepack=True)


def test_prepack_needs_the_fast_path(model):
    path, vocabulary = model
    with pytest.raises(ValueError, match="prepack=True .* fast=True"):
        load_pipeline(path, tokenizer=vocabulary, fast=False, prepack=True)


def test_a_lora_loaded_and_unloaded_after_packing_is_used(model, tmp_path):
    path, vocabulary = model
    args = dict(prompt="a red circle", steps=3, sampler="ddim", seed=0, output_type="np", progress=False)
    plain = load_pipeline(path, tokenizer=vocabulary, dtype=torch.bfloat16, prepack=False)
    pipe = load_pipeline(path, tokenizer=vocabulary, dtype=torch.bfloat16, prepack=True)
    before = pipe.txt2img(**args)                                   # packs every layer's weight
    lora_file = save(tmp_path, kohya_state(pipe))
    for p in (plain, pipe):
        p.load_lora(lora_file, scale=1.0)
    with_lora = pipe.txt2img(**args)
    assert not torch.equal(torch.from_numpy(with_lora), torch.from_numpy(before))
    torch.testing.assert_close(torch.from_numpy(with_lora), torch.from_numpy(plain.txt2img(**args)),
                               atol=1e-2, rtol=0)
    pipe.unload_lora()
    torch.testing.assert_close(torch.from_numpy(pipe.txt2img(**args)), torch.from_numpy(before), atol=0, rtol=0)


def test_cli_prepack_option_packs_the_unet(monkeypatch, tmp_path):
    """`ldm-scratch generate --prepack` loads the pipeline with prepack=True, --no-prepack with False, and
    neither with None (load_pipeline's default: packed in bfloat16)."""
    import ldm_scratch.loader as loader
    from ldm_scratch.cli import main
    seen = []

    def fake_load_pipeline(*args, **kwargs):
        seen.append(kwargs.get("prepack"))
        raise SystemExit(0)                                          # stop before any sampling
    monkeypatch.setattr(loader, "load_pipeline", fake_load_pipeline)
    for extra in (["--prepack"], ["--no-prepack"], []):
        with pytest.raises(SystemExit):
            main(["generate", "a red circle", "--out", str(tmp_path / "x.png"), *extra])
    assert seen == [True, False, None]
