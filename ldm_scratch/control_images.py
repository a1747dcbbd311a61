"""Control images: turning a picture into the hint a ControlNet reads, and the hint into a tensor.

A ControlNet is trained on one kind of map and expects that kind at inference:

    canny      white edges on black, from OpenCV's Canny detector (thresholds 100 / 200 on 8-bit gradients, the
               values lllyasviel's annotator and the diffusers docs use). OpenCV is an optional dependency
               (`pip install ldm-scratch[control]`, which brings opencv-python-headless): Canny is written once,
               well, there; we do not write our own.
    scribble   the scribble models want white strokes on black; people draw black on white, so `invert_scribble`
               flips it: p' = 255 − p.
    as is      pose skeletons, depth maps, segmentation maps made elsewhere are used unchanged (`as_is`, RGB).

`control_tensor` then makes the hint tensor the pipeline feeds the ControlNet: [K, 3, H, W] in [0, 1] (not
[−1, 1]: ControlNets are trained on [0, 1] hints), resized to the output size exactly as diffusers'
`VaeImageProcessor(do_normalize=False)` does (PIL images: 8-bit Lanczos; arrays and tensors: nearest-neighbour).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .images import _stack, load_images

CANNY_LOW, CANNY_HIGH = 100, 200     # hysteresis thresholds on the 8-bit Sobel gradient magnitude


def _to_uint8_rgb(image) -> np.ndarray:
    """A PIL image, a path, an array [H, W(, 3)] (uint8, or float in [0, 1]) or a tensor [3, H, W] in [0, 1]
    → uint8 [H, W, 3]."""
    items = load_images(image, "control image")
    if len(items) != 1:
        raise ValueError(f"control image: preprocess one image at a time, got {len(items)}")
    item = items[0]
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"))
    array = item.permute(1, 2, 0).numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"control image: float pixels must lie in [0, 1], got [{array.min():.3g}, "
                             f"{array.max():.3g}]")
        array = (array * 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:2], 3)) if array.shape[-1] == 1 else array)


def canny(image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Canny edges of an image as a white-on-black RGB image of the same size (the canny ControlNets' input).

    Pixels whose gradient magnitude exceeds `high` start an edge, which continues through pixels above `low`.
    """
    try:
        import cv2
    except ImportError:
        raise ImportError("canny edges need OpenCV: pip install 'ldm-scratch[control]' (opencv-python-headless)"
                          ) from None
    if not 0 <= low <= high:
        raise ValueError(f"canny: need 0 ≤ low ≤ high, got low={low}, high={high}")
    edges = cv2.Canny(_to_uint8_rgb(image), low, high)            # uint8 [H, W], 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def invert_scribble(image) -> Image.Image:
    """Black strokes on white → white strokes on black (p' = 255 − p), as the scribble ControlNets expect."""
    return Image.fromarray(255 - _to_uint8_rgb(image))


def as_is(image) -> Image.Image:
    """A map made elsewhere (pose, depth, segmentation), used unchanged: only converted to RGB."""
    return Image.fromarray(_to_uint8_rgb(image))


PREPROCESSORS = {"canny": canny, "scribble": invert_scribble, "none": as_is}


def control_tensor(images, height: int, width: int, batch: int) -> torch.Tensor:
    """Control image(s) → hint [K, 3, height, width] in [0, 1], K = 1 or `batch`, resized as diffusers does."""
    return _stack(load_images(images, "control_image"), height, width, "RGB", "control_image", batch)
