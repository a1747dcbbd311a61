"""The training loop (ldm_scratch/train.py) on a "tiny-tiny" model: 32×32 images, 4×4 latents, a few hundred k
parameters — small enough to train for a few dozen steps in seconds, yet the same code path as the bundled model.

- a short run from scratch lowers both stages' losses and writes a file the strict loader accepts, whose samples
  equal those of the in-training networks (reloading reproduces the samples);
- an interrupted run resumed from its checkpoint ends exactly where the uninterrupted run does;
  (test_train_safety.py: no pickle, no overwritten work, refused recipe changes, a save killed half-way)
- `torchrun --nproc_per_node 2` (DDP, gloo on CPU) trains and exports (slow: two processes start up).
"""
import os
import subprocess
import sys

import pytest
import torch

from ldm_scratch.checkpoint import load_models
from ldm_scratch.clip import CLIPTextConfig
from ldm_scratch.configs import ModelConfig, tiny_config
from ldm_scratch.train import TrainConfig, build_models, generate, load_checkpoint, train
from ldm_scratch.unet import UNetConfig
from ldm_scratch.vae import VAEConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread (and far faster than on two when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tiny_model() -> ModelConfig:
    return ModelConfig(
        text_encoder=CLIPTextConfig(width=16, n_layers=1, n_heads=2, mlp_width=32),
        unet=UNetConfig(model_channels=16, channel_mult=(1, 2, 2, 2), n_heads=2, context_dim=16, norm_groups=8),
        vae=VAEConfig(base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4),
        latent_scale=1.0, image_size=32, kind="tiny", name="tiny-tiny-test")


def short_run(out_dir, **changes) -> TrainConfig:
    values = dict(out_dir=str(out_dir), model=tiny_tiny_model(), n_images=256, vae_steps=40, vae_batch_size=8,
                  vae_lr=3e-3, steps=60, batch_size=16, lr=3e-3, warmup_steps=5, sample_every=0,
                  checkpoint_every=0, progress=False)
    values.update(changes)
    return TrainConfig(**values)


def average(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    history = train(short_run(out, checkpoint_every=60), resume=False)
    return out, history


def test_tiny_config_fits_the_budget():
    text_encoder, unet, vae = build_models(tiny_config(), seed=0)
    n_params = sum(p.numel() for m in (text_encoder, unet, vae) for p in m.parameters())
    assert n_params * 4 <= 16 * 2**20, f"{n_params:,} float32 parameters exceed the 16 MiB budget"


def test_short_run_lowers_both_losses(trained):
    _, history = trained
    vae_loss, loss = history["vae_loss"], history["loss"]
    assert len(vae_loss) == 40 and len(loss) == 60
    assert average(vae_loss[-5:]) < 0.9 * average(vae_loss[:5]), vae_loss
    # ε-prediction: an untrained UNet's loss is ≥ 1 (E‖ε‖² = 1 plus its own output); learning must cut it clearly
    assert average(loss[-10:]) < 0.8 * average(loss[:10]), loss
    assert history["model_config"].latent_scale != 1.0  # chosen from the data


def test_reloaded_model_reproduces_the_samples(trained):
    out, history = trained
    checkpoint = load_checkpoint(out / "ckpt.safetensors")
    config = ModelConfig.from_json(checkpoint["model_config"])
    text_encoder, unet, vae = build_models(config, seed=123)  # different init, then the trained weights
    for module, name in ((text_encoder, "text_encoder"), (unet, "unet"), (vae, "vae")):
        module.load_state_dict(checkpoint[name])
        module.eval()
    loaded = load_models(history["model"])  # the exported official-layout file, through the strict loader
    assert loaded.config == config

    from ldm_scratch import load_tokenizer
    tokenizer = load_tokenizer()
    captions = ["a red circle on a blue background", "a green star on a white background"]
    options = dict(seed=7, guidance_scale=3.0, steps=5)
    first = generate(text_encoder, unet, vae, tokenizer, config, captions, **options)
    again = generate(loaded.text_encoder, loaded.unet, loaded.vae, tokenizer, loaded.config, captions, **options)
    assert first.shape == (2, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, again)
    other_seed = generate(text_encoder, unet, vae, tokenizer, config, captions, **{**options, "seed": 8})
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("stop_at", [pytest.param(5, id="killed-in-stage-1", marks=pytest.mark.slow),
                                     pytest.param(8 + 6, id="killed-in-stage-2")])
def test_resumed_run_matches_uninterrupted_run(tmp_path, stop_at):
    changes = dict(vae_steps=8, steps=12, n_images=64, checkpoint_every=4)
    whole = train(short_run(tmp_path / "whole", **changes), resume=False)
    part = train(short_run(tmp_path / "parts", **changes), resume=False, stop_at=stop_at)
    assert len(part["vae_loss"]) + len(part["loss"]) == stop_at and part["model"] is None
    rest = train(short_run(tmp_path / "parts", **changes), resume=True)  # picks up ckpt.safetensors where it stopped
    assert rest["vae_loss"] == whole["vae_loss"] and rest["loss"] == whole["loss"]
    a = load_checkpoint(tmp_path / "whole" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "parts" / "ckpt.safetensors")
    for name in ("unet", "text_encoder", "vae"):
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs after resuming"
    for index, values in a["optimizer"]["state"].items():  # AdamW's moments and step counts, and the generators
        for field, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][index][field]), f"optimizer {index}.{field} differs"
    assert all(torch.equal(x, y) for x, y in zip(a["generators"], b["generators"], strict=True))


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes: DDP over gloo trains both stages and rank 0 exports a loadable model."""
    config_file = tmp_path / "model.json"
    config_file.write_text(tiny_tiny_model().to_json())
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldm_scratch.train", "--out", str(out), "--model-config", str(config_file),
               "--n-images", "64", "--vae-steps", "6", "--vae-batch-size", "8", "--steps", "20", "--batch-size", "16",
               "--lr", "0.003", "--warmup-steps", "2", "--sample-every", "0", "--checkpoint-every", "10",
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "world size 2" in log
    loaded = load_models(out / "model.safetensors")
    assert loaded.config.image_size == 32 and loaded.config.latent_scale != 1.0
    history = load_checkpoint(out / "ckpt.safetensors")
    assert history["step"] == 20 and len(history["generators"]) == 2


def test_training_grids_sample_with_the_models_own_schedule(trained, tmp_path):
    """The periodic grids (train.generate) and the user's pipeline must sample the same model the same way, also when
    the model's β schedule is not SD v1's (the bundled model's β_end differs): same seed → same pixels."""
    import dataclasses

    import ldm_scratch
    from ldm_scratch.checkpoint import save_official

    out, history = trained
    loaded = load_models(history["model"])
    config = dataclasses.replace(loaded.config, beta_end=0.03)
    path = save_official(tmp_path / "noisier.safetensors", loaded.text_encoder, loaded.unet, loaded.vae, config)
    pipe = ldm_scratch.load_pipeline(path)
    caption = "a red circle on a blue background"
    ours = generate(loaded.text_encoder, loaded.unet, loaded.vae, pipe.tokenizer, config, [caption], seed=3,
                    guidance_scale=3.0, steps=5)
    theirs = pipe.txt2img(caption, seed=3, guidance_scale=3.0, steps=5, output_type="np", progress=False)[0]
    theirs = torch.from_numpy(theirs * 255).round().to(torch.uint8).permute(2, 0, 1)
    assert (ours[0].int() - theirs.int()).abs().max() <= 1  # rounding of pixel values on either side
    sd_schedule = generate(loaded.text_encoder, loaded.unet, loaded.vae, pipe.tokenizer, loaded.config, [caption],
                           seed=3, guidance_scale=3.0, steps=5)
    assert not torch.equal(ours, sd_schedule)  # the schedule really changes the samples


def test_offset_noise_moves_only_the_channel_means():
    """ε + offset·δ: the per-image, per-channel means get std √(1/(h·w) + offset²); the pixels around each mean keep
    unit variance (δ is constant over the latent); offset 0 is plain N(0, I)."""
    from ldm_scratch.train import training_noise

    shape = (4000, 4, 16, 16)
    plain = training_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = training_noise(shape, 0.1, torch.Generator().manual_seed(0))
    means = offset.mean(dim=(2, 3))
    expected = (1 / 256 + 0.1**2) ** 0.5                       # 0.118, vs 1/16 = 0.0625 without the offset
    assert abs(means.std().item() - expected) < 0.03 * expected  # 16,000 means: std of the estimate ≈ 0.6 %
    assert abs((offset - means[..., None, None]).std().item() - (1 - 1 / 256) ** 0.5) < 0.01


def test_every_name_train_py_had_is_still_importable_from_it():
    """train.py was split into training/ (config, data set, run state, grids) and cli.py (the `train` command); the
    names it held before stay importable from ldm_scratch.train, for notebooks, scripts and users' code."""
    import ldm_scratch.train as recipe

    names = ("TrainConfig STAGE2_FIELDS train build_models AutoencoderLoss TextToEps training_noise "
             "learning_rate render_training_set to_model_range tokenize_all generate save_grid GRID_CAPTIONS "
             "sample_grid save_checkpoint load_checkpoint setup_distributed wrap add_train_arguments cmd_train main")
    assert [name for name in names.split() if not hasattr(recipe, name)] == []
