"""The PNG `parameters` text (ldm_scratch/parameters.py) and `ldm-scratch generate --from-png`.

- reading the web UI's text: a table of texts as AUTOMATIC1111 writes them (quoted values, multi-line prompts, no
  negative prompt, unknown fields, both Karras spellings, Clip skip) and what each must give;
- sampler names: every one we map, and clear errors for the ones we do not have;
- writing: the web UI's quoting and field order, and text → parameters → text round trips;
- files: a missing file, a folder, a JPEG, random bytes, a damaged PNG, a PNG without the chunk, an empty chunk,
  a chunk without settings, all with clear errors; tEXt, zTXt and iTXt chunks all read;
- the CLI: our own PNG regenerates to the identical image, a web-UI PNG regenerates with its Karras sampler and
  clip skip, options on the command line win over the file, unused fields are printed.
"""
import io
import warnings

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_scratch.cli import apply_png_parameters, build_parser, main
from ldm_scratch.diffusion import Schedule, ScheduleConfig
from ldm_scratch.parameters import (GenerationParameters, ParametersError, UnusedParametersWarning,
                                    format_parameters, parameters_from_text, read_png_parameters, read_png_text,
                                    sampler_from_webui, split_parameters)
from ldm_scratch.samplers import SAMPLERS, DPMSolverPP2M

from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary

P = GenerationParameters


def read(text: str) -> GenerationParameters:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedParametersWarning)
        return parameters_from_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Reading the web UI's text
# ---------------------------------------------------------------------------------------------------------------

WEBUI_CASES = [
    # the web UI's own docstring example (v1.0 era): no Schedule type, a Model hash
    ("girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed\n"
     "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
     "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b",
     P("girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed",
       "ugly, fat, (((deformed))), [blurry], bad anatomy", 20, "euler_a", False, 7.0, 965400086, 512, 512,
       model_hash="45dee52b")),
    # v1.9+: Schedule type separate, Clip skip, quoted values with commas and colons, unknown fields
    ("masterpiece, best quality, 1girl, (red hair:1.2)\n"
     "Negative prompt: (worst quality, low quality:1.4)\n"
     'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 123, Size: 512x768, '
     'Model hash: 7f96a1a9ca, Model: anything-v5, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54, '
     'more: 0123", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1',
     P("masterpiece, best quality, 1girl, (red hair:1.2)", "(worst quality, low quality:1.4)", 28, "dpmpp_2m",
       True, 6.5, 123, 512, 768, clip_skip=1, model="anything-v5", model_hash="7f96a1a9ca",
       unknown={"Lora hashes": "add_detail: 7c6bad76eb54, more: 0123", "TI hashes": "EasyNegative: c74b4e810b03",
                "Version": "v1.10.1"})),
    # multi-line prompt and negative prompt, lines stripped; old "… Karras" sampler name; hires fix (not ours)
    ("a castle on a hill,  \n  at sunset\nNegative prompt: blurry,\nlowres, \n"
     "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 42, Size: 640x448, Denoising strength: 0.55, "
     "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+",
     P("a castle on a hill,\nat sunset", "blurry,\nlowres,", 30, "dpmpp_2m", True, 7.0, 42, 640, 448,
       strength=0.55, unknown={"Hires upscale": "2", "Hires upscaler": "R-ESRGAN 4x+"})),
    # no negative prompt; "Automatic" means Karras for DPM++ 2M in the web UI ≥ 1.9, but nothing for Euler
    ("a fox\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512",
     P("a fox", "", 20, "dpmpp_2m", True, 7.0, 1, 512, 512)),
    ("a fox\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512",
     P("a fox", "", 20, "euler", False, 7.0, 1, 512, 512)),
    # before v1.9, plain "DPM++ 2M" meant no Karras; "Uniform" says so explicitly
    ("a fox\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512",
     P("a fox", "", 20, "dpmpp_2m", False, 7.0, 1, 512, 512)),
    ("a fox\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7, Seed: 1, Size: 512x512",
     P("a fox", "", 20, "dpmpp_2m", False, 7.0, 1, 512, 512)),
    # DDIM ignores a schedule type in the web UI: so do we, and say so; Clip skip 1 is the normal output
    ("a fox\nSteps: 50, Sampler: DDIM, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 512x512, Clip skip: 1",
     P("a fox", "", 50, "ddim", False, 7.5, 3, 512, 512, clip_skip=0, unknown={"Schedule type": "Karras"})),
    # an empty prompt; a prompt line that is itself "key: value"-like stays prompt; stray text is reported
    ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, Tiling",
     P("", "", 20, "euler_a", False, 7.0, 5, 64, 64, unknown={"(not key: value)": "Tiling"})),
    ("style: watercolor, subject: fox\nNegative prompt: text: none\n"
     "Steps: 2, Sampler: LMS Karras, CFG scale: 1, Seed: 0, Size: 8x16, ENSD: 31337, RNG: CPU",
     P("style: watercolor, subject: fox", "text: none", 2, "lms", True, 1.0, 0, 8, 16,
       unknown={"ENSD": "31337", "RNG": "CPU"})),
]


@pytest.mark.parametrize("text, expected", WEBUI_CASES)
def test_webui_texts_read_to_the_right_values(text, expected):
    assert read(text) == expected


def test_unused_fields_warn_and_are_returned():
    text = "a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Hires upscale: 2, RNG: CPU"
    with pytest.warns(UnusedParametersWarning, match="not used from the parameters text: Hires upscale: 2, RNG: CPU"):
        params = parameters_from_text(text)
    assert params.unknown == {"Hires upscale": "2", "RNG": "CPU"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # nothing unused: no warning
        parameters_from_text("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")


def test_skipped_fields_are_neither_read_nor_reported():
    text = "a fox\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, Size: 512x512"
    with pytest.raises(ParametersError, match="DPM\\+\\+ SDE Karras"):
        read(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # a skipped field is not "unused"
        params = parameters_from_text(text, skip={"Sampler"})
    assert params.sampler is None and params.unknown == {} and params.steps == 20


@pytest.mark.parametrize("text, message", [
    ("just a prompt, no settings", "no settings line"),
    ("a fox\nSteps: 20, Sampler: Euler", "no settings line"),                      # fewer than 3 pairs
    ("a fox\nSteps: twenty, Sampler: Euler, CFG scale: 7", "'Steps: twenty' .* not a whole number"),
    ("a fox\nSteps: 20, Sampler: Euler, CFG scale: high", "'CFG scale: high' .* not a number"),
    ("a fox\nSteps: 20, Sampler: Euler, Size: 512 by 512", "'Size: 512 by 512' .* not WIDTHxHEIGHT"),
    ("a fox\nSteps: 20, Sampler: Euler, Clip skip: 0", "counts from 1"),
    ("a fox\nSteps: 20, Sampler: UniPC, Seed: 1", "'UniPC' has no counterpart here; supported: 'Euler a'"),
    ("a fox\nSteps: 20, Sampler: Euler, Schedule type: Exponential", "'Exponential' .* Automatic, Uniform, Karras"),
])
def test_unreadable_texts_give_clear_errors(text, message):
    with pytest.raises(ParametersError, match=message):
        read(text)


# ---------------------------------------------------------------------------------------------------------------
# Sampler names
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, schedule, expected", [
    ("Euler a", None, ("euler_a", False)), ("Euler", None, ("euler", False)), ("LMS", None, ("lms", False)),
    ("Heun", None, ("heun", False)), ("DPM++ 2M", None, ("dpmpp_2m", False)), ("DDIM", None, ("ddim", False)),
    ("PLMS", None, ("plms", False)), ("DDPM", None, ("ddpm", False)), ("LCM", None, ("lcm", False)),
    ("PNDM", None, ("pndm", False)),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", True)), ("LMS Karras", None, ("lms", True)),
    ("Euler a", "Karras", ("euler_a", True)), ("Heun", "Karras", ("heun", True)),
    ("DPM++ 2M", "Automatic", ("dpmpp_2m", True)), ("Euler a", "Automatic", ("euler_a", False)),
    ("DPM++ 2M Karras", "Uniform", ("dpmpp_2m", True)),          # the name's suffix wins, as in the web UI
    ("DDIM", "Karras", ("ddim", False)),                           # no σ schedule to change
    ("euler_a", None, ("euler_a", False)),                         # our own names are accepted too
])
def test_webui_sampler_names(name, schedule, expected):
    assert sampler_from_webui(name, schedule) == expected


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE",
                                  "DPM fast", "DPM adaptive", "UniPC", "Restart", "DPM2 Karras", "euler a"])
def test_unsupported_samplers_are_refused_naming_ours(name):
    with pytest.raises(ParametersError) as error:
        sampler_from_webui(name)
    assert f"'{name}'" in str(error.value) and "'DPM++ 2M', 'DDIM'" in str(error.value)


def test_every_sampler_of_ours_has_a_webui_name_that_maps_back():
    for ours in SAMPLERS:
        text = format_parameters("x", "", steps=2, sampler=ours, guidance_scale=7, seed=0, width=8, height=8,
                                 model="m")
        assert read(text).sampler == ours


# ---------------------------------------------------------------------------------------------------------------
# Writing, and round trips
# ---------------------------------------------------------------------------------------------------------------

def test_written_as_the_webui_writes():
    text = format_parameters("a fox, (snow:1.2)\nin a forest", "blurry, lowres", steps=28, sampler="dpmpp_2m",
                             guidance_scale=7, seed=123, width=512, height=768, model="anything-v5", clip_skip=1,
                             karras=True)
    assert text == ("a fox, (snow:1.2)\nin a forest\nNegative prompt: blurry, lowres\n"
                    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 123, Size: 512x768, "
                    "Model: anything-v5, Clip skip: 2")
    # the web UI quotes a value holding ',', ':' or a newline as JSON (non-ASCII kept), and nothing else
    text = format_parameters("x", "", steps=2, sampler="ddim", guidance_scale=7.5, seed=1, width=8, height=8,
                             model='my: "fox", café', strength=0.5)
    assert text.endswith('Size: 8x8, Model: "my: \\"fox\\", café", Denoising strength: 0.5')
    assert "Schedule type" not in text                                              # DDIM has no σ schedule
    text = format_parameters("x", "", steps=2, sampler="ddim", guidance_scale=7.5, seed=1, width=8, height=8,
                             model='say "hi"')
    assert text.endswith('Model: say "hi"')


@pytest.mark.parametrize("params", [
    P("a watercolor fox", "blurry", 30, "dpmpp_2m", False, 7.5, 42, 512, 512, model="tiny"),
    P("two\nlines, (weighted:1.3), [cat:dog:0.5]", "bad: hands,\nblurry", 3, "euler_a", False, 7.123456789,
      2**32 - 1, 64, 96, clip_skip=1, model='my, "model"'),
    P("東京の夜景 🦊, don’t", "", 20, "lms", True, 1.0, 0, 8, 16, clip_skip=2, strength=0.35, model="v1-5"),
    P("", "", 1, "ddim", False, 0.0, 7, 8, 8, model="m"),
    P("(literal) [text]", "", 5, "ddim", False, 7.5, 1, 8, 8, prompt_syntax="plain"),   # "Prompt syntax: plain"
])
def test_text_round_trip(params):
    assert read(params.text()) == params
    prompt, negative, fields = split_parameters(params.text())
    assert (prompt, negative) == (params.prompt, params.negative_prompt)


def test_pipeline_kwargs():
    params = read(WEBUI_CASES[1][0])
    schedule = Schedule(ScheduleConfig(n_train_steps=500))
    kwargs = params.pipeline_kwargs(type("Pipe", (), {"schedule": schedule})())
    sampler = kwargs.pop("sampler")
    assert isinstance(sampler, DPMSolverPP2M) and sampler.karras and sampler.schedule is schedule
    assert kwargs == dict(prompt="masterpiece, best quality, 1girl, (red hair:1.2)",
                          negative_prompt="(worst quality, low quality:1.4)", steps=28, guidance_scale=6.5, seed=123,
                          width=512, height=768, clip_skip=1)
    assert read(WEBUI_CASES[0][0]).pipeline_kwargs()["sampler"] == "euler_a"
    assert "negative_prompt" not in read(WEBUI_CASES[3][0]).pipeline_kwargs()


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

WEBUI_TEXT = WEBUI_CASES[1][0]


def png_bytes(chunks: dict, how: str = "tEXt") -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        if how == "iTXt":
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value, zip=how == "zTXt")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["tEXt", "zTXt", "iTXt"])
def test_reads_every_kind_of_text_chunk(tmp_path, how):
    text = WEBUI_TEXT.replace("1girl", "1girl, 東京") if how == "iTXt" else WEBUI_TEXT
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes({"parameters": text}, how))
    assert read_png_text(path) == text
    with pytest.warns(UnusedParametersWarning):
        assert read_png_parameters(path).seed == 123


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.png", None, FileNotFoundError, "missing.png does not exist"),
    ("folder.png", "folder", FileNotFoundError, "it is a folder"),
    ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", ParametersError, "not a PNG file \\(it is a JPEG\\).*EXIF"),
    ("image.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 ", ParametersError, "not a PNG file \\(it is a WebP\\)"),
    ("junk.png", b"not an image at all", ParametersError, "not a PNG file \\(it is not an image we know\\)"),
    ("cut.png", "cut", ParametersError, "cannot read .*cut.png as a PNG .* damaged"),
    ("crc.png", "crc", ParametersError, "cannot read .*crc.png as a PNG .* damaged"),
    ("comfy.png", {"prompt": "{}", "workflow": "{}"}, ParametersError,
     "no 'parameters' text chunk \\(text chunks found: 'prompt', 'workflow'\\)"),
    ("plain.png", {}, ParametersError, "no 'parameters' text chunk \\(text chunks found: none\\)"),
    ("empty.png", {"parameters": "  \n"}, ParametersError, "'parameters' text chunk of .*empty.png is empty"),
    ("prompt-only.png", {"parameters": "a fox"}, ParametersError, "prompt-only.png: .*no settings line"),
])
def test_bad_files_give_clear_errors(tmp_path, name, content, error, message):
    path = tmp_path / name
    good = png_bytes({"parameters": WEBUI_TEXT})
    if content == "folder":
        path.mkdir()
    elif content == "cut":
        path.write_bytes(good[:len(good) - 30])                      # the pixel data cut short
    elif content == "crc":
        damaged = bytearray(good)
        damaged[damaged.index(b"tEXt") + 12] ^= 0xFF                 # a flipped byte: the chunk's CRC fails
        path.write_bytes(bytes(damaged))
    elif isinstance(content, dict):
        path.write_bytes(png_bytes(content))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        read_png_parameters(path)


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("from_png")
    vocab, merges = write_vocabulary(folder / "tokenizer")
    return dict(checkpoint=str(write_tiny_checkpoint(folder / "tiny.safetensors")), vocab=str(vocab),
                vocabulary=(vocab, merges))


def generate(model, *args):
    return main(["generate", *args, "--checkpoint", model["checkpoint"], "--vocab", model["vocab"]])


def pixels_and_text(path):
    with Image.open(path) as image:
        return np.asarray(image).copy(), image.text["parameters"]


def test_our_png_regenerates_the_identical_image(model, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert generate(model, "a watercolor fox", "--negative", "blurry", "--seed", "42", "--guidance", "5.25",
                    "--sampler", "euler_a", "--steps", "3", "--height", "64", "--width", "48",
                    "--out", str(first)) == 0
    assert generate(model, "--from-png", str(first), "--out", str(again)) == 0
    assert "note:" not in capsys.readouterr().err                   # nothing in our own file goes unused
    (a, text_a), (b, text_b) = pixels_and_text(first), pixels_and_text(again)
    assert a.shape == (64, 48, 3) and np.array_equal(a, b) and text_a == text_b


def test_our_png_keeps_plain_prompt_syntax(model, tmp_path, capsys):
    """A plain-syntax image (brackets as text) regenerates as plain: read as a1111 its pixels would differ."""
    first, again, weighted = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "weighted.png"
    options = ["--seed", "3", "--steps", "2", "--height", "32", "--width", "32"]
    assert generate(model, "a (((red))) circle", "--prompt-syntax", "plain", *options, "--out", str(first)) == 0
    assert generate(model, "--from-png", str(first), "--out", str(again)) == 0
    assert generate(model, "a (((red))) circle", *options, "--out", str(weighted)) == 0
    (a, text_a), (b, text_b), (c, _) = pixels_and_text(first), pixels_and_text(again), pixels_and_text(weighted)
    assert "Prompt syntax: plain" in text_a and np.array_equal(a, b) and text_a == text_b
    assert not np.array_equal(a, c)                                  # the field matters


def test_webui_png_regenerates_with_karras_and_clip_skip(model, tmp_path, capsys):
    source, out = tmp_path / "webui.png", tmp_path / "out.png"
    text = ("a red circle on a blue background\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 6.5, Seed: 123, Size: 64x64, Model hash: 7f96a1a9ca, "
            "Model: anything-v5, Clip skip: 2, Hires upscale: 2")
    source.write_bytes(png_bytes({"parameters": text}))
    # options on the command line win over the file: fewer steps, another seed
    assert generate(model, "--from-png", str(source), "--steps", "2", "--seed", "7", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert f"note: {source}: 'Hires upscale: 2' is not used" in err and "made with the model 'anything-v5'" in err
    pixels, written = pixels_and_text(out)
    assert written == ("a red circle on a blue background\nNegative prompt: ugly\nSteps: 2, Sampler: DPM++ 2M, "
                       "Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 64x64, Model: tiny-test, Clip skip: 2")
    params = read(text)
    params.steps, params.seed = 2, 7
    pipe = tiny_pipeline(model["checkpoint"], model["vocabulary"])
    expected = pipe.txt2img(**params.pipeline_kwargs(pipe), progress=False)[0]
    assert np.array_equal(pixels, np.asarray(expected))


def test_explicit_options_win_even_when_they_equal_the_default(tmp_path):
    source = tmp_path / "webui.png"
    source.write_bytes(png_bytes({"parameters": "a fox\nNegative prompt: ugly\nSteps: 3, Sampler: Heun, "
                                                "CFG scale: 4, Seed: 9, Size: 64x96, Denoising strength: 0.3"}))
    parser = build_parser()

    def resolved(*argv):
        args = parser.parse_args(argv)
        apply_png_parameters(args)
        return args

    args = resolved("generate", "--from-png", str(source))
    assert (args.prompt, args.negative, args.steps, args.sampler, args.guidance, args.seed, args.width,
            args.height) == ("a fox", "ugly", 3, "heun", 4.0, 9, 64, 96)
    args = resolved("generate", "a cat", "--from-png", str(source), "--steps", "30", "--guidance", "7.5",
                    "--sampler", "dpmpp_2m", "--negative", "", "--width", "32")
    assert (args.prompt, args.negative, args.steps, args.sampler, args.guidance, args.seed, args.width,
            args.height) == ("a cat", "", 30, "dpmpp_2m", 7.5, 9, 32, 96)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 96)).save(init)
    assert resolved("img2img", "--from-png", str(source), "--init", str(init)).strength == 0.3
    assert resolved("img2img", "--from-png", str(source), "--init", str(init), "--strength", "0.75").strength == 0.75


@pytest.mark.parametrize("argv, message", [
    (["generate"], "give a prompt, or --from-png IMAGE"),
    (["generate", "--from-png", "{tmp}/missing.png"], "missing.png does not exist"),
    (["generate", "--from-png", "{tmp}/photo.jpg"], "not a PNG file \\(it is a JPEG\\)"),
    (["generate", "--from-png", "{tmp}/unipc.png"], "'UniPC' has no counterpart here"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    import re
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    (tmp_path / "unipc.png").write_bytes(png_bytes({"parameters": "a\nSteps: 2, Sampler: UniPC, Seed: 1"}))
    before = sorted(tmp_path.iterdir())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "out.png")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(tmp_path.iterdir()) == before                      # nothing written


def test_cli_sampler_override_skips_an_unsupported_file_sampler(tmp_path):
    source = tmp_path / "unipc.png"
    source.write_bytes(png_bytes({"parameters": "a fox\nSteps: 2, Sampler: UniPC, Schedule type: Beta, Seed: 1"}))
    args = build_parser().parse_args(["generate", "--from-png", str(source), "--sampler", "ddim"])
    apply_png_parameters(args)
    assert (args.sampler, args.karras, args.steps, args.prompt) == ("ddim", False, 2, "a fox")
