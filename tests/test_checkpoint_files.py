"""Reading files: the safetensors reader, refusing bad files, pickles only through weights_only, and telling
SD v1 / v1-inpainting / v2 / SDXL apart from keys alone."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


W = '"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}'  # a valid entry: 12 bytes of data
B = '"b":{"dtype":"F16","shape":[2],"data_offsets":[12,16]}'  # the next 4 bytes
DATA = bytes(range(16))

# (what is wrong, the header's JSON text (or raw bytes), the data after it, words the message must hold). The
# header length is the text's length unless the case is about the length itself (then the raw file is given).
BAD_HEADERS = [
    ("file shorter than 8 bytes", None, b"\x02\x00\x00", "too short"),
    ("length beyond the file", None, b"\xff\x00\x00\x00\x00\x00\x00\x00{}", "header length 255 is not plausible"),
    ("length over the cap", None, (200_000_000).to_bytes(8, "little") + b"{}", "over 100,000,000 bytes"),
    ("not UTF-8", b'{"\xff":1}', b"", "not UTF-8"),
    ("not JSON", "{" + W, DATA[:12], "not valid JSON"),
    ("trailing NUL after the JSON", "{" + W + "}\x00", DATA[:12], "not valid JSON"),
    ("NaN", '{"__metadata__":{"a":NaN}}', b"", "NaN is not a JSON value"),
    ("a JSON array", "[]", b"", "not a JSON object"),
    ("duplicate tensor name", "{" + W + "," + W + "}", DATA[:12], "duplicate tensor name 'w'"),
    ("duplicate name through an escape", "{" + W + ',"\\u0077":{"dtype":"F32","shape":[0],"data_offsets":[12,12]}}',
     DATA[:12], "duplicate tensor name 'w'"),
    ("duplicate field", '{"w":{"dtype":"F32","dtype":"F32","shape":[3],"data_offsets":[0,12]}}', DATA[:12],
     "tensor 'w': duplicate field 'dtype'"),
    ("duplicate metadata key", '{"__metadata__":{"a":"1","a":"2"}}', b"", "__metadata__ has a duplicate key 'a'"),
    ("metadata value not a string", '{"__metadata__":{"a":1}}', b"", "__metadata__ value for 'a' is not a string"),
    ("metadata not an object", '{"__metadata__":["a"]}', b"", "__metadata__ is not a JSON object"),
    ("unknown field", '{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12],"offset":0}}', DATA[:12],
     "tensor 'w': unknown field 'offset'"),
    ("missing field", '{"w":{"dtype":"F32","data_offsets":[0,12]}}', DATA[:12], "tensor 'w': missing field 'shape'"),
    ("entry not an object", '{"w":[0,12]}', DATA[:12], "tensor 'w': its entry is not a JSON object"),
    ("unknown dtype", '{"w":{"dtype":"F33","shape":[3],"data_offsets":[0,12]}}', DATA[:12], "unknown dtype 'F33'"),
    ("negative size", '{"w":{"dtype":"F32","shape":[-3],"data_offsets":[0,12]}}', DATA[:12],
     "tensor 'w': shape [-3] is not a list of non-negative integers"),
    ("fractional size", '{"w":{"dtype":"F32","shape":[3.0],"data_offsets":[0,12]}}', DATA[:12], "shape [3.0]"),
    ("true as a size", '{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', DATA[:4], "shape [true]"),
    ("sizes whose product overflows", '{"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
     b"", "more elements than a 64-bit size can count"),
    ("-0 as an offset", '{"w":{"dtype":"F32","shape":[3],"data_offsets":[-0,12]}}', DATA[:12],
     "tensor 'w': data_offsets [-0.0, 12] is not a pair"),
    ("three offsets", '{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12,12]}}', DATA[:12], "is not a pair"),
    ("end before begin", '{"w":{"dtype":"F32","shape":[0],"data_offsets":[12,0]}}', b"", "end before they begin"),
    ("offsets disagree with dtype x shape", '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}', DATA[:12],
     "tensor 'w': data_offsets [0, 12] hold 12 bytes but F32 × [4] needs 16"),
    ("overlap", "{" + W + ',"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}', DATA[:12],
     "tensor 'b': data_offsets [8, 12] overlap tensor 'w', which ends at 12"),
    ("hole", "{" + W + ',"b":{"dtype":"F16","shape":[2],"data_offsets":[14,18]}}', DATA + b"xy",
     "tensor 'b': data_offsets [14, 18] leave a hole of 2 unindexed bytes"),
    ("not starting at 0", '{"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}', DATA[:8], "hole of 4"),
    ("bytes after the last tensor", "{" + W + "," + B + "}", DATA + b"polyglot", "8 bytes after the last tensor"),
    ("data cut short", "{" + W + "," + B + "}", DATA[:15], "truncated: the header promises 16 bytes"),
    ("a lone surrogate in a name", '{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', b"",
     "lone surrogate"),
]


@pytest.mark.parametrize("header, data, words", [case[1:] for case in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_damaged_safetensors_header_is_refused_naming_the_problem(tmp_path, header, data, words):
    if header is None:
        content = data
    else:
        raw = header.encode() if isinstance(header, str) else header
        content = len(raw).to_bytes(8, "little") + raw + data
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        TensorFile(tmp_path / "x.safetensors")
    assert words in str(error.value)
    assert "corrupt or was tampered with: re-download it" in str(error.value)


def test_unusual_but_valid_headers_are_read(tmp_path):
    """Whitespace around the JSON, a null __metadata__, empty tensors sharing an offset or sitting at the end."""
    header = (' \n{"__metadata__":null,"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},' + W + ","
              '"z":{"dtype":"BOOL","shape":[2,0],"data_offsets":[0,0]},"end":{"dtype":"F32","shape":[0],'
              '"data_offsets":[12,12]}}   ').encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + DATA[:12])
    file = TensorFile(tmp_path / "x.safetensors")
    assert file.metadata == {} and file.shapes == {"e": (0,), "w": (3,), "z": (2, 0), "end": (0,)}
    assert file.get("w").view(torch.uint8).tolist() == list(range(12))
    with safe_open(tmp_path / "x.safetensors", framework="pt") as reference:  # the library agrees it is valid
        assert list(reference.keys()) == sorted(file.shapes) and torch.equal(reference.get_tensor("w"), file.get("w"))


def test_file_shortened_after_opening_is_refused_when_read(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "a.safetensors")
    file = TensorFile(tmp_path / "a.safetensors")
    with open(tmp_path / "a.safetensors", "r+b") as f:
        f.truncate((tmp_path / "a.safetensors").stat().st_size - 40)
    with pytest.raises(CheckpointError, match="needs 400 bytes but only 360 could be read"):
        file.get("w")


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
