"""Edit pairs for a tiny InstructPix2Pix: (source image, instruction, target image), all rendered by the data generator.

Brooks et al. (2023) made their pairs with GPT-3 and prompt-to-prompt; here the captioned-shapes generator
(ldm_scratch/data/shapes.py) draws both images exactly, so the pair differs in one attribute and nothing else:
the same jitter numbers (radius, rotation, position: one numpy Generator seeded by (seed, index), replayed for
both images), one attribute changed.

    kind         instruction                          what changes         e.g.
    colour       "make the {shape} {colour}"          the shape's colour   "make the circle green"
    shape        "turn it into a {shape}"             the shape            "turn it into a square"
    background   "change the background to {colour}"  the background       "change the background to white"

(A shape edit keeps radius, rotation and the position's uniform draws; its centre moves a little only where the new
shape needs a wider margin from the border: shapes.render keeps every shape inside the image.)

An edit is named by its triple (kind, key, value): the key is the attribute the instruction is read against —
colour edit: the shape (named in the instruction); shape edit: the shape's colour; background edit: the shape —
and the value is the new colour / shape / background. `HELDOUT_EDITS` lists 15 such triples (5 per kind: every
shape or colour once as key and once as value) that training never draws; they ask whether the model composes an
instruction it has never seen from words it has ("make the circle yellow" is never trained, "make the circle red"
and "make the square yellow" are). They were fixed before the first training run.

`VALIDATION_EDITS` (round 5) are 15 more triples built the same way, disjoint from the held-out ones, for choosing
settings on *unseen combinations* without touching the held-out set: a model trained with
`hold_out_validation=True` never draws them either, so they stand to it as the held-out triples stand to the
final model. (Validation cases from *trained* triples on new layouts overestimated held-out keeping by ~10 points
in rounds 3 and 4.)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..data import COLOURS, SHAPES, all_combinations, render

KINDS = ("colour", "shape", "background")

# (kind, key, value): never drawn by the "train" split (module docstring)
HELDOUT_EDITS = (
    ("colour", "circle", "yellow"), ("colour", "square", "white"), ("colour", "triangle", "purple"),
    ("colour", "star", "green"), ("colour", "ring", "red"),
    ("shape", "red", "star"), ("shape", "green", "circle"), ("shape", "blue", "ring"),
    ("shape", "yellow", "square"), ("shape", "purple", "triangle"),
    ("background", "circle", "blue"), ("background", "square", "yellow"), ("background", "triangle", "green"),
    ("background", "star", "white"), ("background", "ring", "purple"),
)
# (kind, key, value): a second unseen set for choosing settings (module docstring); fixed before round 5 ran
VALIDATION_EDITS = (
    ("colour", "circle", "green"), ("colour", "square", "purple"), ("colour", "triangle", "blue"),
    ("colour", "star", "red"), ("colour", "ring", "yellow"),
    ("shape", "red", "triangle"), ("shape", "green", "square"), ("shape", "blue", "circle"),
    ("shape", "white", "star"), ("shape", "purple", "ring"),
    ("background", "circle", "red"), ("background", "square", "green"), ("background", "triangle", "white"),
    ("background", "star", "yellow"), ("background", "ring", "blue"),
)
EDIT_SPLITS = ("train", "heldout", "validation")
_SPLIT_NUMBER = {"train": 10, "heldout": 11, "validation": 12}   # seeds the pair generator (shapes.py's: 0–2)


class Edit(NamedTuple):
    """One edit: the source (shape, colour, background), the kind, the new value, and the target triple."""
    source: tuple[str, str, str]
    kind: str
    value: str

    @property
    def target(self) -> tuple[str, str, str]:
        shape, colour, background = self.source
        return {"colour": (shape, self.value, background), "shape": (self.value, colour, background),
                "background": (shape, colour, self.value)}[self.kind]

    @property
    def key(self) -> str:
        shape, colour, _ = self.source
        return colour if self.kind == "shape" else shape

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.kind, self.key, self.value

    @property
    def instruction(self) -> str:
        return instruction(self.kind, self.source, self.value)


def instruction(kind: str, source: tuple[str, str, str], value: str) -> str:
    """The instruction text of an edit: instruction("colour", ("circle", "red", "blue"), "green") →
    "make the circle green"."""
    if kind == "colour":
        return f"make the {source[0]} {value}"
    if kind == "shape":
        return f"turn it into a {value}"
    if kind == "background":
        return f"change the background to {value}"
    raise ValueError(f"unknown edit kind {kind!r}; use one of {KINDS}")


def edit_values(kind: str, source: tuple[str, str, str]) -> list[str]:
    """The values an edit of `source` may take: a different shape, or a colour that differs from the current one
    and leaves the shape visible (colour ≠ background)."""
    shape, colour, background = source
    if kind == "shape":
        return [s for s in SHAPES if s != shape]
    if kind == "colour":
        return [c for c in COLOURS if c not in (colour, background)]
    if kind == "background":
        return [c for c in COLOURS if c not in (colour, background)]
    raise ValueError(f"unknown edit kind {kind!r}; use one of {KINDS}")


def allowed_edits(split: str, hold_out_validation: bool = False) -> list[Edit]:
    """Every edit of a split, in a fixed order: "heldout" / "validation" = the edits of all 150 source combinations
    whose triple is in HELDOUT_EDITS / VALIDATION_EDITS; "train" = all the others except the held-out ones, and
    except the validation ones too when hold_out_validation."""
    if split not in EDIT_SPLITS:
        raise ValueError(f"unknown edit split {split!r}; use one of {EDIT_SPLITS}")
    edits = [Edit(source, kind, value) for source in all_combinations() for kind in KINDS
             for value in edit_values(kind, source)]
    if split != "train":
        chosen = set(HELDOUT_EDITS if split == "heldout" else VALIDATION_EDITS)
        return [e for e in edits if e.triple in chosen]
    unseen = set(HELDOUT_EDITS) | (set(VALIDATION_EDITS) if hold_out_validation else set())
    return [e for e in edits if e.triple not in unseen]


def pair_images(edit: Edit, size: int, seed: int, index: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) uint8 [size, size, 3]: the same jitter draws, one attribute changed."""
    numbers = [seed, _SPLIT_NUMBER[split], index]
    source = render(*edit.source, size=size, rng=np.random.default_rng(numbers))
    target = render(*edit.target, size=size, rng=np.random.default_rng(numbers))
    return np.array(source), np.array(target)


def check_kind_shares(kind_shares) -> tuple[float, float, float] | None:
    """None (every allowed edit alike: each kind a third), or three shares ≥ 0 for KINDS (colour, shape,
    background), normalised to sum 1."""
    if kind_shares is None:
        return None
    shares = tuple(float(v) for v in kind_shares)
    if len(shares) != len(KINDS) or min(shares) < 0 or not sum(shares) > 0:
        raise ValueError(f"kind_shares={kind_shares!r}: give {len(KINDS)} numbers ≥ 0, not all 0, for {KINDS}")
    return tuple(v / sum(shares) for v in shares)


def edit_pairs(split: str, n: int, size: int = 64, seed: int = 0, part: tuple[int, int] = (0, 1),
               kind_shares=None, hold_out_validation: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, list[Edit]]:
    """n edit pairs of a split: sources and targets uint8 [n, 3, size, size] and their Edits.

    Pair i picks its edit uniformly from `allowed_edits(split)` (each kind about a third) with a Generator seeded
    by (seed, split, i), so a pair never depends on which were drawn before it. part = (k, m): only the pairs
    i ≡ k (mod m) of the n, the same ones whoever asks (one process's share of a data-parallel run).
    kind_shares (colour, shape, background), e.g. (0.3, 0.3, 0.4): the same Generator first draws the kind with
    these probabilities, then the edit uniformly among that kind's (None: the uniform draw above, unchanged).
    hold_out_validation: the "train" split leaves out VALIDATION_EDITS too (allowed_edits)."""
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one edit pair")
    k, m = part
    if not 0 <= k < m:
        raise ValueError(f"part={part!r}: give (k, m) with 0 ≤ k < m")
    shares = check_kind_shares(kind_shares)
    edits = allowed_edits(split, hold_out_validation)
    by_kind = [[e for e in edits if e.kind == kind] for kind in KINDS]
    indices = range(k, n, m)
    sources = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    targets = torch.empty_like(sources)
    chosen = []
    for row, i in enumerate(indices):
        rng = np.random.default_rng([seed, _SPLIT_NUMBER[split], i, 1])
        if shares is None:
            edit = edits[rng.integers(len(edits))]
        else:
            of_kind = by_kind[rng.choice(len(KINDS), p=shares)]                 # P(kind) = its share
            edit = of_kind[rng.integers(len(of_kind))]                          # then uniform within the kind
        source, target = pair_images(edit, size, seed, i, split)
        sources[row] = torch.from_numpy(source).permute(2, 0, 1)
        targets[row] = torch.from_numpy(target).permute(2, 0, 1)
        chosen.append(edit)
    return sources, targets, chosen
