"""Bad files, each refused before any weight is read, with an error that names the problem and the fix (issue 14):

- the model config our own files carry in their metadata (`ldm_scratch_config`): every field checked;
- a file that holds one network, not a whole model (a CLIP text encoder, a UNet, a VAE), and an incomplete one;
- `ldm-scratch inspect` on a folder that is no diffusers model;
- a damaged cached vocabulary, and merge lists with lines moved or swapped.
"""
import gzip
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import CheckpointError, TensorFile, identify, load_models, plan_single_file, reference_keys
from ldm_scratch.cli import main
from ldm_scratch.configs import METADATA_KEY, ModelConfig
from ldm_scratch import vocabulary as V
from ldm_scratch.tokenizer import CorruptVocabularyError, VocabularyNotFoundError, load_tokenizer

from pipeline_fixtures import write_tiny_checkpoint, write_vocabulary


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad_files") / "tiny.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# 1. The model config in the metadata
# ---------------------------------------------------------------------------------------------------------------

def _set(path: str, value):
    """An edit of the config dict: set the field at a dotted path ("unet.model_channels")."""
    def edit(config: dict):
        *parents, last = path.split(".")
        for parent in parents:
            config = config[parent]
        config[last] = value
    return edit


# (name, the metadata text from the valid config dict, words the error must contain)
METADATA_CASES = [
    ("invalid JSON", lambda c: json.dumps(c)[:-7], r"not valid JSON"),
    ("a list", lambda c: "[1, 2]", r"must be a JSON object .*got a list"),
    ("null", lambda c: "null", r"must be a JSON object .*got null"),
    ("latent_scale text", _set("latent_scale", "abc"), r"'latent_scale' must be a positive finite number, got 'abc'"),
    ("latent_scale 0", _set("latent_scale", 0), r"'latent_scale' must be a positive finite number, got 0"),
    ("latent_scale < 0", _set("latent_scale", -0.18), r"'latent_scale' must be a positive finite number"),
    ("latent_scale NaN", _set("latent_scale", float("nan")), r"'latent_scale' must be a positive finite number"),
    ("beta_end < 0", _set("beta_end", -1), r"'beta_end' must be a positive finite number, got -1"),
    ("beta_start ≥ beta_end", _set("beta_start", 0.02), r"'beta_end' must satisfy beta_start < beta_end < 1"),
    ("beta_end ≥ 1", _set("beta_end", 1.5), r"beta_start < beta_end < 1"),
    ("T = 5", _set("num_train_timesteps", 5), r"'num_train_timesteps' must be between 100 and 100,000.*got 5"),
    ("T huge", _set("num_train_timesteps", 10**9), r"'num_train_timesteps' must be between 100 and 100,000"),
    ("T fractional", _set("num_train_timesteps", 999.5), r"'num_train_timesteps' must be a positive whole number"),
    ("T a boolean", _set("num_train_timesteps", True), r"'num_train_timesteps' .*whole number, got True \(a boolean"),
    ("kind", _set("kind", "sd-v3"), r"'kind' must be one of sd-v1, sd-v1-inpainting, sd-v2, sd-v2-inpainting, "
     r"sd-v2-upscaler, tiny"),
    ("image_size", _set("image_size", 60), r"'image_size' must be a multiple of 8"),
    ("unknown field", _set("latent_scal", 0.2), r"unknown field\(s\) \['latent_scal'\]"),
    ("unknown nested field", _set("unet.channels", 3), r"'unet' has unknown field\(s\) \['channels'\]"),
    ("network not an object", _set("unet", [32]), r"'unet' must be a JSON object .*got a list"),
    ("int as text", _set("unet.model_channels", "32"), r"'unet.model_channels' must be a positive whole number"),
    ("int zero", _set("vae.z_channels", 0), r"'vae.z_channels' must be a positive whole number, got 0"),
    ("float as text", _set("vae.norm_eps", "1e-6"), r"'vae.norm_eps' must be a positive finite number"),
    ("tuple as int", _set("unet.channel_mult", 2), r"'unet.channel_mult' must be a list of whole numbers"),
    ("empty levels", _set("vae.channel_mult", []), r"'vae.channel_mult' must list at least one level"),
    ("attention level", _set("unet.attention_levels", [0, 7]), r"'unet.attention_levels' names levels of a 4-level"),
    ("activation", _set("text_encoder.activation", "relu"), r"'text_encoder' is inconsistent: unknown activation"),
    ("divisibility", _set("unet.norm_groups", 7), r"'unet' is inconsistent: .*divisible by norm_groups=7"),
    ("context", _set("unet.context_dim", 64), r"'unet.context_dim' must equal text_encoder.width \(32\)"),
    ("in_channels", _set("unet.in_channels", 5), r"'unet.in_channels' must be 4, 8 or 9"),
    ("out_channels", _set("unet.out_channels", 8), r"'unet.out_channels' must equal vae.z_channels"),
    ("positions", _set("text_encoder.max_positions", 16), r"'text_encoder.max_positions' must be at least 77"),
]


@pytest.mark.parametrize("edit, words", [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_bad_metadata_config_is_refused_naming_the_field(tiny_file, monkeypatch, edit, words):
    file = TensorFile(tiny_file)
    config = json.loads(file.metadata[METADATA_KEY])
    text = edit(config)
    metadata = {METADATA_KEY: text if isinstance(text, str) else json.dumps(config)}

    def no_reading(self, key):
        raise AssertionError("a weight was read before the config was checked")
    monkeypatch.setattr(TensorFile, "get", no_reading)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: its 'ldm_scratch_config' metadata .* is invalid: "
                                              f".*{words}.*re-export it"):
        plan_single_file(file.shapes, metadata, tiny_file.with_name("bad.safetensors"))
    with pytest.raises(ValueError, match=words):    # the same check where configs come from (training, a JSON file)
        ModelConfig.from_json(metadata[METADATA_KEY])


def test_the_valid_configs_still_load(tiny_file):
    """The check refuses only what is wrong: the test model's, SD v1's and the bundled model's configs round-trip."""
    from ldm_scratch.configs import tiny_config
    file = TensorFile(tiny_file)
    for config in (ModelConfig.from_json(file.metadata[METADATA_KEY]), ModelConfig(), tiny_config()):
        assert ModelConfig.from_json(config.to_json()) == config
    partial = ModelConfig.from_json('{"latent_scale": 0.2, "unet": {"model_channels": 320}}')  # the rest: defaults
    assert partial.latent_scale == 0.2 and partial.unet == ModelConfig().unet


def test_bad_metadata_end_to_end(tiny_file, tmp_path, capsys):
    """A real file with a bad config: the loader and `generate` refuse it; `inspect` shows why."""
    tensors = load_file(tiny_file)
    config = json.loads(TensorFile(tiny_file).metadata[METADATA_KEY])
    config["latent_scale"] = "abc"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={METADATA_KEY: json.dumps(config)})
    with pytest.raises(CheckpointError, match="'latent_scale' must be a positive finite number"):
        load_models(bad)
    assert main(["generate", "a fox", "--checkpoint", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "'latent_scale' must be a positive finite number" in capsys.readouterr().err
    assert main(["inspect", str(bad)]) == 0
    assert "config (metadata): INVALID, loading refuses it: " in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# 2. One network alone, or an incomplete model
# ---------------------------------------------------------------------------------------------------------------

KEYS = reference_keys()


def _keys(*sections, rename=None):
    keys = [k for s in sections for k in KEYS[s]]
    return [rename(k) for k in keys] if rename else keys


# (name, the file's keys, the kind identify gives, the words of the loader's error)
PART_CASES = [
    ("SD v1 text encoder", _keys("text_encoder"), "text-encoder-only",
     r"not a whole Stable Diffusion checkpoint: it holds a CLIP text encoder only"),
    ("transformers CLIPTextModel", _keys("text_encoder", rename=lambda k: k.removeprefix("cond_stage_model.transformer.")),
     "text-encoder-only", r"it holds a CLIP text encoder only \(cond_stage_model.\* or text_model.\*\)"),
    ("SD v1 UNet", _keys("unet"), "unet-only", r"it holds a UNet only .*no VAE and no text encoder"),
    ("SD v1 UNet + EMA", _keys("unet", "model_ema"), "unet-only", r"it holds a UNet only"),
    ("diffusers UNet", ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"],
     "unet-only", r"it holds a UNet only"),
    ("SD v1 VAE", _keys("vae"), "vae-only", r"it holds a standalone VAE only"),
    ("diffusers VAE", _keys("vae", rename=lambda k: k.removeprefix("first_stage_model.")), "vae-only",
     r"it holds a standalone VAE only"),
    ("no VAE", _keys("unet", "text_encoder"), "sd-v1",
     r"incomplete SD v1 checkpoint: it has no vae \(first_stage_model.\*\)"),
    ("no text encoder", _keys("unet", "vae", "ddpm_buffers"), "sd-v1",
     r"incomplete SD v1 checkpoint: it has no text_encoder \(cond_stage_model.transformer.\*\)"),
]


@pytest.mark.parametrize("keys, kind, words", [c[1:] for c in PART_CASES], ids=[c[0] for c in PART_CASES])
def test_a_part_of_a_model_is_named(tmp_path, capsys, keys, kind, words):
    path = tmp_path / "part.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, path)   # names are what is judged; shapes are not read
    assert identify({key: (1,) for key in keys}) == kind
    with pytest.raises(CheckpointError, match=words):
        load_models(path)
    assert main(["inspect", str(path)]) == 0                 # inspect says what it holds, and that it is a part
    if kind != "sd-v1":
        assert f"kind:       {kind}  (" in capsys.readouterr().out


def test_inspect_calls_a_part_a_part(tmp_path, capsys):
    path = tmp_path / "text.safetensors"
    save_file({key: torch.zeros(1) for key in _keys("text_encoder")}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a CLIP text encoder only" in out and "not a whole model" in out and "not supported yet" not in out


# ---------------------------------------------------------------------------------------------------------------
# 3. `inspect` on folders that are not diffusers models
# ---------------------------------------------------------------------------------------------------------------

FOLDER_CASES = [
    ("empty", [], r"is not a diffusers model folder: it has none of the sub-folders text_encoder/, unet/, vae/ \(it is "
               r"empty\)"),
    ("other files", ["notes.txt", "images/"], r"is not a diffusers model folder: .*\(it holds images/, notes.txt\)"),
    ("unet only", ["unet/"], r"not a loadable diffusers model: text_encoder, unet, vae missing or unreadable"),
]


@pytest.mark.parametrize("contents, words", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_inspect_on_a_folder_that_is_no_model_fails(tmp_path, capsys, contents, words):
    import re
    for name in contents:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text("x")
    assert main(["inspect", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert re.search(words, captured.err) and captured.err.startswith("error: ") and captured.out == ""


# ---------------------------------------------------------------------------------------------------------------
# 4. Vocabulary: the cache and merge lists
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_gz():
    try:
        return V.fetch_openai_vocabulary()
    except VocabularyNotFoundError as err:
        pytest.skip(f"OpenAI's BPE vocabulary is not cached and could not be downloaded: {err}")


def _no_download(monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError("a damaged cache must be reported, not silently downloaded again")
    monkeypatch.setattr(V.subprocess, "run", run)


@pytest.mark.parametrize("damage", ["one byte changed", "truncated", "another gzip"])
def test_a_damaged_cached_vocabulary_is_reported_with_the_fix(openai_gz, monkeypatch, tmp_path, damage):
    data = bytearray(openai_gz.read_bytes())
    if damage == "one byte changed":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = gzip.compress(b"#version: 0.2\n" + b"a b\n" * V.N_MERGES)
    cached = tmp_path / V.OPENAI_VOCAB_FILE
    cached.write_bytes(bytes(data))
    monkeypatch.setenv("LDM_SCRATCH_CACHE", str(tmp_path))
    _no_download(monkeypatch)
    with pytest.raises(CorruptVocabularyError, match=rf"cached vocabulary .*{V.OPENAI_VOCAB_FILE} is damaged: its "
                                                     r"sha256 is [0-9a-f]{64}, OpenAI's file has 924691ac.*Delete it "
                                                     r"\(rm .*\) and run `ldm-scratch tokenize"):
        load_tokenizer()
    assert cached.read_bytes() == bytes(data)                    # reported, not replaced behind the user's back
    assert main(["tokenize", "a cat"]) == 2                       # the CLI: one line, exit 2


def _hf_folder(folder, encoder, merges):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return folder


def _moved(merges, source, target):
    merges = list(merges)
    merges.insert(target, merges.pop(source))
    return merges


def _swapped(merges, i, j):
    merges = list(merges)
    merges[i], merges[j] = merges[j], merges[i]
    return merges


# (name, what to do to CLIP's merges, words of the error)
MERGES_CASES = [
    ("a merge moved above its parts", lambda m: _moved(m, 6, 0), r"merge 1 'th e</w>' joins 'th', which neither the "
                                                                 r"byte alphabet nor an earlier merge makes"),
    ("a late merge moved to the top", lambda m: _moved(m, 40000, 0), r"merge 1 .* reordered or edited"),
    ("two independent merges swapped", lambda m: _swapped(m, 0, 2), r"merges are not CLIP's in CLIP's order"),
    ("the last two swapped", lambda m: _swapped(m, -1, -2), r"merges are not CLIP's in CLIP's order"),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in MERGES_CASES], ids=[c[0] for c in MERGES_CASES])
def test_reordered_merges_are_refused(openai_gz, tmp_path, change, words):
    encoder, merges = V.read_openai_vocabulary(openai_gz)
    assert change(merges) != merges
    folder = _hf_folder(tmp_path / "model" / "tokenizer", encoder, change(merges))
    with pytest.raises(CorruptVocabularyError, match=rf"merges.txt: .*{words}.*Use the original file"):
        load_tokenizer(folder.parent)                             # a diffusers folder's tokenizer/
    gz = tmp_path / "reordered.txt.gz"                            # and the same lines in OpenAI's format
    gz.write_bytes(gzip.compress(("header\n" + "\n".join(f"{a} {b}" for a, b in change(merges))).encode()))
    with pytest.raises(CorruptVocabularyError, match=words):
        load_tokenizer(gz)


def test_clips_own_merges_pass_in_both_formats_and_any_line_ending(openai_gz, tmp_path):
    encoder, merges = V.read_openai_vocabulary(openai_gz)
    folder = _hf_folder(tmp_path / "tokenizer", encoder, merges)
    (folder / "merges.txt").write_bytes((folder / "merges.txt").read_bytes().replace(b"\n", b"\r\n"))
    assert load_tokenizer(folder).ranks == load_tokenizer(openai_gz).ranks


def test_small_vocabularies_are_checked_for_order_too(tmp_path):
    vocab, merges_txt = write_vocabulary(tmp_path / "tokenizer")
    load_tokenizer(tmp_path / "tokenizer")                        # the test vocabulary is in order
    header, *lines = merges_txt.read_text(encoding="utf-8").strip().split("\n")
    merges_txt.write_text("\n".join([header, *reversed(lines)]) + "\n", encoding="utf-8")
    with pytest.raises(CorruptVocabularyError, match=r"merge 1 .* joins .* reordered or edited"):
        load_tokenizer(tmp_path / "tokenizer")


def test_vocab_and_merges_from_different_tokenizers_are_refused(tmp_path):
    vocab, merges_txt = write_vocabulary(tmp_path / "tokenizer")
    encoder = json.loads(vocab.read_text(encoding="utf-8"))
    last = max((t for t in encoder if t not in ("<|startoftext|>", "<|endoftext|>")), key=encoder.get)
    del encoder[last]                                             # the token the last merge makes
    vocab.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(CorruptVocabularyError, match=r"vocab.json lacks 1 token\(s\) that merges.txt makes"):
        load_tokenizer(tmp_path / "tokenizer")


# (name, file of the tokenizer folder, what it is replaced with, words of the error)
TOKENIZER_FILE_CASES = [
    ("vocab.json not JSON", "vocab.json", b'{"a": 0,', r"vocab.json is not valid JSON .*maps each token to its id"),
    ("vocab.json a list", "vocab.json", b'["a", "b"]', r"vocab.json holds list, not a JSON object"),
    ("vocab.json ids as text", "vocab.json", b'{"a": "0"}', r"vocab.json is not a vocabulary"),
    ("merges.txt not text", "merges.txt", b"\xff\xfe\x00a b", r"merges.txt is not UTF-8 text"),
    ("special tokens not JSON", "special_tokens_map.json", b"{pad", r"special_tokens_map.json is not valid JSON"),
]


@pytest.mark.parametrize("name, content, words", [c[1:] for c in TOKENIZER_FILE_CASES],
                         ids=[c[0] for c in TOKENIZER_FILE_CASES])
def test_damaged_tokenizer_files_are_named(tmp_path, capsys, name, content, words):
    import re
    write_vocabulary(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / name).write_bytes(content)
    with pytest.raises(CorruptVocabularyError, match=words):
        load_tokenizer(tmp_path / "tokenizer")
    assert main(["tokenize", "a cat", "--vocab", str(tmp_path / "tokenizer")]) == 2
    assert re.search(words, capsys.readouterr().err)
