"""SD 2's text encoder: our CLIPTextModel configured as OpenCLIP ViT-H/14's text tower, loaded from open_clip's own
names (checkpoint/openclip_keys.py), against open_clip itself and against transformers' CLIPTextModel as diffusers'
single-file code converts it. Random weights; a small config (fast) and the full-size one (slow).

Measured max |ours − reference| (float32, [2, 77, C] hidden states of magnitude 3.4–4.4): small config 0.0 vs
open_clip and 0.0 vs transformers; full size (23 of 24 blocks of 1024) 3.8e-6 vs open_clip (nn.MultiheadAttention
sums in another order) and 0.0 vs transformers. Tolerances: 1e-5 small, 1e-4 full size, far below what a real
mistake does (asserted: a swapped q/k or the last block instead of the penultimate moves the output by > 1e-2,
quick-GELU instead of GELU by > 1e-3).
"""
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from ldm_scratch.checkpoint.openclip_keys import (LAST_BLOCK_REASON, OPENCLIP_PREFIX, FusedView, map_openclip,
                                                   source_keys, unused_openclip_keys)
from ldm_scratch.checkpoint.loading import fill_module
from ldm_scratch.clip import CLIPTextConfig, CLIPTextModel, openclip_text_config

pytestmark = [pytest.mark.parity]

SMALL = dict(width=64, heads=4, layers=4)


def import_open_clip_transformer():
    """open_clip's text tower module (open_clip/transformer.py) without the package's __init__, which imports
    torchvision for its image transforms; torchvision has no wheel for this CPU torch here. Only the text tower is
    needed; the one name transformer.py's helpers take from torchvision (FrozenBatchNorm2d, for ResNet towers) is
    stood in for while importing, and every stand-in is removed again afterwards."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("needs open-clip-torch (the [reference] extra)")
    try:
        import open_clip.transformer as module      # a full install (with torchvision) imports normally
        return module
    except ImportError:
        pass
    saved = {name: sys.modules.get(name) for name in ("open_clip", "torchvision", "torchvision.ops",
                                                      "torchvision.ops.misc")}
    stub = types.ModuleType("torchvision.ops.misc")
    stub.FrozenBatchNorm2d = nn.BatchNorm2d
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": stub})
    try:
        return importlib.import_module("open_clip.transformer")
    finally:
        for name in [n for n in sys.modules if n.startswith("open_clip")]:
            del sys.modules[name]
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
            else:
                sys.modules.pop(name, None)


def random_tower(width, heads, layers, seed=0):
    """open_clip's TextTransformer with every tensor random (LayerNorms too, so they are tested)."""
    open_clip_transformer = import_open_clip_transformer()
    torch.manual_seed(seed)
    tower = open_clip_transformer.TextTransformer(width=width, heads=heads, layers=layers, output_dim=width,
                                                  act_layer=nn.GELU, output_tokens=True).eval()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return tower


def sd2_state(tower) -> dict[str, torch.Tensor]:
    """The tower as an SD 2 single file stores it: under cond_stage_model.model., with CLIP's logit_scale."""
    state = {OPENCLIP_PREFIX + k: v for k, v in tower.state_dict().items() if k != "attn_mask"}
    state[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    return state


class StateFile:
    """A {key: tensor} dict with the TensorFile interface the loader reads."""

    def __init__(self, state):
        self.state, self.shapes = state, {k: tuple(v.shape) for k, v in state.items()}

    def get(self, key):
        return self.state[key]


def ours_from(state, n_layers) -> CLIPTextModel:
    view = FusedView(StateFile(state))
    mapping = map_openclip(view.shapes)
    width = view.shapes[OPENCLIP_PREFIX + "token_embedding.weight"][1]
    config = CLIPTextConfig(width=width, n_layers=n_layers, n_heads=width // 64 if width >= 1024 else 4,
                            mlp_width=4 * width, activation="gelu")
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return fill_module(model, mapping, view.get, view.shapes, "text encoder").eval()


def open_clip_penultimate(tower, ids):
    """SD 2's FrozenOpenCLIPEmbedder(layer="penultimate"): all blocks but the last, then ln_final."""
    x, attn_mask = tower._embeds(ids)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    return tower.ln_final(x)


def token_ids(seed=0):
    """Two prompts' ids as SD 2's tokenizer makes them: BOS, words, EOS, then padding with id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 77, dtype=torch.long)
    for row, n in enumerate((5, 30)):
        ids[row, 0], ids[row, n + 1] = 49406, 49407
        ids[row, 1:n + 1] = torch.randint(0, 49406, (n,), generator=g)
    return ids


def check_against_open_clip(width, heads, layers, tol):
    tower = random_tower(width, heads, layers)
    state, ids = sd2_state(tower), token_ids()
    with torch.no_grad():
        ours = ours_from(state, layers - 1)(ids)
        reference = open_clip_penultimate(tower, ids)
    assert (ours - reference).abs().max().item() < tol
    return tower, state, ids, ours, reference


def test_small_tower_matches_open_clip_penultimate_and_full():
    tower, state, ids, ours, reference = check_against_open_clip(**SMALL, tol=1e-5)
    assert not any(name.startswith("blocks.3.") for name in map_openclip(state))   # the real last block: unused
    # The whole tower (4 blocks) against open_clip's own forward: the same table maps every block once a later
    # one exists (a dummy block 99, left out), so block 3 loads like the others.
    whole = CLIPTextModel(CLIPTextConfig(width=64, n_layers=4, n_heads=4, mlp_width=256, activation="gelu")).eval()
    padded = {**state, OPENCLIP_PREFIX + "transformer.resblocks.99.ln_1.weight": torch.ones(64)}
    whole_state = {}
    for name, key in map_openclip(padded).items():
        base, _, k = key.partition("#")
        whole_state[name] = state[base].chunk(3)[int(k)] if k else state[base]
    whole.load_state_dict(whole_state)
    with torch.no_grad():
        _, tokens = tower(ids)
        assert (whole(ids) - tokens).abs().max().item() < 1e-5                 # 4 blocks + ln_final = open_clip's
        assert (whole(ids, clip_skip=1) - reference).abs().max().item() < 1e-5  # clip_skip=1 = SD 2's choice
        assert (whole(ids) - reference).abs().max().item() > 1e-2              # the last block changes it


def test_fused_qkv_split_order_and_unused_keys():
    tower = random_tower(**SMALL)
    state = sd2_state(tower)
    mapping = map_openclip(state)
    fused = f"{OPENCLIP_PREFIX}transformer.resblocks.1.attn.in_proj_weight"
    assert [mapping[f"blocks.1.attn.{p}.weight"] for p in "qkv"] == [f"{fused}#0", f"{fused}#1", f"{fused}#2"]
    view = FusedView(StateFile(state))
    assert torch.equal(view.get(f"{fused}#1"), state[fused][64:128])      # rows C … 2C−1 are W_k
    unused = unused_openclip_keys(state)
    assert unused[OPENCLIP_PREFIX + "logit_scale"].startswith("the temperature")
    assert OPENCLIP_PREFIX + "text_projection" in unused
    assert unused[f"{OPENCLIP_PREFIX}transformer.resblocks.3.ln_1.weight"] == LAST_BLOCK_REASON
    # every tensor is either read or allowed by name: nothing is silently dropped
    assert source_keys(mapping) | set(unused) == set(state)


def test_swapped_split_or_quick_gelu_would_be_caught():
    tower = random_tower(**SMALL)
    state, ids = sd2_state(tower), token_ids()
    with torch.no_grad():
        reference = open_clip_penultimate(tower, ids)
        model = ours_from(state, 3)
        model.blocks[0].attn.q.weight, model.blocks[0].attn.k.weight = model.blocks[0].attn.k.weight, \
            model.blocks[0].attn.q.weight
        assert (model(ids) - reference).abs().max().item() > 1e-2
        model = ours_from(state, 3)
        for block in model.blocks:
            block.mlp.activation = lambda x: x * torch.sigmoid(1.702 * x)
        assert (model(ids) - reference).abs().max().item() > 1e-3


def transformers_as_diffusers_converts(state, width, heads, layers):
    """transformers' CLIPTextModel with diffusers' single-file conversion of the OpenCLIP keys (SD 2's
    text_encoder: num_hidden_layers = layers − 1, hidden_act gelu)."""
    transformers = pytest.importorskip("transformers")
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                         num_hidden_layers=layers - 1, num_attention_heads=heads,
                                         max_position_embeddings=77, hidden_act="gelu", projection_dim=width)
    model = transformers.CLIPTextModel(config).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(model, state)
    # diffusers' ignore list names ViT-H's block 23; a smaller tower's last block is dropped here instead
    converted = {k: v for k, v in converted.items() if f"layers.{layers - 1}." not in k}
    if not any(k.startswith("text_model.") for k in model.state_dict()):   # transformers ≥ 5.6: flat names
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def test_small_tower_matches_transformers_as_diffusers_converts():
    tower = random_tower(**SMALL)
    state, ids = sd2_state(tower), token_ids()
    reference_model = transformers_as_diffusers_converts(state, 64, 4, 4)
    with torch.no_grad():
        reference = reference_model(ids).last_hidden_state
        ours = ours_from(state, 3)(ids)
    assert (ours - reference).abs().max().item() < 1e-5


def test_openclip_config_is_vit_h_penultimate():
    config = openclip_text_config()
    assert (config.width, config.n_layers, config.n_heads, config.mlp_width, config.activation) == \
        (1024, 23, 16, 4096, "gelu")
    assert openclip_text_config(24).n_layers == 24


@pytest.mark.slow
def test_full_size_tower_matches_open_clip_and_transformers():
    tower, state, ids, ours, reference = check_against_open_clip(1024, 16, 24, tol=1e-4)
    reference_model = transformers_as_diffusers_converts(state, 1024, 16, 24)
    with torch.no_grad():
        theirs = reference_model(ids).last_hidden_state
    assert (ours - theirs).abs().max().item() < 1e-4
