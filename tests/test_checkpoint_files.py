"""Reading files: the safetensors reader, refusing bad files, pickles only through weights_only, and telling
SD v1 / v1-inpainting / v2 / SDXL apart from keys alone."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_scratch.checkpoint import CheckpointError, TensorFile, ema_key, identify, reference_keys

KEYS = reference_keys()
V2_KEYS = json.loads((Path(__file__).parents[1] / "ldm_scratch" / "checkpoint" / "keys" / "sd-v2-checkpoint-keys.json").read_text())


def shapes_of(*sections, keys=KEYS):
    return {k: tuple(v) for section in sections for k, v in keys[section].items()}


def test_safetensors_reader_reads_every_dtype_exactly(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(7), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"note": "hi"})
    file = TensorFile(tmp_path / "a.safetensors")
    assert file.metadata == {"note": "hi"}
    for key, tensor in tensors.items():
        assert file.shapes[key] == tuple(tensor.shape)
        assert torch.equal(file.get(key), tensor), key


def test_truncated_safetensors_is_refused_with_the_reason(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorFile(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_non_safetensors_content_is_refused(tmp_path, content):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        TensorFile(tmp_path / "x.safetensors")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown file type"):
        TensorFile(tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="no such file"):
        TensorFile(tmp_path / "absent.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_ckpt_is_opened_only_with_weights_only(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 3}, tmp_path / "good.ckpt")
    file = TensorFile(tmp_path / "good.ckpt")  # CompVis wraps the tensors in 'state_dict'
    assert torch.equal(file.get("a"), torch.ones(2))
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"a": Evil()}}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        TensorFile(tmp_path / "evil.ckpt")


def test_identify_from_keys():
    assert identify(shapes_of("unet", "vae", "text_encoder")) == "sd-v1"
    assert identify(shapes_of("unet", "vae", "text_encoder", "ddpm_buffers", "model_ema")) == "sd-v1"
    inpainting = shapes_of("unet", "vae", "text_encoder")
    inpainting.update({k: tuple(v) for k, v in KEYS["inpainting"]["changed_shapes"].items()})
    assert identify(inpainting) == "sd-v1-inpainting"
    assert identify(shapes_of("unet", "vae", "text_encoder", keys=V2_KEYS)) == "sd-v2"
    assert identify({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                     "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) == "sdxl"
    assert identify({"encoder.conv_in.weight": (128, 3, 3, 3)}) == "vae-only"
    assert identify({"foo": (1,)}) == "unknown"


def test_ema_names_follow_litema():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    unet = [k for k in KEYS["unet"]]
    assert {ema_key(k) for k in unet} | {"model_ema.decay", "model_ema.num_updates"} == set(KEYS["model_ema"])
