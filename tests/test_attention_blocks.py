"""bfloat16 self-attention in blocks of queries (ldm_scratch/fast/attention_blocks.py): softmax(Q Kᵀ/√d) V block by
block, the plain Attention wherever the blocks do not apply (install and load_pipeline: tests/test_fast.py).

Tolerance. The blocks round the scores Q Kᵀ/√d to bfloat16 before the softmax; the fused kernel keeps them in
float32, so the blocks' error grows with the scores' size (a score s is rounded by up to |s|·2⁻⁸). Measured on the
test's data (bfloat16 q, k, v of unit variance, 16-channel heads, |scores| up to 5.6), against float32 attention on
the same numbers: largest error 0.0016 for the kernel, 0.008 for the blocks (the same for every block size); with
q doubled (|scores| up to 11) 0.005 and 0.034. The check allows 0.02 absolute, 2.5× the blocks' measured error; a
missing or doubled 1/√d, a wrong head or a wrong block edge moves outputs by ≈ 0.5 (q scaled by 1.25: 0.55).
Cases that run the plain Attention must equal it exactly: the same code.
"""
import pytest
import torch
import torch.nn.functional as F

from ldm_scratch.attention import hooks
from ldm_scratch.fast.attention_blocks import BlockedAttention, blocked_attention, query_rows, use_attention_blocks
from ldm_scratch.spatial_transformer import Attention
from ldm_scratch.unet import UNet
from tinymodels import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("queries, keys, element_size, rows", [
    (4096, 4096, 2, 512),        # SD v1 at 512², level 1: 512 × 4096 bfloat16 scores = 4 MiB
    (1024, 1024, 2, 1024),       # level 2: all 1024 queries fit in 4 MiB (2 MiB of scores)
    (9216, 9216, 2, 227),        # 768² level 1: 4 MiB // (9216 · 2 bytes)
    (10, 3_000_000, 2, 1),       # at least one query, however many keys
])
def test_query_rows(queries, keys, element_size, rows):
    assert query_rows(queries, keys, element_size) == rows


def test_rounding_a_score_to_bfloat16_moves_it_by_at_most_a_2_to_the_minus_8th():
    """The docstring's cost: a score s becomes s(1 + δ) with |δ| ≤ 2⁻⁸ (8 significant bits, round to nearest: half
    the spacing 2^(e−7) of numbers in [2^e, 2^(e+1)))."""
    s = torch.randn(100_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 20
    moved = (s.float().bfloat16().double() - s.float().double()).abs()
    assert (moved <= s.float().double().abs() * 2**-8).all()
    assert (moved > s.abs() * 2**-9).any()                         # and more than half the bound is reached


def reference(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V in float32 on the same (bfloat16) numbers, per head: [B, N, C]."""
    split = [x.float().unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(-2)


@pytest.mark.parametrize("rows", [None, 7, 64, 1000], ids=lambda r: f"rows={r}")
def test_blocks_compute_softmax_attention(rows):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 64, generator=g).bfloat16()     # 300 queries: blocks of 7 leave a remainder
    k, v = (torch.randn(2, 260, 64, generator=g).bfloat16() for _ in range(2))
    out = blocked_attention(q, k, v, n_heads=4, rows=rows)
    assert out.shape == (2, 300, 64) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, 4), atol=0.02, rtol=0)


@pytest.mark.parametrize("rows, heads, message", [(0, 4, "positive"), (-5, 4, "positive"), (2.5, 4, "positive"),
                                                  (None, 3, "do not split into 3 heads")])
def test_bad_blocks_are_refused(rows, heads, message):
    q = k = v = torch.zeros(1, 8, 64).bfloat16()
    with pytest.raises(ValueError, match=message):
        blocked_attention(q, k, v, n_heads=heads, rows=rows)


def layer(dtype=torch.bfloat16, upcast=False, context_dim=None, seed=0) -> Attention:
    torch.manual_seed(seed)
    return Attention(32, 4, context_dim=context_dim, upcast=upcast).to(dtype).eval()


def test_bfloat16_self_attention_takes_the_blocks(monkeypatch):
    import ldm_scratch.fast.attention_blocks as module
    taken, real = [], module.blocked_attention
    monkeypatch.setattr(module, "blocked_attention", lambda *a, **kw: taken.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(2, 96, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    plain, blocked = layer(), use_attention_blocks(layer())        # the same seed: the same weights
    blocked.min_keys = 1
    with torch.inference_mode():
        want, got = plain(x), blocked(x)
    assert taken == [torch.Size([2, 96, 32])]
    torch.testing.assert_close(got.float(), want.float(), atol=0.02, rtol=0)


@pytest.mark.parametrize("case", ["float32", "not the CPU", "upcast", "few keys", "hooked", "training"])
def test_the_plain_path_where_blocks_do_not_apply(case, monkeypatch):
    import ldm_scratch.fast.attention_blocks as module
    monkeypatch.setattr(module, "blocked_attention", lambda *a, **kw: pytest.fail(f"blocks taken ({case})"))
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    blocked = use_attention_blocks(layer(dtype, upcast=case == "upcast"))
    plain = layer(dtype, upcast=case == "upcast")
    blocked.min_keys = 97 if case == "few keys" else 1                # 96 keys: one too few
    x = torch.randn(2, 96, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    if case == "training":
        blocked.train()
        out = blocked(x.requires_grad_())
        out.float().square().sum().backward()
        assert x.grad is not None and blocked.to_q.weight.grad is not None
        return
    if case == "not the CPU":                                     # the meta device stands in for a GPU
        blocked.to("meta")
        with torch.inference_mode():
            assert blocked(x.to("meta")).device.type == "meta"
        return
    if case == "hooked":
        seen = []
        with hooks(torch.nn.ModuleDict({"self_attn": blocked}), lambda *a: seen.append(a[1])):
            with torch.inference_mode():
                blocked(x)
        assert seen == ["self"]
        return
    with torch.inference_mode():
        assert torch.equal(blocked(x), plain(x))                  # the same code, the same numbers


def test_cross_attention_keeps_the_kernel_below_min_keys(monkeypatch):
    import ldm_scratch.fast.attention_blocks as module
    monkeypatch.setattr(module, "blocked_attention", lambda *a, **kw: pytest.fail("blocks taken for 77 keys"))
    blocked = use_attention_blocks(layer(context_dim=24))
    x = torch.randn(1, 300, 32).bfloat16()
    context = torch.randn(1, 77, 24).bfloat16()                     # CLIP's 77 tokens < MIN_KEYS (256)
    with torch.inference_mode():
        assert blocked(x, context).shape == (1, 300, 32)
