"""The diffusers folder layout (unet/, vae/, text_encoder/ with config.json) loads to exactly the same model as the
official single file holding the same weights."""
import pytest
import torch
from safetensors.torch import load_file

from ldm_scratch.checkpoint import CheckpointError, describe, load_models, save_official
from tinymodels import random_networks, tiny_config

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    pytest.importorskip("transformers", reason="needs the [reference] extra")
    from reference_models import reference_networks
    root = tmp_path_factory.mktemp("folder")
    config = tiny_config()
    single = save_official(root / "tiny.safetensors", *random_networks(config, seed=3), config)
    text_encoder, unet, vae = reference_networks(load_file(single), config)
    folder = root / "tiny-diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    return single, folder


def test_folder_and_single_file_give_identical_networks(files):
    single, folder = files
    a, b = load_models(single), load_models(folder)
    assert b.config.unet == a.config.unet and b.config.vae == a.config.vae
    assert b.config.text_encoder == a.config.text_encoder  # head counts read from the folders' config.json
    for name in ("text_encoder", "unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)
    torch.manual_seed(0)
    ids, z = torch.randint(0, 49408, (1, 77)), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.unet(z, torch.tensor(500), a.text_encoder(ids)), b.unet(z, torch.tensor(500), b.text_encoder(ids)))
        assert torch.equal(a.vae.decode(z), b.vae.decode(z))


def test_inspect_describes_a_folder(files):
    _, folder = files
    report = describe(folder)
    assert "diffusers folder" in report and "unet" in report and "unmapped" not in report


def test_folder_without_a_network_is_refused(files, tmp_path):
    _, folder = files
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="no text_encoder/ sub-folder"):
        load_models(tmp_path)
