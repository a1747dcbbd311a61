"""Textual inversion (issue 16 item 2): every embedding file format, built here with random tensors in the exact
layouts the web UI, the original textual-inversion code and diffusers write; multi-vector words; weighted and long
prompts; unloading; clear errors; the CLI's --embedding; and parity with diffusers' `load_textual_inversion`.

The reference for "what an embedding means" is independent of the loading code: a prompt with the new word must
encode exactly like a prompt whose ordinary words (fox, cat, ugly) have had their rows of E_tok replaced by the
embedding's vectors — the same float32 operations, so bit-equal.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_scratch.cli import main
from ldm_scratch.prompts import prompt_chunks
from ldm_scratch.textual_inversion import TextualInversionError, read_embedding

from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary

WIDTH = 32                                   # the tiny model's text width (tinymodels.tiny_config)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti")
    vocabulary = write_vocabulary(folder / "tokenizer")
    return dict(checkpoint=write_tiny_checkpoint(folder / "tiny.safetensors"), vocabulary=vocabulary)


@pytest.fixture(scope="module")
def loaded(files):
    return tiny_pipeline(files["checkpoint"], files["vocabulary"])


@pytest.fixture
def pipe(loaded):
    """The module's pipeline, its embeddings unloaded after each test (unloading is bit-exact: tested below)."""
    yield loaded
    loaded.unload_textual_inversion()


def vectors(n: int, d: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- the exact layouts ---------------------------------------------------------------------------------------------

def original_code_pt(path, vec):
    """rinongal/textual_inversion's EmbeddingManager.save: string_to_param is an nn.ParameterDict."""
    params = nn.ParameterDict()
    params["*"] = nn.Parameter(vec.clone())
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    return path


def webui_pt(path, vec):
    """AUTOMATIC1111's Embedding.save: plain dicts, the vector a tensor that requires grad, and metadata."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_(True)},
                "name": "stored-name", "step": 1500, "sd_checkpoint": "a1b2c3d4",
                "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


def webui_safetensors(path, vec):
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def diffusers_bin(path, vec, token="<cat-toy>"):
    torch.save({token: vec[0] if len(vec) == 1 else vec}, path)           # [D] for one vector, as diffusers saves
    return path


def diffusers_safetensors(path, vec, token="<cat-toy>"):
    save_file({token: vec.contiguous()}, str(path))
    return path


WRITERS = {"original.pt": original_code_pt, "webui.pt": webui_pt, "webui.safetensors": webui_safetensors,
           "learned_embeds.bin": diffusers_bin, "learned_embeds.safetensors": diffusers_safetensors}


def replaced_rows_context(pipe, prompt: str, words: list[str], vec: torch.Tensor) -> torch.Tensor:
    """The reference: `prompt` encoded by a copy of the text encoder whose rows for `words` are the vectors."""
    encoder = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        for word, row in zip(words, vec):
            (i,) = pipe.tokenizer.encode(word)
            encoder.token_embedding.weight[i] = row
    return encoder(pipe.tokenizer([prompt]))


# --- formats and meaning -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("n", [1, 3])
def test_every_format_means_the_vectors_in_place_of_the_word(pipe, tmp_path, name, n):
    vec = vectors(n, seed=n)
    path = WRITERS[name](tmp_path / name, vec)
    names = pipe.load_textual_inversion(path, token="myemb")
    assert names == ["myemb", "myemb_1", "myemb_2"][:n]
    context, _ = pipe.encode_prompt("a myemb circle")
    words = ["fox", "cat", "ugly"][:n]
    reference = replaced_rows_context(pipe, f"a {' '.join(words)} circle", words, vec)
    assert torch.equal(context, reference)


def test_the_word_defaults_to_the_file_stem_as_in_the_web_ui(pipe, tmp_path):
    assert pipe.load_textual_inversion(webui_pt(tmp_path / "Style-One.pt", vectors(1))) == ["style-one"]
    assert pipe.load_textual_inversion(diffusers_bin(tmp_path / "learned_embeds.bin", vectors(1))) \
        == ["learned_embeds"]                          # the web UI's name for it; diffusers would say <cat-toy>
    assert read_embedding(webui_pt(tmp_path / "x.pt", vectors(1))).word == "x"   # not the stored "name"


def test_original_code_pickle_loads_but_no_other_class_is_allowed(tmp_path):
    assert torch.equal(read_embedding(original_code_pt(tmp_path / "ok.pt", vectors(2))).vectors, vectors(2))
    params = nn.ParameterDict()
    params["*"] = nn.Parameter(vectors(1))
    torch.save({"string_to_param": params, "extra": nn.Linear(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(TextualInversionError, match="weights_only=True.*refused"):
        read_embedding(tmp_path / "bad.pt")
    torch.save({"string_to_param": nn.ModuleDict({"x": nn.Identity()})}, tmp_path / "module.pt")
    with pytest.raises(TextualInversionError, match="refused"):
        read_embedding(tmp_path / "module.pt")


# --- the tokenizer -------------------------------------------------------------------------------------------------

def test_a_multi_vector_word_expands_to_its_ids(pipe, tmp_path):
    rows = pipe.text_encoder.token_embedding.num_embeddings
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "e.safetensors", vectors(3)), token="MyEmb")
    tok = pipe.tokenizer
    ids = [rows, rows + 1, rows + 2]
    assert tok.encode("myemb") == ids and tok.encode("MYEMB") == ids           # CLIP text is lower-cased
    assert tok.encode("myemb myemb_1") == ids + [rows + 1]                      # diffusers' row names work too
    assert tok.encode_words("a myemb,") == [tok.encode("a"), ids, tok.encode(",")]
    assert tok.encode("(myemb:1.2)")[1:4] == ids and tok.encode("myemb2")[:3] == ids
    assert rows not in tok.encode("myembs") and rows not in tok.encode("xmyemb")   # whole words only
    assert tok.tokenize("a myemb") == ["a</w>", "myemb", "myemb_1", "myemb_2"]
    assert tok.decode(tok.encode("a myemb circle")) == "a myemb myemb_1 myemb_2 circle"
    assert pipe.text_encoder.config.vocab_size == rows + 3
    assert pipe.config.text_encoder.vocab_size == rows                          # the model's file config stays


def test_weights_apply_to_every_vector(pipe, tmp_path):
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "e.safetensors", vectors(3)), token="myemb")
    (chunk,) = prompt_chunks("a (myemb:1.2) circle", pipe.tokenizer)
    assert chunk.weights[1:6] == [1.0, 1.2, 1.2, 1.2, 1.0]
    weighted, _ = pipe.encode_prompt("a (myemb:1.2) circle")
    plain, _ = pipe.encode_prompt("a myemb circle")
    assert weighted.shape == plain.shape and not torch.equal(weighted, plain)


@pytest.mark.parametrize("before", [72, 73])
def test_a_multi_vector_word_is_never_cut_by_a_chunk_boundary(pipe, tmp_path, before):
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "e.safetensors", vectors(3)), token="myemb")
    ids = pipe.tokenizer.encode("myemb")
    first, second = prompt_chunks("a " * before + "myemb circle", pipe.tokenizer)
    if before == 72:                                  # 72 + 3 = 75 fits exactly
        assert first.ids[73:76] == ids and second.ids[1:2] == pipe.tokenizer.encode("circle")
    else:                                             # 73 + 3 > 75: the whole embedding moves on, as the web UI
        assert ids[0] not in first.ids and first.ids[74:77] == [pipe.tokenizer.eos_id] * 3
        assert second.ids[1:5] == ids + pipe.tokenizer.encode("circle")
    context, _ = pipe.encode_prompt("a " * before + "myemb circle")
    assert context.shape == (1, 154, WIDTH)


# --- unloading -----------------------------------------------------------------------------------------------------

def test_unloading_restores_the_table_and_keeps_the_others_working(pipe, tmp_path):
    original = pipe.text_encoder.token_embedding.weight.detach().clone()
    plain, _ = pipe.encode_prompt("a myemb circle")
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "one.safetensors", vectors(2, seed=1)))
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "two.safetensors", vectors(3, seed=2)))
    two, _ = pipe.encode_prompt("a two circle")
    pipe.unload_textual_inversion("one")
    assert torch.equal(pipe.encode_prompt("a two circle")[0], two)            # renumbered, same meaning
    assert "one" not in pipe.tokenizer.added_tokens
    with pytest.raises(TextualInversionError, match="no embedding 'one' is loaded"):
        pipe.unload_textual_inversion("one")
    pipe.unload_textual_inversion()
    assert torch.equal(pipe.text_encoder.token_embedding.weight, original)
    assert pipe.text_encoder.config.vocab_size == len(original) and pipe.tokenizer.added_tokens == {}
    assert torch.equal(pipe.encode_prompt("a myemb circle")[0], plain)


# --- errors --------------------------------------------------------------------------------------------------------

def test_an_sd2_embedding_on_an_sd1_width_model_is_refused(pipe, tmp_path):
    with pytest.raises(TextualInversionError, match="1024 wide, made for SD 2.*text encoder is 32 wide"):
        pipe.load_textual_inversion(webui_safetensors(tmp_path / "sd2.safetensors", vectors(2, d=1024)))


def test_a_word_of_the_vocabulary_or_loaded_twice_is_refused(pipe, tmp_path):
    path = webui_safetensors(tmp_path / "cat.safetensors", vectors(1))
    with pytest.raises(TextualInversionError, match="'cat' is already a token.*token='<cat>'"):
        pipe.load_textual_inversion(path)
    assert pipe.load_textual_inversion(path, token="<cat>") == ["<cat>"]
    with pytest.raises(TextualInversionError, match="already loaded"):
        pipe.load_textual_inversion(path, token="<cat>")
    pipe.load_textual_inversion(webui_safetensors(tmp_path / "yy.safetensors", vectors(2)))
    with pytest.raises(TextualInversionError, match="already loaded"):   # yy_1, a row of the 2-vector yy, is taken
        pipe.load_textual_inversion(path, token="yy_1")


@pytest.mark.parametrize("content, message", [
    ({"emb_params": torch.zeros(0, WIDTH)}, "is empty"),
    ({"emb_params": torch.full((2, WIDTH), float("nan"))}, "NaN or infinite"),
    ({"emb_params": torch.zeros(2, WIDTH, dtype=torch.int32)}, "must be a float tensor"),
    ({"emb_params": torch.zeros(2, 3, WIDTH)}, "must be a float tensor"),
    ({"emb_params": torch.zeros(76, WIDTH)}, "at most 75"),
    ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "exactly one tensor.*has 2"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
])
def test_bad_files_are_refused(tmp_path, content, message):
    save_file(content, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TextualInversionError, match=message):
        read_embedding(tmp_path / "bad.safetensors")


def test_bad_paths_and_words_are_refused(tmp_path):
    with pytest.raises(TextualInversionError, match="no such embedding file"):
        read_embedding(tmp_path / "missing.pt")
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(TextualInversionError, match="unknown embedding file type"):
        read_embedding(tmp_path / "e.txt")
    torch.save([vectors(1)], tmp_path / "list.pt")
    with pytest.raises(TextualInversionError, match="expected a dictionary"):
        read_embedding(tmp_path / "list.pt")
    torch.save({"string_to_param": {"*": vectors(1), "+": vectors(1)}}, tmp_path / "two.pt")
    with pytest.raises(TextualInversionError, match="exactly one tensor.*has 2"):
        read_embedding(tmp_path / "two.pt")
    torch.save({"string_to_param": [vectors(1)]}, tmp_path / "notdict.pt")
    with pytest.raises(TextualInversionError, match="not a dictionary"):
        read_embedding(tmp_path / "notdict.pt")
    path = webui_safetensors(tmp_path / "e.safetensors", vectors(1))
    for word, message in [("   ", "empty"), ("(x)", "prompt syntax")]:
        with pytest.raises(TextualInversionError, match=message):
            read_embedding(path, token=word)


# --- command line --------------------------------------------------------------------------------------------------

def test_cli_embedding_option(files, tmp_path, capsys):
    emb = webui_safetensors(tmp_path / "myemb.safetensors", vectors(2, seed=5))
    common = ["generate", "a myemb circle", "--checkpoint", str(files["checkpoint"]), "--vocab",
              str(files["vocabulary"][0]), "--steps", "1", "--seed", "1", "--height", "64", "--width", "64"]
    assert main([*common, "--embedding", str(emb), "--out", str(tmp_path / "emb.png")]) == 0
    assert "word 'myemb'" in capsys.readouterr().err and (tmp_path / "emb.png").is_file()
    assert main([*common, "--embedding", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.png")]) != 0
    assert "--embedding" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


# --- parity with diffusers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_components(files, loaded):
    from test_pipeline_parity import diffusers_components
    return diffusers_components(load_file(str(files["checkpoint"])), loaded.config, files["vocabulary"])


@pytest.mark.parity
@pytest.mark.parametrize("n, name", [(1, "learned_embeds.safetensors"), (3, "webui.safetensors")])
def test_matches_diffusers_load_textual_inversion(pipe, reference_components, tmp_path, n, name):
    """The same file loaded by both (diffusers gets token= too): the same prompt embeds, bit for bit, and the same
    image. diffusers rewrites "<emb>" into "<emb> <emb>_1 <emb>_2"; we expand the word to its 3 ids."""
    from test_pipeline_parity import SIZE, TOLERANCE, diffusers_pipeline, noise
    reference = diffusers_pipeline("txt2img", reference_components, "ddim")
    path = WRITERS[name](tmp_path / name, vectors(n, seed=7))
    pipe.load_textual_inversion(path, token="<emb>")
    reference.load_textual_inversion(str(path), token="<emb>")
    try:
        prompt, negative = "a <emb> circle on a blue background", "blurry <emb>"
        context, negative_context = pipe.encode_prompt(prompt, negative)
        theirs, theirs_negative = reference.encode_prompt(prompt, "cpu", 1, True, negative)
        # measured: 0 (the same float32 operations in the same order)
        assert torch.equal(context, theirs) and torch.equal(negative_context, theirs_negative)
        eps = noise(1, SIZE, SIZE)
        args = dict(prompt=prompt, negative_prompt=negative, guidance_scale=7.5, height=SIZE, width=SIZE)
        mine = pipe.txt2img(**args, steps=3, sampler="ddim", latents=eps, output_type="np", progress=False)
        image = reference(**args, num_inference_steps=3, latents=eps.clone(), output_type="np").images
    finally:
        reference.unload_textual_inversion()
    diff = float(np.abs(mine.astype(np.float64) - image).max())
    print(f"\ntextual inversion n={n}: max |ours − diffusers| = {diff:.2e}")
    assert diff < TOLERANCE              # measured 6.0e-6 (n=1) and 5.7e-6 (n=3): as the plain pipeline parity
