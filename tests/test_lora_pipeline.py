"""The pipeline's side of adapters: `pipe.load_lora / set_lora_scale / unload_lora`, `load_pipeline(path, vae=…)`,
and the command line's `--lora PATH[:SCALE]` and `--vae PATH`, on the tiny random model."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.cli import main
from ldm_scratch.pipeline import load_pipeline
from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary
from test_lora import kohya_state

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = dict(prompt="a red circle", steps=2, sampler="ddim", seed=3, height=64, width=64, output_type="np",
            progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    vocabulary = write_vocabulary(folder / "tokenizer")
    checkpoint = write_tiny_checkpoint(folder / "tiny.safetensors", seed=1)
    pipe = tiny_pipeline(checkpoint, vocabulary)
    save_file(kohya_state(pipe, seed=5), str(folder / "style.safetensors"))
    save_file(kohya_state(pipe, seed=6, alpha=None), str(folder / "other.safetensors"))
    other = write_tiny_checkpoint(folder / "other-model.safetensors", seed=9)   # its VAE, as a standalone file
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(str(other)).items()
               if k.startswith("first_stage_model.")}, str(folder / "vae.safetensors"))
    return dict(folder=folder, vocabulary=vocabulary, checkpoint=checkpoint, pipe=pipe, other=other)


def test_pipeline_lora_methods(setup):
    pipe, folder = setup["pipe"], setup["folder"]
    plain = pipe.txt2img(**ARGS)
    weights = {name: p for name, p in pipe.unet.named_parameters()}
    name = pipe.load_lora(folder / "style.safetensors", scale=0.8)
    assert name == "style"
    assert pipe.load_lora(folder / "other.safetensors", scale=0.5, name="second") == "second"
    styled = pipe.txt2img(**ARGS)
    assert np.abs(styled - plain).max() > 1e-2
    pipe.set_lora_scale("style", 0.0)
    pipe.set_lora_scale("second", 0.0)
    np.testing.assert_allclose(pipe.txt2img(**ARGS), plain, atol=1e-5)   # scale 0 ≈ off (W + 0·Δ, recomputed)
    pipe.unload_lora("second")
    pipe.unload_lora()
    assert np.array_equal(pipe.txt2img(**ARGS), plain)                      # unloaded: the same image, bit for bit
    assert all(p is weights[name] for name, p in pipe.unet.named_parameters())


def test_load_pipeline_with_a_standalone_vae(setup):
    vae = setup["folder"] / "vae.safetensors"
    with_vae = load_pipeline(setup["checkpoint"], tokenizer=setup["vocabulary"], vae=vae)
    other = load_pipeline(setup["other"], tokenizer=setup["vocabulary"])
    for (name, p), (_, q) in zip(with_vae.vae.state_dict().items(), other.vae.state_dict().items()):
        assert torch.equal(p, q), name                                     # the VAE is the file's …
    ours = setup["pipe"]
    assert all(torch.equal(p, q) for p, q in zip(with_vae.unet.parameters(), ours.unet.parameters()))   # … the rest not
    latents = with_vae.txt2img(**{**ARGS, "output_type": "latent"})
    assert np.array_equal(with_vae.decode_latents(latents).numpy(), other.decode_latents(latents).numpy())


def test_load_pipeline_refuses_a_whole_checkpoint_as_vae(setup):
    with pytest.raises(CheckpointError, match="whole model checkpoint"):
        load_pipeline(setup["checkpoint"], tokenizer=setup["vocabulary"], vae=setup["other"])


def test_cli_lora_and_vae(setup, tmp_path):
    common = ["generate", "a red circle", "--checkpoint", str(setup["checkpoint"]), "--vocab",
              str(setup["vocabulary"][0].parent), "--steps", "2", "--seed", "1", "--sampler", "ddim"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "lora.png"), "--lora",
                 f"{setup['folder'] / 'style.safetensors'}:0.7", "--lora", str(setup["folder"] / "other.safetensors"),
                 "--vae", str(setup["folder"] / "vae.safetensors")]) == 0
    plain, styled = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("plain", "lora"))
    assert np.abs(plain - styled).max() > 5
    assert main([*common, "--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
