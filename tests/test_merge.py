"""Checkpoint merging (ldm_scratch/merging.py): the web UI's weighted-sum and add-difference rules, tensor by tensor,
on tiny random models in the official single-file layout; refusals; and that at most one tensor per input is held."""
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_scratch import merging
from ldm_scratch.checkpoint import TensorFile, load_models
from pipeline_fixtures import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # many tiny tensors: threads only contend

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A, B, C: tiny SD v1 files of the same architecture with different random weights. A also carries a DDPM
    buffer and position ids (kept from A), C lacks one UNet tensor (B's is added whole)."""
    folder = tmp_path_factory.mktemp("merge")
    paths = {name: write_tiny_checkpoint(folder / f"{name}.safetensors", seed=seed)
             for name, seed in (("A", 0), ("B", 10), ("C", 20))}
    a = load_file(str(paths["A"]))
    a["betas"] = torch.linspace(0.1, 0.2, 5)
    a[POSITION_IDS] = torch.arange(77)[None]
    save_file(a, str(paths["A"]), metadata=TensorFile(paths["B"]).metadata)
    c = load_file(str(paths["C"]))
    del c["model.diffusion_model.out.2.bias"]
    save_file(c, str(paths["C"]))
    return paths


def test_weighted_sum(models, tmp_path):
    out = tmp_path / "m.safetensors"
    report = merging.merge_checkpoints(models["A"], models["B"], out, alpha=0.3)
    a, b, m = (load_file(str(p)) for p in (models["A"], models["B"], out))
    assert list(m) == list(a)                      # A's keys, in A's order
    for key in a:
        if key in ("betas", POSITION_IDS):
            assert torch.equal(m[key], a[key]), key   # not model weights / skipped: A's, unchanged
        else:
            assert torch.equal(m[key], 0.7 * a[key] + 0.3 * b[key]), key   # θ = (1 − α)·A + α·B
    assert report.merged == len(a) - 2 and report.copied == 2
    load_models(out)                                # the result is a loadable model (A's config metadata kept)


def test_add_difference(models, tmp_path):
    out = tmp_path / "m.safetensors"
    merging.merge_checkpoints(models["A"], models["B"], out, alpha=0.8, method="add-difference", base=models["C"])
    a, b, c, m = (load_file(str(p)) for p in (models["A"], models["B"], models["C"], out))
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.decoder.conv_out.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(m[key], a[key] + 0.8 * (b[key] - c[key])), key         # θ = A + α·(B − C)
    key = "model.diffusion_model.out.2.bias"                                        # C lacks it: C_k = 0
    assert torch.equal(m[key], a[key] + 0.8 * b[key])


def test_inpainting_a_keeps_its_extra_input_channels(models, tmp_path):
    inpaint = write_tiny_checkpoint(tmp_path / "inpaint.safetensors", in_channels=9, seed=5)
    out = tmp_path / "m.safetensors"
    report = merging.merge_checkpoints(inpaint, models["B"], out, alpha=1.0, method="add-difference",
                                       base=models["C"])
    a, b, c, m = (load_file(str(p)) for p in (inpaint, models["B"], models["C"], out))
    assert report.extra_channels_kept and m[INPUT_CONV].shape[1] == 9
    assert torch.equal(m[INPUT_CONV][:, :4], a[INPUT_CONV][:, :4] + 1.0 * (b[INPUT_CONV] - c[INPUT_CONV]))
    assert torch.equal(m[INPUT_CONV][:, 4:], a[INPUT_CONV][:, 4:])
    with pytest.raises(merging.MergeError, match="A must be the inpainting model"):
        merging.merge_checkpoints(models["B"], inpaint, tmp_path / "n.safetensors", alpha=0.5)


def test_ckpt_input_half_output_and_model_keys_only_in_a(models, tmp_path):
    b = load_file(str(models["B"]))
    del b["first_stage_model.decoder.conv_out.bias"]
    torch.save(b, tmp_path / "b.ckpt")             # a plain dict of tensors, read with weights_only=True
    out = tmp_path / "m.safetensors"
    report = merging.merge_checkpoints(models["A"], tmp_path / "b.ckpt", out, alpha=0.5, half=True)
    assert report.only_in_a == ["first_stage_model.decoder.conv_out.bias"]
    m, a = load_file(str(out)), load_file(str(models["A"]))
    assert m["first_stage_model.decoder.conv_out.bias"].dtype == torch.float16
    key = "first_stage_model.decoder.conv_out.bias"
    assert torch.equal(m[key], a[key].half())
    assert m[POSITION_IDS].dtype == torch.int64


def test_streaming_holds_one_tensor_per_input(models, tmp_path, monkeypatch):
    """Count the tensors read from the inputs that are still alive: never more than one per input (A, B, C)."""
    alive, peak, reads = set(), [0], [0]
    original_get = TensorFile.get

    def counting_get(self, key):
        tensor = original_get(self, key)
        token = object()
        alive.add(id(token))
        holder = tensor.view(tensor.shape)         # a view we can attach a finaliser to; it keeps `tensor` alive
        weakref.finalize(holder, alive.discard, id(token))
        reads[0] += 1
        peak[0] = max(peak[0], len(alive))
        return holder

    monkeypatch.setattr(TensorFile, "get", counting_get)
    merging.merge_checkpoints(models["A"], models["B"], tmp_path / "m.safetensors", alpha=0.5,
                              method="add-difference", base=models["C"])
    assert reads[0] > 2 * len(load_file(str(models["A"])))   # every tensor of A, B and C was read …
    assert peak[0] <= 3, f"{peak[0]} input tensors were alive at once"   # … but at most one of each at a time


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------

def test_refuses_different_model_types(models, tmp_path):
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(models["B"])).items()
                if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae.safetensors"))
    with pytest.raises(merging.MergeError, match="different kinds of model.*vae-only"):
        merging.merge_checkpoints(models["A"], tmp_path / "vae.safetensors", tmp_path / "m.safetensors", alpha=0.5)
    v2 = load_file(str(models["B"]))
    v2["cond_stage_model.model.ln_final.weight"] = torch.ones(4)     # an OpenCLIP (SD 2.x) text tower
    save_file(v2, str(tmp_path / "v2.safetensors"))
    with pytest.raises(merging.MergeError, match="sd-v2"):
        merging.merge_checkpoints(models["A"], tmp_path / "v2.safetensors", tmp_path / "m.safetensors", alpha=0.5)
    assert not (tmp_path / "m.safetensors").exists()


def test_refuses_different_shapes(models, tmp_path):
    b = load_file(str(models["B"]))
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    b[key] = torch.zeros(65, b[key].shape[1])
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(merging.MergeError, match=r"different shapes.*mlp\.fc1\.weight A \[64, 32\] B \[65, 32\]"):
        merging.merge_checkpoints(models["A"], tmp_path / "b.safetensors", tmp_path / "m.safetensors", alpha=0.5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="add-difference"), "needs the base model"),
    (dict(method="weighted", base="C"), "only used by"),
    (dict(method="sum"), "unknown merge method"),
    (dict(alpha=float("nan")), "not a number"),
    (dict(out="m.ckpt"), "written as .safetensors"),
])
def test_refuses_bad_requests(models, tmp_path, kwargs, words):
    kwargs = {"alpha": 0.5, "out": "m.safetensors", **kwargs}
    kwargs["out"] = tmp_path / kwargs["out"]
    if kwargs.get("base") == "C":
        kwargs["base"] = models["C"]
    with pytest.raises(merging.MergeError, match=words):
        merging.merge_checkpoints(models["A"], models["B"], **kwargs)


def test_never_overwrites_without_force(models, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(merging.MergeError, match="--force"):
        merging.merge_checkpoints(models["A"], models["B"], out, alpha=0.5)
    assert out.read_bytes() == b"precious"
    merging.merge_checkpoints(models["A"], models["B"], out, alpha=0.5, force=True)
    assert len(load_file(str(out))) == len(load_file(str(models["A"])))


def test_a_failed_merge_leaves_no_file(models, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    monkeypatch.setattr(merging, "_write_tensor", lambda f, t: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        merging.merge_checkpoints(models["A"], models["B"], out, alpha=0.5)
    assert list(tmp_path.iterdir()) == []


def test_cli_merge(models, tmp_path, capsys):
    from ldm_scratch.cli import main
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(models["A"]), str(models["B"]), "--alpha", "0.25", "--out", str(out)]) == 0
    assert "tensors merged" in capsys.readouterr().out
    a, b, m = (load_file(str(p)) for p in (models["A"], models["B"], out))
    key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(m[key], 0.75 * a[key] + 0.25 * b[key])
    assert main(["merge", str(models["A"]), str(models["B"]), "--alpha", "0.25", "--out", str(out)]) != 0
