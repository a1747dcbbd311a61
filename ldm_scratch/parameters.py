"""The PNG `parameters` text: what AUTOMATIC1111's web UI and `ldm-scratch generate` write under every image, and
reading it back into the arguments of `pipe.txt2img`, so an image can be made again.

    a watercolor fox, (snow:1.2),                    ← prompt: every line before "Negative prompt:"
    in a birch forest
    Negative prompt: blurry, lowres                  ← negative prompt: from that line on (absent when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, Clip skip: 2
                                                     ← settings: the last line, "Key: value" pairs joined by ", "

A value holding a comma, colon or newline is written as a JSON string ("Lora hashes: "a: 1, b: 2""), as the web UI
quotes it. Its reader takes the last line as the settings when it holds at least three "Key: value" pairs, strips
every prompt line, and fills in defaults for what is absent; we do the same (a text without a settings line is an
error here: there is nothing to regenerate from).

What maps to what (the web UI's spelling → ours):
    Steps → steps      CFG scale → guidance_scale      Seed → seed      Size: WxH → width, height
    Sampler (+ Schedule type) → sampler, karras        see WEBUI_SAMPLERS; the rest are refused, naming ours
    Clip skip: N → clip_skip = N − 1    the web UI counts the last layer as 1 (clip.py: its "2" is our 1)
    Denoising strength → strength (img2img, inpaint)   Model, Model hash → model, model_hash (for information)
Every other field (Hires upscale, Variation seed, RNG, Lora hashes, Version, …) is kept in `unknown` and reported
(UnusedParametersWarning; the CLI prints them): the picture it describes may need what we do not do.

Karras: the web UI spelled it in the sampler name until v1.8 ("DPM++ 2M Karras") and as "Schedule type: Karras" from
v1.9, where "Automatic" means the sampler's own default, which is Karras for DPM++ 2M. A text without a Schedule
type reads as its sampler name says ("DPM++ 2M" = no Karras, as such files meant when they were written). We always
write the schedule of a σ-sampler ("Uniform" or "Karras"), so no web UI version misreads ours.

Same name, same algorithm, not the same pixels: the web UI runs k-diffusion's samplers and draws its noise on the
GPU by default, ours reproduce diffusers' schedulers with CPU noise; a web UI image regenerated here is a close
relative, our own PNGs come back pixel for pixel.
"""
from __future__ import annotations

import inspect
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# The web UI's sampler names → ours. PNDM is not a web UI sampler: it names SD v1.5's default scheduler in our files.
WEBUI_SAMPLERS = {"Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "Heun": "heun", "DPM++ 2M": "dpmpp_2m",
                  "DDIM": "ddim", "PLMS": "plms", "DDPM": "ddpm", "LCM": "lcm", "PNDM": "pndm"}
SAMPLER_NAMES = {ours: webui for webui, ours in WEBUI_SAMPLERS.items()}        # ours → what we write
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras")                             # the ones we can follow
AUTOMATIC_KARRAS = {"dpmpp_2m"}          # the web UI ≥ 1.9 picks Karras for "Automatic" on these samplers
KARRAS_SUFFIX = " Karras"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# One "Key: value" pair of the settings line: a key of word characters, spaces, '-' or '/', then a JSON-quoted
# value or anything up to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class ParametersError(ValueError):
    """A file or text that holds no usable generation parameters; the message says what is wrong and what to do."""


class UnusedParametersWarning(UserWarning):
    """Fields of a parameters text that are not applied when regenerating (listed in GenerationParameters.unknown)."""


def our_samplers() -> dict:
    """ldm_scratch.samplers.SAMPLERS, imported when first needed: it imports torch, which `ldm-scratch --help`
    should not wait for."""
    from .samplers import SAMPLERS
    return SAMPLERS


def takes_karras(sampler: str) -> bool:
    """Whether our sampler has the Karras σ option (the σ-samplers: euler, euler_a, heun, lms, dpmpp_2m)."""
    return "karras" in inspect.signature(our_samplers()[sampler].__init__).parameters


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def quote(value) -> str:
    """A settings value as the web UI writes it: as is, or as a JSON string when it holds ',', ':' or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance_scale: float,
                      seed: int, width: int, height: int, model: str | None = None, strength: float | None = None,
                      clip_skip: int | None = None, karras: bool = False, prompt_syntax: str = "a1111") -> str:
    """The PNG `parameters` text in the web UI's format, e.g.

        a red circle on a blue background
        Negative prompt: blurry
        Steps: 30, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny

    No "Negative prompt:" line when there is none, no "Model" when model is None; img2img/inpaint add "Denoising
    strength"; clip_skip (ours) is written as the web UI's "Clip skip: clip_skip + 1", and only from 1 on (the web
    UI omits its 1). Floats are written in full (repr), so the file gives back exactly the numbers that made the
    image; σ-samplers always get their "Schedule type" (see the module docstring). prompt_syntax "plain" (brackets
    read as text) is written as "Prompt syntax: plain" — a field of ours; the web UI always reads its own syntax and
    ignores fields it does not know — so our file regenerates the same image; the default "a1111" is not written.
    """
    fields = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler)}
    if sampler in our_samplers() and takes_karras(sampler):
        fields["Schedule type"] = "Karras" if karras else "Uniform"
    fields.update({"CFG scale": float(guidance_scale), "Seed": seed, "Size": f"{width}x{height}"})
    if model is not None:
        fields["Model"] = model
    if strength is not None:
        fields["Denoising strength"] = float(strength)
    if clip_skip:
        fields["Clip skip"] = clip_skip + 1
    if prompt_syntax != "a1111":
        fields["Prompt syntax"] = prompt_syntax
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {quote(value)}" for key, value in fields.items())])


# ---------------------------------------------------------------------------------------------------------------
# Reading the text
# ---------------------------------------------------------------------------------------------------------------

def split_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings {key: value as text}) of a parameters text, read as the web UI reads it.

    Text on the settings line that is not a "Key: value" pair is kept under the key "(not key: value)".
    """
    *lines, last = text.strip().split("\n")
    matches = list(_FIELD.finditer(last))
    if len(matches) < 3:
        raise ParametersError("the parameters text has no settings line (a last line like 'Steps: 20, Sampler: "
                              "Euler a, CFG scale: 7, Seed: 1, Size: 512x512'); give the prompt and settings as "
                              "options instead")
    fields, leftover, end = {}, [], 0
    for match in matches:
        leftover.append(last[end:match.start()])
        key, value = match.group(1), match.group(2).strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass                          # the web UI keeps such a value as written; so do we
        fields[key] = value
        end = match.end()
    stray = " ".join(piece.strip(" ,") for piece in leftover + [last[end:]] if piece.strip(" ,"))
    if stray:
        fields["(not key: value)"] = stray
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), fields


def parse_parameters(text: str) -> dict[str, str]:
    """The text as strings: {"prompt", "negative_prompt", "Steps", "Sampler", …} and our sampler name under
    "sampler" (the web UI's own name where we have none)."""
    prompt, negative, fields = split_parameters(text)
    name = fields.get("Sampler", "")
    name = name[:-len(KARRAS_SUFFIX)] if name.endswith(KARRAS_SUFFIX) else name
    return {"prompt": prompt, "negative_prompt": negative, **fields,
            "sampler": WEBUI_SAMPLERS.get(name, fields.get("Sampler"))}


def sampler_from_webui(name: str, schedule_type: str | None = None) -> tuple[str, bool]:
    """The web UI's "Sampler" (and "Schedule type") → (our sampler name, karras). Raises ParametersError naming
    the supported ones for a sampler or schedule we do not have. Our own names are accepted too."""
    karras = name.endswith(KARRAS_SUFFIX)
    base = name[:-len(KARRAS_SUFFIX)] if karras else name
    sampler = WEBUI_SAMPLERS.get(base, base if base in our_samplers() else None)
    if sampler is None:
        supported = ", ".join(f"'{webui}'" for webui in WEBUI_SAMPLERS)
        raise ParametersError(f"the sampler '{name}' has no counterpart here; supported: {supported} (the "
                              f"σ-samplers also with ' Karras'); choose one with --sampler / sampler=")
    if schedule_type is not None and schedule_type not in SCHEDULE_TYPES:
        raise ParametersError(f"the schedule type '{schedule_type}' has no counterpart here; supported: "
                              f"{', '.join(SCHEDULE_TYPES)}; choose the sampler with --sampler / sampler=")
    karras = karras or schedule_type == "Karras" or (schedule_type == "Automatic" and sampler in AUTOMATIC_KARRAS)
    return sampler, karras and takes_karras(sampler)


@dataclass
class GenerationParameters:
    """What a parameters text says, in our terms (None: the text does not say; use the pipeline's default).

    unknown: the fields read but not applied, as written ({"Hires upscale": "2", …}), so nothing is dropped silently.
    """
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    karras: bool = False
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None             # ours (diffusers' count): the web UI's "Clip skip: N" is N − 1
    strength: float | None = None            # img2img / inpaint only
    prompt_syntax: str = "a1111"             # "plain" only in our own files ("Prompt syntax: plain")
    model: str | None = None                 # for information: the checkpoint is chosen by the caller
    model_hash: str | None = None
    unknown: dict[str, str] = field(default_factory=dict)

    def pipeline_kwargs(self, pipe=None) -> dict:
        """Keyword arguments for `pipe.txt2img(**kwargs)`: prompt, negative_prompt and every setting the text gave.

        A Karras sampler is passed as a sampler object built on `pipe.schedule` (SD's default β schedule when no
        pipe is given). `strength` is left out (txt2img takes none): pass it to img2img/inpaint yourself.
        """
        kwargs = {"prompt": self.prompt}
        if self.negative_prompt:
            kwargs["negative_prompt"] = self.negative_prompt
        if self.prompt_syntax != "a1111":
            kwargs["prompt_syntax"] = self.prompt_syntax
        for name in ("steps", "guidance_scale", "seed", "width", "height", "clip_skip"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.sampler is not None:
            from .samplers import get_sampler
            kwargs["sampler"] = (get_sampler(self.sampler, schedule=getattr(pipe, "schedule", None), karras=True)
                                 if self.karras else self.sampler)
        return kwargs

    def text(self) -> str:
        """This as a parameters text (format_parameters); every setting must be known."""
        return format_parameters(self.prompt, self.negative_prompt, steps=self.steps, sampler=self.sampler,
                                 guidance_scale=self.guidance_scale, seed=self.seed, width=self.width,
                                 height=self.height, model=self.model, strength=self.strength,
                                 clip_skip=self.clip_skip, karras=self.karras, prompt_syntax=self.prompt_syntax)


def _number(fields: dict[str, str], key: str, kind):
    """fields[key] as an int or float, with an error naming the field."""
    value = fields.pop(key)
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ParametersError(f"'{key}: {value}' in the parameters text is not {what}") from None


def parameters_from_text(text: str, skip=()) -> GenerationParameters:
    """Read a parameters text (ours or the web UI's) into GenerationParameters.

    skip: settings keys not to read at all (e.g. {"Sampler", "Schedule type"} when the caller chooses the sampler
    itself): they are neither checked nor reported. Fields left unused warn (UnusedParametersWarning) and are kept
    in `.unknown`.
    """
    prompt, negative, fields = split_parameters(text)
    for key in skip:
        fields.pop(key, None)
    p = GenerationParameters(prompt=prompt, negative_prompt=negative)
    if "Steps" in fields:
        p.steps = _number(fields, "Steps", int)
    if "Sampler" in fields:
        p.sampler, p.karras = sampler_from_webui(fields.pop("Sampler"), fields.get("Schedule type"))
        if fields.get("Schedule type") in (None, "Automatic", "Uniform") or takes_karras(p.sampler):
            fields.pop("Schedule type", None)     # else: the web UI's DDIM/PLMS ignore "Karras"; so we report it
    if "CFG scale" in fields:
        p.guidance_scale = _number(fields, "CFG scale", float)
    if "Seed" in fields:
        p.seed = _number(fields, "Seed", int)
    if "Size" in fields:
        size = re.fullmatch(r"(\d+)x(\d+)", fields["Size"])
        if size is None:
            raise ParametersError(f"'Size: {fields['Size']}' in the parameters text is not WIDTHxHEIGHT")
        p.width, p.height = int(size.group(1)), int(size.group(2))
        del fields["Size"]
    if "Clip skip" in fields:
        n = _number(fields, "Clip skip", int)
        if n < 1:
            raise ParametersError(f"'Clip skip: {n}' in the parameters text: the web UI counts from 1 (1 = the last "
                                  "layer, 2 = the one before)")
        p.clip_skip = n - 1
    if "Prompt syntax" in fields:
        syntax = fields.pop("Prompt syntax")
        if syntax not in ("a1111", "plain"):
            raise ParametersError(f"'Prompt syntax: {syntax}' in the parameters text: it is 'a1111' or 'plain'")
        p.prompt_syntax = syntax
    if "Denoising strength" in fields:
        p.strength = _number(fields, "Denoising strength", float)
    p.model, p.model_hash = fields.pop("Model", None), fields.pop("Model hash", None)
    p.unknown = fields
    if fields:
        warnings.warn(f"not used from the parameters text: {', '.join(f'{k}: {v}' for k, v in fields.items())}",
                      UnusedParametersWarning, stacklevel=2)
    return p


# ---------------------------------------------------------------------------------------------------------------
# Reading the PNG
# ---------------------------------------------------------------------------------------------------------------

def _kind_of_file(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP"
    return "not an image we know"


def read_png_text(path) -> str:
    """The `parameters` text chunk (tEXt, zTXt or iTXt) of a PNG file, with a clear error for a missing file, a
    file that is not a PNG, a damaged PNG, or a PNG without that chunk."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    with open(path, "rb") as file:
        head = file.read(16)
    if not head.startswith(PNG_SIGNATURE):
        raise ParametersError(f"{path} is not a PNG file (it is {_kind_of_file(head)}); the parameters are read "
                              "from PNG text chunks only (the web UI keeps JPEG/WebP parameters in EXIF, which "
                              "this reader does not read): use the PNG the image was saved as")
    try:
        with Image.open(path) as image:
            chunks = dict(image.text)            # every text chunk, before and after the pixel data
    except (OSError, ValueError, SyntaxError) as error:
        raise ParametersError(f"cannot read {path} as a PNG ({error}); the file is damaged") from error
    if "parameters" not in chunks:
        found = ", ".join(repr(key) for key in chunks) or "none"
        raise ParametersError(f"{path} has no 'parameters' text chunk (text chunks found: {found}); it was not "
                              "saved by this project or by AUTOMATIC1111's web UI, or its metadata was stripped")
    text = chunks["parameters"]
    if not text.strip():
        raise ParametersError(f"the 'parameters' text chunk of {path} is empty")
    return text


def read_png_parameters(path, skip=()) -> GenerationParameters:
    """The generation parameters stored in a PNG by `ldm-scratch generate` or AUTOMATIC1111's web UI.

        params = read_png_parameters("00001-123.png")
        images = pipe.txt2img(**params.pipeline_kwargs(pipe))
        params.unknown                                  # {"Hires upscale": "2", …}: what was not applied
    """
    try:
        return parameters_from_text(read_png_text(path), skip)
    except ParametersError as error:
        if str(path) in str(error):
            raise
        raise ParametersError(f"{path}: {error}") from None
