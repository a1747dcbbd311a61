"""TAESD (fast/taesd.py): parity with diffusers' AutoencoderTiny on random weights (decode and encode), the three
published layouts (taesd_encoder/decoder .pth and .safetensors, the diffusers folder) loading to the same numbers,
the conventions of each API, strict loading and bad files, per-step previews, and TAESD standing in for pipe.vae."""
import pytest
import torch
from safetensors.torch import save_file

from ldm_scratch.checkpoint import CheckpointError
from ldm_scratch.fast.taesd import TAESD, is_taesd, load_taesd, preview, preview_callback

pytestmark = pytest.mark.usefixtures("one_thread")

# Known names and shapes of the official madebyollin/taesd files (their nn.Sequential indices), as a fact check
OFFICIAL_DECODER = {"1.weight": (64, 4, 3, 3), "1.bias": (64,), "3.conv.0.weight": (64, 64, 3, 3),
                    "7.weight": (64, 64, 3, 3), "18.conv.4.bias": (64,), "19.weight": (3, 64, 3, 3), "19.bias": (3,)}
OFFICIAL_ENCODER = {"0.weight": (64, 3, 3, 3), "1.conv.0.weight": (64, 64, 3, 3), "2.weight": (64, 64, 3, 3),
                    "13.conv.4.bias": (64,), "14.weight": (4, 64, 3, 3), "14.bias": (4,)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random diffusers AutoencoderTiny (SD's config), saved as a folder; every parameter random and non-zero."""
    diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
    torch.manual_seed(0)
    model = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in model.parameters():  # biases too: the default init leaves some small, which would hide a swap
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))
    folder = tmp_path_factory.mktemp("taesd") / "taesd-diffusers"
    model.save_pretrained(folder)
    return model, folder


def official_files(taesd: TAESD, folder, suffix: str):
    """taesd_encoder / taesd_decoder in the official layout: each half's own state dict, keys `N.…`."""
    folder.mkdir(exist_ok=True)
    for half in ("encoder", "decoder"):
        state = {k: v.contiguous() for k, v in getattr(taesd, half).state_dict().items()}
        path = folder / f"taesd_{half}{suffix}"
        torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    return folder / f"taesd_encoder{suffix}", folder / f"taesd_decoder{suffix}"


@pytest.mark.parity
def test_decode_and_encode_equal_diffusers_autoencoder_tiny(reference):
    """Measured max |ours − diffusers|: decoder and encoder 0 (the same convolutions in the same order); through
    the KL-VAE interface decode 3.3e-6 (z / s · s rounds, and the decoder amplifies it; outputs up to 2.3), encode
    3e-8. Bound 1e-5: three times the largest."""
    model, folder = reference
    taesd = load_taesd(folder)
    assert is_taesd(folder)
    g = torch.Generator().manual_seed(1)
    latents, image = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        theirs_image, theirs_latents = model.decode(latents).sample, model.encode(image).latents
        # the taesd-repo convention: scaled latents in, [0, 1] out / [0, 1] in
        torch.testing.assert_close(taesd.decoder(latents) * 2 - 1, theirs_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(taesd.encoder((image + 1) / 2), theirs_latents, rtol=0, atol=1e-5)
        # the KL-VAE's interface (pipe.vae): unscaled latents, [−1, 1] images
        torch.testing.assert_close(taesd.decode(latents / taesd.latent_scale), theirs_image, rtol=0, atol=1e-5)
        torch.testing.assert_close(taesd.encode(image).mean * taesd.latent_scale, theirs_latents, rtol=0, atol=1e-5)
        assert theirs_image.abs().max() > 0.5 and theirs_latents.abs().max() > 0.5   # not a vacuous comparison


@pytest.mark.parity
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_files_load_to_the_same_weights(reference, tmp_path, suffix):
    _, folder = reference
    ours = load_taesd(folder)
    encoder, decoder = official_files(ours, tmp_path, suffix)
    for half, known in (("encoder", OFFICIAL_ENCODER), ("decoder", OFFICIAL_DECODER)):
        state = getattr(ours, half).state_dict()
        assert {k: tuple(state[k].shape) for k in known} == known and len(state) == 67
    assert "7.bias" not in ours.decoder.state_dict()  # the convolutions after each upsample have no bias
    for loaded in (load_taesd(encoder, decoder), load_taesd(decoder)):  # the encoder beside the decoder is found
        for half in ("encoder", "decoder"):
            a, b = getattr(loaded, half).state_dict(), getattr(ours, half).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_decoder_alone_decodes_and_refuses_to_encode(tmp_path):
    _, decoder = official_files(TAESD(), tmp_path, ".safetensors")
    (tmp_path / "taesd_encoder.safetensors").unlink()
    taesd = load_taesd(decoder)
    assert taesd.encoder is None and taesd.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="has no encoder"):
        taesd.encode(torch.zeros(1, 3, 16, 16))


def test_bad_files_are_refused_with_the_reason(tmp_path):
    encoder, decoder = official_files(TAESD(), tmp_path, ".safetensors")
    kl = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, kl)
    with pytest.raises(CheckpointError, match="not a TAESD file"):
        load_taesd(kl)
    assert is_taesd(decoder) and is_taesd(encoder) and not is_taesd(kl) and not is_taesd(tmp_path / "absent.pth")
    copy = tmp_path / "copy_decoder.safetensors"
    copy.write_bytes(decoder.read_bytes())
    with pytest.raises(CheckpointError, match="two decoders given"):
        load_taesd(decoder, copy)
    from safetensors.torch import load_file
    state = load_file(decoder)
    del state["19.bias"]
    save_file(state, tmp_path / "broken_decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*19\.bias"):
        load_taesd(tmp_path / "broken_decoder.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_taesd(tmp_path / "empty")


def test_a_pickle_with_code_is_not_loaded(tmp_path):
    """.pth files are opened with weights_only=True: an object that would run code on unpickling is refused."""
    path = tmp_path / "taesd_decoder.pth"
    torch.save({"1.weight": torch.zeros(1), "extra": print}, path)
    with pytest.raises(CheckpointError):
        load_taesd(path)


def test_previews_are_pictures_of_each_step(tmp_path):
    _, decoder = official_files(TAESD(), tmp_path, ".safetensors")
    taesd, shown = load_taesd(decoder), []
    images = preview(taesd, torch.randn(2, 4, 8, 8))
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    callback = preview_callback(taesd, lambda i, t, pictures: shown.append((i, len(pictures))), every=2)
    for i in range(5):
        callback(i, 999 - i, torch.randn(1, 4, 8, 8))
    assert shown == [(0, 1), (2, 1), (4, 1)]


def test_taesd_stands_in_for_the_pipeline_vae(tmp_path):
    """pipe.vae = TAESD (the KL-VAE's interface): txt2img's picture is TAESD's decoder on the final latents. The
    pipeline's own ÷ latent_scale and decode's × latent_scale cancel: measured max difference 3.4e-8 on [0, 1]
    pixels; bound 1e-5. (The bundled tiny model's VAE downsamples by 4, TAESD by 8: its pictures come out at twice
    the size, so only the plumbing is tested here; encoding is in the parity test above.)"""
    import ldm_scratch
    from pipeline_fixtures import write_vocabulary
    pipe = ldm_scratch.load_pipeline(tokenizer=write_vocabulary(tmp_path))
    torch.manual_seed(0)
    pipe.vae = TAESD(latent_channels=pipe.config.latent_channels, latent_scale=pipe.latent_scale).eval()
    args = dict(steps=2, seed=1, height=64, width=64, progress=False, sampler="lcm", guidance_scale=1.0)
    latents = pipe.txt2img("a red circle", output_type="latent", **args)
    image = pipe.txt2img("a red circle", output_type="pt", **args)
    with torch.no_grad():
        expected = pipe.vae.decoder(latents).clamp(0, 1)
    assert image.shape == (1, 3, 128, 128)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)


def test_load_pipeline_takes_a_taesd_file_as_its_vae(tmp_path):
    """load_pipeline(vae=taesd_decoder.*) puts TAESD in place of the KL-VAE, paired with the model's latent scale
    (the encoder beside the decoder file comes along)."""
    import numpy as np

    import ldm_scratch
    from pipeline_fixtures import write_vocabulary
    _, decoder = official_files(TAESD(), tmp_path / "taesd", ".safetensors")
    pipe = ldm_scratch.load_pipeline(tokenizer=write_vocabulary(tmp_path), vae=decoder)
    assert isinstance(pipe.vae, TAESD) and pipe.vae.encoder is not None
    assert pipe.vae.latent_scale == pytest.approx(pipe.latent_scale)
    image = pipe.txt2img("a red circle", steps=2, sampler="lcm", guidance_scale=1.0, seed=0, output_type="np",
                         progress=False)
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()  # TAESD's ×8 on the tiny model's latents
