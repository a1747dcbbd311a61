"""`ldm-scratch …`: the command line, mirroring the Python API (see README)."""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import sys
import warnings
from pathlib import Path

# The PNG `parameters` text (AUTOMATIC1111's format) is written and read in parameters.py; format_parameters and
# parse_parameters stay importable from here.
from .parameters import (UnusedParametersWarning, format_parameters, parse_parameters,  # noqa: F401
                         read_png_parameters)


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
    if getattr(args, "strength", None) is not None:
        check_strength(args.strength, args.steps)   # strength 0 is refused, as by pipe.img2img / pipe.inpaint
    if args.seed is not None:
        check_seed(args.seed, args.n)


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


# --from-png: the settings keys of a parameters text that each command-line option replaces
OPTION_FIELDS = {"steps": ("Steps",), "sampler": ("Sampler", "Schedule type"), "guidance": ("CFG scale",),
                 "seed": ("Seed",), "strength": ("Denoising strength",), "prompt_syntax": ("Prompt syntax",)}


class Given(argparse.Action):
    """Store an option's value and note that the command line gave it: with --from-png, given options win over the
    file's values and the others take them (a default cannot tell "--steps 30" from no --steps)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = namespace.given | {self.dest}


def apply_png_parameters(args):
    """--from-png IMAGE: the prompt and settings of the image's `parameters` text, wherever the command line gave
    none. Prints one note per field of the file that is not used; returns the GenerationParameters read."""
    skip = {key for option, keys in OPTION_FIELDS.items() if option in args.given for key in keys}
    if {"width", "height"} <= args.given:
        skip.add("Size")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedParametersWarning)      # printed below, one line each
        params = read_png_parameters(args.from_png, skip=skip)
    if args.prompt is None:
        args.prompt = params.prompt
    if "negative" not in args.given:
        args.negative = params.negative_prompt or None
    for option, value in [("steps", params.steps), ("sampler", params.sampler), ("guidance", params.guidance_scale),
                          ("seed", params.seed), ("width", params.width), ("height", params.height),
                          ("strength", params.strength)]:
        if option not in args.given and value is not None and hasattr(args, option):
            setattr(args, option, value)
    if "sampler" not in args.given:
        args.karras = params.karras
    if "prompt_syntax" not in args.given:
        args.prompt_syntax = params.prompt_syntax
    if args.clip_skip is None:
        args.clip_skip = params.clip_skip
    unused = dict(params.unknown)
    if params.strength is not None and not hasattr(args, "strength"):
        unused["Denoising strength"] = f"{params.strength} (generate makes a new image; img2img/inpaint take it)"
    for key, value in unused.items():
        print(f"note: {args.from_png}: '{key}: {value}' is not used", file=sys.stderr)
    return params


def control_options(args) -> dict:
    """The pipeline's ControlNet arguments from --controlnet / --control-image / --control-preprocess / …"""
    if len(args.control_image) != len(args.controlnet):
        raise ValueError(f"--controlnet given {len(args.controlnet)} time(s) but --control-image "
                         f"{len(args.control_image)}: give one control image per ControlNet")
    if len(args.control_scale) not in (0, 1, len(args.controlnet)):
        raise ValueError("--control-scale: give one, or one per --controlnet")
    if not args.controlnet:
        return {}
    from . import control_images, load_controlnet
    preprocess = control_images.PREPROCESSORS[args.control_preprocess]
    images = [preprocess(path) for path in args.control_image]     # unreadable images fail before loading
    nets = [load_controlnet(path) for path in args.controlnet]
    scales = args.control_scale or [1.0]
    one = len(nets) == 1
    return dict(controlnet=nets[0] if one else nets, control_image=images[0] if one else images,
                controlnet_scale=scales[0] if one or len(scales) == 1 else scales, guess_mode=args.guess_mode,
                control_start=args.control_start, control_end=args.control_end)


def cmd_generate(args) -> int:
    """generate / img2img / inpaint: run the pipeline, then save numbered PNGs (and a grid) with their parameters."""
    import torch
    from .loader import load_pipeline
    from .pipeline import NonFiniteOutputError
    from .samplers import get_sampler

    png = apply_png_parameters(args) if args.from_png else None
    if args.prompt is None:
        raise ValueError("give a prompt, or --from-png IMAGE to take the prompt and settings from a PNG")
    get_sampler(args.sampler)                         # an unknown name fails before the model is loaded
    check_numbers(args)
    if args.command == "upscale":
        _check_upscale_options(args)
    control = control_options(args)                   # --controlnet …: loaded and preprocessed before the model
    out = check_output(Path(args.out))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    from .lora import load_lora, parse_lora_option
    loras = [parse_lora_option(text) for text in args.lora]
    for path, _ in loras:                             # a missing file fails before the model is loaded
        if not Path(path).is_file():
            raise ValueError(f"--lora {path}: no such file")
    for path in args.embedding:
        if not Path(path).is_file():
            raise ValueError(f"--embedding {path}: no such file")
    pipe = load_pipeline(args.checkpoint, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device,
                         tokenizer=args.vocab, prepack=args.prepack, **({"vae": args.vae} if args.vae else {}))
    for path, scale in loras:
        load_lora(pipe, path, scale=scale)
    for path in args.embedding:                       # textual inversion: the file's stem becomes a prompt word
        print(f"embedding {path}: word {pipe.load_textual_inversion(path)[0]!r}", file=sys.stderr)
    if png is not None and png.model not in (None, pipe.config.name):
        print(f"note: {args.from_png} was made with the model '{png.model}'; this run uses '{pipe.config.name}' "
              "(choose with --checkpoint)", file=sys.stderr)
    sampler = get_sampler(args.sampler, schedule=pipe.schedule, karras=True) if args.karras else args.sampler
    common = dict(negative_prompt=args.negative, num_images=args.n, steps=args.steps, guidance_scale=args.guidance,
                  sampler=sampler, seed=seed, height=args.height, width=args.width, progress=True,
                  clip_skip=args.clip_skip, prompt_syntax=args.prompt_syntax, **control)
    try:
        if args.command == "img2img":
            images = pipe.img2img(args.prompt, args.init, strength=args.strength, **common)
        elif args.command == "inpaint":
            images = pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength, **common)
        elif args.command == "instruct":                  # InstructPix2Pix: the prompt is the instruction
            images = pipe.instruct(args.image, args.prompt, image_guidance_scale=args.image_guidance, **common)
        elif args.command == "upscale":                   # SD 2 ×4 upscaler: the size is 4× the image's
            del common["height"], common["width"]
            images = pipe.upscale(args.prompt, args.image, noise_level=args.noise_level, **common)
        else:
            images = pipe.txt2img(args.prompt, **common)
    except NonFiniteOutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    strength = getattr(args, "strength", None)
    texts = [format_parameters(args.prompt, args.negative or "", steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance, seed=seed + k, width=image.width, height=image.height,
                               model=pipe.config.name, strength=strength, clip_skip=args.clip_skip,
                               karras=args.karras, prompt_syntax=args.prompt_syntax)
             for k, image in enumerate(images)]
    paths = output_paths(out, len(images), args.force)
    if args.grid and len(images) > 1:
        images, texts = images + [image_grid(images)], texts + [texts[0]]
        paths = paths + output_paths(out, 1, args.force, suffix="-grid")
    save_pngs(images, paths, texts)
    for k, path in enumerate(paths):
        print(f"wrote {path}" + (f"  (seed {seed + k})" if k < args.n else "  (grid)"))
    return 0


def _check_upscale_options(args) -> None:
    """upscale: the noise level as pipe.upscale checks it, and no size (it is 4× the image's), before loading."""
    from .upscale import check_noise_level
    check_noise_level(args.noise_level)
    if args.height is not None or args.width is not None:
        raise ValueError("upscale takes no --height/--width: the output is 4× the --image's size")


def _add_generation_options(p: argparse.ArgumentParser, default_strength: float | None = None) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (may be left out with --from-png)")
    p.add_argument("--from-png", metavar="IMAGE", default=None,
                   help="make an image again from the `parameters` text of a PNG written by ldm-scratch or "
                   "AUTOMATIC1111's web UI: its prompt, negative prompt, steps, sampler, CFG scale, seed, size and "
                   "clip skip (img2img/inpaint: also its denoising strength). Options given on the command line "
                   "override the file's values; fields that cannot be used are listed")
    p.add_argument("--checkpoint", default=None, help="official .safetensors/.ckpt or diffusers folder "
                   "(default: the bundled tiny model)")
    p.add_argument("--negative", default=None, action=Given, help="negative prompt")
    p.add_argument("--prompt-syntax", default="a1111", choices=("a1111", "plain"), action=Given,
                   help="a1111 (default): AUTOMATIC1111's (word:1.3), [word], BREAK, [from:to:when], [a|b] and "
                   "prompts beyond 75 tokens; plain: the text as written, cut at 75 tokens")
    p.add_argument("--steps", type=int, default=30, action=Given)
    p.add_argument("--sampler", default="dpmpp_2m", action=Given, help="ddpm, ddim, plms, pndm, lms, euler, "
                   "euler_a, heun, dpmpp_2m (default)")
    p.add_argument("--seed", type=int, default=None, action=Given, help="image k gets seed + k (default: random, "
                   "printed)")
    p.add_argument("--guidance", type=float, default=7.5, action=Given, help="classifier-free guidance scale "
                   "(1 = none)")
    p.add_argument("--height", type=int, default=None, action=Given, help="multiple of 8 (default: the model's "
                   "size or the image's)")
    p.add_argument("--width", type=int, default=None, action=Given)
    p.add_argument("--n", type=int, default=1, help="number of images (numbered files)")
    p.add_argument("--out", default="image.png", help="output PNG; taken names get -1, -2, … (default image.png)")
    p.add_argument("--force", action="store_true", help="overwrite existing files instead of numbering new ones")
    p.add_argument("--grid", action="store_true", help="also save a grid of the --n images (<out>-grid.png)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="network precision")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, …")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: keep the UNet's weights packed for oneDNN (a faster step, one more copy of its weights "
                   "in memory: +1.6 GiB for SD v1 in bfloat16); default: on with --dtype bf16, off in float32")
    p.add_argument("--vocab", default=None, help="tokenizer vocabulary (default: as load_tokenizer finds it)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA (kohya/A1111 or diffusers .safetensors) at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH", help="a textual-inversion "
                   "embedding (.pt, .bin, .safetensors); its file name without extension is the prompt word; "
                   "repeatable")
    p.add_argument("--vae", default=None, metavar="PATH", help="a standalone VAE to use instead of the "
                   "checkpoint's (e.g. vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers vae/ folder)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet file or diffusers folder (repeat for several)")
    p.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="its control image, one per --controlnet (resized to the output size)")
    p.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="controlnet_scale: one, or one per --controlnet (default 1)")
    p.add_argument("--control-preprocess", default="none", choices=["canny", "scribble", "none"],
                   help="make the control image's map first: canny edges, inverted scribble, or none (as is)")
    p.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional half only")
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps before control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps after which it stops")
    if default_strength is not None:
        p.add_argument("--strength", type=float, default=default_strength, action=Given,
                       help=f"how much to change the image, 0–1 (default {default_strength})")
    p.set_defaults(run=cmd_generate, given=frozenset(), karras=False, clip_skip=None)


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
    p = commands.add_parser("instruct", help="edit an image by an instruction (an InstructPix2Pix checkpoint)")
    _add_generation_options(p)
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale s_I (1 = none; higher "
                   "keeps closer to the image)")
    p = commands.add_parser("upscale", help="draw an image 4× larger (the SD 2 ×4 upscaler checkpoint)")
    _add_generation_options(p)
    p.add_argument("--image", required=True, help="the low-resolution image; the output is 4× its size")
    p.add_argument("--noise-level", type=int, default=20, help="noise added to the image first, 0–350 (default 20; "
                   "more noise: more invented detail, less of the image kept)")
    p.set_defaults(guidance=9.0, sampler="ddim")      # diffusers' defaults for this model
    from .training.command import add_train_arguments, cmd_train
    p = commands.add_parser("train", help="train the tiny model from scratch (ldm_scratch/train.py)")
    add_train_arguments(p)
    p.set_defaults(run=cmd_train)
    from .training.controlnet import add_arguments as add_controlnet_arguments, cmd_train_controlnet
    p = commands.add_parser("train-controlnet", help="train a ControlNet (Canny edges) for the tiny model")
    add_controlnet_arguments(p)
    p.set_defaults(run=cmd_train_controlnet)
    from .training.finetune_command import add_arguments as add_finetune_arguments, cmd_finetune
    p = commands.add_parser("finetune", help="adapt a model to a few pictures: LoRA, textual inversion, DreamBooth")
    add_finetune_arguments(p)
    p.set_defaults(run=cmd_finetune)
    from .merging import add_merge_arguments
    p = commands.add_parser("merge", help="merge two checkpoints (weighted sum or add difference), tensor by tensor")
    add_merge_arguments(p)
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
