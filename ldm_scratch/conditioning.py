"""The pipeline's text conditioning: prompts → the context the UNet attends to at each sampler step.

    prompt ──prompts.schedule──▶ [(end_at_step, text)] ──prompts.prompt_chunks──▶ k chunks of 77 ids + weights
      ──CLIP──▶ z [k, 77, D] ──emphasis──▶ [k, 77, D] ──concatenate──▶ context [77·k, D] per schedule entry

Emphasis, the web UI's "Original" (per chunk, w = the token weights [77], means over all 77·D elements):

    z' = (z · w) · mean(z) / mean(z · w)

so a weight tilts the tokens against each other while the chunk's mean stays that of the unweighted encoding.
(The web UI takes the two means over all the chunks it encodes together: the same chunk of every prompt of a
batch, and of every text of one prompt's edit schedule. We take them per text and chunk, so a context does not
depend on what else is encoded with it; for one prompt without editing the two are the same.) A chunk
whose weights are all 1 is left exactly as CLIP returned it, so a plain prompt of ≤ 75 tokens gives bit for bit
the context of `text_encoder(tokenizer([prompt]))`, and diffusers parity is untouched.

Clip skip is the web UI's operation (the hidden state of an earlier block, then the final LayerNorm: clip.py), in
diffusers' count: the web UI's "Clip skip: 2" is clip_skip=1.

Different chunk counts. Classifier-free guidance runs [uncond; cond] through the UNet as one batch, which needs one
context length. When prompts, negative prompts, or the schedule entries of one prompt give different numbers of
chunks, the shorter contexts are padded with chunks of the empty prompt (BOS, EOS, padding) up to the longest:
what the web UI does inside a batch of prompts (its `empty_chunk`) and between prompt and negative prompt with
its "pad prompt/negative prompt to be same length" option. We pad rather than run the two halves separately (the
web UI's other choice) because it keeps eq 4.4 one batched UNet call for every prompt; an empty chunk is what CLIP
gives for "nothing more was said", so it is the closest to adding nothing (attention still sees its 77 keys).
(The web UI pads the cond batch of *different* prompts by repeating the last vector instead; one rule here.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompts import entry_at_step, prompt_chunks, schedule

TOKENS_PER_CHUNK = 77


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The "Original" emphasis per chunk: z [N, 77, D], weights [N, 77] → z' = (z·w) · mean(z) / mean(z·w).

    Chunks whose weights are all 1 come back untouched (the formula would give z·1·1 up to the division's
    rounding). Computed in float32, returned in z's dtype."""
    weighted = (weights != 1).any(dim=1)                             # [N]: chunks with a weight ≠ 1
    if not weighted.any():
        return z
    z32, w = z.float(), weights.to(z.device, torch.float32)[..., None]  # w [N, 77, 1]
    zw = z32 * w                                                      # z · w
    scale = z32.mean(dim=(1, 2), keepdim=True) / zw.mean(dim=(1, 2), keepdim=True)  # mean(z) / mean(z · w)
    out = (zw * scale).to(z.dtype)
    return torch.where(weighted[:, None, None], out, z)


def encode_texts(tokenizer, text_encoder, texts: list[str], clip_skip: int | None, syntax: str,
                 device) -> list[torch.Tensor]:
    """Texts → one context [77·k_i, D] per text, all chunks through CLIP in one batch (text i's chunks in order).

    syntax "plain": the literal text, one chunk cut at 75 tokens (the tokenizer warns), k_i = 1.
    syntax "a1111": weights, BREAK and long-prompt chunks (prompts.prompt_chunks) and the emphasis above."""
    if syntax == "plain":
        return list(text_encoder(tokenizer(texts).to(device), clip_skip=clip_skip))
    per_text = [prompt_chunks(text, tokenizer) for text in texts]
    every = [chunk for text_chunks in per_text for chunk in text_chunks]
    ids = torch.tensor([chunk.ids for chunk in every], dtype=torch.long, device=device)      # [N, 77]
    weights = torch.tensor([chunk.weights for chunk in every], dtype=torch.float32)          # [N, 77]
    z = emphasize(text_encoder(ids, clip_skip=clip_skip), weights)                            # [N, 77, D]
    contexts, start = [], 0
    for text_chunks in per_text:
        k = len(text_chunks)
        contexts.append(z[start:start + k].reshape(k * TOKENS_PER_CHUNK, z.shape[-1]))   # [k, 77, D] → [77k, D]
        start += k
    return contexts


@dataclass
class PromptSchedule:
    """One prompt's contexts over the run: contexts[j] [77·k_j, D] holds for the steps i ≤ ends[j] (prompts.py)."""
    ends: list[int]
    contexts: list[torch.Tensor]

    def at(self, step: int) -> torch.Tensor:
        return self.contexts[entry_at_step(self.ends, step)]


def text_schedules(tokenizer, text_encoder, texts: list[str], *, steps: int, clip_skip: int | None, syntax: str,
                   device) -> list[PromptSchedule]:
    """Each text's schedule (one entry for a text without editing/alternation, or for syntax "plain"). The
    distinct texts of all schedules go through CLIP in one batch; a text without editing is just itself, so a
    batch of plain prompts is encoded exactly as `text_encoder(tokenizer(texts))` was."""
    entries = [schedule(text, steps) if syntax == "a1111" else [(steps, text)] for text in texts]
    owners, distinct = [], []                      # each prompt's distinct texts (alternation repeats them)
    for index, text_entries in enumerate(entries):
        for text in dict.fromkeys(text for _, text in text_entries):
            owners.append(index)
            distinct.append(text)
    encoded = encode_texts(tokenizer, text_encoder, distinct, clip_skip, syntax, device)
    table = {(index, text): context for index, text, context in zip(owners, distinct, encoded)}
    return [PromptSchedule([end for end, _ in text_entries], [table[index, text] for _, text in text_entries])
            for index, text_entries in enumerate(entries)]


def embedding_schedules(embeds: torch.Tensor) -> list[PromptSchedule]:
    """Given contexts [P, 77·k, D] (prompt_embeds): one constant schedule per prompt."""
    return [PromptSchedule([0], [context]) for context in embeds]


class StepContexts:
    """The context of every step of one call, [2B, 77·K, D] = [uncond; cond] when guiding, else [B, 77·K, D],
    each prompt's rows repeated for its num_images images (batch order as pipeline.py). K is the largest chunk
    count of any prompt, negative prompt or schedule entry; shorter contexts are padded with empty-prompt chunks
    (module docstring), so every step has the same shape.

    `step` is the sampler step the next model call belongs to; the pipeline advances it after each step (from
    the sampler's per-step hook), so a sampler that calls the model twice in a step (Heun) uses that step's
    context both times. A model call reads `current`.
    """

    def __init__(self, cond: list[PromptSchedule], uncond: list[PromptSchedule] | None, num_images: int,
                 empty_context, dtype: torch.dtype):
        self.schedules = (uncond or []) + cond
        self.num_images, self.dtype, self.step = num_images, dtype, 0
        lengths = {context.shape[0] for s in self.schedules for context in s.contexts}
        if len(lengths) > 1:
            longest, empty = max(lengths), empty_context()                           # empty: [77, D]
            for s in self.schedules:
                s.contexts = [pad_context(context, longest, empty) for context in s.contexts]
        self._cache: dict[tuple, torch.Tensor] = {}

    def at(self, step: int) -> torch.Tensor:
        key = tuple(entry_at_step(s.ends, step) for s in self.schedules)
        if key not in self._cache:
            rows = torch.stack([s.contexts[j] for s, j in zip(self.schedules, key)])      # [P(+P), 77K, D]
            self._cache[key] = rows.repeat_interleave(self.num_images, dim=0).to(self.dtype)
        return self._cache[key]

    @property
    def current(self) -> torch.Tensor:
        return self.at(self.step)

    def step_done(self, i: int) -> None:
        """After the sampler's step i (counted from 0 at the first step that runs): the next calls are step i+1."""
        self.step = i + 1


def step_contexts(tokenizer, text_encoder, prompts, negatives, prompt_embeds, negative_embeds, *, num_images: int,
                  guided: bool, clip_skip: int | None, syntax: str, steps: int, dtype) -> StepContexts:
    """A call's StepContexts from text (prompts / negatives: lists of P strings) or from contexts [P, 77·k, D]
    (prompt_embeds / negative_embeds, used as given); the negative side only when guided (CFG)."""
    device = next(text_encoder.parameters()).device

    def side(texts, embeds) -> list[PromptSchedule]:
        if embeds is not None:
            return embedding_schedules(embeds.to(device))
        return text_schedules(tokenizer, text_encoder, texts, steps=steps, clip_skip=clip_skip, syntax=syntax,
                              device=device)

    def empty_context() -> torch.Tensor:          # the empty prompt's chunk [77, D]: BOS, EOS, padding
        return encode_texts(tokenizer, text_encoder, [""], clip_skip, "plain", device)[0]
    return StepContexts(side(prompts, prompt_embeds), side(negatives, negative_embeds) if guided else None,
                        num_images, empty_context, dtype)


def pad_context(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """[77·k, D] → [length, D] by appending copies of the empty prompt's chunk `empty` [77, D]."""
    missing = (length - context.shape[0]) // TOKENS_PER_CHUNK
    return torch.cat([context, empty.to(context.dtype).repeat(missing, 1)]) if missing else context
