"""Images in and out of the pipeline: PIL / numpy / tensor conversion, sizes, and the checks on image inputs.

In: what users pass as an image (a PIL image, a file path, an array [H, W, 3] of uint8 or float in [0, 1], a
tensor [3, H, W] or [K, 3, H, W] in [0, 1], or a list of those) becomes the VAE's input [K, 3, H, W] in [−1, 1];
a mask (grayscale, white = repaint) becomes [K, 1, H, W] of 0 (keep) and 1 (repaint). K = 1 or one per image.
Out: images [B, 3, H, W] in [0, 1] become what `output_type` asks for ("pil", "np", "pt"), diffusers' conventions.

PIL images are turned upright first (EXIF orientation, as cameras record it), then read by mode, as floats:
  8-bit modes ("L", "RGB", "P", "CMYK", "1", "YCbCr", …): PIL's own conversion to RGB / L, then ÷ 255 (CMYK by
      PIL's formula R = 255·(1 − C)(1 − K) without a colour profile; "1" gives 0 or 1);
  "I;16" (16-bit PNGs): ÷ 65535;  "I" (32-bit integers): read as 16-bit, ÷ 65535, when every value lies in
      0…65535, else refused (the range is unknown);  "F" (32-bit floats): taken as [0, 1], as float arrays are;
  alpha ("RGBA", "LA", "PA", or a "transparency" entry, e.g. a "P" palette's): composited on white,
      c·α + (1 − α), so transparent parts read as white (for a mask: repaint), never as their hidden colour.
Grayscale → RGB repeats the channel; RGB → gray is ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B, PIL's "L").

Sizes are multiples of the VAE's downsampling factor (8): latents are [B, 4, H/8, W/8]. An image of another size is
resized (with a warning) when its aspect ratio matches, and refused when resizing would distort it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------

def check_size(height, width, factor: int) -> tuple[int, int, int, int]:
    """(H, W, h, w): image and latent size, checked to be positive multiples of the VAE's factor (8)."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < factor or value % factor:
            hint = f"e.g. {max(factor, value - value % factor)}" if isinstance(value, int) else "e.g. 512"
            raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling factor: "
                             f"latents are {factor}× smaller), got {value!r}; {hint}")
    return int(height), int(width), int(height) // factor, int(width) // factor


def size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an array [H, W(, C)] or a tensor [(C,) H, W]."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    return tuple(image.shape[-2:])


def default_size(image, height, width, factor: int) -> tuple[int, int]:
    """height/width default to the image's, rounded down to a multiple of `factor` (diffusers' rule)."""
    image_h, image_w = size_of(image)
    return (image_h - image_h % factor if height is None else height,
            image_w - image_w % factor if width is None else width)


def needs_resize(size: tuple[int, int], height: int, width: int, what: str) -> bool:
    """True if the image must be resized; raises if resizing would distort it (aspect ratios differ by more than
    the rounding to a multiple of 8 explains: scaled to the target height, its width is off by > 8 pixels)."""
    image_h, image_w = size
    if (image_h, image_w) == (height, width):
        return False
    if abs(image_w * height / image_h - width) > 8:
        raise ValueError(f"{what} is {image_w}×{image_h} (width×height) but the output is {width}×{height}: their "
                         f"aspect ratios differ ({image_w / image_h:.3f} vs {width / height:.3f}), so resizing would "
                         "distort it. Crop it to the output's aspect ratio, or pass height/width that match it.")
    warnings.warn(f"{what} is {image_w}×{image_h}; resizing it to {width}×{height}", stacklevel=4)
    return True


# ---------------------------------------------------------------------------------------------------------------
# In: PIL / file / array / tensor → tensors
# ---------------------------------------------------------------------------------------------------------------

def load_images(images, what: str) -> list:
    """One image or a list → a list of PIL images / arrays / tensors; file paths are opened (with a clear error)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{what} is an empty list; give an image")
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            out.extend(item)
        elif isinstance(item, (str, Path)):
            out.append(_open_image(Path(item), what))
        elif isinstance(item, Image.Image):
            out.append(upright(item))
        elif isinstance(item, torch.Tensor):
            out.append(_channels_first(item, what))
        elif isinstance(item, np.ndarray):
            out.append(item)
        else:
            raise TypeError(f"{what}: expected a PIL image, a file path, a numpy array or a tensor, got "
                            f"{type(item).__name__}")
    return out


def _channels_first(image: torch.Tensor, what: str) -> torch.Tensor:
    """Tensors are [C, H, W] (C = 1 or 3); one that looks like [H, W, C] is refused, not read as C pixels wide."""
    if image.dim() == 3 and image.shape[0] not in (1, 3, 4) and image.shape[-1] in (1, 3, 4):
        raise ValueError(f"{what}: tensors are channels-first [3, H, W], got shape {list(image.shape)}; for a "
                         "tensor [H, W, 3] pass tensor.permute(2, 0, 1)")
    return image


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return upright(image)
    except Image.DecompressionBombError as error:   # PIL's own limit, before decoding gigabytes
        raise ValueError(f"{what}: {path} is too large to read safely ({error}); resize it first") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what}: cannot read {path} as an image ({error}); give a PNG or JPEG file") from error


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated/flipped by its EXIF orientation tag (cameras store pixels
    unrotated and record the orientation), the tag removed. A copy; the caller's image is not changed."""
    return ImageOps.exif_transpose(image)


# PIL modes read as floats beyond 8 bits (the module docstring); any other mode goes through PIL's 8-bit convert
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def needs_float_read(image: Image.Image) -> bool:
    """True for modes PIL's 8-bit convert would get wrong: 16/32-bit and float pixels (clipped at 255: a 16-bit
    PNG came out all white), and alpha (which convert("RGB") drops, showing the colours hidden under it)."""
    return (image.mode in SIXTEEN_BIT_MODES + ALPHA_MODES + ("I", "F")) or "transparency" in image.info


def pil_to_float(image: Image.Image, what: str) -> np.ndarray:
    """A PIL image of any mode → float32 [H, W, 1 or 3] in [0, 1], by the rules of the module docstring."""
    if image.mode in SIXTEEN_BIT_MODES:
        return (np.asarray(image).astype(np.float32) / 65535.0)[..., None]
    if image.mode == "I":
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"{what}: a 32-bit integer image (PIL mode I) with values {array.min()}…{array.max()}; "
                             "it is read as 16-bit (0…65535): rescale it to that range or to 8 bits first")
        return (array.astype(np.float32) / 65535.0)[..., None]
    if image.mode == "F":
        return _to_float_array(np.asarray(image, dtype=np.float32), 1, f"{what} (PIL mode F)")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)           # composited on white: c·α + 1·(1 − α)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _to_float_array(image, channels: int, what: str) -> np.ndarray:
    """An array or tensor image → float32 [H, W, channels] in [0, 1]."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if isinstance(image, torch.Tensor) and array.ndim == 3:
        array = array.transpose(1, 2, 0)                    # tensors are channels-first
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an image [H, W], [H, W, 3] (array) or [3, H, W] (tensor), got shape "
                         f"{list(getattr(image, 'shape', []))}")
    if array.dtype in (np.uint8, np.uint16):                   # 8- or 16-bit pixels: 255 or 65535 is white
        array = array.astype(np.float32) / np.iinfo(array.dtype).max
    array = array.astype(np.float32)[..., :3]
    if channels == 1 and array.shape[-1] == 3:
        array = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]  # ITU-R 601 luma, as PIL's "L"
    elif channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: the pixel values hold NaN or inf; give finite values in [0, 1]")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{what}: float pixel values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
    return array


def _stack(images, height, width, mode: str, what: str, batch: int) -> torch.Tensor:
    """PIL/array/tensor images → [K, C, H, W] in [0, 1], resized to (height, width) when needed.

    Resizing as diffusers' VaeImageProcessor: PIL images with Lanczos, arrays and tensors with nearest-neighbour.
    8-bit PIL images take diffusers' exact path (8-bit Lanczos, then ÷ 255); the others (`needs_float_read`) are
    read as floats and resized with Lanczos per channel in float, clipped back to [0, 1] (Lanczos overshoots).
    """
    if len(images) not in (1, batch):
        raise ValueError(f"{what}: got {len(images)} images for a batch of {batch}; give one, or one per image")
    channels = 3 if mode == "RGB" else 1
    out = []
    for image in images:
        resize = needs_resize(size_of(image), height, width, what)
        if isinstance(image, Image.Image) and needs_float_read(image):
            array = _to_float_array(pil_to_float(image, what), channels, what)
            out.append(torch.from_numpy(_resize_float(array, height, width) if resize else array).permute(2, 0, 1))
        elif isinstance(image, Image.Image):
            image = image.convert(mode)
            if resize:
                image = image.resize((width, height), resample=Image.LANCZOS)
            array = np.asarray(image, dtype=np.float32).reshape(height, width, channels) / 255.0
            out.append(torch.from_numpy(array).permute(2, 0, 1))
        else:
            tensor = torch.from_numpy(_to_float_array(image, channels, what)).permute(2, 0, 1)
            out.append(F.interpolate(tensor[None], size=(height, width))[0] if resize else tensor)
    return torch.stack(out)


def _resize_float(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [H, W, C] in [0, 1] → [height, width, C]: Lanczos on each channel as a PIL float ("F") image."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]), mode="F")
                           .resize((width, height), resample=Image.LANCZOS)) for c in range(array.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def images_to_tensor(images, height: int, width: int, what: str, batch: int) -> torch.Tensor:
    """Images (from `load_images`) → [K, 3, H, W] in [−1, 1], the VAE's input range."""
    return _stack(images, height, width, "RGB", what, batch) * 2 - 1  # [0, 1] → [−1, 1]


def masks_to_tensor(masks, height: int, width: int, batch: int) -> torch.Tensor:
    """Masks (from `load_images`) → [K, 1, H, W] of 0 (keep) and 1 (repaint), binarised at 0.5 as diffusers."""
    mask = (_stack(masks, height, width, "L", "mask_image", batch) >= 0.5).float()
    for k, repaint in enumerate(mask.flatten(1).mean(1).tolist()):   # fraction of pixels to repaint, per mask
        which = f"mask_image {k}" if len(mask) > 1 else "mask_image"
        if repaint == 0:
            warnings.warn(f"{which} is all black (0 = keep): nothing will be repainted, so the output is at best "
                          "the image itself. Paint white where the image should change.", stacklevel=3)
        elif repaint == 1:
            warnings.warn(f"{which} is all white (1 = repaint): the whole image will be repainted, as txt2img "
                          "(or img2img at this strength) would. Paint black where the image should be kept.",
                          stacklevel=3)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Out: tensors → what output_type asks for
# ---------------------------------------------------------------------------------------------------------------

def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def to_output(images: torch.Tensor, output_type: str):
    """images [B, 3, H, W] in [0, 1] → "pt": the same on the CPU; "np": float32 [B, H, W, 3]; "pil": a list of B
    RGB images (rounded to 8 bits)."""
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)  # [B, H, W, 3]
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]
