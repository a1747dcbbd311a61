"""Prompt-to-prompt (Hertz et al. 2022): edit an image by editing its prompt, keeping the layout.

The layout of a generated image is decided by its cross-attention maps M (which pixels read which word) early in
sampling. So generate the source and the target prompt side by side from the same noise, and during the first
steps give the target the source's maps (§3.2, eq. in "Controlling the cross-attention"):

    Edit(M_t, M*_t, t) = M_t*  if t ≥ τ  else  M_t    (the target's own maps only for the last steps)

with M_t the source's maps and M*_t the target's at step t. Four edits, picked by the arguments:

- word swap ("a red circle" → "a green circle", same token count): the target takes the source's maps for every
  token, M̂*_t = M_t, during the first `cross_replace` fraction of the steps.
- refinement (words added, "a circle" → "a red circle"): the two token sequences are aligned (longest matching
  blocks); a target token j that matches source token A(j) takes its map, M̂*_t[:, j] = M_t[:, A(j)], and new words
  keep their own maps (the paper's (M_t)_{i,A(j)} if A(j) ≠ None else (M*_t)_{i,j}).
- reweighting (`reweight={"red": 2.0}`): the target's maps of those words are scaled, M̂*_t[:, j] = c · M̂*_t[:, j].
- local blending (`local_blend="circle"`): after each step from 20 % of the way on, only the region the words
  attend to may change: mask α = (union of the source's and the target's thresholded maps of those words), and
  x*_t ← x_t + α ⊙ (x*_t − x_t) (§3.2, "Local editing").

Self-attention is copied too, for the first `self_replace` fraction of the steps, at the coarse layers only
(≤ 1/16 of the latent's pixels: 16² of 64² for SD at 512², as the authors' code), which keeps the shapes' geometry.
Only the conditional half of the classifier-free-guidance batch is edited (as the authors' code).

`inversion=` (editing.invert) starts both from the latents of a real image, with its per-step null-text embeddings.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F

from ..attention import hooks
from ..vocabulary import EOS_ID
from .denoise import (check_guidance, check_model, check_steps, denoise, encode_text, latents_to_output,
                      prompt_tokens, starting_noise)
from .maps import feature_map_size

BLEND_START = 0.2        # local blending starts after this fraction of the steps (the authors' start_blend)
BLEND_THRESHOLD = 0.3    # a pixel belongs to the edited region where its word map is ≥ 0.3 × the map's maximum
SELF_REPLACE_SHARE = 16  # self-attention is copied at layers with ≤ (latent pixels) / 16 queries


def token_alignment(source_ids: list[int], target_ids: list[int]) -> list[int]:
    """A(j) for every target position j of the 77-token sequences: the source position it matches, or −1 for a new
    token. The same token count (a word swap) maps j → j; otherwise the longest matching blocks of ids (difflib)
    align."""
    if _token_count(source_ids) == _token_count(target_ids):
        return list(range(len(target_ids)))                                       # word swap: j → j
    mapping = [-1] * len(target_ids)
    for block in difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False).get_matching_blocks():
        for offset in range(block.size):
            mapping[block.b + offset] = block.a + offset
    return mapping


def _token_count(ids: list[int]) -> int:
    """Tokens before the first end-of-text id (BOS included)."""
    return ids.index(EOS_ID) if EOS_ID in ids else len(ids)


def word_positions(pipe, prompt: str, words, what: str) -> list[int]:
    """Positions (1-based, in the 77 tokens) of every token of every occurrence of `words` in `prompt`."""
    words = [words] if isinstance(words, str) else list(words)
    tokens = prompt_tokens(pipe, prompt)
    positions = []
    for word in words:
        pieces = [pipe.tokenizer.decode([i]).strip() for i in pipe.tokenizer.encode(word)]   # "circle", or pieces
        found = []
        for start in range(len(tokens) - len(pieces) + 1):
            window = tokens[start:start + len(pieces)]
            if [token for _, token in window] == pieces:
                found += [index for index, _ in window]
        if not found:
            raise ValueError(f"{what}: the word {word!r} is not in the prompt {prompt!r} (its tokens: "
                             f"{[t for _, t in tokens]})")
        positions += found
    return positions


class PromptToPromptEdit:
    """The attention hook: rows [..., source, target] of the UNet batch are the conditional source and target;
    edits the target row in place of its own maps. `step` is set by the loop before each UNet call."""

    def __init__(self, steps: int, cross_replace: float, self_replace: float, alignment: list[int],
                 weights: torch.Tensor, latent_size: tuple[int, int], blend_positions=None,
                 self_replace_share: int = SELF_REPLACE_SHARE, unconditional: bool = False):
        self.cross_steps, self.self_steps = int(cross_replace * steps), int(self_replace * steps)
        self.source_index = torch.tensor([max(a, 0) for a in alignment])           # A(j), −1 → any (masked)
        self.aligned = torch.tensor([a >= 0 for a in alignment], dtype=torch.float32)   # 1 where A(j) exists
        self.weights = weights                                                     # c_j, 1 for most tokens
        self.latent_size = latent_size
        self.self_max_tokens = latent_size[0] * latent_size[1] // self_replace_share
        self.blend_positions = blend_positions         # (source positions, target positions) or None
        self.blend_maps: list[torch.Tensor] = []      # this step's word maps [2, h, w], one per cross layer
        self.unconditional = unconditional              # also edit the unconditional rows (off: as the authors)
        self.step = 0

    def __call__(self, layer, kind, q, k, v, probs):
        if kind == "cross" and self.blend_positions is not None:
            self._record_blend(probs[-2], probs[-1])
        pairs = [(-2, -1)]                                                         # the conditional source, target
        if self.unconditional and probs.shape[0] == 4:
            pairs.append((0, 1))                                                   # … and the unconditional pair
        edited = [(row, self._edit(kind, probs[source], probs[row])) for source, row in pairs]
        edited = [(row, rows) for row, rows in edited if rows is not None]
        if not edited:
            return None
        probs = probs.clone()
        for row, rows in edited:
            probs[row] = rows
        return probs

    def _edit(self, kind, source, target):
        """The target's new maps [heads, N, M] from the source's and its own, or None to keep its own."""
        if kind == "cross":
            if self.step >= self.cross_steps:
                return None
            aligned = self.aligned.to(source)
            mapped = source[..., self.source_index.to(source.device)]            # (M_t)_{i, A(j)}
            edited = aligned * mapped + (1 - aligned) * target                    # new words keep (M*_t)_{i, j}
            return edited * self.weights.to(source)                               # reweighting: c_j · M̂*_t[:, j]
        if self.step < self.self_steps and source.shape[1] <= self.self_max_tokens:
            return source                                                         # the source's self-attention
        return None

    def _record_blend(self, source, target):
        size = feature_map_size(source.shape[1], *self.latent_size)
        source_positions, target_positions = self.blend_positions
        maps = torch.stack([source[..., source_positions].sum(-1), target[..., target_positions].sum(-1)])
        maps = maps.mean(1).reshape(2, 1, *size).float()                          # mean over heads: [2, 1, h_l, w_l]
        self.blend_maps.append(F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False))

    def blend(self, i: int, steps: int, x: torch.Tensor) -> torch.Tensor:
        """Local blending after step i: x* ← x + α ⊙ (x* − x) for the target row of x [2, 4, h, w]."""
        maps, self.blend_maps = self.blend_maps, []
        if self.blend_positions is None or i < int(BLEND_START * steps):
            return x
        maps = torch.stack(maps).mean(0)                                           # over layers: [2, 1, h, w]
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)                         # grow by a pixel (the authors' k = 1)
        maps = maps / maps.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None, None]
        mask = (maps >= BLEND_THRESHOLD).any(dim=0, keepdim=True)                 # α: source ∪ target region
        # x*_t ← x_t + α ⊙ (x*_t − x_t), written as a choice so that α ∈ {0, 1} keeps either exactly
        return torch.cat([x[:1], torch.where(mask, x[1:], x[:1])])


@torch.inference_mode()
def prompt_to_prompt(pipe, source_prompt: str, target_prompt: str, *, seed: int = 0, steps: int = 50,
                     guidance_scale: float = 7.5, cross_replace: float = 0.8, self_replace: float = 0.4,
                     reweight: dict | None = None, local_blend=None, inversion=None, negative_prompt: str = "",
                     height: int | None = None, width: int | None = None, output_type: str = "pil",
                     self_replace_share: int = SELF_REPLACE_SHARE, edit_unconditional: bool = False):
    """Generate `source_prompt` and its edit `target_prompt` from the same noise; returns (source, edited) as
    `output_type` ("pil": two PIL images; "np"/"pt"/"latent": arrays/tensors with a batch of 1 each).

    cross_replace, self_replace: fractions of the steps (from the start) in which the target takes the source's
    cross- / self-attention (module docstring); self-attention only at layers with ≤ latent pixels /
    self_replace_share queries (the authors' 16 keeps the fine layers free; a small model with an 8×8 latent has no
    such coarse layer, so there 4 or 1; on the bundled tiny model a colour swap keeps the outline best at
    guidance_scale 3, cross_replace 0.4, self_replace 1.0, share 4: docs/p2p_swap.json).
    reweight: {word: c} scales the target's attention to `word`.
    local_blend: a word or list of words (in either prompt) whose attention region is the only part that changes.
    inversion: an `editing.Inversion` of a real image: both start from its latents, use its steps, guidance and
    null-text embeddings, and `seed`, `steps`, `guidance_scale` are ignored.
    edit_unconditional: also give the target's unconditional row of the guidance batch the source's maps (a departure
    from the authors' code, which edits the conditional rows only; off by default).
    """
    for name, prompt in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name} must be a non-empty string, got {prompt!r}")
    check_model(pipe)
    for name, share in (("cross_replace", cross_replace), ("self_replace", self_replace)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} is a fraction of the steps, in [0, 1]; got {share!r}")
    if isinstance(self_replace_share, bool) or not isinstance(self_replace_share, int) or self_replace_share < 1:
        raise ValueError(f"self_replace_share is a whole number ≥ 1 (1: every layer); got {self_replace_share!r}")
    if inversion is not None:
        noise, steps, guidance_scale = inversion.latents.to(pipe.device), inversion.steps, inversion.guidance_scale
        uncond = inversion.unconditional(pipe)
    else:
        steps, guidance_scale = check_steps(steps), check_guidance(guidance_scale)
        noise = starting_noise(pipe, seed, height, width)
        uncond = encode_text(pipe, [negative_prompt]) if guidance_scale != 1 else None
    ids = pipe.tokenizer([source_prompt, target_prompt]).tolist()
    weights = torch.ones(len(ids[1]))
    for word, scale in (reweight or {}).items():
        weights[word_positions(pipe, target_prompt, word, "reweight")] = float(scale)
    blend = None
    if local_blend is not None:
        blend = (_positions_in_either(pipe, source_prompt, local_blend),
                 _positions_in_either(pipe, target_prompt, local_blend))
        if not blend[0] and not blend[1]:
            raise ValueError(f"local_blend: none of {local_blend!r} is in either prompt")
    edit = PromptToPromptEdit(steps, cross_replace, self_replace, token_alignment(*ids), weights,
                              tuple(noise.shape[-2:]), blend, self_replace_share, bool(edit_unconditional))
    cond = encode_text(pipe, [source_prompt, target_prompt])
    with hooks(pipe.unet, edit):
        latents = denoise(pipe, noise.expand(2, -1, -1, -1).clone(), cond, uncond, steps, guidance_scale,
                          before_step=lambda i: setattr(edit, "step", i),
                          after_step=lambda i, x: edit.blend(i, steps, x))
    out = latents_to_output(pipe, latents, output_type)
    return (out[0], out[1]) if output_type == "pil" else (out[:1], out[1:])


def _positions_in_either(pipe, prompt: str, words) -> list[int]:
    """Positions of those of `words` that occur in `prompt` (a word absent from this prompt is skipped)."""
    words = [words] if isinstance(words, str) else list(words)
    positions = []
    for word in words:
        try:
            positions += word_positions(pipe, prompt, word, "local_blend")
        except ValueError:
            pass
    return positions
