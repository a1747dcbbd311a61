"""A fine-tune's pictures: a folder of images with captions beside them, and DreamBooth's generated class images.

    FOLDER/photo1.png + FOLDER/photo1.txt ("a red cross on a blue background")   one caption per image, or
    FOLDER/*.png and --instance-prompt "a photo of sks cross"                    one prompt for all of them

Images are read with Pillow, converted to RGB, centre-cropped to a square and resized to the model's image size.
Prior preservation (Ruiz et al. 2023, DreamBooth §3.3) needs pictures of the *class* ("a cross") drawn by the model
before fine-tuning: they are generated once into a folder (class-0000.png, …, with the prompt in the .txt beside
each) and reused by later runs and resumes, so a resumed run trains on the same pictures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path) -> list[Path]:
    """The images in `folder` (not its subfolders), sorted by name; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder; give a folder of images (.png/.jpg) with "
                                f"a caption .txt beside each, or one --instance-prompt")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the pictures to "
                         f"learn from there")
    return files


def read_captions(files: list[Path], instance_prompt: str | None) -> list[str]:
    """One caption per image: the .txt beside it (first line), else --instance-prompt; an image with neither is an
    error naming it."""
    captions, missing = [], []
    for file in files:
        text_file = file.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""
        if text:
            captions.append(text.splitlines()[0])
        elif instance_prompt is not None:
            captions.append(instance_prompt)
        else:
            missing.append(file.name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"no caption for {shown}: put a .txt with the same name beside each image (e.g. "
                         f"{Path(missing[0]).with_suffix('.txt')}) or give --instance-prompt for all of them")
    return captions


def load_image(path: Path, size: int) -> torch.Tensor:
    """One image → uint8 [3, size, size]: RGB, centre-cropped to a square, resized with Lanczos."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def load_folder(folder: Path, instance_prompt: str | None, size: int) -> tuple[torch.Tensor, list[str]]:
    """(images uint8 [N, 3, size, size], captions) of a --data folder."""
    files = image_files(folder)
    captions = read_captions(files, instance_prompt)
    return torch.stack([load_image(f, size) for f in files]), captions


@torch.no_grad()
def class_images(pipe, folder: Path, prompt: str, count: int, seed: int, steps: int = 20,
                 progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """`count` pictures of the class prompt in `folder`, generating only the missing ones (the model's own prior,
    sampled with the pipeline's defaults, seed + i each); (uint8 [count, 3, S, S], their prompts). Several
    prompts separated by "|" are used in turn (picture i: prompt i mod n): a prior over a whole vocabulary."""
    prompts = [p.strip() for p in prompt.split("|") if p.strip()]
    from tqdm import tqdm
    folder.mkdir(parents=True, exist_ok=True)
    size = pipe.config.image_size
    for i in tqdm(range(count), desc="class images", disable=not progress):
        path = folder / f"class-{i:04d}.png"
        prompt = prompts[i % len(prompts)]
        if path.is_file() and path.with_suffix(".txt").is_file() \
                and path.with_suffix(".txt").read_text(encoding="utf-8").strip() == prompt:
            continue
        image = pipe.txt2img(prompt, steps=steps, seed=seed + i, height=size, width=size, output_type="pil",
                             progress=False)[0]
        image.save(path)
        path.with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
    files = [folder / f"class-{i:04d}.png" for i in range(count)]
    return torch.stack([load_image(f, size) for f in files]), [prompts[i % len(prompts)] for i in range(count)]
