"""The speed and memory options give the same results as the plain code, on tiny random models.

- attention slicing (attention.py): queries processed `chunk` at a time — the same numbers;
- VAE tiled decode (vae.py): one tile covering z is the plain decode exactly; the blending is a partition of unity
  (exact for a decoder that works pixel by pixel); real tiling of a real decoder differs a little (stated);
- VAE row bands (vae.py, the default without autograd): each piece equals its plain counterpart (GroupNorm as an
  affine map, the banded 3×3 conv also in place, the upsampled rows), the whole decoder and encoder give the plain
  numbers to rounding, and (slow) the full-size decoder's peak memory at 512² is the smaller one measured;
- channels_last memory layout: the same outputs, and the layout is kept through the network;
- the in-place operations in the UNet/VAE forwards leave training (backward) working;
- torch.compile of the UNet equals eager mode.
"""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch import attention as attention_module
from ldm_scratch.attention import attention, set_attention_slicing
from ldm_scratch.unet import UNet, UNetConfig
from ldm_scratch import vae as vae_module
from ldm_scratch.vae import VAE, VAEConfig, _tile_starts
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
# VAE tiled decode
# ---------------------------------------------------------------------------------------------------------------

def test_tile_starts_cover_the_image_with_the_overlap():
    for size, tile, overlap in [(64, 32, 8), (24, 16, 8), (40, 16, 4), (16, 16, 8), (10, 16, 8), (33, 8, 0)]:
        starts = _tile_starts(size, tile, overlap)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))    # neighbours share ≥ overlap


def test_tile_covering_the_latent_is_the_plain_decode(tiny_vae):
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_vae.decode(z)
        assert torch.equal(tiny_vae.decode(z, tile=16), plain)
        assert torch.equal(tiny_vae.decode_tiled(z, tile=16), plain)      # one tile, mask 1, weight 1: exact


class PixelwiseDecoder(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(h[:, :3], scale_factor=8, mode="nearest")


def test_tile_blending_is_exact_for_a_pixelwise_decoder(tiny_vae, monkeypatch):
    """With a decoder whose every output pixel depends on its own latent pixel only (nearest ×8 upsampling of the
    first 3 channels), tiles agree where they overlap, so the blend must reproduce the plain decode: this checks
    the offsets, the masks and the normalisation Σ m_k ⊙ D(z_k) / Σ m_k without the decoder's own tiling error."""
    monkeypatch.setattr(tiny_vae, "decoder", PixelwiseDecoder())
    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_vae.decode(z)
        for tile, overlap in [(8, 4), (10, 3), (16, 0)]:
            tiled = tiny_vae.decode(z, tile=tile, overlap=overlap)
            assert tiled.shape == plain.shape == (2, 3, 168, 240)
            # only float32 rounding of (Σ m_k · x) / Σ m_k: measured max |diff| 7.2e-7
            assert (tiled - plain).abs().max() < 1e-5, (tile, overlap)


def test_real_tiling_error_is_small(tiny_vae):
    """The real decoder is not pixelwise: its 3×3 convs see across tile edges, and its GroupNorms and mid-block
    attention see one tile at a time, so tiling changes the output. Measured on the tiny random VAE, 24×24 latent:
    tile 16 overlap 8 → max |diff| / max |plain| = 0.215, mean |diff| / mean |plain| = 0.158. That is large because
    random GroupNorm gains make the output depend strongly on per-tile statistics; it is what tiling costs, not a
    stitching bug (the pixelwise test above shows the stitching exact). Use tiles as large as memory allows.
    The bound documents this figure and would catch e.g. tiles placed at wrong offsets (error ≈ the output)."""
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_vae.decode(z)
        tiled = tiny_vae.decode(z, tile=16, overlap=8)
    diff = (tiled - plain).abs()
    max_rel, mean_rel = (diff.max() / plain.abs().max()).item(), (diff.mean() / plain.abs().mean()).item()
    print(f"tiled VAE decode vs plain: max rel {max_rel:.3f}, mean rel {mean_rel:.4f}")
    assert 0 < mean_rel < 0.25 and max_rel < 0.4


def test_tiled_decode_rejects_bad_overlap(tiny_vae):
    with pytest.raises(ValueError, match="overlap < tile"):
        tiny_vae.decode(torch.zeros(1, 4, 24, 24), tile=8, overlap=8)


# ---------------------------------------------------------------------------------------------------------------
# VAE row bands
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def plain_layers(monkeypatch):
    """A function that runs a callable with row bands off (one band taller than any image: the plain code)."""
    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(vae_module, "BAND_ROWS", 10 ** 9)
            return fn(*args)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_as_an_affine_map_is_group_norm(dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(16, generator=g))
        norm.bias.copy_(0.1 * torch.randn(16, generator=g))
    x = (3 + 2 * torch.randn(2, 16, 13, 7, generator=g)).to(dtype)    # mean ≠ 0: the two-pass variance matters
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        scale, shift = vae_module._group_norm_as_affine(norm, x, rows=3)  # 13 rows: bands of 3, 3, 3, 3, 1
        assert scale.shape == shift.shape == (2, 16, 1, 1)
        diff = (x * scale + shift - norm(x)).abs().max().item()
    # measured max |diff| on outputs of order 3: float32 7.2e-7 (contiguous), 2.4e-6 (channels_last, where
    # PyTorch's kernel is the less exact one), float64 4.9e-15 — the statistics are summed in another order; a wrong
    # group, mean or variance gives differences of order 1
    assert diff < (1e-5 if dtype == torch.float32 else 1e-12), diff


def test_upsampled_rows_are_rows_of_the_upsampled_image():
    x = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    whole = F.interpolate(x, scale_factor=2.0, mode="nearest")          # [2, 3, 14, 10]
    for a, b in [(0, 14), (0, 1), (1, 2), (3, 8), (5, 6), (13, 14), (2, 14)]:   # even and odd starts and ends
        assert torch.equal(vae_module._upsampled_rows(x, a, b), whole[:, :, a:b]), (a, b)


@pytest.mark.parametrize("rows", [1, 2, 5, 17])
def test_conv_in_bands_is_the_conv_and_may_write_over_its_input(rows):
    """out = conv(input) (+ residual) band by band, including in place (input_rows reading from out itself)."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, padding=1)
    x, skip = torch.randn(2, 6, 17, 9, generator=g), torch.randn(2, 6, 17, 9, generator=g)
    with torch.no_grad():
        expected = conv(x) + skip
        out = vae_module._conv3x3_in_bands(conv, lambda a, b: x[:, :, a:b], torch.empty_like(x), rows,
                                           residual=lambda r0, r1: skip[:, :, r0:r1])
        # measured max |diff| 0.0 (a band's conv does the whole conv's multiply-adds in the same order); 1e-5
        # leaves room for kernels that block the rows differently, a wrong halo or offset gives errors of order 1
        assert (out - expected).abs().max() < 1e-5
        in_place = x.clone()
        vae_module._conv3x3_in_bands(conv, lambda a, b: in_place[:, :, a:b], in_place, rows,
                                     residual=lambda r0, r1: skip[:, :, r0:r1])
        assert torch.equal(in_place, out)         # writing one band late: no band ever read an overwritten row
    with pytest.raises(ValueError, match="3×3 conv with padding 1"):
        vae_module._conv3x3_in_bands(torch.nn.Conv2d(6, 6, 1), lambda a, b: x[:, :, a:b], out, rows)


@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_vae_equals_the_plain_vae(tiny_vae, plain_layers, monkeypatch, channels_last):
    """The whole decoder and encoder with row bands of 3 rows (every layer above 3 rows runs banded, odd sizes
    leave a short last band) against the plain layers, in float32 and float64."""
    monkeypatch.setattr(vae_module, "BAND_ROWS", 3)
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(2, 4, 7, 5, generator=g), torch.rand(1, 3, 40, 24, generator=g) * 2 - 1
    if channels_last:
        tiny_vae.to(memory_format=torch.channels_last)
    for dtype, tolerance in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
        tiny_vae.to(dtype)
        with torch.no_grad():
            banded, plain = tiny_vae.decode(z.to(dtype)), plain_layers(tiny_vae.decode, z.to(dtype))
            mean, plain_mean = tiny_vae.encode(x.to(dtype)).mean, plain_layers(tiny_vae.encode, x.to(dtype)).mean
        assert banded.shape == plain.shape == (2, 3, 56, 40)
        # measured max rel diff, float32: 2.1e-6 / 3.2e-6 (decode, contiguous / channels_last), 8.2e-7 (encode),
        # the GroupNorm statistics summed in another order; float64: 4.6e-15. A misplaced row or a wrong halo gives
        # errors of order 1.
        assert rel_err(banded, plain) < tolerance and rel_err(mean, plain_mean) < tolerance, dtype
    if channels_last:
        assert banded.is_contiguous(memory_format=torch.channels_last)


def test_bands_are_for_inference_only(tiny_vae, monkeypatch):
    """With autograd on (training), the plain layers run and gradients flow."""
    monkeypatch.setattr(vae_module, "BAND_ROWS", 3)
    called = []
    monkeypatch.setattr(vae_module, "_conv3x3_in_bands", lambda *args, **kw: called.append(1))
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    tiny_vae.decode(z).square().mean().backward()
    assert not called and z.grad is not None and z.grad.abs().sum() > 0


def test_decoder_returns_freed_memory_before_each_banded_block(tiny_vae, monkeypatch):
    """At inference the decoder hands freed memory back to the OS before each block that runs in bands (the blocks
    after the mid block: 3 levels × (3 ResBlocks + upsample) + 3 ResBlocks here), and not while training."""
    monkeypatch.setattr(vae_module, "BAND_ROWS", 3)
    calls = []
    monkeypatch.setattr(vae_module, "release_freed_memory", lambda: calls.append(1))
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tiny_vae.decode(z)
    assert len(calls) == 15
    calls.clear()
    tiny_vae.decode(z)
    assert not calls


PEAK_CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from ldm_scratch import vae
    if sys.argv[1] == "plain":
        vae.BAND_ROWS = 10 ** 9
    model = vae.VAE().eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 64, 64)
    def rss(field):
        return int([l for l in open("/proc/self/status") if l.startswith(field)][0].split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # VmHWM := VmRSS now, so the peak below is the decode's alone
    before = rss("VmRSS:")
    with torch.inference_mode():
        model.decode(z)
    print(rss("VmHWM:") - before)
""")


@pytest.mark.slow
def test_banded_full_size_decode_peaks_lower():
    """The full-size SD v1 decoder at 512² (random weights, channels_last, one thread), in a fresh process each:
    the peak memory of the decode itself. Measured: plain 686–710 MiB (4 runs), banded 434–456 MiB (3 runs) — the
    upsample's output [1, 256, 512, 512] and the next ResBlock's conv1 output [1, 128, 512, 512] side by side
    (384 MiB), plus band-sized temporaries (485–496 MiB before the decoder handed freed memory back to the OS
    between its blocks). The bound 590 sits ≈ 100 MiB below plain and ≈ 135 MiB above banded.
    ~30 s per decode, hence slow; Linux only (it reads /proc)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    root = Path(__file__).resolve().parents[1]
    peaks = {}
    for mode in ("banded", "plain"):
        out = subprocess.run([sys.executable, "-c", PEAK_CHILD, mode], capture_output=True, text=True, cwd=root)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[mode] = int(out.stdout.split()[-1]) / 2 ** 20
    print(f"VAE decode 512² peak above the model: {peaks}")
    assert peaks["banded"] < 590 < peaks["plain"], peaks


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
    # the convolutions accumulate in another order in channels_last: measured max rel diff 1.4e-6 (UNet), 2.4e-6 (VAE)
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
