"""The captioned-shapes data set (ldm_scratch/data/shapes.py) and its pixel checker (checker.py)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_scratch.data import (COLOURS, HELDOUT, PALETTE, SHAPES, ShapesDataset, all_combinations, caption, check,
                              combinations, heldout_combinations, parse_caption, render, train_combinations)


# --- data set -------------------------------------------------------------------------------------------------

def test_items_are_tensors_in_vae_range_with_captions():
    image, text = ShapesDataset("train", size=64, length=4, seed=0)[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert image.min() < -0.5 and image.max() > 0.5  # both saturated colours and dark channels appear
    assert parse_caption(text) in train_combinations()
    assert ShapesDataset("train", size=32, length=1)[0][0].shape == (3, 32, 32)


def test_same_seed_same_pixels_in_any_order():
    a = ShapesDataset("train", length=50, seed=7)
    b = ShapesDataset("train", length=50, seed=7)
    forward = [a[i] for i in (0, 17, 42)]
    backward = [b[i] for i in (42, 17, 0)][::-1]  # a different access order must not change an item
    for (xa, ca), (xb, cb) in zip(forward, backward):
        assert ca == cb and torch.equal(xa, xb)
    other_seed = ShapesDataset("train", length=50, seed=8)
    assert not all(torch.equal(a[i][0], other_seed[i][0]) for i in range(5))
    assert not torch.equal(a[0][0], a[1][0])


def test_combination_counts_and_split_are_disjoint():
    assert len(all_combinations()) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1) == 150
    assert len(set(all_combinations())) == 150
    assert all(colour != background for _, colour, background in all_combinations())
    assert set(heldout_combinations()) <= set(all_combinations())
    assert not set(train_combinations()) & set(HELDOUT)
    assert set(train_combinations()) | set(HELDOUT) == set(all_combinations())
    with pytest.raises(ValueError, match="unknown split"):
        combinations("test")


def test_heldout_combinations_never_drawn_for_training():
    train = ShapesDataset("train", length=1500, seed=0)
    drawn = {train.sample(i)[1] for i in range(len(train))}
    assert not drawn & set(HELDOUT)
    assert len(drawn) == 140  # 1500 uniform draws cover every training combination
    heldout = ShapesDataset("heldout", length=200, seed=0)
    assert {heldout.sample(i)[1] for i in range(200)} == set(HELDOUT)


def test_every_word_of_every_heldout_triple_is_seen_in_training():
    train = train_combinations()
    for shape, colour, background in HELDOUT:
        assert any(s == shape for s, _, _ in train)
        assert any(c == colour for _, c, _ in train)
        assert any(b == background for _, _, b in train)
        # and even the pair "colour shape" is seen, on another background
        assert any((s, c) == (shape, colour) for s, c, _ in train)
    assert {s for s, _, _ in train} == set(SHAPES)
    assert {c for _, c, _ in train} == set(COLOURS) == {b for _, _, b in train}
    assert ("circle", "red", "blue") in train  # the README's example prompt is a training caption
    # the held-out set is balanced as shapes.py documents: each shape twice, each colour in both roles
    assert sorted(s for s, _, _ in HELDOUT) == sorted(SHAPES * 2)
    assert {c for _, c, _ in HELDOUT} == set(COLOURS) == {b for _, _, b in HELDOUT}


def test_caption_round_trip_and_bad_captions():
    for combo in all_combinations():
        assert parse_caption(caption(*combo)) == combo
    assert caption("circle", "red", "blue") == "a red circle on a blue background"
    assert parse_caption("  A Red Circle on a blue background ") == ("circle", "red", "blue")
    with pytest.raises(ValueError, match="not of the form"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="unknown shape"):
        parse_caption("a red hexagon on a blue background")
    with pytest.raises(ValueError, match="unknown colour"):
        caption("circle", "teal", "blue")
    with pytest.raises(ValueError, match="both 'red'"):
        caption("circle", "red", "red")


def test_render_is_antialiased_and_uses_the_palette():
    image = np.asarray(render("circle", "red", "blue", size=64))  # no rng: centred, no jitter
    assert tuple(image[0, 0]) == PALETTE["blue"] and tuple(image[32, 32]) == PALETTE["red"]
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(colours) > 5  # edge pixels mix the two colours: anti-aliased, not a hard two-colour image
    with pytest.raises(ValueError, match="too small"):
        render("circle", "red", "blue", size=8)


# --- checker --------------------------------------------------------------------------------------------------

def _cycle(n, size=64, degrade=None):
    """n images cycling through all 150 combinations (held-out included), each with its own jitter."""
    combos = all_combinations()
    for i in range(n):
        combo = combos[i % len(combos)]
        rng = np.random.default_rng([123, i])
        image = render(*combo, size=size, rng=rng)
        yield (degrade(image, rng) if degrade else image), combo


def test_checker_reads_clean_images():
    results = [(check(image), combo) for image, combo in _cycle(300)]
    accuracy = np.mean([reading.matches(*combo) for reading, combo in results])
    assert accuracy >= 0.98
    assert np.mean([reading.confident for reading, _ in results]) >= 0.98


def test_checker_tolerates_blur_and_noise():
    def blur_and_noise(image, rng):
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        pixels += rng.normal(0, 0.05 * 255, pixels.shape)
        return np.clip(pixels, 0, 255).astype(np.uint8)  # arrays are accepted as well as PIL images

    accuracy = np.mean([check(image).matches(*combo) for image, combo in _cycle(150, degrade=blur_and_noise)])
    assert accuracy >= 0.95


def test_checker_works_at_other_sizes_and_input_types():
    image = render("star", "purple", "white", size=256, rng=np.random.default_rng(0))
    assert check(image).matches("star", "purple", "white")
    assert check(render("ring", "green", "yellow", size=32)).matches("ring", "green", "yellow")
    as_float = np.asarray(image, dtype=np.float32) / 255  # the pipeline's output_type="np" range
    assert check(as_float).as_tuple() == check(image).as_tuple()
    with pytest.raises(ValueError, match="at least 32"):
        check(render("circle", "red", "blue", size=16))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        check(np.zeros((3, 64, 64), dtype=np.uint8))


def test_checker_is_not_constant_and_says_when_it_is_unsure():
    # different combinations give different readings: the checker really looks at the pixels
    readings = {check(render(*combo)).as_tuple() for combo in all_combinations()}
    assert len(readings) == 150
    # a mislabelled image is caught
    assert not check(render("circle", "red", "blue")).matches("square", "red", "blue")
    assert not check(render("circle", "red", "blue")).matches("circle", "blue", "red")
    # a blank image has no shape
    blank = check(Image.new("RGB", (64, 64), PALETTE["green"]))
    assert blank.shape is None and blank.colour is None and blank.background == "green" and not blank.confident
    # pure noise and two shapes at once are flagged as unsure
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not check(noise).confident
    two = Image.new("RGB", (64, 64), PALETTE["blue"])
    two.paste(render("circle", "red", "blue", size=32), (0, 0))
    two.paste(render("square", "yellow", "blue", size=32), (32, 32))
    assert not check(two).confident
