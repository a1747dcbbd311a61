"""`ldm-scratch …`: the command line, mirroring the Python API (see README)."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
from pathlib import Path


def cmd_inspect(args) -> int:
    """Print what a file or diffusers folder holds. A path that is neither a tensor file nor a diffusers model folder
    (an empty folder, say) raises CheckpointError, which main turns into exit status 2."""
    from .checkpoint import describe
    print(describe(args.checkpoint))
    return 0


def cmd_tokenize(args) -> int:
    from . import load_tokenizer
    tokenizer = load_tokenizer(args.vocab)
    ids = tokenizer.encode(args.prompt)
    print(f"prompt: {args.prompt!r}")
    print(f"{len(ids)} tokens: {[tokenizer.decode([i]) for i in ids]}")
    print(f"ids:    {ids}")
    print(f"padded [1, 77]: {tokenizer([args.prompt])[0].tolist()}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# generate / img2img / inpaint
# ---------------------------------------------------------------------------------------------------------------

# Our sampler names → the names AUTOMATIC1111's web UI writes in its `parameters` text, so its viewers read ours.
A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "pndm": "PNDM", "lms": "LMS",
                       "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}


def format_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance_scale: float,
                      seed: int, width: int, height: int, model: str, strength: float | None = None) -> str:
    """The PNG `parameters` text in AUTOMATIC1111's format:

        a red circle on a blue background
        Negative prompt: blurry
        Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly

    (no "Negative prompt:" line when there is none; img2img/inpaint add "Denoising strength").
    """
    fields = {"Steps": steps, "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler), "CFG scale": f"{guidance_scale:g}",
              "Seed": seed, "Size": f"{width}x{height}", "Model": model}
    if strength is not None:
        fields["Denoising strength"] = f"{strength:g}"
    quote = lambda v: json.dumps(str(v)) if any(c in str(v) for c in ',:"') else str(v)  # as A1111 quotes
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {quote(value)}" for key, value in fields.items())])


def parse_parameters(text: str) -> dict[str, str]:
    """Read `format_parameters` (or AUTOMATIC1111's) text back: {"prompt", "negative_prompt", "Steps", …} as
    strings, with our sampler name under "sampler"."""
    lines = text.strip("\n").split("\n")
    fields = {}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1]):
        fields[key] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, target = [], [], None
    target = prompt
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            target, line = negative, line[len("Negative prompt:"):].lstrip()
        target.append(line)
    by_a1111 = {v: k for k, v in A1111_SAMPLER_NAMES.items()}
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **fields,
            "sampler": by_a1111.get(fields.get("Sampler"), fields.get("Sampler"))}


def output_paths(out: Path, count: int, force: bool, suffix: str = "") -> list[Path]:
    """`count` file names from out.png, out-1.png, out-2.png, … (with `suffix` before the numbers, e.g. -grid).
    Without force, names that exist are skipped, so nothing is overwritten; with force, the first `count` names
    that are not folders (force overwrites files, never a folder)."""
    stem = out.stem + suffix
    names = (out.with_name(f"{stem}{'' if k == 0 else f'-{k}'}{out.suffix}") for k in itertools.count())
    free = (p for p in names if not p.is_dir() and (force or not p.exists()))
    return list(itertools.islice(free, count))


def check_output(out: Path) -> Path:
    """Before any work: the output must be a .png file name (not a folder) whose folder exists (or can be made)
    and is writable."""
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the images are PNG files (they carry the parameters); use a name ending "
                         "in .png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder, not a file name (--force overwrites files, never a folder); "
                         f"give a file name, e.g. --out {out / 'image.png'}")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the folder {folder} ({error}); choose another --out") from error
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable; choose another --out")
    return out


def save_pngs(images: list, paths: list[Path], texts: list[str]) -> None:
    """Write every image with its `parameters` chunk to a temporary name first, then rename them all. Whatever stops
    it (a full disk, a folder in the way, Ctrl-C) removes the temporaries, so no half-written file is left: every
    file under its real name is whole, and an error before the renames leaves none at all."""
    from PIL.PngImagePlugin import PngInfo
    temporaries = [path.with_name(f".{path.name}.{os.getpid()}.partial") for path in paths]
    written, current = 0, paths[0] if paths else None
    try:
        for image, temporary, current, text in zip(images, temporaries, paths, texts):
            info = PngInfo()
            info.add_text("parameters", text)
            image.save(temporary, format="PNG", pnginfo=info)
        for temporary, current in zip(temporaries, paths):
            os.replace(temporary, current)
            written += 1
    except OSError as error:
        done = "nothing was written" if not written else f"{written} of {len(paths)} files were written"
        raise ValueError(f"cannot write {current}: {error}; {done}") from error
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def image_grid(images: list, columns: int | None = None):
    """The images side by side, ⌈√n⌉ per row."""
    from PIL import Image
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid


def check_numbers(args) -> None:
    """Before loading: the numbers the pipeline will check anyway (arguments.py, so the CLI and the API refuse the
    same values with the same words), checked now so a typo costs no model load."""
    from .arguments import check_count, check_device, check_guidance, check_strength
    from .seeds import check_seed
    check_device(args.device)
    check_count(args.steps, "steps")
    check_guidance(args.guidance)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.command != "generate":
        check_strength(args.strength, args.steps)   # strength 0 is refused, as by pipe.img2img / pipe.inpaint
    if args.seed is not None:
        check_seed(args.seed, args.n)


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def cmd_generate(args) -> int:
    """generate / img2img / inpaint: run the pipeline, then save numbered PNGs (and a grid) with their parameters."""
    import torch
    from .pipeline import NonFiniteOutputError, load_pipeline
    from .samplers import get_sampler

    get_sampler(args.sampler)                         # an unknown name fails before the model is loaded
    check_numbers(args)
    out = check_output(Path(args.out))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    pipe = load_pipeline(args.checkpoint, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device,
                         tokenizer=args.vocab)
    common = dict(negative_prompt=args.negative, num_images=args.n, steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, seed=seed, height=args.height, width=args.width, progress=True)
    try:
        if args.command == "img2img":
            images = pipe.img2img(args.prompt, args.init, strength=args.strength, **common)
        elif args.command == "inpaint":
            images = pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength, **common)
        else:
            images = pipe.txt2img(args.prompt, **common)
    except NonFiniteOutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    strength = args.strength if args.command != "generate" else None
    texts = [format_parameters(args.prompt, args.negative or "", steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance, seed=seed + k, width=image.width, height=image.height,
                               model=pipe.config.name, strength=strength) for k, image in enumerate(images)]
    paths = output_paths(out, len(images), args.force)
    if args.grid and len(images) > 1:
        images, texts = images + [image_grid(images)], texts + [texts[0]]
        paths = paths + output_paths(out, 1, args.force, suffix="-grid")
    save_pngs(images, paths, texts)
    for k, path in enumerate(paths):
        print(f"wrote {path}" + (f"  (seed {seed + k})" if k < args.n else "  (grid)"))
    return 0


def _add_generation_options(p: argparse.ArgumentParser, default_strength: float | None = None) -> None:
    p.add_argument("prompt")
    p.add_argument("--checkpoint", default=None, help="official .safetensors/.ckpt or diffusers folder "
                   "(default: the bundled tiny model)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="dpmpp_2m", help="ddpm, ddim, plms, pndm, lms, euler, euler_a, heun, "
                   "dpmpp_2m (default)")
    p.add_argument("--seed", type=int, default=None, help="image k gets seed + k (default: random, printed)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's size or the image's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="number of images (numbered files)")
    p.add_argument("--out", default="image.png", help="output PNG; taken names get -1, -2, … (default image.png)")
    p.add_argument("--force", action="store_true", help="overwrite existing files instead of numbering new ones")
    p.add_argument("--grid", action="store_true", help="also save a grid of the --n images (<out>-grid.png)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="network precision")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, …")
    p.add_argument("--vocab", default=None, help="tokenizer vocabulary (default: as load_tokenizer finds it)")
    if default_strength is not None:
        p.add_argument("--strength", type=float, default=default_strength,
                       help=f"how much to change the image, 0–1 (default {default_strength})")
    p.set_defaults(run=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-scratch", description="Stable Diffusion v1 from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("inspect", help="say what a checkpoint file or diffusers folder holds")
    p.add_argument("checkpoint")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser("tokenize", help="show the CLIP tokens of a prompt")
    p.add_argument("prompt")
    p.add_argument("--vocab", default=None, help="bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json+merges.txt")
    p.set_defaults(run=cmd_tokenize)

    p = commands.add_parser("generate", help="text → image(s), saved as PNGs with their parameters")
    _add_generation_options(p)
    p = commands.add_parser("img2img", help="image + text → image(s)")
    _add_generation_options(p, default_strength=0.75)
    p.add_argument("--init", required=True, help="the starting image")
    p = commands.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_options(p, default_strength=1.0)
    p.add_argument("--image", required=True, help="the image to repaint")
    p.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
    from .training.command import add_train_arguments, cmd_train
    p = commands.add_parser("train", help="train the tiny model from scratch (ldm_scratch/train.py)")
    add_train_arguments(p)
    p.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; its exit status. A mistake in the input is one line "error: …" and status 2; Ctrl-C is one
    line and status 130 (128 + SIGINT, as shells report it), no traceback. Files are written to a temporary name
    and renamed when whole (save_pngs), so an interrupted command leaves no
    half-written file."""
    try:
        from .checkpoint import CheckpointError
        args = build_parser().parse_args(argv)
        try:
            return args.run(args)
        except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
