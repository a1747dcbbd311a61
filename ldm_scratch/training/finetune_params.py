"""What each fine-tuning method may move (`ldm-scratch finetune`, training/finetune.py): the parameters made
trainable and their optimiser groups.

    lora               the (α/r)·B A pairs beside the chosen layers (lora_training.LoraLayers)
    textual-inversion  the new word's rows of E_tok (add_word)
    dreambooth         the UNet, or its prompt K, V only (cross-kv); the text encoder with --train-text-encoder;
                       and with --train-words only those words' rows of E_tok (train_rows)
    --token (with dreambooth or lora: "pivotal tuning")  also a new word's n rows of E_tok (add_word), in their
                       own optimiser group at --word-lr; saved beside the model or LoRA as an embedding file

Frozen rows of E_tok stay bit-identical: a gradient hook zeroes their ∂L/∂E_tok and AdamW runs without weight
decay there, so their update lr · m̂/(√v̂ + ε) with m̂ = 0 is exactly 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora_training import LoraLayers, context_kv_names


def prepare_method(cfg, pipe, word_lr_default: float
                   ) -> tuple[dict[str, nn.Module], list[dict], nn.Module | None]:
    """Freeze the model and make the method's parameters trainable (cfg: a FinetuneConfig): ({name: module whose
    state is saved}, the optimiser's parameter groups, an extra module for Denoiser). word_lr_default: the
    --train-words rows' learning rate when --word-lr is not given."""
    pipe.text_encoder.requires_grad_(False), pipe.unet.requires_grad_(False), pipe.vae.requires_grad_(False)
    torch.manual_seed(cfg.seed)                                  # the LoRA's A: the same on every rank
    if cfg.method == "lora":
        layers = LoraLayers({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, cfg.lora_rank,
                            cfg.lora_alpha or cfg.lora_rank, cfg.lora_targets, cfg.lora_text_encoder)
        layers.attach()
        saved, groups = {"unet": layers}, [{"params": list(layers.parameters())}]
        add_token(cfg, pipe, saved, groups, word_lr_default)
        return saved, groups, layers
    if cfg.method == "textual-inversion":
        table = add_word(pipe, cfg.token, cfg.init_word, cfg.num_vectors)
        return {"text_encoder": pipe.text_encoder.token_embedding}, [{"params": [table]}], None
    if cfg.unet_params == "cross-kv":           # Custom Diffusion: K = W_k c, V = W_v c of the prompt only
        layers = dict(pipe.unet.named_modules())
        for name in context_kv_names(pipe.unet):
            layers[name].requires_grad_(True)
    else:
        pipe.unet.requires_grad_(True)
    groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad]}]
    trained = {"unet": pipe.unet}
    if cfg.train_text_encoder:
        pipe.text_encoder.requires_grad_(True)
        trained["text_encoder"] = pipe.text_encoder
        groups[0]["params"] += list(pipe.text_encoder.parameters())
    if cfg.words:
        table = train_rows(pipe, cfg.words)
        trained["text_encoder"] = pipe.text_encoder.token_embedding
        groups.append({"params": [table], "lr": cfg.word_lr or word_lr_default})
    add_token(cfg, pipe, trained, groups, word_lr_default)
    return trained, groups, None


def add_token(cfg, pipe, saved: dict, groups: list[dict], word_lr_default: float) -> None:
    """--token with dreambooth or lora: the new word's n rows of E_tok learn with the model (add_word), at --word-lr
    in a group of their own; E_tok is then saved with the run's checkpoint (the rows [V, V + n) are the new word)."""
    if not cfg.token:
        return
    table = add_word(pipe, cfg.token, cfg.init_word, cfg.num_vectors)                # E_tok [V + n, D]
    saved["text_encoder"] = pipe.text_encoder.token_embedding
    groups.append({"params": [table], "lr": cfg.word_lr or word_lr_default})


def word_ids(pipe, text: str) -> list[int]:
    """The token ids `text` is made of, without the start/end/padding tokens."""
    special = (pipe.tokenizer.bos_id, pipe.tokenizer.eos_id, pipe.tokenizer.pad_id)
    return [int(i) for i in pipe.tokenizer([text])[0] if int(i) not in special]


def only_rows_learn(weight: nn.Parameter, rows) -> nn.Parameter:
    """Make E_tok trainable but let only `rows` (indices or a slice) learn: a gradient hook zeroes every other row's
    ∂L/∂E_tok, and with AdamW without weight decay a frozen row's update, lr · m̂/(√v̂ + ε) with m̂ = 0, is
    exactly 0."""
    mask = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask)                              # ∂L/∂E_tok[other rows] = 0
    return weight


def train_rows(pipe, words: list[str]) -> nn.Parameter:
    """Let only the rows of E_tok that `words` are made of learn (only_rows_learn): they stay bit-identical, and so
    does τ(y) of any prompt without these words (causal attention: even the tokens before them in a prompt that
    has them)."""
    rows = []
    for word in words:
        ids = word_ids(pipe, word)
        if not ids:
            raise ValueError(f"--train-words: {word!r} has no tokens")
        rows += ids
    return only_rows_learn(pipe.text_encoder.token_embedding.weight, rows)      # E_tok [V, D]


def add_word(pipe, token: str, init_word: str, n_vectors: int) -> nn.Parameter:
    """Add `token` as n new rows of E_tok, each starting at the mean embedding of `init_word`'s tokens; only those
    rows learn (only_rows_learn: E_tok[:V], V = the original rows, stays exactly as it was)."""
    from ..textual_inversion import Embedding, _embeddings, check_word
    ids = word_ids(pipe, init_word)
    if not ids:
        raise ValueError(f"--init-word {init_word!r} has no tokens; give a word such as 'square'")
    table = pipe.text_encoder.token_embedding.weight
    start = table.detach()[ids].mean(0, keepdim=True).repeat(n_vectors, 1)      # [n, D]
    embedding = Embedding(token.lower(), start.clone())
    check_word(embedding, pipe.tokenizer, pipe.text_encoder.config.width, "--token")
    embeddings = _embeddings(pipe)
    embeddings.loaded[embedding.word] = embedding
    embeddings.install(pipe.tokenizer, pipe.text_encoder)
    return only_rows_learn(pipe.text_encoder.token_embedding.weight, slice(embeddings.base_rows, None))  # [V + n, D]
