"""Every PIL mode becomes the right floats (issue 14: 16-bit PNG init images came out all white), and EXIF
orientation is honoured. Each image is built here with known pixel values; the expected [0, 1] values are written
out from the rules in images.py's docstring (16-bit ÷ 65535, alpha composited on white, …).

images_to_tensor returns the VAE's input in [−1, 1]; `rgb` below maps it back to [0, 1] ((x + 1) / 2, exact in
float32 for these values up to one rounding: 1e-6 bounds it, far below the 1/65535 = 1.5e-5 a 16-bit level is).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scratch.images import images_to_tensor, load_images, masks_to_tensor, size_of

EXACT = 1e-6   # float32 rounding of ÷ 255 / ÷ 65535 and of the [−1, 1] round trip; one 16-bit level is 1.5e-5


def rgb(image, height=None, width=None) -> np.ndarray:
    """What the pipeline feeds the VAE, back in [0, 1], as [H, W, 3]."""
    images = load_images(image, "init_image")
    h, w = size_of(images[0]) if height is None else (height, width)
    return ((images_to_tensor(images, h, w, "init_image", 1)[0] + 1) / 2).permute(1, 2, 0).numpy()


def gray(values) -> np.ndarray:
    """[H, W] values in [0, 1] → the RGB image [H, W, 3] a grayscale input should give."""
    return np.repeat(np.asarray(values, dtype=np.float32)[..., None], 3, axis=-1)


def test_16_bit_png_keeps_its_levels(tmp_path):
    """The reported bug: a 16-bit PNG (0…65535) came out all white, PIL's 8-bit convert clipping at 255."""
    levels = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode in ("I;16", "I")          # PIL opens 16-bit PNGs as one or the other
    np.testing.assert_allclose(rgb(path), gray(levels / 65535), atol=EXACT)
    np.testing.assert_allclose(rgb(Image.fromarray(levels)), gray(levels / 65535), atol=EXACT)


def test_mode_I_is_read_as_16_bit_and_beyond_that_refused():
    levels = np.array([[0, 255, 40000, 65535]], dtype=np.int32)
    image = Image.fromarray(levels)
    assert image.mode == "I"
    np.testing.assert_allclose(rgb(image), gray(levels / 65535), atol=EXACT)
    with pytest.raises(ValueError, match=r"mode I\) with values 0…70000.*read as 16-bit"):
        rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_mode_F_is_read_as_0_to_1_and_beyond_that_refused():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    np.testing.assert_allclose(rgb(image), gray(values), atol=EXACT)
    with pytest.raises(ValueError, match=r"mode F.*must lie in \[0, 1\], got \[0, 255\]"):
        rgb(Image.fromarray(np.array([[0.0, 255.0]], dtype=np.float32)))


def test_LA_is_composited_on_white():
    luma, alpha = np.array([[100, 100, 100, 0]]), np.array([[255, 0, 128, 64]])
    image = Image.fromarray(np.stack([luma, alpha], axis=-1).astype(np.uint8), mode="LA")
    a = alpha / 255
    np.testing.assert_allclose(rgb(image), gray(luma / 255 * a + (1 - a)), atol=EXACT)


def test_RGBA_is_composited_on_white_not_shown_with_its_hidden_colour():
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    a = pixels[..., 3:] / 255
    expected = pixels[..., :3] / 255 * a + (1 - a)
    np.testing.assert_allclose(rgb(Image.fromarray(pixels, mode="RGBA")), expected, atol=EXACT)
    assert rgb(Image.fromarray(pixels, mode="RGBA"))[0, 3].tolist() == [1, 1, 1]   # transparent black → white


def test_palette_with_a_transparent_entry():
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])       # entries 0 black, 1 red, 2 green
    image.putdata([1, 2, 0])
    image.info["transparency"] = 0                          # entry 0 is transparent
    np.testing.assert_allclose(rgb(image), [[[1, 0, 0], [0, 1, 0], [1, 1, 1]]], atol=EXACT)
    del image.info["transparency"]
    np.testing.assert_allclose(rgb(image), [[[1, 0, 0], [0, 1, 0], [0, 0, 0]]], atol=EXACT)   # opaque: black


def test_CMYK_by_the_naive_formula():
    """No colour profile: R = 255·(1 − C)(1 − K), G and B likewise; PIL rounds to 8 bits, so within 0.5/255."""
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 0, 100], [0, 0, 0, 255]]], dtype=np.uint8)
    c = cmyk / 255
    expected = (1 - c[..., :3]) * (1 - c[..., 3:])
    np.testing.assert_allclose(rgb(Image.fromarray(cmyk, mode="CMYK")), expected, atol=0.5 / 255 + EXACT)


def test_mode_1_gives_0_or_1():
    image = Image.fromarray(np.array([[True, False, False, True]]))
    assert image.mode == "1"
    np.testing.assert_allclose(rgb(image), gray([[1, 0, 0, 1]]), atol=EXACT)


@pytest.mark.parametrize("source", ["file", "memory"])
def test_exif_orientation_is_honoured(tmp_path, source):
    """Orientation 6 (the camera was turned a quarter clockwise): shown rotated 90° clockwise, 2×3 → 3×2."""
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    if source == "file":
        image.save(tmp_path / "rotated.png", exif=exif)
        image = tmp_path / "rotated.png"
    got = rgb(image)
    assert got.shape == (3, 2, 3)
    np.testing.assert_allclose(got, np.rot90(pixels, k=-1) / 255, atol=EXACT)


def test_a_16_bit_image_resized_keeps_its_level():
    """Resized in float (Lanczos per channel): a flat 16-bit image stays at its level, not clipped to white.
    Lanczos weights sum to 1 only up to float32 rounding: 1e-5 (below one 16-bit level)."""
    image = Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16))
    with pytest.warns(UserWarning, match="resizing it to 8×8"):
        np.testing.assert_allclose(rgb(image, 8, 8), np.full((8, 8, 3), 30000 / 65535), atol=1e-5)


def test_16_bit_and_transparent_masks():
    """Masks: the same reading, then binarised at 0.5; a transparent part of a mask reads as white (repaint)."""
    sixteen = Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16))
    assert masks_to_tensor([sixteen], 1, 4, 1)[0, 0, 0].tolist() == [0, 0, 1, 1]       # 32768/65535 ≥ 0.5
    black_and_clear = Image.fromarray(np.array([[[0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8), mode="RGBA")
    assert masks_to_tensor([black_and_clear], 1, 2, 1)[0, 0, 0].tolist() == [0, 1]


@pytest.mark.parametrize("array, expected", [
    (np.array([[0, 65535]], dtype=np.uint16), [0, 1]),     # 16-bit arrays: ÷ 65535, as 16-bit images
    (np.array([[0, 255]], dtype=np.uint8), [0, 1]),
    (np.array([[0.0, 0.5]], dtype=np.float64), [0, 0.5]),
])
def test_arrays_by_dtype(array, expected):
    np.testing.assert_allclose(rgb(array), gray([expected]), atol=EXACT)


def test_a_channels_last_tensor_reads_as_the_contiguous_one():
    x = torch.rand(2, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    plain = images_to_tensor(load_images(x, "init_image"), 8, 16, "init_image", 2)
    last = images_to_tensor(load_images(x.to(memory_format=torch.channels_last), "init_image"), 8, 16,
                            "init_image", 2)
    assert torch.equal(plain, last)
