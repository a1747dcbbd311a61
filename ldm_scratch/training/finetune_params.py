"""What each fine-tuning method may move (`ldm-scratch finetune`, training/finetune.py): the parameters made
trainable and their optimiser groups.

    lora               the (α/r)·B A pairs beside the chosen layers (lora_training.LoraLayers)
    textual-inversion  the new word's rows of E_tok (add_word)
    dreambooth         the UNet, or its prompt K, V only (cross-kv); the text encoder with --train-text-encoder;
                       and with --train-words only those words' rows of E_tok (train_rows)

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
        return {"unet": layers}, [{"params": list(layers.parameters())}], layers
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
    return trained, groups, None


def train_rows(pipe, words: list[str]) -> nn.Parameter:
    """Let only the rows of E_tok that `words` are made of learn: as in add_word, a gradient hook zeroes every other
    row's ∂L/∂E_tok, so with AdamW without weight decay they stay bit-identical, and so does τ(y) of any prompt
    without these words (causal attention: even the tokens before them in a prompt that has them)."""
    special = (pipe.tokenizer.bos_id, pipe.tokenizer.eos_id, pipe.tokenizer.pad_id)
    weight = pipe.text_encoder.token_embedding.weight                           # E_tok [V, D]
    mask = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
    for word in words:
        ids = [int(i) for i in pipe.tokenizer.encode(word) if int(i) not in special]
        if not ids:
            raise ValueError(f"--train-words: {word!r} has no tokens")
        mask[ids] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask)                              # ∂L/∂E_tok[other rows] = 0
    return weight


def add_word(pipe, token: str, init_word: str, n_vectors: int) -> nn.Parameter:
    """Add `token` as n new rows of E_tok, each starting at the mean embedding of `init_word`'s tokens; only those
    rows learn: a gradient hook zeroes ∂L/∂E_tok[:V] (V = the original rows), and AdamW runs without weight decay,
    so a frozen row's update, lr · m̂/(√v̂ + ε) with m̂ = 0, is exactly 0."""
    from ..textual_inversion import Embedding, _embeddings, check_word
    special = (pipe.tokenizer.bos_id, pipe.tokenizer.eos_id, pipe.tokenizer.pad_id)
    ids = [int(i) for i in pipe.tokenizer([init_word])[0] if int(i) not in special]
    if not ids:
        raise ValueError(f"--init-word {init_word!r} has no tokens; give a word such as 'square'")
    table = pipe.text_encoder.token_embedding.weight
    start = table.detach()[ids].mean(0, keepdim=True).repeat(n_vectors, 1)      # [n, D]
    embedding = Embedding(token.lower(), start.clone())
    check_word(embedding, pipe.tokenizer, pipe.text_encoder.config.width, "--token")
    embeddings = _embeddings(pipe)
    embeddings.loaded[embedding.word] = embedding
    embeddings.install(pipe.tokenizer, pipe.text_encoder)
    weight = pipe.text_encoder.token_embedding.weight                           # [V + n, D]
    weight.requires_grad_(True)
    frozen = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
    frozen[embeddings.base_rows:] = 1
    weight.register_hook(lambda grad: grad * frozen)                            # ∂L/∂E_tok[:V] = 0
    return weight
