"""Whole-model loading: strict accounting of every official tensor, the tiny model's round trip through the
official layout, EMA, half precision, and a clear error for each kind of bad file."""
import torch
import pytest
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import (CheckpointError, IGNORED_KEYS, _network_classes, check_mapping, ema_key,
                                    load_models, plan_single_file, reference_keys, save_official)
from ldm_scratch.configs import METADATA_KEY
from tinymodels import random_networks, tiny_config

KEYS = reference_keys()
SECTIONS = ("unet", "vae", "text_encoder")


def official_shapes(extra_sections=(), without_text_model=False, inpainting=False):
    shapes = {k: tuple(v) for s in SECTIONS + tuple(extra_sections) for k, v in KEYS[s].items()}
    if inpainting:
        shapes.update({k: tuple(v) for k, v in KEYS["inpainting"]["changed_shapes"].items()})
        if "model_ema" in extra_sections:
            shapes.update({k: tuple(v) for k, v in KEYS["inpainting"]["changed_shapes_ema"].items()})
    if without_text_model:  # the variant some tools write: no inner 'text_model.'
        shapes = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                  for k, v in shapes.items()}
    return shapes


def account(shapes, use_ema=False):
    """Plan the load from names and shapes only and check it against full-size networks on the meta device."""
    mappings, config = plan_single_file(shapes, {}, __import__("pathlib").Path("synthetic.safetensors"), use_ema)
    for name, (network_class, _, what) in _network_classes().items():
        with torch.device("meta"):
            check_mapping(network_class(getattr(config, name)), mappings[name], shapes, what)
    return mappings, config


@pytest.mark.parametrize("extra", [(), ("ddpm_buffers",), ("ddpm_buffers", "model_ema")])
@pytest.mark.parametrize("without_text_model", [False, True])
@pytest.mark.parametrize("inpainting", [False, True])
def test_every_official_tensor_is_used_once_or_allowed(extra, without_text_model, inpainting):
    shapes = official_shapes(extra, without_text_model, inpainting)
    mappings, config = account(shapes)
    used = [key for mapping in mappings.values() for key in mapping.values()]
    assert len(used) == len(set(used))  # exactly once
    left = set(shapes) - set(used)
    assert all(k in IGNORED_KEYS or k.startswith("model_ema.") for k in left), sorted(left)[:5]
    expected = {"unet": 686, "vae": 248, "text_encoder": 196}  # 197 text keys minus position_ids (allow-listed)
    assert {name: len(m) for name, m in mappings.items()} == expected
    assert config.unet.in_channels == (9 if inpainting else 4)
    assert config.kind == ("sd-v1-inpainting" if inpainting else "sd-v1")
    assert (config.unet.model_channels, config.unet.channel_mult, config.unet.context_dim) == (320, (1, 2, 4, 4), 768)
    assert (config.text_encoder.width, config.text_encoder.n_layers, config.text_encoder.n_heads) == (768, 12, 12)
    assert (config.vae.base_channels, config.vae.channel_mult, config.vae.z_channels) == (128, (1, 2, 4, 4), 4)
    if "model_ema" in extra:
        ema_mappings, _ = account(shapes, use_ema=True)
        assert set(ema_mappings["unet"].values()) == {ema_key(k) for k in mappings["unet"].values()}


def test_param_counts_match_the_official_model():
    _, config = account(official_shapes())
    counts = {}
    for name, (network_class, _, _) in _network_classes().items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in network_class(getattr(config, name)).parameters())
    assert counts == {"unet": 859520964, "vae": 83653863, "text_encoder": 123060480}


@pytest.mark.parametrize("problem", ["missing", "extra", "misshapen"])
def test_accounting_errors_name_the_key(problem):
    shapes = official_shapes()
    victim = "model.diffusion_model.output_blocks.5.2.conv.weight"
    if problem == "missing":
        del shapes[victim]
        match = "missing 1 tensor.*upsample"  # named by our parameter that has no tensor
    elif problem == "extra":
        shapes["model.diffusion_model.some_new_layer.weight"] = (3, 3)
        match = "unexpected tensor.*model.diffusion_model.some_new_layer.weight"
    else:
        shapes[victim] = (1, 2, 3, 3)
        match = f"wrong shape.*{victim}"
    with pytest.raises(CheckpointError, match=match):
        account(shapes)


def test_a_tensor_of_no_known_network_is_an_error():
    shapes = official_shapes()
    shapes["lora_unet_down_blocks_0.alpha"] = ()
    with pytest.raises(CheckpointError, match="belong to no network we know.*lora_unet"):
        account(shapes)


def test_use_ema_without_ema_weights_says_so():
    with pytest.raises(CheckpointError, match="no EMA weights"):
        account(official_shapes(), use_ema=True)


# --- the tiny model through a real file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_config()
    networks = random_networks(config)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_official(path, *networks, config)
    return config, networks, path


def outputs(text_encoder, unet, vae):
    torch.manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77))
    x = torch.randn(2, 4, 8, 8)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        context = text_encoder(ids)
        return context, unet(x, torch.tensor([10, 900]), context), vae.decode(x[:1]), vae.encode(image).mean


def test_tiny_model_round_trips_through_the_official_layout(tiny):
    config, networks, path = tiny
    tensors = load_file(path)
    official = {k: v for s in SECTIONS for k, v in KEYS[s].items()}
    assert set(tensors) <= set(official)  # every tensor carries an official SD v1 name …
    assert all(t.dim() == len(official[k]) for k, t in tensors.items())  # … and the official rank (1×1 convs)
    loaded = load_models(path)
    assert loaded.config == config
    for ours, theirs in zip(outputs(*networks), outputs(loaded.text_encoder, loaded.unet, loaded.vae)):
        assert torch.equal(ours, theirs)


def _rewrite(path, tmp_path, change, name="changed.safetensors"):
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = change(tensors) or tensors
    save_file(tensors, tmp_path / name, metadata=metadata)
    return tmp_path / name


def test_ema_weights_are_taken_when_asked(tiny, tmp_path):
    config, networks, path = tiny
    def add_ema(t):
        for key in [k for k in t if k.startswith("model.diffusion_model.")]:
            t[ema_key(key)] = t[key] + 1.0
        t["model_ema.decay"], t["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    with_ema = _rewrite(path, tmp_path, add_ema)
    plain, ema = load_models(with_ema), load_models(with_ema, use_ema=True)
    for (name, p), q in zip(plain.unet.state_dict().items(), ema.unet.state_dict().values()):
        assert torch.equal(q, p + 1.0), name


def test_fp16_file_and_schedule_buffers_and_position_ids(tiny, tmp_path):
    config, networks, path = tiny
    def change(t):
        t = {k: v.half() for k, v in t.items()}
        t["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # float, as some merges store it
        return t
    loaded = load_models(_rewrite(path, tmp_path, change), dtype=torch.float32)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    for name, p in networks[1].state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], p.half().float()), name


def test_nan_in_a_file_is_an_error_and_nothing_is_returned(tiny, tmp_path):
    _, _, path = tiny
    def poison(t):
        t["first_stage_model.decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="decoder.conv_out.*NaN"):
        load_models(_rewrite(path, tmp_path, poison))


@pytest.mark.parametrize("where", [0, 4, 7, 8, 20])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_reads_every_chunk(where, bad):
    """The finiteness check reads the tensor in chunks (a small temporary instead of a tensor-sized one): a bad
    value anywhere is found, on either side of a chunk boundary, in any dtype."""
    from ldm_scratch.checkpoint import _all_finite
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(3, 7).to(dtype)
        assert _all_finite(t, chunk=4)
        t.view(-1)[where] = bad
        assert not _all_finite(t, chunk=4)


def test_incomplete_sd2_and_sdxl_files_are_named_and_refused(tmp_path):
    v2 = {"cond_stage_model.model.positional_embedding": torch.zeros(77, 8),
          "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    save_file(v2, tmp_path / "v2.safetensors")
    with pytest.raises(CheckpointError, match="incomplete Stable Diffusion 2.x checkpoint"):
        load_models(tmp_path / "v2.safetensors")
    save_file({"conditioner.embedders.0.x": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="Stable Diffusion XL"):
        load_models(tmp_path / "xl.safetensors")


def test_save_never_overwrites(tiny, tmp_path):
    config, networks, path = tiny
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_official(path, *networks, config)


def test_inspect_reports_the_file(tiny, capsys):
    from ldm_scratch.cli import main
    _, _, path = tiny
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind:       sd-v1" in out and "every tensor accounted for" in out and "config (metadata)" in out


@pytest.mark.slow
def test_full_size_fp16_file_with_ema_and_buffers_loads_strictly(tmp_path):
    from synthetic_checkpoint import synthetic_state
    state = synthetic_state(dtype=torch.float16, ema=True, buffers=True)
    save_file(state, tmp_path / "sd-v1-full-ema-fp16.safetensors")
    path = tmp_path / "sd-v1-full-ema-fp16.safetensors"
    live = load_models(path, dtype=torch.float32)
    assert live.config.kind == "sd-v1" and next(live.unet.parameters()).dtype == torch.float32
    from ldm_scratch.checkpoint import UNET_RULES, rename
    key = "model.diffusion_model.output_blocks.11.1.proj_out.weight"
    ours = rename(key[len("model.diffusion_model."):], UNET_RULES)
    assert torch.equal(live.unet.state_dict()[ours], state[key].float())
    del live
    ema = load_models(path, use_ema=True)  # file dtype kept: fp16
    assert next(ema.unet.parameters()).dtype == torch.float16
    assert torch.equal(ema.unet.state_dict()[ours], state[ema_key(key)])
