"""Tests of the CLIP tokenizer (ldm_scratch/tokenizer.py) and where its vocabulary comes from (vocabulary.py).

Three groups:
- no vocabulary needed: byte table, cleaning (ftfy first, as CLIP), pre-tokenizer, BPE on a hand-made merge list,
  the cache/download error paths (pip is replaced by a fake);
- OpenAI's vocabulary, fetched once into the user cache by load_tokenizer() (skipped with the reason when that is
  impossible, e.g. offline): golden ids from tests/data/tokenizer_golden.json, the [B, 77] batch, truncation,
  decode, the diffusers/HF file format;
- parity (the [reference] extra): the pre-tokenizer against the `regex` package pattern, and a live comparison
  with OpenAI's simple_tokenizer.py.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import inspect
import json
import random
import subprocess
import unicodedata
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from ldm_scratch import tokenizer as T
from ldm_scratch import vocabulary as V
from ldm_scratch.tokenizer import (BOS_ID, EOS_ID, CLIPTokenizer, VocabularyNotFoundError, bytes_to_unicode,
                                   clean_text, load_tokenizer, merge_pair, pre_tokenize)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "tokenizer_golden.json").read_text(encoding="utf-8"))
PROMPTS = GOLDEN["prompts"]
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _golden_script():
    """scripts/make_tokenizer_golden.py as a module (it holds the corpus and the reference loader)."""
    path = ROOT / "scripts" / "make_tokenizer_golden.py"
    spec = importlib.util.spec_from_file_location("make_tokenizer_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tok() -> CLIPTokenizer:
    try:
        return load_tokenizer()
    except VocabularyNotFoundError as err:
        pytest.skip(f"OpenAI's BPE vocabulary is not cached and could not be downloaded: {err}")


# ---------------------------------------------------------------------------------------------------------------
# No vocabulary needed
# ---------------------------------------------------------------------------------------------------------------

def test_byte_table_is_a_printable_bijection():
    table = bytes_to_unicode()
    chars = list(table.values())
    assert sorted(table) == list(range(256)) and len(set(chars)) == 256
    assert not any(c.isspace() or unicodedata.category(c)[0] == "C" for c in chars)
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]     # vocabulary order: printable bytes first
    assert list(table)[188] == 0                                  # … then the shifted ones, from byte 0


def test_clean_text():
    assert clean_text("  A <b>Fox</b>\t\n  RUNS  ") == "a <b>fox</b> runs"
    assert clean_text("Tom &amp;amp; Jerry &lt;3") == "tom & jerry <3"          # unescaped twice, not three times
    # ftfy.fix_text unescapes once more, unless the text looks like HTML (holds a "<"): then CLIP's two are all
    assert clean_text("&amp;amp;amp;") == "&" and clean_text("<b> &amp;amp;amp;") == "<b> &amp;"
    assert clean_text("a\u3000b\u00a0c\u2028d\u2029e\u1680f") == "a b c d e f"  # Unicode White_Space collapses
    assert clean_text("\x1c a\x1cb \x1c") == "ab"                              # ftfy drops control characters
    assert clean_text("a\x85b") == "a…b"                      # ftfy reads a lone C1 control as Windows-1252
    assert clean_text("İSTANBUL") == "i\u0307stanbul"                              # Python's lower(), as CLIP


@pytest.mark.parametrize("text, cleaned", [
    ("don’t “quote” ‘single’", "don't \"quote\" 'single'"),                 # ftfy straightens curly quotes
    ("The Mona Lisa doesnâ€™t", "the mona lisa doesn't"),                   # … and repairs mojibake
    ("cafÃ© crÃ¨me", "café crème"),
    ("ＭＡＳＴＥＲＰＩＥＣＥ，（ｃｈｉｂｉ：１．２）", "masterpiece,(chibi:1.2)"),     # fullwidth → ASCII
    ("ﬁreﬂies", "fireflies"),                                               # ligatures
    ("Poke\u0301mon", "pok\u00e9mon"),                                        # NFD → NFC
    ("\ufeffBOM \x1b[31mred\x1b[0m", "bom red"),                              # BOM, terminal escapes dropped
    ("&amp;quot;x&amp;quot; &amp;amp;amp;", "\"x\" &"),                       # ftfy's unescape, then CLIP's two
])
def test_clean_text_runs_ftfy_first(text, cleaned):
    assert clean_text(text) == cleaned


@pytest.mark.parametrize("text, words", [
    ("a dog's 3 toys!!", ["a", "dog", "'s", "3", "toys", "!!"]),
    ("don't we'll they're i've he'd i'm", ["don", "'t", "we", "'ll", "they", "'re", "i", "'ve", "he", "'d", "i", "'m"]),
    ("''s '", ["''", "s", "'"]),                                  # a symbol run swallows the apostrophe first
    ("(masterpiece:1.2)", ["(", "masterpiece", ":", "1", ".", "2", ")"]),
    ("2024½Ⅻ٣", ["2", "0", "2", "4", "½", "Ⅻ", "٣"]),            # \p{N}: one character at a time
    ("café 東京 кот", ["café", "東京", "кот"]),
    ("e\u0301cole", ["e", "\u0301", "cole"]),                     # a combining mark is not a letter
    ("🦊🐱 x-y", ["🦊🐱", "x", "-", "y"]),
    ("a<|endoftext|>b<|startoftext|>", ["a", "<|endoftext|>", "b", "<|startoftext|>"]),
    ("<|ſtartoftext|>", ["<|ſtartoftext|>"]),                     # IGNORECASE: ſ folds to s
    ("x'ſ", ["x", "'ſ"]),
    ("a\u0345b", ["a", "b"]),                                      # U+0345 matches no alternative: dropped
    ("a\x1cb", ["a", "\x1c", "b"]),                               # not whitespace for the regex package
    ("", []),
])
def test_pre_tokenize_examples(text, words):
    assert pre_tokenize(text) == words


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert merge_pair(["a", "a", "a"], ("a", "a")) == ["aa", "a"]
    assert merge_pair(["a", "b", "a", "b"], ("a", "b")) == ["ab", "ab"]
    assert merge_pair(["x", "y"], ("a", "b")) == ["x", "y"]


def _tiny_tokenizer() -> CLIPTokenizer:
    """A hand-made vocabulary: the byte characters, the same with </w>, five merges, the two specials."""
    merges = [("b", "c</w>"), ("a", "b"), ("l", "o"), ("lo", "w</w>"), ("a", "bc</w>")]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(T.SPECIAL_TOKENS)
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges)


def test_bpe_on_a_tiny_merge_list():
    tiny = _tiny_tokenizer()
    # Lowest rank first, not leftmost first: (b, c</w>) has rank 0 and beats (a, b) at rank 1.
    steps = tiny.bpe_steps("abc")
    assert [s.symbols for s in steps] == [("a", "b", "c</w>"), ("a", "bc</w>"), ("abc</w>",)]
    assert [(s.pair, s.rank) for s in steps] == [(None, None), (("b", "c</w>"), 0), (("a", "bc</w>"), 4)]
    assert tiny.bpe("abd") == ("ab", "d</w>")                     # (b, d) is unknown: (a, b) merges
    assert tiny.bpe("low") == ("low</w>",) and tiny.bpe("lowx") == ("lo", "w", "x</w>")
    assert tiny.bpe("é") == ("Ã", "©</w>")                        # two UTF-8 bytes, no merge for them
    assert tiny.tokenize("Low, abc!") == ["low</w>", ",</w>", "abc</w>", "!</w>"]
    n = 512
    assert tiny.encode("low abc") == [n + 3, n + 4]
    assert tiny.decode(tiny.encode("Low, abc é")) == "low , abc é"
    assert tiny.bos_id == n + 5 and tiny.eos_id == tiny.pad_id == n + 6


def test_call_on_a_tiny_vocabulary_pads_and_truncates():
    tiny = _tiny_tokenizer()
    ids = tiny(["low", ""], max_length=5, pad_id=0)
    assert ids.dtype == torch.long and ids.shape == (2, 5)
    low = tiny.encoder["low</w>"]
    assert ids.tolist() == [[tiny.bos_id, low, tiny.eos_id, 0, 0], [tiny.bos_id, tiny.eos_id, 0, 0, 0]]
    with pytest.warns(UserWarning, match=r"the last 2 tokens were dropped: 'abc low'"):
        ids = tiny("low low abc low", max_length=4)
    assert ids.tolist() == [[tiny.bos_id, tiny.encoder["low</w>"], tiny.encoder["low</w>"], tiny.eos_id]]
    with pytest.raises(ValueError, match="max_length"):
        tiny("low", max_length=1)


def test_vocabulary_without_specials_is_refused():
    with pytest.raises(ValueError, match="special tokens"):
        CLIPTokenizer({"a": 0}, [])


def test_every_vocabulary_name_is_importable_from_tokenizer():
    """vocabulary.py was split out of tokenizer.py; `from ldm_scratch.tokenizer import X` keeps working for all."""
    names = [name for name, value in vars(V).items() if not name.startswith("_") and not inspect.ismodule(value)
             and getattr(value, "__module__", V.__name__) == V.__name__]      # defined here, not imported
    assert {"BOS_ID", "bytes_to_unicode", "fetch_openai_vocabulary", "VocabularyNotFoundError"} <= set(names)
    assert [name for name in names if getattr(T, name, None) is not getattr(V, name)] == []


def _fake_pip(monkeypatch, wheel_member: bytes | None, returncode: int = 0, stderr: str = ""):
    """Replace the `pip download` subprocess: write a wheel holding `wheel_member` as the merges file, or fail."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "clip-anytorch==2.6.0" in cmd and "--no-deps" in cmd
        if wheel_member is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "clip_anytorch-2.6.0-py3-none-any.whl", "w") as zf:
                zf.writestr("clip/bpe_simple_vocab_16e6.txt.gz", wheel_member)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(V.subprocess, "run", run)
    return calls


def test_clear_error_when_no_vocabulary(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LDM_SCRATCH_CACHE", str(cache))
    _fake_pip(monkeypatch, None, returncode=1,
              stderr="ERROR: Could not find a version that satisfies the requirement clip-anytorch==2.6.0\n"
                     "ERROR: No matching distribution found for clip-anytorch==2.6.0")
    with pytest.raises(VocabularyNotFoundError) as err:
        load_tokenizer()
    message = str(err.value)
    assert str(cache / "bpe_simple_vocab_16e6.txt.gz") in message      # where it looked
    assert "No matching distribution found" in message                 # why the download failed
    assert "pip download clip-anytorch==2.6.0 --no-deps" in message and "load_tokenizer(path=" in message  # the fix
    assert not cache.exists() or not any(cache.iterdir())


def test_error_when_pip_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_SCRATCH_CACHE", str(tmp_path))

    def run(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(V.subprocess, "run", run)
    with pytest.raises(VocabularyNotFoundError, match="could not run .*pip download"):
        load_tokenizer()


def test_download_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_SCRATCH_CACHE", str(tmp_path))
    _fake_pip(monkeypatch, gzip.compress(b"#version: 0.2\nnot the real file\n"))
    with pytest.raises(VocabularyNotFoundError, match="sha256"):
        load_tokenizer()
    assert list(tmp_path.iterdir()) == []                              # nothing half-written left behind


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(VocabularyNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(VocabularyNotFoundError, match="vocab.json .*merges.txt"):
        load_tokenizer(tmp_path)                                       # an empty folder that is not a model folder
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(VocabularyNotFoundError, match="not OpenAI's BPE merges file"):
        load_tokenizer(tmp_path / "junk.gz")


def test_corpus_is_deterministic_and_matches_golden():
    script = _golden_script()
    corpus = script.build_corpus()
    assert corpus == [entry["text"] for entry in PROMPTS]             # the fixture is up to date with the script
    assert len(PROMPTS) == GOLDEN["n_prompts"] == 731 and len(script.WEB_PASTED) >= 60
    assert "" in corpus and sum(len(e["ids"]) > 75 for e in PROMPTS) >= 10
    # the corpus keeps exercising ftfy: 67 prompts get other ids without it (41 before the pasted-from-the-web set)
    assert sum(e["ftfy"] for e in PROMPTS) == GOLDEN["n_ftfy"] == 67
    assert all(set(e) == {"text", "ids", "ftfy"} for e in PROMPTS)   # one expected answer per prompt, no escape hatch


# ---------------------------------------------------------------------------------------------------------------
# OpenAI's vocabulary (cached on first use)
# ---------------------------------------------------------------------------------------------------------------

def test_vocabulary_layout(tok):
    assert len(tok) == T.VOCAB_SIZE == 49408 and len(tok.ranks) == T.N_MERGES == 48894
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, EOS_ID) == (49406, 49407, 49407)
    assert tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 320                    # byte tokens, then with </w>
    assert all(tok.decoder[i] == t for t, i in tok.encoder.items())


def test_golden_ids(tok):
    """Ids equal OpenAI's reference tokenizer (ftfy on, as CLIP runs it) on every prompt of the corpus."""
    wrong = [(e["text"], tok.encode(e["text"]), e["ids"]) for e in PROMPTS if tok.encode(e["text"]) != e["ids"]]
    assert not wrong, f"{len(wrong)} of {len(PROMPTS)} prompts differ, first: {wrong[:3]}"


def test_batch_is_bos_ids_eos_padding(tok):
    texts = [e["text"] for e in PROMPTS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = tok(texts)
    assert batch.dtype == torch.long and batch.shape == (len(texts), 77)
    for row, entry in zip(batch.tolist(), PROMPTS):
        ids = entry["ids"][:75]
        assert row == [BOS_ID, *ids, EOS_ID] + [EOS_ID] * (75 - len(ids))
    too_long = [k for k, e in enumerate(PROMPTS) if len(e["ids"]) > 75]
    assert [str(w.message).split()[1] for w in caught] == [str(k) for k in too_long]   # one warning per long prompt


def test_truncation_keeps_75_ids_and_warns_what_was_dropped(tok):
    exact = " ".join(["a"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # 75 ids fit: no warning
        assert tok(exact)[0, 76].item() == EOS_ID
    with pytest.warns(UserWarning, match=r"is 77 tokens long .* the last 2 tokens were dropped: 'lighthouse fox'"):
        row = tok(exact + " lighthouse fox")[0]
    assert row.tolist() == [BOS_ID] + [tok.encoder["a</w>"]] * 75 + [EOS_ID]


def test_padding_and_pad_id(tok):
    batch = tok(["a cat", "", "a photo of a cat"], pad_id=0, max_length=10)
    assert batch.shape == (3, 10)
    cat = tok.encode("a cat")
    assert batch[0].tolist() == [BOS_ID, *cat, EOS_ID] + [0] * (10 - 2 - len(cat))
    assert batch[1].tolist() == [BOS_ID, EOS_ID] + [0] * 8
    assert tok("a cat").shape == (1, 77) and tok([]).shape == (0, 77)


def test_decode_round_trip(tok):
    """decode(encode(t)) gives back the cleaned text with the pre-tokenizer's words separated by spaces."""
    for entry in PROMPTS:
        words = pre_tokenize(clean_text(entry["text"]))
        expected = "".join(w if w in T.SPECIAL_TOKENS else w + " " for w in words).strip()
        assert tok.decode(tok.encode(entry["text"])) == expected, entry["text"]
    row = tok("A Fox, running!")[0]
    assert tok.decode(row, skip_special_tokens=True) == "a fox , running !"
    assert tok.decode(row).startswith("<|startoftext|>a fox")
    assert tok.decode(tok.encode("🦊")[:1]) == "\ufffd"                # a cut UTF-8 sequence: replacement char
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([49408])


def test_bpe_steps_on_the_real_vocabulary(tok):
    for word in ["lighthouse", "masterpiece", "antidisestablishmentarianism", "東京", "🦊"]:
        steps = tok.bpe_steps(word)
        ranks = [s.rank for s in steps[1:]]
        assert ranks == sorted(set(ranks))        # a merge's pieces only exist after lower-ranked merges made them
        assert "".join(steps[-1].symbols) == "".join(T.BYTE_TO_CHAR[b] for b in word.encode()) + "</w>"
        assert steps[-1].symbols == tok.bpe(word)
    assert len(tok.bpe_steps("lighthouse")[-1].symbols) == 1


def _write_hf_files(tok: CLIPTokenizer, folder: Path) -> None:
    """vocab.json + merges.txt as Hugging Face writes CLIP's (diffusers: <model>/tokenizer/)."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))


def test_diffusers_and_hf_files_give_the_same_ids(tok, tmp_path):
    model = tmp_path / "stable-diffusion"
    _write_hf_files(tok, model / "tokenizer")
    (model / "model_index.json").write_text("{}")
    vocab, merges = model / "tokenizer" / "vocab.json", model / "tokenizer" / "merges.txt"
    texts = [e["text"] for e in PROMPTS]
    expected = [tok.encode(t) for t in texts]
    for n, source in zip((len(texts), 50, 50, 50), (model, model / "tokenizer", (vocab, merges), vocab)):
        other = load_tokenizer(source)
        assert other.encoder == tok.encoder and other.ranks == tok.ranks and other.pad_id == EOS_ID
        assert [other.encode(t) for t in texts[:n]] == expected[:n], source


def test_openai_file_and_folder_paths(tok, tmp_path):
    gz = T.fetch_openai_vocabulary()                                  # already cached by the `tok` fixture
    assert hashlib.sha256(gz.read_bytes()).hexdigest() == T.OPENAI_VOCAB_SHA256
    (tmp_path / gz.name).write_bytes(gz.read_bytes())
    for source in (gz, tmp_path / gz.name, tmp_path):
        assert load_tokenizer(source).encoder == tok.encoder
    weights_only = tmp_path / "model"
    (weights_only / "text_encoder").mkdir(parents=True)               # a diffusers folder without tokenizer/
    assert load_tokenizer(weights_only).ranks == tok.ranks           # falls back to the cache


def test_cache_is_filled_from_the_wheel_atomically(tok, monkeypatch, tmp_path):
    real = T.fetch_openai_vocabulary().read_bytes()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LDM_SCRATCH_CACHE", str(cache))
    calls = _fake_pip(monkeypatch, real)
    assert load_tokenizer().encode("a lighthouse") == tok.encode("a lighthouse")
    assert len(calls) == 1 and [p.name for p in cache.iterdir()] == ["bpe_simple_vocab_16e6.txt.gz"]
    load_tokenizer()
    assert len(calls) == 1                                            # cached: pip is not run again


# ---------------------------------------------------------------------------------------------------------------
# Parity with the reference implementations
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_character_classes_match_the_regex_package():
    """str.isalpha / unicodedata N* / isspace-minus-U+001C..F equal regex's \\p{L}, \\p{N}, \\s (IGNORECASE) on every
    code point both Unicode tables assign (a newer regex knows letters Python's table does not have yet).
    Planes 0-3 and 14 hold every assigned character; planes 4-13 are empty and 15-16 are private use (a sample)."""
    regex = pytest.importorskip("regex", reason="needs the [reference] extra")
    code_points = [*range(0xD800), *range(0xE000, 0x40000), *range(0xE0000, 0xE1000), *range(0xF0000, 0xF0100)]
    chars = [chr(cp) for cp in code_points]
    text = "".join(chars)

    def positions(pattern, flags=regex.IGNORECASE):
        return {m.start() for m in regex.finditer(pattern, text, flags)}

    unassigned = positions(r"\p{Cn}", 0) | {i for i, c in enumerate(chars) if unicodedata.category(c) == "Cn"}
    for name, pattern, ours in [("\\p{L}", r"[\p{L}]", T._is_letter), ("\\p{N}", r"[\p{N}]", T._is_number),
                                ("\\s", r"\s", T._is_space), ("symbol", r"[^\s\p{L}\p{N}]", T._is_symbol)]:
        theirs = positions(pattern)
        differ = [hex(ord(chars[i])) for i, c in enumerate(chars)
                  if i not in unassigned and ours(c) != (i in theirs)]
        assert not differ, f"{name} differs on {differ[:10]}"


@pytest.mark.parity
def test_pre_tokenizer_and_whitespace_match_the_regex_package():
    regex = pytest.importorskip("regex", reason="needs the [reference] extra")
    import ftfy
    pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
    alphabet = ["'", "<", "|", ">", "s", "S", "ſ", "t", "r", "e", "v", "m", "l", "d", "K", "x", "1", "٣", "Ⅻ", "½",
                " ", "\t", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", "\u0345", "é", "\u0301", "!", "🦊", "\u200d",
                "_", "ß", "İ", "ǅ", "ﬁ", "東", "<|startoftext|>", "<|endoftext|>", "<|ſtartoftext|>", "<|endoftext"]
    rng = random.Random(0)
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    samples += [e["text"] for e in PROMPTS]
    for text in samples:
        cleaned = clean_text(text)
        assert pre_tokenize(cleaned) == pattern.findall(cleaned), repr(cleaned)
        basic = T.html.unescape(T.html.unescape(ftfy.fix_text(text))).strip()    # CLIP's basic_clean
        assert clean_text(text) == regex.sub(r"\s+", " ", basic).strip().lower()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    pytest.importorskip("ftfy", reason="needs the [reference] extra")
    pytest.importorskip("regex", reason="needs the [reference] extra")
    script = _golden_script()
    workdir = tmp_path_factory.mktemp("clip_reference")
    try:
        return script.load_reference(workdir), script.load_reference(workdir, use_ftfy=False)
    except VocabularyNotFoundError as err:
        pytest.skip(f"the clip-anytorch wheel (OpenAI's simple_tokenizer.py) could not be downloaded: {err}")


@pytest.mark.parity
def test_live_parity_with_openai_simple_tokenizer(tok, reference):
    """Live: our ids = OpenAI's (ftfy on) on every prompt, none excluded, and the golden file is up to date."""
    with_ftfy, without_ftfy = reference
    assert with_ftfy.encoder == tok.encoder and with_ftfy.bpe_ranks == tok.ranks
    changed_by_ftfy = 0
    for entry in PROMPTS:
        ref_ids = with_ftfy.encode(entry["text"])
        assert ref_ids == entry["ids"], f"the golden file is stale for {entry['text']!r}"
        assert tok.encode(entry["text"]) == ref_ids, entry["text"]
        changed_by_ftfy += ref_ids != without_ftfy.encode(entry["text"])
    assert changed_by_ftfy == sum(e["ftfy"] for e in PROMPTS) == 67  # these would differ without ftfy
    for entry in PROMPTS[:50]:
        ids = tok.encode(entry["text"])
        assert tok.decode(ids) == with_ftfy.decode(ids).strip()       # decode: the reference's, minus the end space
