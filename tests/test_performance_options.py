"""The speed and memory options give the same results as the plain code, on tiny random models.

- attention slicing (attention.py): queries processed `chunk` at a time — the same numbers;
- channels_last memory layout (what `fast.install` sets): the same outputs, and the layout is kept through the
  network;
- the in-place operations in the UNet/VAE forwards leave training (backward) working;
- torch.compile of the UNet equals eager mode.
The VAE's row bands and tiled decode (ldm_scratch/fast/) are tested in test_fast.py.
"""
import time

import pytest
import torch

from ldm_scratch import attention as attention_module
from ldm_scratch.attention import attention, set_attention_slicing
from ldm_scratch.unet import UNet, UNetConfig
from ldm_scratch.vae import VAE, VAEConfig
from tinymodels import randomize

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), n_heads=2, context_dim=32)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 4, 4))


@pytest.fixture
def tiny_unet():
    return randomize(UNet(TINY_UNET), seed=1).eval()


@pytest.fixture
def tiny_vae():
    return randomize(VAE(TINY_VAE), seed=2).eval()


def unet_inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([981.0, 20.5][:batch]),
            torch.randn(batch, 77, 32, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# Attention slicing
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
def test_sliced_attention_equals_plain(chunk, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 24, generator=g) for _ in range(3))   # 37 queries: the last slice is partial
    plain = attention(q, k, v, n_heads=3, causal=causal)
    sliced = attention(q, k, v, n_heads=3, causal=causal, chunk=chunk)
    assert sliced.shape == plain.shape == (2, 37, 24)
    # each query row's softmax is the same computation sliced or not; measured max |diff| 2.7e-7 (kernel
    # blocking differs between a slice and the whole), so 1e-5 on outputs of order 1 leaves a margin yet fails
    # on a wrong mask or a misplaced slice (differences of order 1)
    assert (sliced - plain).abs().max() < 1e-5


def test_cross_attention_slicing_and_the_module_setting(tiny_unet):
    """set_attention_slicing applies to every call (here all of the tiny UNet's self- and cross-attention)."""
    x, t, context = unet_inputs()
    with torch.no_grad():
        plain = tiny_unet(x, t, context)
        try:
            set_attention_slicing(7)                                    # 256 and 64 tokens: partial last slices
            assert attention_module._default_chunk == 7
            sliced = tiny_unet(x, t, context)
        finally:
            set_attention_slicing(None)
    # measured max rel diff 6.9e-7 (float32 rounding in different kernel blocking)
    assert rel_err(sliced, plain) < 1e-5
    with pytest.raises(ValueError, match="positive number of queries"):
        set_attention_slicing(0)


# ---------------------------------------------------------------------------------------------------------------
# channels_last
# ---------------------------------------------------------------------------------------------------------------

def test_channels_last_unet_and_vae_give_the_same_outputs(tiny_unet, tiny_vae):
    x, t, context = unet_inputs()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eps, image = tiny_unet(x, t, context), tiny_vae.decode(z)
        tiny_unet.to(memory_format=torch.channels_last)
        tiny_vae.to(memory_format=torch.channels_last)
        eps_cl, image_cl = tiny_unet(x, t, context), tiny_vae.decode(z)    # x itself stays NCHW
    assert eps_cl.is_contiguous(memory_format=torch.channels_last)        # the layout is kept to the end
    # the convolutions accumulate in another order in channels_last: measured max rel diff 1.1e-6…1.4e-6 (UNet),
    # 2.6e-6 (the plain VAE; 2.4e-6 when it ran in row bands)
    assert rel_err(eps_cl, eps) < 1e-5 and rel_err(image_cl, image) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# In-place operations and training
# ---------------------------------------------------------------------------------------------------------------

def test_inplace_forward_still_trains(tiny_unet):
    """The forwards apply SiLU, the GEGLU product and the residual additions in place; autograd must still give the
    true gradient. Checked in float64 against central differences along a random direction of parameters whose
    gradient flows through each in-place op (and of the first conv, through all of them)."""
    tiny_unet.double()
    x, t, context = (a.double() for a in unet_inputs(batch=1, size=8))
    tiny_unet(x, t, context).pow(2).mean().backward()
    params = dict(tiny_unet.named_parameters())
    for name in ["down.0.res.0.norm1.weight",                      # SiLU in place on GroupNorm's output
                 "down.0.attn.0.blocks.0.ff.geglu.weight",         # a ⊙ GELU(g) in place
                 "down.0.attn.0.blocks.0.self_attn.to_q.weight",   # residual added into the attention output
                 "input_conv.weight"]:
        p = params[name]
        direction = torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype)
        eps = 1e-7
        with torch.no_grad():
            p.add_(eps * direction)
            up = tiny_unet(x, t, context).pow(2).mean().item()
            p.sub_(2 * eps * direction)
            down = tiny_unet(x, t, context).pow(2).mean().item()
            p.add_(eps * direction)
        # the central difference's error is O(eps²): measured relative error 8e-7…3e-5 at eps = 1e-6, falling
        # 100× per 10× smaller eps (so the gradient is right); at 1e-7 it is ≤ 3e-7, float64 rounding ~1e-9
        assert (up - down) / (2 * eps) == pytest.approx((p.grad * direction).sum().item(), rel=1e-5), name


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_unet_equals_eager(tiny_unet):
    """`torch.compile(unet, fullgraph=True)`: the whole forward is one graph (no Python fallbacks) and gives the
    eager numbers. Compiling takes minutes on a 2-core CPU (C++ code generation: measured 377 s with a cold cache
    on a loaded machine, 70 s warm), hence `slow`."""
    pytest.importorskip("torch._inductor")
    x, t, context = unet_inputs()
    compiled = torch.compile(tiny_unet, fullgraph=True)
    with torch.no_grad():
        eager = tiny_unet(x, t, context)
        start = time.perf_counter()
        out = compiled(x, t, context)
        print(f"torch.compile of the tiny UNet: {time.perf_counter() - start:.0f} s")
    # inductor fuses and reorders float32 arithmetic: measured max rel diff 1.3e-6 (abs 3.6e-6 on outputs ≈ 3)
    assert rel_err(out, eager) < 1e-5
