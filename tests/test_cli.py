"""`ldm-scratch generate | img2img | inpaint`: real PNG files whose `parameters` text (AUTOMATIC1111's format)
parses back to the arguments used, no overwriting without --force, numbered files and a grid, and clear errors that
leave nothing behind."""
import numpy as np
import pytest
from PIL import Image

from ldm_scratch.cli import format_parameters, main, parse_parameters

from pipeline_fixtures import sample_image, sample_mask, tiny_pipeline, write_tiny_checkpoint, write_vocabulary


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    vocab, _ = write_vocabulary(folder / "tokenizer")
    return dict(checkpoint=str(write_tiny_checkpoint(folder / "tiny.safetensors")),
                inpainting=str(write_tiny_checkpoint(folder / "tiny-9.safetensors", in_channels=9)),
                vocab=str(vocab), vocabulary=(vocab, folder / "tokenizer" / "merges.txt"))


def run(model, *args, checkpoint="checkpoint"):
    return main([*args, "--checkpoint", model[checkpoint], "--vocab", model["vocab"], "--steps", "2"])


def parameters(path) -> dict:
    with Image.open(path) as image:
        return parse_parameters(image.text["parameters"])


def test_generate_writes_a_png_whose_metadata_parses_back(model, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert run(model, "generate", "a watercolor fox", "--negative", "blurry", "--seed", "42", "--guidance", "5",
               "--sampler", "euler", "--height", "64", "--width", "96", "--out", str(out)) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (96, 64) and image.format == "PNG"
        pixels = np.asarray(image)
    meta = parameters(out)
    assert meta["prompt"] == "a watercolor fox" and meta["negative_prompt"] == "blurry"
    assert (meta["Steps"], meta["sampler"], float(meta["CFG scale"]), meta["Seed"], meta["Size"], meta["Model"]) \
        == ("2", "euler", 5.0, "42", "96x64", "tiny-test")
    # the file holds exactly the pipeline's image for those parameters
    pipe = tiny_pipeline(model["checkpoint"], model["vocabulary"])
    expected = pipe.txt2img("a watercolor fox", "blurry", steps=2, guidance_scale=5, sampler="euler", seed=42,
                            height=64, width=96, progress=False)[0]
    assert np.array_equal(pixels, np.asarray(expected))


def test_parameters_text_is_automatic1111s_format():
    text = format_parameters("a fox, running", "", steps=30, sampler="euler_a", guidance_scale=7.5, seed=1,
                             width=512, height=768, model="v1-5", strength=0.75)
    assert text == ("a fox, running\nSteps: 30, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 1, "
                    "Size: 512x768, Model: v1-5, Denoising strength: 0.75")
    back = parse_parameters(format_parameters("two\nlines", "bad: hands, blurry", steps=3, sampler="dpmpp_2m",
                                              guidance_scale=7, seed=9, width=64, height=64, model='my, "model"'))
    assert back["prompt"] == "two\nlines" and back["negative_prompt"] == "bad: hands, blurry"
    assert back["Model"] == 'my, "model"' and back["Sampler"] == "DPM++ 2M" and back["CFG scale"] == "7.0"


def test_never_overwrites_without_force_and_numbers_n_images(model, tmp_path, capsys):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    assert run(model, "generate", "a red circle", "--seed", "1", "--n", "2", "--grid", "--out", str(out)) == 0
    assert out.read_bytes() == b"precious"
    written = capsys.readouterr().out
    first, second, grid = tmp_path / "img-1.png", tmp_path / "img-2.png", tmp_path / "img-grid.png"
    for path in (first, second, grid):
        assert f"wrote {path}" in written
    assert parameters(first)["Seed"] == "1" and parameters(second)["Seed"] == "2"   # image k has seed + k
    with Image.open(grid) as image:
        assert image.size == (128, 64)
    # --force takes the first names in order and overwrites
    assert run(model, "generate", "a red circle", "--seed", "5", "--force", "--out", str(out)) == 0
    assert parameters(out)["Seed"] == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png", "img-grid.png", "img.png"]


def test_img2img_and_inpaint_commands(model, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    sample_image(64, 64).save(init)
    sample_mask(64, 64).save(mask)
    assert run(model, "img2img", "a fox", "--init", str(init), "--strength", "0.5", "--seed", "3",
               "--out", str(tmp_path / "i2i.png")) == 0
    meta = parameters(tmp_path / "i2i.png")
    assert meta["Denoising strength"] == "0.5" and meta["Size"] == "64x64"
    assert run(model, "inpaint", "a fox", "--image", str(init), "--mask", str(mask), "--seed", "3",
               "--out", str(tmp_path / "inpainted.png"), checkpoint="inpainting") == 0
    assert parameters(tmp_path / "inpainted.png")["Denoising strength"] == "1.0"


@pytest.mark.parametrize("args, message", [
    (["generate", "a fox", "--height", "60"], "height must be a positive multiple of 8"),
    (["generate", "a fox", "--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'"),
    (["generate", "a fox", "--out", "{tmp}/fox.jpg"], "use a name ending in .png"),
    (["generate", "a fox", "--out", "{tmp}/afile/fox.png"], "cannot create the folder"),
    (["img2img", "a fox", "--init", "{tmp}/junk.png"], "cannot read .*junk.png as an image"),
    (["img2img", "a fox", "--init", "{tmp}/missing.png"], "missing.png does not exist"),
    (["img2img", "a fox", "--init", "{tmp}/init.png", "--strength", "1.5"], r"strength must be in \[0, 1\]"),
    (["inpaint", "a fox", "--image", "{tmp}/init.png", "--mask", "{tmp}/wide.png"], "aspect ratios differ"),
])
def test_errors_are_explained_and_nothing_is_written(model, tmp_path, capsys, args, message):
    import re
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "afile").write_text("a file, not a folder")
    sample_image(64, 64).save(tmp_path / "init.png")
    sample_mask(64, 128).save(tmp_path / "wide.png")
    before = sorted(tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.png")]
    assert run(model, *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(tmp_path.iterdir()) == before
