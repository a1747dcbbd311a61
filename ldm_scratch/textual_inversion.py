"""Textual inversion: new words for the prompt, each one or more learned vectors of the text encoder's input.

Gal et al. 2022 ("An Image is Worth One Word") freeze the whole model and learn only the input embedding v* of a
placeholder word S*, so that prompts containing S* reproduce a concept (eq 2):

    v* = argmin_v  E_{z, y, ε, t} ‖ ε − ε_θ(z_t, t, c_θ(y; v)) ‖²

where c_θ(y; v) is the text encoder with row E_tok[S*] = v. Loading an embedding is therefore just that: append
its n rows to the token table E_tok [V, D] → [V + n, D] and let the tokenizer turn the word into the n new ids:

    "a photo of myemb"  ──tokenizer──▶ [a, photo, of, V, V+1, …, V+n−1]   (n vectors: one word, n positions)
    h⁰_i = E_tok[id_i] + E_pos[i]                                           (clip.py; rows ≥ V are the embedding)

The web UI does the same without touching the table (it swaps the vectors in after the lookup); the numbers are
identical. diffusers adds n tokens named token, token_1, …, token_{n−1} and rewrites "token" in a prompt into
"token token_1 …"; here the word expands to its n ids directly, and token_1 … are also words of one vector each,
so a prompt written for diffusers works unchanged. A word matches whole (tokenizer.split_added), lower-cased like
all CLIP text, also inside weighted and long prompts; a multi-vector word is never cut by a 75-token chunk
boundary (prompts.py moves it to the next chunk, as the web UI does).

File formats (all strict: one embedding per file, D = the text encoder's width, finite numbers, 1 ≤ n ≤ 75):
- AUTOMATIC1111 / original textual-inversion `.pt`: {"string_to_param": {"*": [n, D]}, "string_to_token", "name",
  "step", …}. The original code pickles an `nn.ParameterDict` there; we read it with torch.load(weights_only=True)
  and allow exactly that one class (its Parameter is rebuilt by a function weights_only already allows).
- The web UI's `.safetensors`: one tensor `emb_params` [n, D].
- diffusers `learned_embeds.bin` / `.safetensors`: {token: [D] or [n, D]}.
The word defaults to the file's stem, as in the web UI (diffusers uses the name stored in the file instead; pass
`token=` to choose). A word that is already one token of the vocabulary ("cat") is refused: the web UI would
silently re-define every "cat" of every prompt; diffusers refuses too. So is a word loaded twice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint.tensor_file import CheckpointError, TensorFile, key_list
from .prompts import CHUNK_LENGTH
from .tokenizer import SPECIAL_TOKENS, clean_text, pre_tokenize

# The only class a textual-inversion pickle may hold beyond plain tensors and containers (the original code's
# string_to_param). Everything else, e.g. a pickled nn.Linear or any non-torch class, is refused by weights_only.
ALLOWED_PICKLE_CLASSES = [nn.ParameterDict]


class TextualInversionError(CheckpointError):
    """An embedding file or word that cannot be used; the message says why and what to do."""


@dataclass
class Embedding:
    """One loaded embedding: the prompt word and its vectors [n, D] (n = number of tokens it takes)."""
    word: str
    vectors: torch.Tensor

    @property
    def names(self) -> list[str]:
        """The names of its n rows, as diffusers gives them: word, word_1, …, word_{n−1}."""
        return [self.word] + [f"{self.word}_{k}" for k in range(1, len(self.vectors))]


# ---------------------------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------------------------

def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """An embedding file (any of the module docstring's formats) → Embedding(word, vectors [n, D] float32)."""
    path = Path(path)
    if not path.is_file():
        raise TextualInversionError(f"{path}: no such embedding file")
    if path.suffix == ".safetensors":
        file = TensorFile(path)
        tensors = {key: file.get(key) for key in file.keys()}
    elif path.suffix in (".pt", ".bin", ".pth", ".ckpt"):
        tensors = _unpickle(path)
    else:
        raise TextualInversionError(f"{path}: unknown embedding file type '{path.suffix}'; expected .pt or .bin "
                                    "(web UI / diffusers) or .safetensors")
    vectors = _check_vectors(path, *_only_tensor(path, tensors))
    return Embedding(clean_word(token if token is not None else path.stem, path), vectors)


def _unpickle(path: Path) -> dict:
    """A torch pickle read with weights_only=True, the original code's nn.ParameterDict allowed and nothing else;
    an A1111 file's string_to_param is returned as its {key: tensor}, a diffusers file as it is."""
    try:
        with torch.serialization.safe_globals(ALLOWED_PICKLE_CLASSES):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TextualInversionError(
            f"{path}: torch.load(weights_only=True) refused this file ({type(error).__name__}: {str(error)[:200]}). "
            "An embedding file holds tensors (and the original code's nn.ParameterDict); this one pickles other "
            "Python objects, which we never unpickle. Use a .safetensors embedding, or convert it where you trust "
            "the source.") from None
    if not isinstance(data, dict):
        raise TextualInversionError(f"{path}: expected a dictionary, found {type(data).__name__}")
    if "string_to_param" in data:                                   # A1111 / the original textual-inversion code
        params = data["string_to_param"]
        params = params._parameters if isinstance(params, nn.ParameterDict) else params
        if not isinstance(params, dict):
            raise TextualInversionError(f"{path}: 'string_to_param' is a {type(params).__name__}, not a dictionary")
        return {f"string_to_param.{key}": value for key, value in params.items()}
    return data


def _only_tensor(path: Path, tensors: dict) -> tuple[str, torch.Tensor]:
    """The file's one tensor: emb_params, string_to_param.*, or diffusers' {token: tensor}."""
    if "clip_l" in tensors and "clip_g" in tensors:
        raise TextualInversionError(f"{path}: an SDXL embedding (clip_l + clip_g); this project runs SD 1 and 2")
    if len(tensors) != 1:
        raise TextualInversionError(f"{path}: an embedding file holds exactly one tensor (emb_params, "
                                    f"string_to_param['*'] or {{token: tensor}}); this one has {len(tensors)}: "
                                    f"{key_list(tensors)}")
    key, value = next(iter(tensors.items()))
    if not isinstance(value, torch.Tensor):
        raise TextualInversionError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
    return key, value


def _check_vectors(path: Path, key: str, value: torch.Tensor) -> torch.Tensor:
    """[D] or [n, D] floating point, 1 ≤ n ≤ 75, all finite → float32 [n, D]."""
    vectors = value.detach()
    vectors = vectors[None] if vectors.ndim == 1 else vectors                     # diffusers' [D] → [1, D]
    if vectors.ndim != 2 or not vectors.dtype.is_floating_point:
        raise TextualInversionError(f"{path}: {key!r} must be a float tensor [n, D] (n vectors of width D); got "
                                    f"{vectors.dtype} {list(value.shape)}")
    if vectors.numel() == 0:
        raise TextualInversionError(f"{path}: {key!r} is empty ({list(value.shape)}): the file holds no vectors")
    if len(vectors) > CHUNK_LENGTH:
        raise TextualInversionError(f"{path}: {len(vectors)} vectors, but a prompt chunk holds at most "
                                    f"{CHUNK_LENGTH} tokens")
    vectors = vectors.float()
    if not torch.isfinite(vectors).all():
        raise TextualInversionError(f"{path}: {key!r} holds NaN or infinite numbers; the training that made it "
                                    "diverged. Use an earlier save of the embedding.")
    return vectors.contiguous()


def clean_word(word: str, path: Path | str = "") -> str:
    """The prompt word as the tokenizer will see it (CLIP's cleaning: lower case, single spaces)."""
    cleaned = clean_text(word)
    if not cleaned:
        raise TextualInversionError(f"{path}: the token {word!r} is empty after cleaning; pass token='<name>'")
    if any(c in cleaned for c in "()[]:|\\"):
        raise TextualInversionError(f"{path}: the token {word!r} contains one of ( ) [ ] : | \\, which the prompt "
                                    "syntax reads as emphasis or editing; pass another token=")
    return cleaned


# ---------------------------------------------------------------------------------------------------------------
# Installing into a tokenizer + text encoder
# ---------------------------------------------------------------------------------------------------------------

class Embeddings:
    """The embeddings loaded into one pipeline, in loading order, and the text encoder's original row count V.

    `install` rebuilds both sides from this list: E_tok = [E_tok[:V]; vectors₁; vectors₂; …] and the
    tokenizer's added words (word → its ids, word_k → its k-th id), so loading and unloading are the same code."""

    def __init__(self, base_rows: int):
        self.base_rows = base_rows
        self.loaded: dict[str, Embedding] = {}

    def install(self, tokenizer, text_encoder) -> None:
        table = text_encoder.token_embedding.weight                                   # E_tok [V + …, D]
        rows = [table.detach()[:self.base_rows]]
        added, names, next_id = {}, {}, self.base_rows
        for embedding in self.loaded.values():
            ids = list(range(next_id, next_id + len(embedding.vectors)))
            rows.append(embedding.vectors.to(table.device, table.dtype))
            added[embedding.word] = ids                        # the word → all n ids
            for name, i in zip(embedding.names, ids):
                names[i] = name
                if name != embedding.word:
                    added[name] = [i]                          # diffusers' word_k → its one row
            next_id += len(ids)
        weight = torch.cat(rows)                                                       # [V + Σn, D]
        text_encoder.token_embedding = nn.Embedding(len(weight), weight.shape[1], _weight=weight)
        text_encoder.token_embedding.requires_grad_(table.requires_grad)
        text_encoder.config = replace(text_encoder.config, vocab_size=len(weight))    # clip.py checks ids < V
        tokenizer.added_tokens, tokenizer.added_names = added, names


def check_word(embedding: Embedding, tokenizer, width: int, path) -> None:
    """Refuse a width that is not the text encoder's, a word already loaded, or a word the vocabulary has."""
    n, d = embedding.vectors.shape
    if d != width:
        hint = {768: "SD 1 (CLIP ViT-L, 768)", 1024: "SD 2 (OpenCLIP ViT-H, 1024)"}.get(d, f"a width-{d} model")
        raise TextualInversionError(f"{path}: the embedding's vectors are {d} wide, made for {hint}, but this "
                                    f"model's text encoder is {width} wide: use an embedding trained for this model")
    taken = [name for name in embedding.names if name in tokenizer.added_tokens]
    if taken:
        raise TextualInversionError(f"{path}: the token(s) {taken} are already loaded: unload_textual_inversion"
                                    f"({embedding.word!r}) first, or pass another token=")
    words = pre_tokenize(embedding.word)
    if embedding.word in SPECIAL_TOKENS or (len(words) == 1 and len(tokenizer.bpe(words[0])) == 1):
        raise TextualInversionError(f"{path}: {embedding.word!r} is already a token of CLIP's vocabulary; loading "
                                    f"it would change the meaning of that word in every prompt. Pass token="
                                    f"'<{embedding.word}>' (or any word the vocabulary lacks)")


def _embeddings(pipe) -> Embeddings:
    if getattr(pipe, "_embeddings", None) is None:
        pipe._embeddings = Embeddings(pipe.text_encoder.token_embedding.num_embeddings)
    return pipe._embeddings


def load_textual_inversion(pipe, path: str | os.PathLike, token: str | None = None) -> list[str]:
    """Read an embedding file and add its word to `pipe`'s tokenizer and text encoder. Returns the names of its
    rows, [word] for one vector, [word, word_1, …] for n (the word itself brings all n into a prompt)."""
    embedding = read_embedding(path, token)
    check_word(embedding, pipe.tokenizer, pipe.text_encoder.config.width, path)
    embeddings = _embeddings(pipe)
    embeddings.loaded[embedding.word] = embedding
    embeddings.install(pipe.tokenizer, pipe.text_encoder)
    return embedding.names


def unload_textual_inversion(pipe, token: str | None = None) -> None:
    """Remove one loaded embedding (by its word) or all (None); the token table gets its original rows back."""
    embeddings = _embeddings(pipe)
    if token is None:
        embeddings.loaded.clear()
    else:
        word = clean_text(token)
        if word not in embeddings.loaded:
            raise TextualInversionError(f"no embedding {token!r} is loaded; loaded: {sorted(embeddings.loaded)}")
        del embeddings.loaded[word]
    embeddings.install(pipe.tokenizer, pipe.text_encoder)


class TextualInversionMethods:
    """`pipe.load_textual_inversion`, `pipe.unload_textual_inversion`: inherited by the pipeline class."""

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> list[str]:
        """Add an embedding's word (default: the file's stem) to prompts; returns its rows' names (see above)."""
        return load_textual_inversion(self, path, token)

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one embedding (by its word), or all (None)."""
        unload_textual_inversion(self, token)
