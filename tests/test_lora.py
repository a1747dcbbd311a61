"""LoRA loading on tiny random networks: the update W' = W + scale·(α/r)·B A, the file formats (kohya / A1111,
diffusers / PEFT, older diffusers), several LoRAs at once, exact unloading, and strictness.

Parity with diffusers' `load_lora_weights` is in tests/test_lora_parity.py."""
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from ldm_scratch import lora
from ldm_scratch.checkpoint.lora_keys import kohya_name, lora_targets, parse_key
from tinymodels import random_networks, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Layers of every kind a LoRA may target: attention (self and cross), GEGLU MLP, 1×1 proj_in conv, 3×3 ResBlock
# conv, 1×1 skip conv, time_emb_proj, the downsample conv, and the text encoder's attention and MLP.
LAYERS = [("unet", "down.0.attn.0.blocks.0.self_attn.to_q"), ("unet", "up.2.attn.1.blocks.0.cross_attn.to_k"),
          ("unet", "middle.attn.blocks.0.self_attn.to_out"), ("unet", "down.1.attn.0.blocks.0.ff.geglu"),
          ("unet", "up.1.attn.2.blocks.0.ff.out"), ("unet", "down.0.attn.1.proj_in"),
          ("unet", "down.1.res.0.conv1"), ("unet", "up.3.res.0.skip"), ("unet", "middle.res2.time_proj"),
          ("unet", "down.2.downsample"), ("unet", "time_embedding.linear1"), ("unet", "up.1.upsample.conv"),
          ("text_encoder", "blocks.0.attn.q"), ("text_encoder", "blocks.1.mlp.fc1"),
          ("text_encoder", "blocks.1.attn.out")]


def tiny_pipe(seed=0):
    text_encoder, unet, vae = random_networks(tiny_config(), seed)
    return SimpleNamespace(text_encoder=text_encoder, unet=unet, vae=vae)


def module(pipe, network, name):
    return getattr(pipe, network).get_submodule(name)


def random_pair(weight: torch.Tensor, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in(, k, k)] and B [out, r(, 1, 1)], both non-zero (a trained B; B = 0 would test nothing)."""
    out, rest = weight.shape[0], tuple(weight.shape[1:])
    down = torch.randn(rank, *rest, generator=generator) / math.sqrt(math.prod(rest))
    up = torch.randn(out, rank, *((1, 1) if weight.dim() == 4 else ()), generator=generator) * 0.1
    return down, up


def kohya_state(pipe, layers=LAYERS, rank=4, alpha=2.0, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for network, name in layers:
        key = kohya_name(network, name)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = random_pair(
            module(pipe, network, name).weight, rank, generator)
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def to_peft(state: dict) -> dict:
    """The same LoRA in diffusers' current (PEFT) spelling: unet.<path>.lora_A.weight."""
    targets = lora_targets({"unet": tiny_pipe().unet, "text_encoder": tiny_pipe().text_encoder})
    out = {}
    for key, tensor in state.items():
        layer, role = parse_key(key)
        if role == "alpha":
            continue
        target = targets[layer]
        path = next(k for k, t in targets.items() if t is target and k.startswith(f"{target.network}."))
        out[f"{path}.lora_{'A' if role == 'down' else 'B'}.weight"] = tensor
    return out


def save(tmp_path, state, name="style.safetensors"):
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def expected_weight(pipe_before, state, network, name, scale, rank=4, alpha=2.0):
    """W + scale·(α/r)·B A, computed here from the file's tensors."""
    key = kohya_name(network, name)
    w = module(pipe_before, network, name).weight
    down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
    return w + scale * (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# The update and its scale
# ---------------------------------------------------------------------------------------------------------------

def test_kohya_lora_adds_scaled_low_rank_update_to_every_kind_of_layer(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    state = kohya_state(pipe)
    name = lora.load_lora(pipe, save(tmp_path, state), scale=0.7)
    assert name == "style"
    for network, layer in LAYERS:
        got = module(pipe, network, layer).weight
        torch.testing.assert_close(got, expected_weight(before, state, network, layer, 0.7), rtol=0, atol=1e-6)
        assert not torch.equal(got, module(before, network, layer).weight)
    # layers the file does not name are untouched
    assert torch.equal(pipe.unet.down[0].res[0].conv2.weight, before.unet.down[0].res[0].conv2.weight)


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    state = kohya_state(pipe, alpha=None)
    lora.load_lora(pipe, save(tmp_path, state))
    network, layer = LAYERS[0]
    torch.testing.assert_close(module(pipe, network, layer).weight,
                               expected_weight(before, state, network, layer, 1.0, alpha=4.0), rtol=0, atol=1e-6)


def test_set_scale_and_several_loras_add_up(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    a, b = kohya_state(pipe, seed=1), kohya_state(pipe, LAYERS[:3], seed=2)
    lora.load_lora(pipe, save(tmp_path, a, "a.safetensors"), scale=1.0)
    lora.load_lora(pipe, save(tmp_path, b, "b.safetensors"), scale=0.5, name="second")
    lora.set_lora_scale(pipe, "a", -0.3)
    network, layer = LAYERS[0]
    w = module(before, network, layer).weight
    delta_a = expected_weight(before, a, network, layer, 1.0) - w
    delta_b = expected_weight(before, b, network, layer, 1.0) - w
    torch.testing.assert_close(module(pipe, network, layer).weight, w - 0.3 * delta_a + 0.5 * delta_b,
                               rtol=0, atol=1e-6)
    lora.set_lora_scale(pipe, "a", 0.0)  # scale 0 switches a LoRA off without unloading it
    torch.testing.assert_close(module(pipe, network, layer).weight, w + 0.5 * delta_b, rtol=0, atol=1e-6)


def test_unload_restores_the_original_weights_bit_for_bit(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    originals = {(n, l): module(pipe, n, l).weight for n, l in LAYERS}
    lora.load_lora(pipe, save(tmp_path, kohya_state(pipe, seed=1), "a.safetensors"))
    lora.load_lora(pipe, save(tmp_path, kohya_state(pipe, LAYERS[:5], seed=2), "b.safetensors"), scale=0.9)
    lora.set_lora_scale(pipe, "b", 0.37)
    lora.unload_lora(pipe, "a")
    assert module(pipe, *LAYERS[-1]).weight is originals[LAYERS[-1]]       # only "a" touched it
    assert module(pipe, *LAYERS[0]).weight is not originals[LAYERS[0]]     # "b" is still on it
    lora.unload_lora(pipe)
    for key, original in originals.items():
        assert module(pipe, *key).weight is original                     # the very Parameter, not a copy
    for (name, p), (_, q) in zip(pipe.unet.state_dict().items(), before.unet.state_dict().items()):
        assert torch.equal(p, q), name


def test_channels_last_weights_keep_their_layout(tmp_path):
    pipe = tiny_pipe()
    pipe.unet.to(memory_format=torch.channels_last)   # what load_pipeline's fast path does
    lora.load_lora(pipe, save(tmp_path, kohya_state(pipe)))
    assert pipe.unet.down[1].res[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_pipeline_cast_after_loading_stays_in_its_new_dtype(tmp_path):
    pipe = tiny_pipe()
    lora.load_lora(pipe, save(tmp_path, kohya_state(pipe)))
    pipe.unet.to(torch.bfloat16)
    lora.set_lora_scale(pipe, "style", 0.5)
    assert pipe.unet.down[1].res[0].conv1.weight.dtype == torch.bfloat16
    lora.unload_lora(pipe)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# The formats give the same weights
# ---------------------------------------------------------------------------------------------------------------

def old_processor_spelling(peft: dict) -> dict:
    """diffusers 0.14–0.21: …attn1.processor.to_q_lora.down.weight (UNet), …self_attn.to_q_lora.up.weight (text)."""
    out = {}
    for key, tensor in peft.items():
        role = "down" if key.endswith("lora_A.weight") else "up"
        path = key.rsplit(".lora_", 1)[0]
        for ours, old in ((".to_out.0", ".processor.to_out_lora"), (".to_q", ".processor.to_q_lora"),
                          (".to_k", ".processor.to_k_lora"), (".q_proj", ".to_q_lora"), (".out_proj", ".to_out_lora")):
            if path.endswith(ours) and (".attn" in path or "self_attn" in path):
                path = path[: -len(ours)] + old
                break
        else:
            path += ".lora_linear_layer" if path.startswith("text_encoder") else ".lora"
        out[f"{path}.{role}.weight"] = tensor
    return out


@pytest.mark.parametrize("spelling", ["peft", "old diffusers"])
def test_diffusers_spellings_give_the_kohya_weights(tmp_path, spelling):
    reference, pipe = tiny_pipe(), tiny_pipe()
    state = kohya_state(reference, alpha=None)       # diffusers files carry no alpha: α = r on both sides
    lora.load_lora(reference, save(tmp_path, state, "kohya.safetensors"))
    other = to_peft(state) if spelling == "peft" else old_processor_spelling(to_peft(state))
    assert not set(other) & set(state)
    lora.load_lora(pipe, save(tmp_path, other, "diffusers.safetensors"))
    for network, layer in LAYERS:
        assert torch.equal(module(pipe, network, layer).weight, module(reference, network, layer).weight)


def test_text_encoder_names_without_text_model_are_accepted(tmp_path):
    pipe = tiny_pipe()
    peft = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in to_peft(kohya_state(pipe)).items()}
    lora.load_lora(pipe, save(tmp_path, peft))
    assert len(pipe.loras.loras["style"].updates) == len(LAYERS)


def test_ckpt_lora_is_read_weights_only(tmp_path):
    pipe = tiny_pipe()
    path = tmp_path / "old.pt"
    torch.save(kohya_state(pipe), path)
    assert lora.load_lora(pipe, path) == "old"


# ---------------------------------------------------------------------------------------------------------------
# LyCORIS LoHa and LoKr: ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b) and (α/r)·W1 ⊗ W2, checked element by element here
# ---------------------------------------------------------------------------------------------------------------

def test_loha_is_a_hadamard_product_of_two_low_rank_products(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    g = torch.Generator().manual_seed(3)
    state, expected = {}, {}
    for network, name in [("unet", "down.0.attn.0.blocks.0.cross_attn.to_v"), ("unet", "down.1.res.0.conv1")]:
        w = module(before, network, name).weight
        out, rest = w.shape[0], math.prod(w.shape[1:])
        f = {"hada_w1_a": torch.randn(out, 3, generator=g), "hada_w1_b": torch.randn(3, rest, generator=g),
             "hada_w2_a": torch.randn(out, 3, generator=g), "hada_w2_b": torch.randn(3, rest, generator=g)}
        state.update({f"{kohya_name(network, name)}.{k}": v for k, v in f.items()})
        state[f"{kohya_name(network, name)}.alpha"] = torch.tensor(1.5)
        hadamard = torch.einsum("or,ri->oi", f["hada_w1_a"], f["hada_w1_b"]) * torch.einsum(
            "or,ri->oi", f["hada_w2_a"], f["hada_w2_b"])
        expected[network, name] = w + 0.6 * (1.5 / 3) * hadamard.reshape(w.shape)
    lora.load_lora(pipe, save(tmp_path, state, "loha.safetensors"), scale=0.6)
    for key, weight in expected.items():
        torch.testing.assert_close(module(pipe, *key).weight, weight, rtol=0, atol=1e-5)
    lora.unload_lora(pipe)
    assert torch.equal(module(pipe, *key).weight, module(before, *key).weight)


def kronecker(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(W1 ⊗ W2)[a·o2 + b, c·i2 + d, …] = W1[a, c] · W2[b, d, …], written out."""
    o1, i1 = w1.shape
    o2, i2 = w2.shape[:2]
    return torch.einsum("ac,bd...->abcd...", w1, w2).reshape(o1 * o2, i1 * i2, *w2.shape[2:])


def test_lokr_is_a_kronecker_product(tmp_path):
    pipe, before = tiny_pipe(), tiny_pipe()
    g = torch.Generator().manual_seed(4)
    linear, conv = ("text_encoder", "blocks.0.mlp.fc1"), ("unet", "down.1.res.1.conv2")   # [64, 32], [64, 64, 3, 3]
    w2_a, w2_b = torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g)         # W2 = W2a W2b, rank 2
    factors = {linear: {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": w2_a, "lokr_w2_b": w2_b},
               conv: {"lokr_w1": torch.randn(8, 4, generator=g), "lokr_w2": torch.randn(8, 16, 3, 3, generator=g)}}
    state = {f"{kohya_name(*key)}.{k}": v for key, f in factors.items() for k, v in f.items()}
    state[f"{kohya_name(*linear)}.alpha"] = torch.tensor(1.0)   # α/r = 1/2 (r = W2b's rank)
    state[f"{kohya_name(*conv)}.alpha"] = torch.tensor(7.0)     # nothing factored: no α/r
    lora.load_lora(pipe, save(tmp_path, state, "lokr.safetensors"))
    w = module(before, *linear).weight
    torch.testing.assert_close(module(pipe, *linear).weight,
                               w + 0.5 * kronecker(factors[linear]["lokr_w1"], w2_a @ w2_b), rtol=0, atol=1e-5)
    w = module(before, *conv).weight
    torch.testing.assert_close(module(pipe, *conv).weight,
                               w + kronecker(factors[conv]["lokr_w1"], factors[conv]["lokr_w2"]), rtol=0, atol=1e-5)


def test_loha_and_lokr_shapes_are_checked(tmp_path):
    key = kohya_name("unet", "down.0.attn.0.blocks.0.self_attn.to_q")   # [32, 32]
    loha = {f"{key}.hada_w1_a": torch.zeros(32, 2), f"{key}.hada_w1_b": torch.zeros(2, 31),
            f"{key}.hada_w2_a": torch.zeros(32, 2), f"{key}.hada_w2_b": torch.zeros(2, 31)}
    refused(tmp_path, loha, "hada_w1_b [2, 31]", "do not fit")
    refused(tmp_path, {f"{key}.lokr_w1": torch.zeros(4, 4), f"{key}.lokr_w2": torch.zeros(8, 4)}, "do not fit")
    refused(tmp_path, {f"{key}.lokr_w1": torch.zeros(4, 4)}, "lokr_w1", "LoHa/LoKr factors")


# ---------------------------------------------------------------------------------------------------------------
# Strict: every tensor used, every layer found, shapes that fit — else an error listing the keys, nothing changed
# ---------------------------------------------------------------------------------------------------------------

def refused(tmp_path, state, *words):
    pipe, before = tiny_pipe(), tiny_pipe()
    with pytest.raises(lora.LoraError) as error:
        lora.load_lora(pipe, save(tmp_path, state, "bad.safetensors"))
    for word in words:
        assert word in str(error.value), str(error.value)
    for (name, p), (_, q) in zip(pipe.unet.state_dict().items(), before.unet.state_dict().items()):
        assert torch.equal(p, q), f"{name} changed although loading failed"
    return str(error.value)


def test_unknown_key_is_listed(tmp_path):
    state = kohya_state(tiny_pipe())
    state["lora_unet_down_blocks_0_attentions_0_proj_in.some_extra.weight"] = torch.zeros(1)
    refused(tmp_path, state, "lora_unet_down_blocks_0_attentions_0_proj_in.some_extra.weight", "not LoRA weights")


def test_layer_that_does_not_exist_is_listed(tmp_path):
    state = kohya_state(tiny_pipe())
    state["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 3)
    state["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = torch.zeros(3, 4)
    refused(tmp_path, state, "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight", "do not have")


def test_half_a_pair_is_listed(tmp_path):
    state = kohya_state(tiny_pipe())
    del state[f"{kohya_name('unet', 'down.1.res.0.conv1')}.lora_up.weight"]
    refused(tmp_path, state, kohya_name("unet", "down.1.res.0.conv1"), "down/up pair")


def test_wrong_shape_is_listed(tmp_path):
    state = kohya_state(tiny_pipe())
    key = f"{kohya_name('text_encoder', 'blocks.0.attn.q')}.lora_down.weight"
    state[key] = torch.zeros(4, 31)
    refused(tmp_path, state, kohya_name("text_encoder", "blocks.0.attn.q"), "[4, 31]", "do not fit")


def test_non_finite_tensors_are_listed(tmp_path):
    state = kohya_state(tiny_pipe())
    key = f"{kohya_name('unet', 'down.1.res.0.conv1')}.lora_up.weight"
    state[key][0, 0] = float("nan")
    refused(tmp_path, state, key, "NaN or inf")


@pytest.mark.parametrize("key, words", [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "SDXL"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_t1", "Tucker"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
    ("emb_params", "textual-inversion"),
])
def test_other_kinds_of_file_are_named(tmp_path, key, words):
    refused(tmp_path, {key: torch.zeros(2, 2)}, words)


def test_bad_calls(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(lora.LoraError, match="does not exist"):
        lora.load_lora(pipe, tmp_path / "missing.safetensors")
    path = save(tmp_path, kohya_state(pipe))
    lora.load_lora(pipe, path)
    with pytest.raises(lora.LoraError, match="already loaded"):
        lora.load_lora(pipe, path)
    with pytest.raises(lora.LoraError, match="no LoRA named 'other'"):
        lora.set_lora_scale(pipe, "other", 1.0)
    with pytest.raises(lora.LoraError, match="no LoRA named"):
        lora.unload_lora(pipe, "other")
    with pytest.raises(lora.LoraError, match="no LoRA weights"):
        lora.load_lora(pipe, save(tmp_path, {}, "empty.safetensors"))


@pytest.mark.parametrize("text, expected", [("x.safetensors", ("x.safetensors", 1.0)),
                                            ("x.safetensors:0.6", ("x.safetensors", 0.6)),
                                            ("C:\\loras\\x.safetensors:-1", ("C:\\loras\\x.safetensors", -1.0)),
                                            ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0))])
def test_cli_lora_option(text, expected):
    assert lora.parse_lora_option(text) == expected
