"""A deterministic pixel checker: reads (shape, colour, background) back from a captioned-shapes image.

It grades generated images (does "a purple ring on a white background" give a purple ring on white?) with no
learned weights, so its verdicts can be trusted and reproduced. numpy does the work; Pillow only resizes.

Steps, on the image resized to 64×64 (box filter down, bilinear up), pixels p ∈ [0, 255]³:

1. background: b = median RGB of the 2-pixel border (the shape never touches it); name = nearest palette colour.
2. foreground colour: d(p) = ‖p − b‖; the "core" pixels are those with d > max(40, 0.6 · d_99) where d_99 is the
   99th percentile of d — the inside of the shape, away from anti-aliased edges. f = their median RGB; name =
   nearest palette colour.
3. mask: each pixel's position between b and f,  t(p) = clip((p − b)·(f − b) / ‖f − b‖², 0, 1);  t > ½ is the
   shape (an anti-aliased edge pixel holds t = the covered fraction, so ½ is the true edge). Only the largest
   4-connected blob is kept, so stray noise pixels do not count.
4. shape, from two rotation-invariant features of the blob:
   - hole ratio: pixels enclosed by the blob but not in it, / the filled blob. A ring's hole is ≈ 30 % → ring.
   - the outline r(θ): distance from the filled blob's centroid to its outermost edge along 180 rays (sub-pixel,
     where bilinear t crosses ½). Its Fourier amplitudes relative to the mean radius,
         h_k = 2 |R_k| / R_0,   R_k = Σ_j r(θ_j) e^{−i k θ_j}
     measure k-fold symmetry: a triangle's radius has 3 maxima per turn, a square's 4, a star's 5; a circle's is
     flat. The largest of h₃, h₄, h₅ names the shape, unless every h_k is under 40 % of what that shape has when
     drawn (DRAWN_HARMONIC) → circle.

   With `new_shapes=True` (fine-tuning's "cross", shapes.NEW_SHAPES) a 4-fold outline is a cross when h₄ is over
   CROSS_MIN_H4: a plus sign's radius swings from arm tip to notch far more than a square's from corner to side.

`Reading.confident` is False when a step found nothing sure (no shape, colours far from every palette colour, a
weak harmonic margin, or most of the foreground in other blobs); a field is None when it could not be read at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .shapes import BACKGROUNDS, PALETTE

WORK_SIZE = 64            # everything is measured at 64×64: thresholds in pixels mean one thing
BORDER = 2                # border width (pixels) sampled for the background
MIN_CORE_DISTANCE = 40.0  # RGB distance below which a pixel is background plus noise, never the shape's core
MIN_AREA = 0.01           # a shape covers at least 1 % of the image (the smallest drawn, a star, ≈ 9 %)
RING_MIN_HOLE = 0.12      # hole / filled area: 0.30 for a drawn ring, ≈ 0 for every other shape
HARMONIC_SHAPES = {3: "triangle", 4: "square", 5: "star"}
# h_k of each shape as drawn (clean, measured on 500 images; ±0.01 with jitter). Blur σ = 2 px + noise σ = 0.1 lowers
# them to ≥ 0.23 / 0.11 / 0.19, while a circle stays ≤ 0.02 — or ≤ 0.06 when its outline wobbles by ~1.5 px (the
# "warp" of scripts/checker_accuracy.py), which is why the circle test is relative to each shape's own amplitude.
DRAWN_HARMONIC = {3: 0.27, 4: 0.137, 5: 0.31}
# h₄ of a drawn cross is 0.34–0.35 (0.28–0.32 blurred by σ = 2 px), of a square 0.14 (0.12 blurred), measured on
# 40 jittered renders each: the threshold sits between the two
CROSS_MIN_H4 = 0.21
CIRCLE_MAX_SCORE = 0.4    # circle when h_k / DRAWN_HARMONIC[k] < 0.4 for k = 3, 4, 5
N_RAYS = 180
RAY_STEP = 0.25           # pixels between samples along a ray
MAX_PALETTE_DISTANCE = 90.0  # a measured colour further than this from its nearest palette colour is not sure

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float64)  # [6, 3]
_BACKGROUND_NAMES = list(BACKGROUNDS)  # the palette plus pure black / pure white (shapes.EXTREME_BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[name] for name in _BACKGROUND_NAMES], dtype=np.float64)  # [8, 3]


@dataclass
class Reading:
    """What the checker read from one image; None where it could not tell."""
    shape: str | None
    colour: str | None
    background: str | None
    confident: bool
    features: dict = field(default_factory=dict)  # the measured numbers, for debugging thresholds

    def as_tuple(self) -> tuple[str | None, str | None, str | None]:
        return self.shape, self.colour, self.background

    def matches(self, shape: str, colour: str, background: str) -> bool:
        """True when all three attributes are read and equal the expected ones."""
        return self.as_tuple() == (shape, colour, background)


def check(image, extreme_backgrounds: bool = False, new_shapes: bool = False) -> Reading:
    """Read (shape, colour, background) from an RGB image: PIL image or uint8/float array [H, W, 3] (H, W ≥ 32).

    A float array is taken as [0, 1] (the pipeline's "np" output); uint8 as [0, 255].
    extreme_backgrounds: the background may also be "pure black" or "pure white" (data made with
    `ShapesDataset(..., extreme_backgrounds=True)`); off, the names and verdicts are the palette's only, as before.
    new_shapes: the shape may also be a "cross" (shapes.NEW_SHAPES); off, verdicts are as before.
    """
    pixels = _to_work_pixels(image)  # [64, 64, 3] float64 in [0, 255]
    features: dict = {}

    # 1. background: the border's median, robust to a shape that grazes the edge
    border = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                             pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background, bg_error = _nearest_colour(bg_rgb, extreme_backgrounds)
    features["background_error"] = bg_error

    # 2. foreground colour from the core: pixels far from the background, away from the soft edges
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)  # d(p) = ‖p − b‖, [64, 64]
    core = distance > max(MIN_CORE_DISTANCE, 0.6 * np.percentile(distance, 99))
    if core.mean() < MIN_AREA / 4:
        return Reading(None, None, background, False, features)
    fg_rgb = np.median(pixels[core], axis=0)
    colour, fg_error = _nearest_colour(fg_rgb)
    features["colour_error"] = fg_error

    # 3. the shape's mask: t = fraction of the way from b to f, ½ at the true edge
    axis = fg_rgb - bg_rgb
    t = np.clip((pixels - bg_rgb) @ axis / (axis @ axis), 0.0, 1.0)  # t = (p − b)·(f − b) / ‖f − b‖²
    mask = t > 0.5
    blob = _largest_component(mask)
    features["blob_share"] = float(blob.sum() / max(mask.sum(), 1))  # how much of the foreground the blob is
    features["area"] = float(blob.mean())
    if blob.mean() < MIN_AREA:
        return Reading(None, colour, background, False, features)

    # 4a. holes: not in the blob and not reachable from the border without crossing it
    outside = _reachable_from_border(~blob)
    holes = ~blob & ~outside
    filled = blob | holes
    features["hole_ratio"] = hole_ratio = float(holes.sum() / filled.sum())

    # 4b. outline harmonics around the filled blob's centroid
    t_blob = t * _dilate(blob)  # keep the blob's soft edge, drop other blobs
    ys, xs = np.nonzero(filled)
    radius = _outline_radius(t_blob, cy=ys.mean(), cx=xs.mean())  # r(θ), [N_RAYS]
    spectrum = np.abs(np.fft.rfft(radius))
    harmonics = {k: float(2 * spectrum[k] / spectrum[0]) for k in HARMONIC_SHAPES}  # h_k = 2|R_k| / R_0
    features.update({f"h{k}": h for k, h in harmonics.items()})

    # score: each symmetry's strength as a fraction of what a drawn triangle / square / star has
    features["roundness_score"] = score = max(h / DRAWN_HARMONIC[k] for k, h in harmonics.items())
    ranked = sorted(harmonics, key=harmonics.get, reverse=True)  # raw h_k: a star's h₅ dwarfs its stray h₄
    best, second = harmonics[ranked[0]], harmonics[ranked[1]]
    if hole_ratio > RING_MIN_HOLE:
        # a ring's outline is a circle; a hole inside a triangle/square/star outline is something else
        shape, shape_sure = "ring", hole_ratio > 1.5 * RING_MIN_HOLE and score < CIRCLE_MAX_SCORE
    elif score < CIRCLE_MAX_SCORE:
        shape, shape_sure = "circle", score < 0.6 * CIRCLE_MAX_SCORE
    else:
        # sure only when one symmetry clearly dominates and is well clear of the circle threshold
        shape, shape_sure = HARMONIC_SHAPES[ranked[0]], best > 2 * second and score > 1.5 * CIRCLE_MAX_SCORE
        if new_shapes and shape == "square":  # a square's h₄ ≈ 0.14, a cross's ≈ 0.34
            shape = "cross" if harmonics[4] > CROSS_MIN_H4 else "square"
            shape_sure = shape_sure and abs(harmonics[4] - CROSS_MIN_H4) > 0.2 * CROSS_MIN_H4

    confident = (shape_sure and bg_error < MAX_PALETTE_DISTANCE and fg_error < MAX_PALETTE_DISTANCE
                 and features["blob_share"] > 0.8 and colour != background)
    return Reading(shape, colour, background, bool(confident), features)


def _to_work_pixels(image) -> np.ndarray:
    """PIL image or array [H, W, 3] → float64 [64, 64, 3] in [0, 255]."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {array.shape}; "
                             f"for a tensor [3, H, W] pass tensor.permute(1, 2, 0).numpy()")
        if array.dtype != np.uint8:  # float in [0, 1], as the pipeline's output_type="np"
            array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        pil = Image.fromarray(array, "RGB")
    if min(pil.size) < 32:
        raise ValueError(f"image is {pil.size[0]}×{pil.size[1]}; the checker needs at least 32×32 pixels")
    if pil.size != (WORK_SIZE, WORK_SIZE):
        downsizing = min(pil.size) >= WORK_SIZE
        pil = pil.resize((WORK_SIZE, WORK_SIZE), Image.BOX if downsizing else Image.BILINEAR)
    return np.asarray(pil, dtype=np.float64)


def _nearest_colour(rgb: np.ndarray, extreme_backgrounds: bool = False) -> tuple[str, float]:
    names, table = (_BACKGROUND_NAMES, _BACKGROUND_RGB) if extreme_backgrounds else (_PALETTE_NAMES, _PALETTE_RGB)
    distances = np.linalg.norm(table - rgb, axis=-1)
    i = int(np.argmin(distances))
    return names[i], float(distances[i])


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mask moved by (dy, dx), filled with False: out[y, x] = mask[y − dy, x − dx]."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _dilate(mask: np.ndarray) -> np.ndarray:
    return mask | np.logical_or.reduce([_shift(mask, dy, dx) for dy, dx in _NEIGHBOURS])


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Flood fill: every `allowed` pixel 4-connected to `seed` through `allowed` pixels."""
    region = seed & allowed
    while True:
        grown = _dilate(region) & allowed
        if (grown == region).all():
            return region
        region = grown


def _reachable_from_border(allowed: np.ndarray) -> np.ndarray:
    edge = np.zeros_like(allowed)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    return _grow(edge, allowed)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of `mask` (all False if the mask is empty)."""
    best = np.zeros_like(mask)
    left = mask.copy()
    while left.sum() > best.sum():  # a remaining blob can only win if enough pixels are left
        seed = np.zeros_like(mask)
        seed.flat[np.argmax(left)] = True  # first remaining pixel
        blob = _grow(seed, left)
        if blob.sum() > best.sum():
            best = blob
        left &= ~blob
    return best


def _outline_radius(t: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """r(θ): the outermost distance from (cy, cx) at which t crosses ½, along N_RAYS rays. [N_RAYS]"""
    theta = np.linspace(0, 2 * np.pi, N_RAYS, endpoint=False)
    steps = np.arange(0, WORK_SIZE, RAY_STEP)  # [S]
    ys = cy + np.outer(np.sin(theta), steps)  # [N_RAYS, S]
    xs = cx + np.outer(np.cos(theta), steps)
    values = _bilinear(t, ys, xs)
    inside = values > 0.5
    # last sample inside along each ray (the centroid itself may fall in a ring's hole: then any inside works)
    last = np.where(inside.any(axis=1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    nxt = np.minimum(last + 1, len(steps) - 1)
    rows = np.arange(N_RAYS)
    v0, v1 = values[rows, last], values[rows, nxt]
    frac = np.clip((v0 - 0.5) / np.maximum(v0 - v1, 1e-9), 0.0, 1.0)  # linear crossing of ½ between samples
    return steps[last] + frac * RAY_STEP


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample `image` [H, W] at fractional pixel-centre coordinates; 0 outside."""
    h, w = image.shape
    padded = np.pad(image, 1)  # zeros around, so rays may leave the image
    ys = np.clip(ys + 1, 0, h)
    xs = np.clip(xs + 1, 0, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h + 1), np.minimum(x0 + 1, w + 1)
    wy, wx = ys - y0, xs - x0
    top = padded[y0, x0] * (1 - wx) + padded[y0, x1] * wx
    bottom = padded[y1, x0] * (1 - wx) + padded[y1, x1] * wx
    return top * (1 - wy) + bottom * wy
