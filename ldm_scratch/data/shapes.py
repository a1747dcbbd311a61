"""The captioned-shapes data set: small RGB images of one coloured shape on a plain background.

The tiny model that ships with the package is trained on this data, so it must be (1) cheap to make — images are
drawn on the fly, nothing is downloaded or stored; (2) reproducible — item i of a data set is the same pixels on
every run and every machine; (3) easy to grade — `checker.py` reads shape, colour and background back from pixels.

Each image shows one shape in one colour on a background of another colour, with the caption

    "a {colour} {shape} on a {background} background"        e.g. "a red circle on a blue background"

    shapes   circle, square, triangle, star, ring                               (5)
    colours  red, green, blue, yellow, purple, white  (foreground and background; foreground ≠ background)  (6)
    →        5 · 6 · 5 = 150 (shape, colour, background) combinations

The shapes differ in what a pixel checker (and a blurry generated image) can still see: a circle has a constant
radius, a triangle / square / star have 3 / 4 / 5 corners (the 3rd / 4th / 5th harmonic of the radius as a
function of angle), and a ring is the only shape with a hole.

Held-out combinations. `HELDOUT` lists 10 triples that never appear in the "train" split; they exist only to ask
whether the model composes words it has seen apart ("purple" and "ring" and "white background" each appear in many
training images, but a purple ring on white never does). Every shape, colour and background word is used in
training, and the README's example "a red circle on a blue background" is a training combination.

Rendering. Each shape is drawn with Pillow at 4× the requested size and downsampled with a box filter (the mean
over each 4×4 block), which anti-aliases the edges without the overshoot of a Lanczos filter. Jitter of position,
size and rotation comes from a numpy Generator seeded by (seed, split, index), so an item never depends on which
items were drawn before it (DataLoader workers and shuffling give the same pixels).

Extreme backgrounds (only when asked: `ShapesDataset(..., extreme_backgrounds=True)`). The zero-terminal-SNR
experiment (issue 19, scripts/zero_snr_experiment.py) needs the ends of the pixel range, which SD's noise schedule
cannot reach (Lin et al. 2023): "pure black" (0, 0, 0) and "pure white" (255, 255, 255), as backgrounds only —
"a red circle on a pure black background". They add 5·6 + 5·5 = 55 training combinations (a white shape on pure
white, 10 apart, would be invisible) and no held-out ones. Off by default, so the default data and everything
trained on it stay bit-identical.

New shapes for fine-tuning (issue 16's demo, scripts/finetune_demo.py): "cross" (a plus sign) is a shape the
bundled model has never seen. It is in `NEW_SHAPES`, not in SHAPES: no split, no data set and no default draws it;
only `render`, `caption` and `new_shape_combinations()` accept it (and the checker reads it only when asked,
`check(..., new_shapes=True)`), so the default data stays bit-identical.

Tensors: `ShapesDataset[i]` → (image [3, H, W] float32 in [-1, 1], caption str), the range the VAE expects.
"""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring")
NEW_SHAPES = ("cross",)  # for fine-tuning only: never in a split (see the module docstring)

# Saturated colours at least ~150 apart in RGB (0–255), so the nearest palette colour of a blurred, noisy or
# slightly shifted pixel is still the right one. Orange (between red and yellow) and black (close to a dark
# blue or purple once a model darkens it) were left out for that reason.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
# background-only colours at the ends of the pixel range, for the zero-terminal-SNR experiment (see the docstring)
EXTREME_BACKGROUNDS = {
    "pure black": (0, 0, 0),
    "pure white": (255, 255, 255),
}
BACKGROUNDS = {**PALETTE, **EXTREME_BACKGROUNDS}  # every background a caption may name

# (shape, colour, background) triples kept out of the "train" split. Each shape appears twice, every colour is a
# foreground at least once and a background at least once, and no two triples share both shape and colour.
HELDOUT = (
    ("circle", "yellow", "purple"),
    ("circle", "white", "green"),
    ("square", "green", "red"),
    ("square", "purple", "yellow"),
    ("triangle", "red", "white"),
    ("triangle", "blue", "yellow"),
    ("star", "white", "blue"),
    ("star", "purple", "green"),
    ("ring", "blue", "red"),
    ("ring", "green", "white"),
)

SPLITS = ("train", "heldout", "all")
SUPERSAMPLE = 4  # draw at 4× and average 4×4 blocks: anti-aliased edges

# Radius r of a shape, as a fraction of the image side, is drawn from this range. Each shape's extent from its
# centre is `EXTENT[shape] · r`; the centre is jittered only as far as keeps that extent plus a margin inside.
RADIUS_RANGE = (0.22, 0.30)
MAX_ROTATION = 20.0  # degrees either way: a triangle still points up, a star still stands on two legs
EXTENT = {"circle": 1.0, "square": 0.9 * math.sqrt(2), "triangle": 1.2, "star": 1.2, "ring": 1.0, "cross": 1.15}
CROSS_HALF_WIDTH = 0.38  # · r: half the width of a cross's arms (its arms reach EXTENT["cross"] · r)
SQUARE_HALF_SIDE = 0.9   # · r: a square of about the same area as the circle of radius r
STAR_INNER = 0.45        # inner / outer radius of the 5-pointed star
RING_INNER = 0.55        # inner / outer radius of the ring: the hole is 0.55² ≈ 30 % of the disc


def caption(shape: str, colour: str, background: str) -> str:
    """The caption of one combination: caption("circle", "red", "blue") → "a red circle on a blue background"."""
    _check_combination(shape, colour, background)
    return f"a {colour} {shape} on a {background} background"


_CAPTION_RE = re.compile(r"^\s*an? (\w+) (\w+) on an? ((?:pure )?\w+) background\s*$")


def parse_caption(text: str) -> tuple[str, str, str]:
    """The (shape, colour, background) of a caption written by `caption`; ValueError if it is not one."""
    match = _CAPTION_RE.match(text.lower())
    if match is None:
        raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> on a <colour> background' "
                         f"(e.g. {caption('circle', 'red', 'blue')!r})")
    colour, shape, background = match.groups()
    _check_combination(shape, colour, background)
    return shape, colour, background


def all_combinations() -> list[tuple[str, str, str]]:
    """All 150 (shape, colour, background) triples with colour ≠ background, in a fixed order."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def heldout_combinations() -> list[tuple[str, str, str]]:
    """The 10 triples never seen in training (see HELDOUT)."""
    return list(HELDOUT)


def train_combinations() -> list[tuple[str, str, str]]:
    """The 140 triples of the "train" split: all combinations except the held-out ones."""
    heldout = set(HELDOUT)
    return [combo for combo in all_combinations() if combo not in heldout]


def extreme_background_combinations() -> list[tuple[str, str, str]]:
    """The 55 triples on "pure black" or "pure white" (every shape and colour, but no white on pure white)."""
    return [(s, c, b) for b, s, c in itertools.product(EXTREME_BACKGROUNDS, SHAPES, COLOURS)
            if (c, b) != ("white", "pure white")]


def new_shape_combinations() -> list[tuple[str, str, str]]:
    """The 30 (shape, colour, background) triples of NEW_SHAPES (fine-tuning only, never in a split)."""
    return [(s, c, b) for s, c, b in itertools.product(NEW_SHAPES, COLOURS, COLOURS) if c != b]


def combinations(split: str, extreme_backgrounds: bool = False) -> list[tuple[str, str, str]]:
    """The triples a split draws from: "train" (140), "heldout" (10) or "all" (150); with extreme_backgrounds,
    "train" and "all" also draw the 55 on pure black / pure white (after the others, which keep their order)."""
    if split == "train":
        combos = train_combinations()
    elif split == "heldout":
        return heldout_combinations()
    elif split == "all":
        combos = all_combinations()
    else:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return combos + extreme_background_combinations() if extreme_backgrounds else combos


def render(shape: str, colour: str, background: str, size: int = 64,
           rng: np.random.Generator | None = None) -> Image.Image:
    """Draw one anti-aliased `size`×`size` RGB image of a `colour` `shape` on a `background` background.

    rng: jitters radius (RADIUS_RANGE), rotation (±MAX_ROTATION°) and position; None draws the shape centred,
    upright, at the middle of the radius range (handy for documentation and tests).
    """
    _check_combination(shape, colour, background)
    if size < 16:
        raise ValueError(f"size={size} is too small to draw a recognisable shape; use size >= 16 (default 64)")
    if rng is None:
        radius, rotation, cx, cy = sum(RADIUS_RANGE) / 2 * size, 0.0, size / 2, size / 2
    else:
        radius = rng.uniform(*RADIUS_RANGE) * size
        rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        # keep the whole shape (plus a 2-pixel margin at 64², scaled) inside the image
        reach = EXTENT[shape] * radius + size / 32
        cx, cy = rng.uniform(reach, size - reach, size=2)

    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[colour]
    s = SUPERSAMPLE
    cx, cy, radius = cx * s, cy * s, radius * s
    if shape == "circle":
        draw.ellipse(_box(cx, cy, radius), fill=fill)
    elif shape == "ring":
        draw.ellipse(_box(cx, cy, radius), fill=fill)
        draw.ellipse(_box(cx, cy, RING_INNER * radius), fill=BACKGROUNDS[background])
    elif shape == "square":
        corner = SQUARE_HALF_SIDE * math.sqrt(2) * radius  # centre-to-corner distance
        draw.polygon(_polygon(cx, cy, [corner] * 4, rotation + 45.0), fill=fill)
    elif shape == "triangle":
        # equilateral, centred on its centroid, one corner pointing up
        draw.polygon(_polygon(cx, cy, [EXTENT["triangle"] * radius] * 3, rotation + 90.0), fill=fill)
    elif shape == "star":
        outer = EXTENT["star"] * radius
        radii = [outer, STAR_INNER * outer] * 5  # alternate tips and notches
        draw.polygon(_polygon(cx, cy, radii, rotation + 90.0), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, EXTENT["cross"] * radius, CROSS_HALF_WIDTH * radius, rotation), fill=fill)
    return image.resize((size, size), Image.BOX)


def _box(cx: float, cy: float, r: float) -> list[float]:
    return [cx - r, cy - r, cx + r, cy + r]


def _polygon(cx: float, cy: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    """Vertices at equal angle steps from `start_degrees` (counter-clockwise on screen: y points down)."""
    step = 2 * math.pi / len(radii)
    start = math.radians(start_degrees)
    return [(cx + r * math.cos(start + i * step), cy - r * math.sin(start + i * step)) for i, r in enumerate(radii)]


def _cross(cx: float, cy: float, arm: float, half: float, degrees: float) -> list[tuple[float, float]]:
    """The 12 corners of a plus sign: arms reaching `arm` from the centre, `2·half` wide, turned by `degrees`."""
    outline = [(arm, half), (half, half), (half, arm), (-half, arm), (-half, half), (-arm, half),
               (-arm, -half), (-half, -half), (-half, -arm), (half, -arm), (half, -half), (arm, -half)]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(cx + x * c - y * s, cy - (x * s + y * c)) for x, y in outline]


def _check_combination(shape: str, colour: str, background: str) -> None:
    if shape not in SHAPES + NEW_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; use one of {COLOURS}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; use one of {tuple(BACKGROUNDS)}")
    if colour == background:
        raise ValueError(f"colour and background are both {colour!r}; the shape would be invisible — "
                         f"pick two different colours")
    if (colour, background) == ("white", "pure white"):  # (245, 245, 245) on (255, 255, 255): 17 apart
        raise ValueError("a white shape on a pure white background would be invisible — pick another colour")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → float32 tensor [3, H, W] in [-1, 1] (x = 2·pixel/255 − 1, the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """`length` seeded images of one split: dataset[i] → (image [3, size, size] in [-1, 1], caption).

    Item i picks its combination uniformly from the split and its jitter from a Generator seeded by
    (seed, split, i), so it is the same on every run, in every worker, in any order. Different `seed`s give
    different data sets; the train and held-out splits never share a combination. extreme_backgrounds adds the
    pure black / pure white backgrounds (a different data set: items are drawn from 195 combinations, not 140).
    """

    def __init__(self, split: str = "train", size: int = 64, length: int = 10_000, seed: int = 0,
                 extreme_backgrounds: bool = False):
        self.combos = combinations(split, extreme_backgrounds)  # validates split
        if length < 1:
            raise ValueError(f"length={length}: a data set needs at least one item")
        self.split, self.size, self.length, self.seed = split, size, length, seed

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[Image.Image, tuple[str, str, str]]:
        """Item `index` as a PIL image and its (shape, colour, background)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        combo = self.combos[rng.integers(len(self.combos))]
        return render(*combo, size=self.size, rng=rng), combo

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, combo = self.sample(index)
        return to_tensor(image), caption(*combo)
