"""The attention hook (ldm_scratch/attention.py): every layer seen with the right identity, probabilities readable
and replaceable, and no change at all to the fused path when no hook is set."""
import pytest
import torch
from torch import nn

import ldm_scratch
from ldm_scratch import attention as attn


@pytest.fixture(scope="module")
def pipe():
    return ldm_scratch.load_pipeline()


def unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)                       # the tiny model's latent for a 64² image
    context = torch.randn(2, 77, pipe.config.unet.context_dim, generator=g)
    return x, torch.tensor(500.0), context


def test_every_unet_layer_is_seen_with_name_kind_level_and_resolution(pipe):
    seen = []
    with attn.hooks(pipe.unet, lambda layer, kind, q, k, v, probs: seen.append(
            (layer.name, layer.place, layer.level, kind, layer.tokens, tuple(probs.shape)))) as layers:
        pipe.unet(*unet_inputs(pipe))
    assert len(layers) == 22 and len(seen) == 22                      # 11 transformer blocks × (self, cross)
    assert sorted(s[0] for s in seen) == sorted(info.name for info in layers)   # each layer once per call
    by_name = {s[0]: s for s in seen}
    assert by_name["down.1.attn.0.blocks.0.self_attn"][1:] == ("down", 1, "self", 64, (2, 2, 64, 64))
    assert by_name["down.1.attn.0.blocks.0.cross_attn"][1:] == ("down", 1, "cross", 64, (2, 2, 64, 77))
    assert by_name["middle.attn.blocks.0.cross_attn"][1:] == ("middle", 2, "cross", 16, (2, 2, 16, 77))
    assert by_name["up.2.attn.2.blocks.0.self_attn"][1:] == ("up", 2, "self", 16, (2, 2, 16, 16))
    # the resolution follows the image: at 128² the level-1 maps have (32 / 2)² = 256 tokens
    tokens = {}

    def record(layer, *rest):
        tokens[layer.name] = layer.tokens
    with attn.hooks(pipe.unet, record):
        x, t, context = unet_inputs(pipe)
        pipe.unet(torch.randn(2, 4, 32, 32), t, context)
    assert tokens["down.1.attn.0.blocks.0.self_attn"] == 256 and tokens["middle.attn.blocks.0.self_attn"] == 64


def test_text_encoder_layers_are_causal_self_attention(pipe):
    seen = []
    ids = pipe.tokenizer(["a red circle"])
    plain = pipe.text_encoder(ids)
    with attn.hooks(pipe.text_encoder, lambda layer, kind, q, k, v, probs: seen.append((layer, kind, probs))):
        hooked = pipe.text_encoder(ids)
    assert [(s[0].name, s[0].place, s[0].level, s[1]) for s in seen] == [
        ("blocks.0.attn", "text", None, "self"), ("blocks.1.attn", "text", None, "self")]
    probs = seen[0][2]                                                # [1, heads, 77, 77]
    assert torch.all(probs.triu(1) == 0)                              # token i never sees j > i
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    # the explicit softmax path gives the fused kernel's numbers up to float32 rounding (measured 6.0e-7)
    assert (hooked - plain).abs().max() < 1e-5


def test_looking_does_not_change_the_output_and_replacing_does(pipe):
    inputs = unet_inputs(pipe)
    plain = pipe.unet(*inputs)
    with attn.hooks(pipe.unet, lambda *args: None):
        looked = pipe.unet(*inputs)
    assert (looked - plain).abs().max() < 1e-5                        # measured 1.2e-6 (softmax vs fused kernel)

    def uniform_cross(layer, kind, q, k, v, probs):                   # every pixel reads all 77 tokens equally
        return torch.full_like(probs, 1 / probs.shape[-1]) if kind == "cross" else None
    with attn.hooks(pipe.unet, uniform_cross):
        edited = pipe.unet(*inputs)
    assert (edited - plain).abs().max() > 1e-2


def test_where_selects_layers_and_hooks_nest(pipe):
    calls = []
    with attn.hooks(pipe.unet, lambda layer, *rest: calls.append(("outer", layer.name)),
                    where=lambda layer: layer.kind == "cross"):
        with attn.hooks(pipe.unet, lambda layer, *rest: calls.append(("inner", layer.name)),
                        where=lambda layer: layer.place == "middle"):
            pipe.unet(*unet_inputs(pipe))
        assert ("inner", "middle.attn.blocks.0.cross_attn") in calls
        assert ("inner", "middle.attn.blocks.0.self_attn") in calls
        assert ("outer", "middle.attn.blocks.0.cross_attn") not in calls   # the inner hook took over
        calls.clear()
        pipe.unet(*unet_inputs(pipe))
        assert len(calls) == 11 and all(who == "outer" for who, _ in calls)   # the outer one is back
    assert attn._hooked == {}                                         # everything removed on exit


def test_no_hook_is_bit_identical_to_the_fused_path(pipe):
    """With no hook set, attention(..., layer=m) runs exactly the code it ran before hooks existed."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 64, 48, generator=g) for _ in range(3))
    layer = pipe.unet.down[1].attn[0].blocks[0].self_attn
    before = attn.attention(q, k, v, 2)
    assert torch.equal(attn.attention(q, k, v, 2, layer=layer), before)
    inputs = unet_inputs(pipe)
    plain = pipe.unet(*inputs)
    with attn.hooks(pipe.unet, lambda *args: None):
        pipe.unet(*inputs)
    assert torch.equal(pipe.unet(*inputs), plain)                     # nothing left behind by the hook


def test_bad_hooks_fail_clearly(pipe):
    with pytest.raises(ValueError, match="no attention layer"):
        with attn.hooks(nn.Linear(2, 2), lambda *args: None):
            pass
    with pytest.raises(ValueError, match="must keep the shape"):
        with attn.hooks(pipe.unet, lambda layer, kind, q, k, v, probs: probs[..., :3]):
            pipe.unet(*unet_inputs(pipe))
    with pytest.raises(TypeError, match="return None .only looking. or a tensor"):
        with attn.hooks(pipe.unet, lambda *args: 1.0):
            pipe.unet(*unet_inputs(pipe))
    assert attn._hooked == {}                                         # removed even after an error
