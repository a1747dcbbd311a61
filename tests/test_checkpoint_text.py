"""Loading the CLIP text encoder from files laid out like the official SD v1 checkpoints.

The reference layout is `ldm_scratch/checkpoint/keys/sd-v1-checkpoint-keys.json` (section `text_encoder`): transformers'
CLIPTextModel state dict under `cond_stage_model.transformer.text_model.`, with `position_ids` [1, 77] int64.
Files in the wild also come without the inner `text_model.`, with `position_ids` stored as float, or without it.

The helpers at the top (`official_text_shapes`, `write_text_file`, `load_text_encoder`) are also used by
test_clip.py's parity tests.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm_scratch import checkpoint
from ldm_scratch.checkpoint import CLIP_RULES, DIFFUSERS_CLIP_RULES, CheckpointError, TensorFile
from ldm_scratch.checkpoint.keymap import clip_config_from_shapes
from ldm_scratch.clip import CLIPTextConfig, CLIPTextModel

PREFIX = "cond_stage_model.transformer."
WITH_TEXT_MODEL = PREFIX + "text_model."  # the official layout
FLAT = PREFIX                             # the variant without the inner text_model.
POSITION_IDS = "embeddings.position_ids"

# Small enough to write and load in milliseconds, large enough to have more than one head and block.
TINY = CLIPTextConfig(vocab_size=1000, width=64, n_layers=2, n_heads=4, mlp_width=256, max_positions=77)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

def official_text_shapes(config: CLIPTextConfig) -> dict[str, tuple]:
    """transformers' CLIPTextModel parameter names (below text_model., without position_ids) and shapes, written
    out from transformers' naming, independently of our rule table."""
    V, C, M, P = config.vocab_size, config.width, config.mlp_width, config.max_positions
    shapes = {"embeddings.token_embedding.weight": (V, C), "embeddings.position_embedding.weight": (P, C)}
    for i in range(config.n_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[layer + f"self_attn.{proj}.weight"] = (C, C)
            shapes[layer + f"self_attn.{proj}.bias"] = (C,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[layer + f"{norm}.weight"] = (C,)
            shapes[layer + f"{norm}.bias"] = (C,)
        shapes.update({layer + "mlp.fc1.weight": (M, C), layer + "mlp.fc1.bias": (M,),
                       layer + "mlp.fc2.weight": (C, M), layer + "mlp.fc2.bias": (C,)})
    shapes["final_layer_norm.weight"] = (C,)
    shapes["final_layer_norm.bias"] = (C,)
    return shapes


def random_tensor(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Values that keep a random transformer well-conditioned (activations of order 1 through every block), so
    parity is measured on numbers like a real model's rather than on saturated softmaxes."""
    if "layer_norm" in name and name.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)      # LayerNorm gain γ ≈ 1
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    if "embedding" in name:
        return torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5  # Linear [out, in]: unit-variance outputs


def write_text_file(path, shapes: dict[str, tuple], key_prefix: str = WITH_TEXT_MODEL, position_ids: str = "int64",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a synthetic text-encoder .safetensors file: `shapes` (transformers names below text_model.) under
    `key_prefix`, plus position_ids stored as "int64" (official), "float" (merging tools: float, off-integer) or
    "absent". Returns the tensors written, by full key."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {key_prefix + name: random_tensor(name, shape, generator).to(dtype) for name, shape in shapes.items()}
    n_positions = shapes["embeddings.position_embedding.weight"][0]
    if position_ids == "int64":
        tensors[key_prefix + POSITION_IDS] = torch.arange(n_positions)[None]
    elif position_ids == "float":  # "broken position ids": cast and slightly off, e.g. 75.99998
        tensors[key_prefix + POSITION_IDS] = (torch.arange(n_positions)[None] - 2e-5 * torch.rand(1, n_positions)
                                              ).to(dtype)
    else:
        assert position_ids == "absent"
    save_file(tensors, str(path))
    return tensors


def load_text_encoder(file: TensorFile, config: CLIPTextConfig | None = None,
                      prefix: str = PREFIX) -> tuple[CLIPTextModel, dict[str, str]]:
    """Our CLIPTextModel filled strictly from `file` (config inferred from shapes unless given), and the mapping
    {our name → file key} that was used."""
    mapping = checkpoint.map_component(file.keys(), prefix, CLIP_RULES)
    if config is None:
        config = clip_config_from_shapes({ours: file.shapes[key] for ours, key in mapping.items()})
    with torch.device("meta"):
        model = CLIPTextModel(config)
    checkpoint.fill_module(model, mapping, file.get, file.shapes, "text encoder")
    return model.eval(), mapping


def reference_text_shapes() -> dict[str, tuple]:
    """The text-encoder section of the reference key list (full official keys)."""
    return {key: tuple(shape) for key, shape in checkpoint.reference_keys()["text_encoder"].items()}


def assert_every_tensor_used(file: TensorFile, mapping: dict[str, str], model: CLIPTextModel) -> None:
    """Every tensor of the file is loaded into a parameter of ours, except position_ids (allow-listed), and each
    parameter holds exactly the file's numbers."""
    allowed = {key for key in file.keys() if key in checkpoint.IGNORED_KEYS}
    assert allowed <= {WITH_TEXT_MODEL + POSITION_IDS, FLAT + POSITION_IDS}
    assert set(mapping.values()) | allowed == set(file.keys())
    state = model.state_dict()
    assert mapping.keys() == state.keys()
    for ours, key in mapping.items():
        assert torch.equal(state[ours], file.get(key)), f"{key} → {ours} holds other numbers"


# ---------------------------------------------------------------------------------------------------------------
# The synthetic layout is the reference layout
# ---------------------------------------------------------------------------------------------------------------

def test_synthetic_layout_equals_reference_json():
    """official_text_shapes(SD v1) + position_ids is exactly the reference key list, names and shapes."""
    ours = {WITH_TEXT_MODEL + name: shape for name, shape in official_text_shapes(CLIPTextConfig()).items()}
    ours[WITH_TEXT_MODEL + POSITION_IDS] = (1, 77)
    assert ours == reference_text_shapes()


def test_rules_map_reference_keys_onto_our_module():
    """Both prefix variants of every reference key land on our parameter names, and the inferred config is SD v1's."""
    reference = reference_text_shapes()
    for inner in ("text_model.", ""):
        keys = [key.replace(WITH_TEXT_MODEL, PREFIX + inner) for key in reference]
        mapping = checkpoint.map_component(keys, PREFIX, CLIP_RULES)
        with torch.device("meta"):
            model = CLIPTextModel()
        assert mapping.keys() == model.state_dict().keys()
        assert len(mapping) == len(keys) - 1  # all but position_ids
        shapes = {ours: reference[key.replace(PREFIX + inner, WITH_TEXT_MODEL)]
                  for ours, key in mapping.items()}
        assert clip_config_from_shapes(shapes) == CLIPTextConfig()
    example = checkpoint.rename("text_model.encoder.layers.3.self_attn.out_proj.weight", CLIP_RULES)
    assert example == "blocks.3.attn.out.weight"


def test_diffusers_text_encoder_keys_map_the_same_way():
    """A diffusers folder's text_encoder/model.safetensors holds the same state dict with no prefix."""
    keys = [key[len(PREFIX):] for key in reference_text_shapes() if not key.endswith(POSITION_IDS)]
    for variant in (keys, [key.removeprefix("text_model.") for key in keys]):  # old / flattened transformers
        mapping = checkpoint.map_component(variant, "", DIFFUSERS_CLIP_RULES)
        with torch.device("meta"):
            assert mapping.keys() == CLIPTextModel().state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# Loading whole files
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size_file(tmp_path_factory):
    """One official-layout text encoder at full SD v1 size (123M params, ~490 MB fp32), written once per session."""
    path = tmp_path_factory.mktemp("clip") / "text_encoder_official.safetensors"
    shapes = {key[len(WITH_TEXT_MODEL):]: shape for key, shape in reference_text_shapes().items()
              if not key.endswith(POSITION_IDS)}
    write_text_file(path, shapes, WITH_TEXT_MODEL, position_ids="int64")
    yield path
    path.unlink()  # pytest keeps the last runs' temporary folders; don't leave 490 MB in each


def test_full_size_official_file_loads_every_tensor(full_size_file):
    file = TensorFile(full_size_file)
    assert file.shapes == reference_text_shapes() and file.dtypes[WITH_TEXT_MODEL + POSITION_IDS] == "int64"
    model, mapping = load_text_encoder(file)
    assert model.config == CLIPTextConfig()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # the count in the reference JSON's notes
    assert_every_tensor_used(file, mapping, model)
    out = model(torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70]))
    assert out.shape == (1, 77, 768) and torch.isfinite(out).all()


@pytest.mark.parametrize("position_ids", ["int64", "float", "absent"])
@pytest.mark.parametrize("key_prefix", [WITH_TEXT_MODEL, FLAT], ids=["text_model", "flat"])
def test_file_variants_load_every_tensor(tmp_path, key_prefix, position_ids):
    """Both prefix variants × position_ids int64 / float / absent, at a tiny size (full size: the slow test)."""
    path = tmp_path / "text.safetensors"
    write_text_file(path, official_text_shapes(TINY), key_prefix, position_ids)
    file = TensorFile(path)
    model, mapping = load_text_encoder(file, TINY)
    assert_every_tensor_used(file, mapping, model)
    assert clip_config_from_shapes({o: file.shapes[k] for o, k in mapping.items()}) == CLIPTextConfig(
        vocab_size=1000, width=64, n_layers=2, n_heads=1, mlp_width=256)  # heads = width / 64 when inferred


def test_fp16_file_loads_in_fp16(tmp_path):
    path = tmp_path / "text-fp16.safetensors"
    write_text_file(path, official_text_shapes(TINY), FLAT, "float", dtype=torch.float16)
    file = TensorFile(path)
    model, mapping = load_text_encoder(file, TINY)
    assert_every_tensor_used(file, mapping, model)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.slow
@pytest.mark.parametrize("position_ids", ["int64", "float", "absent"])
@pytest.mark.parametrize("key_prefix", [WITH_TEXT_MODEL, FLAT], ids=["text_model", "flat"])
def test_full_size_file_variants_load_every_tensor(tmp_path, key_prefix, position_ids):
    shapes = official_text_shapes(CLIPTextConfig())
    path = tmp_path / "text.safetensors"
    write_text_file(path, shapes, key_prefix, position_ids)
    try:
        file = TensorFile(path)
        model, mapping = load_text_encoder(file)
        assert model.config == CLIPTextConfig()
        assert_every_tensor_used(file, mapping, model)
    finally:
        path.unlink()  # 490 MB; pytest keeps the last runs' temporary folders


# ---------------------------------------------------------------------------------------------------------------
# Strictness: a missing, an extra or a wrongly shaped tensor is an error that names it (full-size layout; the
# checks run before any tensor is read, so the source below has shapes only)
# ---------------------------------------------------------------------------------------------------------------

def load_shapes(shapes: dict[str, tuple], config: CLIPTextConfig | None = None) -> None:
    def get(key):
        raise AssertionError(f"read '{key}' although the file should have been refused first")
    mapping = checkpoint.map_component(shapes, PREFIX, CLIP_RULES)
    if config is None:
        config = clip_config_from_shapes({ours: shapes[key] for ours, key in mapping.items()})
    with torch.device("meta"):
        model = CLIPTextModel(config)
    checkpoint.fill_module(model, mapping, get, shapes, "text encoder")


@pytest.mark.parametrize("inferred", [True, False], ids=["inferred-config", "sd-v1-config"])
def test_missing_tensor_is_named(inferred):
    shapes = reference_text_shapes()
    del shapes[WITH_TEXT_MODEL + "encoder.layers.5.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*blocks\.5\.mlp\.fc2\.bias"):
        load_shapes(shapes, None if inferred else CLIPTextConfig())


@pytest.mark.parametrize("extra", [PREFIX + "text_projection.weight",  # CLIPTextModelWithProjection's head
                                   WITH_TEXT_MODEL + "encoder.layers.0.self_attn.rotary.weight"])
def test_extra_tensor_is_named(extra):
    shapes = reference_text_shapes()
    shapes[extra] = (768, 768)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*" + extra.replace(".", r"\.")):
        load_shapes(shapes)


@pytest.mark.parametrize("key, shape, inferred", [
    ("encoder.layers.3.self_attn.k_proj.weight", (768, 767), True),
    ("final_layer_norm.bias", (769,), True),
    ("embeddings.token_embedding.weight", (49407, 768), False),  # with the config given, the vocabulary is checked
])
def test_misshapen_tensor_is_named(key, shape, inferred):
    shapes = reference_text_shapes()
    shapes[WITH_TEXT_MODEL + key] = shape
    with pytest.raises(CheckpointError, match=r"wrong shape.*" + (WITH_TEXT_MODEL + key).replace(".", r"\.")):
        load_shapes(shapes, None if inferred else CLIPTextConfig())


def test_config_inference_names_what_is_missing():
    shapes = {k: v for k, v in reference_text_shapes().items() if "token_embedding" not in k}
    with pytest.raises(CheckpointError, match="token_embedding.weight"):
        load_shapes(shapes)
