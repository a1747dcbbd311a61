"""The CLIP text transformer: its equations, its interface, and parity with transformers.CLIPTextModel.

Parity runs on identical random weights that reach both models the way real weights do: a synthetic file in the
official SD v1 layout (`cond_stage_model.transformer.text_model.*`), loaded into ours through checkpoint.CLIP_RULES
and into transformers by its own names.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch import checkpoint
from ldm_scratch.clip import CLIPTextConfig, CLIPTextModel, quick_gelu
from ldm_scratch.checkpoint.keymap import clip_config_from_shapes
from test_checkpoint_text import (POSITION_IDS, WITH_TEXT_MODEL, load_text_encoder, official_text_shapes,
                                  write_text_file)

BOS, EOS = 49406, 49407
# The real vocabulary (so the real BOS/EOS ids work), everything else small: ~3.3M parameters, most of them the
# token table.
TINY = CLIPTextConfig(vocab_size=49408, width=64, n_layers=2, n_heads=4, mlp_width=256, max_positions=77)


def prompt_ids(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """[B, 77] ids shaped like the tokenizer's output: BOS, `length` word ids, EOS, then EOS padding (SD v1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(0, BOS, (n,), generator=generator).tolist()
        rows.append(([BOS] + words + [EOS] + [EOS] * 77)[:77])
    return torch.tensor(rows)


def random_model(config: CLIPTextConfig, seed: int = 0, dtype=torch.float64) -> CLIPTextModel:
    torch.manual_seed(seed)
    model = CLIPTextModel(config).to(dtype).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped γ/β or a missing LN would show
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The equations of clip.py's docstrings, checked with a from-scratch reference written with plain tensor ops
# ---------------------------------------------------------------------------------------------------------------

def equations_forward(state: dict[str, torch.Tensor], config: CLIPTextConfig, ids: torch.Tensor,
                      clip_skip: int = 0) -> torch.Tensor:
    """The module docstring's equations, one line each, with no nn.Module, SDPA or einops."""
    def layer_norm(x, name):  # LN(x) = (x − μ) / √(σ² + ε) · γ + β
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + config.layer_norm_eps) * state[name + ".weight"] + state[name + ".bias"]

    def linear(x, name):
        return x @ state[name + ".weight"].T + state[name + ".bias"]

    B, N = ids.shape
    H, d = config.n_heads, config.width // config.n_heads
    h = state["token_embedding.weight"][ids] + state["position_embedding.weight"][:N]  # h⁰ = E_tok[id] + E_pos
    future = torch.ones(N, N, dtype=torch.bool).triu(1)  # M_ij = −∞ for j > i
    for layer in range(config.n_layers - clip_skip):
        p = f"blocks.{layer}."
        a = layer_norm(h, p + "norm1")
        q, k, v = (linear(a, p + "attn." + w).reshape(B, N, H, d).transpose(1, 2) for w in "qkv")
        scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(future, float("-inf"))
        heads = scores.softmax(-1) @ v                                    # softmax(QKᵀ/√d + M) V
        h = h + linear(heads.transpose(1, 2).reshape(B, N, H * d), p + "attn.out")  # residual
        m = linear(layer_norm(h, p + "norm2"), p + "mlp.fc1")
        m = m * torch.sigmoid(1.702 * m)                                  # quick_gelu
        h = h + linear(m, p + "mlp.fc2")                                  # residual
    return layer_norm(h, "final_norm")


@pytest.mark.parametrize("clip_skip", [None, 0, 1, 2])
def test_forward_is_the_docstring_equations(clip_skip):
    """In float64 the module and the plain-ops equations agree to rounding: measured max abs diff 1.8e-15 on outputs
    of order 4 (a few float64 ulps); tolerance 1e-12, far below what any wrong term would cause."""
    config = CLIPTextConfig(vocab_size=49408, width=96, n_layers=3, n_heads=3, mlp_width=384)
    model = random_model(config)
    ids = prompt_ids([0, 5, 80])
    with torch.no_grad():
        ours = model(ids, clip_skip=clip_skip)
        expected = equations_forward(model.state_dict(), config, ids, clip_skip or 0)
    assert ours.shape == (3, 77, 96)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_quick_gelu_is_the_sigmoid_approximation_of_gelu():
    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    # two formulas (torch's sigmoid kernel, exp) in float64: measured max relative difference 4.4e-16 (2 ulps);
    # 1e-14 leaves room for other CPUs' vector exp; a wrong constant (1.7 for 1.702) is off by up to 2.4e-2 relative
    torch.testing.assert_close(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)), rtol=1e-14, atol=1e-300)
    # the docstring's claim "differ by < 0.021" — and they do differ, so exact GELU would be a (small) bug
    gap = (quick_gelu(x) - F.gelu(x)).abs().max().item()
    assert 0.02 < gap < 0.021


def test_attention_is_causal():
    """Changing token j changes the outputs at positions ≥ j only."""
    model = random_model(TINY)
    ids = prompt_ids([20])
    changed = ids.clone()
    changed[0, 10] = 1234
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # float64; the masked keys get weight exactly 0, so the earlier rows are in practice bit-identical: 1e-12 (on
    # outputs ~4) only allows another kernel's rounding, while a leaking mask moves them by ≥ 1e-6 (asserted below)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-12)
    assert (a[:, 10:] - b[:, 10:]).abs().amax(-1).min() > 1e-6  # every later position sees the change


def test_clip_skip_stops_early_then_applies_the_final_norm():
    """clip_skip=k (diffusers' convention) = final LayerNorm of the output of block L − k."""
    model = random_model(TINY)
    ids = prompt_ids([7, 30])
    with torch.no_grad():
        h = model.token_embedding(ids) + model.position_embedding.weight[:77]
        h = model.blocks[0](h)  # L − 1 = 1 block
        expected = model.final_norm(h)
        torch.testing.assert_close(model(ids, clip_skip=1), expected, rtol=0, atol=0)
        assert not torch.allclose(model(ids, clip_skip=1), model(ids), atol=1e-3)
        torch.testing.assert_close(model(ids, clip_skip=0), model(ids), rtol=0, atol=0)


def test_shorter_sequences_and_dtypes():
    model = random_model(TINY, dtype=torch.float32)
    with torch.no_grad():
        full = model(prompt_ids([3]))
        short = model(prompt_ids([3])[:, :5])  # causal: the first 5 outputs do not depend on what follows
        # (measured 3.6e-7 apart: float32 rounding of differently-shaped kernels)
        assert short.shape == (1, 5, 64)
        torch.testing.assert_close(short, full[:, :5], rtol=1e-5, atol=1e-5)
        # int32 ids (e.g. from numpy) give the same result as int64
        torch.testing.assert_close(model(prompt_ids([3]).int()), full, rtol=0, atol=0)


@pytest.mark.parametrize("ids, clip_skip, error, message", [
    (torch.zeros(1, 77), None, TypeError, "integer tensor"),
    ([[BOS, EOS]], None, TypeError, "integer tensor"),
    (torch.zeros(77, dtype=torch.long), None, ValueError, r"\[B, N\].*input_ids\[None\]"),
    (torch.zeros(1, 78, dtype=torch.long), None, ValueError, "78 tokens.*77 positions"),
    (torch.full((1, 77), 49408), None, ValueError, r"\[0, 49408\).*vocabulary"),
    (torch.full((1, 77), -1), None, ValueError, r"\[0, 49408\)"),
    (torch.zeros(1, 77, dtype=torch.long), 2, ValueError, "clip_skip must be in 0 … 1"),
    (torch.zeros(1, 77, dtype=torch.long), -1, ValueError, "clip_skip"),
])
def test_bad_input_is_explained(ids, clip_skip, error, message):
    model = random_model(TINY, dtype=torch.float32)
    with pytest.raises(error, match=message):
        model(ids, clip_skip=clip_skip)


def test_default_config_is_sd_v1_and_matches_the_reference_layout():
    config = CLIPTextConfig()
    assert (config.vocab_size, config.width, config.n_layers, config.n_heads, config.mlp_width,
            config.max_positions, config.activation, config.layer_norm_eps) == (
        49408, 768, 12, 12, 3072, 77, "quick_gelu", 1e-5)
    with torch.device("meta"):
        model = CLIPTextModel()
    reference = checkpoint.reference_keys()["text_encoder"]
    expected = sum(torch.Size(shape).numel() for key, shape in reference.items() if not key.endswith(POSITION_IDS))
    assert sum(p.numel() for p in model.parameters()) == expected == 123_060_480
    assert not list(model.buffers())  # position ids are arange(N), not a buffer to be loaded


def test_config_from_shapes_round_trips():
    for config in (CLIPTextConfig(), CLIPTextConfig(vocab_size=500, width=128, n_layers=3, n_heads=2, mlp_width=64,
                                                    max_positions=40)):
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in CLIPTextModel(config).state_dict().items()}
        assert clip_config_from_shapes(shapes) == config
    assert clip_config_from_shapes(shapes, head_dim=32).n_heads == 4
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(width=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown activation"):
        CLIPTextConfig(activation="relu")


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers.CLIPTextModel, through a synthetic official-layout file
# ---------------------------------------------------------------------------------------------------------------

def transformers_model(config: CLIPTextConfig, tensors: dict[str, torch.Tensor]):
    """transformers.CLIPTextModel holding the file's tensors."""
    transformers = pytest.importorskip("transformers", reason="needs the [reference] extra")
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        max_position_embeddings=config.max_positions, hidden_act="quick_gelu", layer_norm_eps=config.layer_norm_eps)
    reference = transformers.CLIPTextModel._from_config(hf_config).eval()
    # transformers < 5.6 names its parameters text_model.*, later versions drop that level
    inner = "text_model." if any(k.startswith("text_model.") for k in reference.state_dict()) else ""
    state = {inner + key[len(WITH_TEXT_MODEL):]: t for key, t in tensors.items() if not key.endswith(POSITION_IDS)}
    reference.load_state_dict(state, strict=True)
    return reference


def differences(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |ours − ref|, that divided by max |ref|)."""
    abs_diff = (ours.double() - reference.double()).abs().max().item()
    return abs_diff, abs_diff / reference.double().abs().max().item()


def check_parity(tmp_path, config: CLIPTextConfig, ids: torch.Tensor, clip_skips: list[int],
                 fp32_tolerance: float, fp64_tolerance: float) -> dict[str, tuple[float, float]]:
    """Compare last_hidden_state and the clip_skip outputs in float32 against transformers' two attention paths
    ("eager": the textbook softmax(QKᵀ/√d)V, "sdpa": the fused kernel, its default) and in float64 against sdpa
    (eager computes its softmax in float32 even for float64 inputs, which would cap float64 agreement at ~1e-7)."""
    path = tmp_path / "official.safetensors"
    tensors = write_text_file(path, official_text_shapes(config), WITH_TEXT_MODEL, position_ids="int64")
    ours, _ = load_text_encoder(checkpoint.TensorFile(path), config)
    reference = transformers_model(config, tensors)
    measured = {}
    for dtype, attention, tolerance in ((torch.float32, "eager", fp32_tolerance),
                                        (torch.float32, "sdpa", fp32_tolerance),
                                        (torch.float64, "sdpa", fp64_tolerance)):
        ours, reference = ours.to(dtype), reference.to(dtype)
        reference.set_attn_implementation(attention)
        with torch.no_grad():
            out = reference(ids, output_hidden_states=True)
            pairs = {"last": (ours(ids), out.last_hidden_state)}
            for k in clip_skips:  # diffusers: final_layer_norm(hidden_states[-(k + 1)])
                pairs[f"clip_skip={k}"] = (ours(ids, clip_skip=k),
                                           reference.final_layer_norm(out.hidden_states[-(k + 1)]))
        for name, (a, b) in pairs.items():
            label = f"{name} {str(dtype)[6:]} {attention}"
            measured[label] = differences(a, b)
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=lambda m: f"{label}: {m}")
    path.unlink()  # up to 490 MB; pytest keeps the last runs' temporary folders
    print("\nmax |ours − transformers| (absolute / relative to max |transformers|):\n" + "\n".join(
        f"  {k:28s} {a:.2e} / {r:.2e}" for k, (a, r) in measured.items()))
    return measured


# Measured on CPU (torch 2.13, transformers 5.24), outputs of order 4:
#                        vs eager (float32)          vs sdpa (float32)   vs sdpa (float64)
#   tiny (3.3M params)   ≤ 1.2e-6 (relative 2.9e-7)  0 (bit-identical)   0
#   full (123M params)   ≤ 2.3e-6 (relative 5.0e-7)  0 (bit-identical)   0
# Against eager the gap is float32 rounding of a differently ordered computation (a few ulps at |x| ≈ 4); against
# sdpa it is zero because both call the same kernel on the same operands. Tolerances: 1e-5 in float32 (4–8× the
# eager gap; also covers a different SDPA backend on another machine) and 1e-12 in float64. What bugs do (measured
# on the same weights): no causal mask moves outputs by 2–4, exact GELU instead of quick-GELU by 0.02–0.05,
# LayerNorm ε 1e-6 instead of 1e-5 by ~1e-5 — too close to the float32 tolerance, but 10⁷× the float64 one.
FP32_TOLERANCE, FP64_TOLERANCE = 1e-5, 1e-12


@pytest.mark.parity
def test_parity_with_transformers_tiny(tmp_path):
    check_parity(tmp_path, TINY, prompt_ids([0, 3, 40, 76]), clip_skips=[1], fp32_tolerance=FP32_TOLERANCE,
                 fp64_tolerance=FP64_TOLERANCE)


@pytest.mark.parity
@pytest.mark.slow
def test_parity_with_transformers_full_size(tmp_path):
    """SD v1 size (123M params), including AUTOMATIC1111's "Clip skip 2" (= clip_skip=1)."""
    check_parity(tmp_path, CLIPTextConfig(), prompt_ids([0, 3, 40, 76]), clip_skips=[1, 2, 11],
                 fp32_tolerance=FP32_TOLERANCE, fp64_tolerance=FP64_TOLERANCE)


def test_embeddings_draw_like_nn_embedding_and_skip_the_draw_on_the_meta_device():
    """The embedding tables start as nn.Embedding's do (N(0, 1), the same draws from the same seed). Built on the
    meta device, as the checkpoint loader builds them, nothing is drawn: PyTorch's meta-device normal_ imports
    torch._dynamo (68 MiB resident for good), so the process that loads a checkpoint must not reach it."""
    config = CLIPTextConfig(vocab_size=50, width=16, n_layers=1, n_heads=2, mlp_width=32, max_positions=7)
    torch.manual_seed(3)
    ours = CLIPTextModel(config)
    torch.manual_seed(3)
    reference = [torch.nn.Embedding(50, 16).weight, torch.nn.Embedding(7, 16).weight]
    assert torch.equal(ours.token_embedding.weight, reference[0])
    assert torch.equal(ours.position_embedding.weight, reference[1])
    assert ours.token_embedding.weight.requires_grad
    child = ("import sys, torch\n"
             "from ldm_scratch.clip import CLIPTextModel\n"
             "with torch.device('meta'):\n"
             "    model = CLIPTextModel()\n"
             "assert model.token_embedding.weight.is_meta\n"
             "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
