"""ldm_scratch.editing on the bundled tiny model: DAAM attention maps, prompt-to-prompt, DDIM / null-text inversion.
Few steps everywhere (the measured results on many cases are scripts/editing_experiments.py's)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ldm_scratch
from ldm_scratch import editing
from ldm_scratch.data import render
from ldm_scratch.editing.maps import CrossAttentionSum, feature_map_size
from ldm_scratch.editing.prompt_to_prompt import PromptToPromptEdit

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return ldm_scratch.load_pipeline()


# -- attention maps -------------------------------------------------------------------------------------------------

def test_maps_are_keyed_by_position_and_token_at_image_size(pipe):
    maps = editing.attention_maps(pipe, "a red circle on a red background", seed=0, steps=3)
    assert list(maps) == [(1, "a"), (2, "red"), (3, "circle"), (4, "on"), (5, "a"), (6, "red"), (7, "background")]
    assert all(m.shape == (64, 64) for m in maps.values()) and maps.image.size == (64, 64)
    assert not torch.equal(maps[(2, "red")], maps[(6, "red")])       # the repeated word: two different maps
    assert all(m.min() > -0.05 and m.max() < 1 for m in maps.values())   # probabilities (bicubic may dip < 0)
    shown = editing.overlay(maps.image, maps[(3, "circle")])
    assert shown.size == (64, 64) and shown.mode == "RGB"


def test_maps_are_means_of_probabilities(pipe):
    """D = mean over steps, layers, heads of the upsampled maps: over all 77 keys it sums to 1 at every pixel."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    recorder = CrossAttentionSum((16, 16), rows=1)
    context = editing.denoise.encode_text(pipe, ["", SOURCE])
    with ldm_scratch.attention.hooks(pipe.unet, recorder):
        editing.denoise.denoise(pipe, noise, context[1:], context[:1], 2, 7.5)
    assert recorder.count == 2 * 11 * 2                                 # steps × cross layers × heads
    total = recorder.upsampled(64, 64).sum(dim=1)                       # [1, 64, 64]
    assert (total - 1).abs().max() < 1e-4                               # measured 1.8e-7 (bicubic keeps constants)
    assert feature_map_size(64, 16, 16) == (8, 8) and feature_map_size(4, 15, 15) == (2, 2)
    with pytest.raises(ValueError, match="no halving"):
        feature_map_size(10, 16, 16)


def test_maps_reject_bad_arguments(pipe):
    with pytest.raises(ValueError, match="non-empty string"):
        editing.attention_maps(pipe, "  ")
    with pytest.raises(ValueError, match="steps"):
        editing.attention_maps(pipe, SOURCE, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        editing.overlay(np.zeros((8, 8, 3), np.uint8), torch.rand(8, 8), alpha=2)


# -- prompt-to-prompt -----------------------------------------------------------------------------------------------

def test_source_is_the_plain_ddim_image_and_no_edit_is_two_plain_images(pipe):
    src, edited = editing.prompt_to_prompt(pipe, SOURCE, TARGET, seed=3, steps=4, cross_replace=0, self_replace=0,
                                           output_type="np")
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    plain = pipe.txt2img([SOURCE, TARGET], sampler="ddim", steps=4, output_type="np", progress=False, latents=noise)
    # the same loop as the pipeline's DDIM sampler; the explicit softmax path differs by float rounding only
    assert np.abs(src[0] - plain[0]).max() < 1e-4                       # measured 3.1e-6
    assert np.abs(edited[0] - plain[1]).max() < 1e-4                    # measured 3.8e-6


def test_word_swap_keeps_the_source_and_changes_the_target(pipe):
    options = dict(seed=1, steps=4, output_type="np")
    plain_src, plain_tgt = editing.prompt_to_prompt(pipe, SOURCE, TARGET, cross_replace=0, self_replace=0, **options)
    src, edited = editing.prompt_to_prompt(pipe, SOURCE, TARGET, **options)
    assert np.abs(src - plain_src).max() < 1e-5                         # only the target row is edited (0.0)
    assert np.abs(edited - plain_tgt).max() > 1e-1                      # … and it is (measured 0.80)
    full_src, full_tgt = editing.prompt_to_prompt(pipe, SOURCE, TARGET, cross_replace=1, self_replace=1, **options)
    # every map copied for every step: the target differs from the source only through its values (the colour)
    assert np.abs(full_tgt - full_src).mean() < np.abs(plain_tgt - plain_src).mean()   # measured 0.106 < 0.139


def test_token_alignment():
    # swap: the same token count maps j → j
    assert editing.token_alignment([49406, 1, 2, 49407, 49407], [49406, 1, 3, 49407, 49407]) == [0, 1, 2, 3, 4]
    # refinement: "a circle" → "a red circle": the new token has no source, the others shift by one
    src = [49406, 320, 2866, 49407, 49407, 49407]
    tgt = [49406, 320, 736, 2866, 49407, 49407]
    assert editing.token_alignment(src, tgt) == [0, 1, -1, 2, 3, 4]


def test_refinement_and_reweighting_run_and_act(pipe):
    options = dict(seed=2, steps=4, output_type="np")
    _, refined = editing.prompt_to_prompt(pipe, "a circle on a blue background", "a red circle on a blue background",
                                          **options)
    _, plain = editing.prompt_to_prompt(pipe, "a circle on a blue background", "a red circle on a blue background",
                                        cross_replace=0, self_replace=0, **options)
    assert np.abs(refined - plain).max() > 1e-2
    _, weighted = editing.prompt_to_prompt(pipe, SOURCE, SOURCE, reweight={"red": 3.0}, **options)
    src, same = editing.prompt_to_prompt(pipe, SOURCE, SOURCE, **options)
    assert np.abs(same - src).max() < 1e-5                              # nothing to edit: the same image (0.0)
    assert np.abs(weighted - src).max() > 1e-1                          # measured 0.74
    with pytest.raises(ValueError, match="'purple' is not in the prompt"):
        editing.prompt_to_prompt(pipe, SOURCE, TARGET, reweight={"purple": 2.0}, steps=2)


def test_edit_touches_only_the_conditional_target_row():
    edit = PromptToPromptEdit(steps=10, cross_replace=0.5, self_replace=0.5, alignment=[0, 2, 1, -1],
                              weights=torch.tensor([1.0, 1.0, 2.0, 1.0]), latent_size=(8, 8))
    probs = torch.rand(4, 2, 4, 4).softmax(-1)                          # [uncond src, uncond tgt, src, tgt]
    cross = edit(None, "cross", None, None, None, probs)
    assert torch.equal(cross[:3], probs[:3])
    expected = torch.stack([probs[2][..., 0], probs[2][..., 2], 2 * probs[2][..., 1], probs[3][..., 3]], dim=-1)
    assert torch.allclose(cross[3], expected)                           # (M_t)_{i,A(j)}, c_j, new tokens kept
    assert torch.equal(edit(None, "self", None, None, None, probs)[3], probs[2])   # 4 ≤ 64 / 16 queries: copied
    edit.step = 5
    assert edit(None, "cross", None, None, None, probs) is None and edit(None, "self", None, None, None, probs) is None


def test_edit_unconditional_also_edits_the_unconditional_target_row():
    edit = PromptToPromptEdit(steps=10, cross_replace=0.5, self_replace=0.5, alignment=list(range(4)),
                              weights=torch.ones(4), latent_size=(8, 8), unconditional=True)
    probs = torch.rand(4, 2, 4, 4).softmax(-1)                          # [uncond src, uncond tgt, src, tgt]
    for kind in ("cross", "self"):
        out = edit(None, kind, None, None, None, probs)
        assert torch.equal(out[0], probs[0]) and torch.equal(out[2], probs[2])     # the sources stay
        assert torch.equal(out[1], probs[0]) and torch.equal(out[3], probs[2])     # each target takes its source's
    two_rows = probs[2:]                                                # guidance 1: no unconditional rows
    assert torch.equal(edit(None, "self", None, None, None, two_rows)[1], probs[2])


def test_self_replace_share_picks_the_layers_whose_self_attention_is_copied():
    probs = torch.rand(4, 2, 16, 16).softmax(-1)                        # a 4×4 layer: 16 queries
    for share, copied in ((16, False), (4, True), (1, True)):           # 64 / 16 = 4 < 16 ≤ 64 / 4
        edit = PromptToPromptEdit(steps=10, cross_replace=0.5, self_replace=0.5, alignment=list(range(4)),
                                  weights=torch.ones(4), latent_size=(8, 8), self_replace_share=share)
        out = edit(None, "self", None, None, None, probs.clone())
        assert (out is not None and torch.equal(out[3], probs[2])) is copied, share


def test_local_blend_keeps_the_source_outside_the_mask():
    edit = PromptToPromptEdit(steps=10, cross_replace=0.5, self_replace=0.5, alignment=list(range(4)),
                              weights=torch.ones(4), latent_size=(4, 4), blend_positions=([1], [1]))
    probs = torch.zeros(4, 1, 16, 4)
    probs[..., 0] = 1
    probs[2:, :, 5, :] = torch.tensor([0, 1.0, 0, 0])                   # the word sits on latent pixel (1, 1)
    edit(None, "cross", None, None, None, probs)
    x = torch.randn(2, 4, 4, 4)
    blended = edit.blend(5, 10, x)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:3, 0:3] = True                                             # grown by one pixel (3×3 max-pool)
    assert torch.equal(blended[1][:, inside], x[1][:, inside])          # the edit is kept where the word is
    assert torch.equal(blended[1][:, ~inside], x[0][:, ~inside])        # and the source everywhere else
    assert torch.equal(blended[0], x[0])


def test_local_blend_runs_end_to_end_and_checks_words(pipe):
    src, edited = editing.prompt_to_prompt(pipe, SOURCE, TARGET, seed=0, steps=4, local_blend="circle")
    assert src.size == edited.size == (64, 64)
    with pytest.raises(ValueError, match="local_blend"):
        editing.prompt_to_prompt(pipe, SOURCE, TARGET, steps=2, local_blend="star")
    with pytest.raises(ValueError, match="cross_replace"):
        editing.prompt_to_prompt(pipe, SOURCE, TARGET, cross_replace=1.5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="self_replace_share"):
            editing.prompt_to_prompt(pipe, SOURCE, TARGET, self_replace_share=bad)


# -- inversion ------------------------------------------------------------------------------------------------------

def psnr(a, b) -> float:
    return float(10 * np.log10(1 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@pytest.fixture(scope="module")
def shape_image():
    return render("circle", "red", "blue", rng=np.random.default_rng(7))   # rendered, not generated


def test_ddim_inversion_without_guidance_reproduces_the_image(pipe, shape_image):
    inv = editing.invert(pipe, shape_image, SOURCE, steps=10, guidance_scale=1.0)
    assert inv.latents.shape == (1, 4, 16, 16) and inv.null_embeddings is None and len(inv.trajectory) == 11
    with torch.no_grad():
        vae_only = editing.denoise.latents_to_output(pipe, inv.trajectory[0], "np")[0]   # D(E(x)): the ceiling
    back = editing.regenerate(pipe, inv, "np")[0]
    assert psnr(back, vae_only) > 25                                    # measured 28.4 dB


def test_null_text_inversion_beats_plain_inversion_under_guidance(pipe):
    small = render("circle", "red", "blue", size=32, rng=np.random.default_rng(7))   # 32²: a quarter of the work
    plain = editing.invert(pipe, small, SOURCE, steps=4)
    # learning rate 0.1, not the authors' 0.01: with only 4 Adam steps the small one barely moves ∅_t here
    # (measured at 64²: 0.43 / 0.58 of the plain error with 0.01, 0.076 / 0.58 with 0.1)
    tuned = editing.invert(pipe, small, SOURCE, steps=4, null_text=True, inner_steps=4, learning_rate=0.1)
    assert len(tuned.null_embeddings) == 4 and tuned.null_embeddings[0].shape == (1, 77, 32)
    z0 = plain.trajectory[0]
    error_plain = (editing.regenerate(pipe, plain, "latent") - z0).square().mean()
    error_tuned = (editing.regenerate(pipe, tuned, "latent") - z0).square().mean()
    assert error_tuned < 0.3 * error_plain                              # measured 0.024 × (2.24 → 0.053)
    # editing the inverted image: the source row is the regeneration, the target is changed
    src, edited = editing.prompt_to_prompt(pipe, SOURCE, TARGET, inversion=tuned, output_type="latent")
    assert (src - editing.regenerate(pipe, tuned, "latent")).abs().max() < 1e-4
    assert (edited - src).abs().max() > 1e-2


def test_models_the_loop_cannot_run_are_refused(pipe):
    v_model = SimpleNamespace(schedule=SimpleNamespace(config=SimpleNamespace(prediction_type="v_prediction")),
                              config=pipe.config)
    for call in (lambda p: editing.attention_maps(p, SOURCE), lambda p: editing.prompt_to_prompt(p, SOURCE, TARGET),
                 lambda p: editing.invert(p, np.zeros((64, 64, 3), np.uint8), SOURCE)):
        with pytest.raises(ValueError, match="ε-predicting"):
            call(v_model)
    inpainting = SimpleNamespace(schedule=pipe.schedule, config=SimpleNamespace(
        latent_channels=4, unet=SimpleNamespace(in_channels=9)))
    with pytest.raises(ValueError, match="9 input channels"):
        editing.attention_maps(inpainting, SOURCE)


def test_invert_rejects_bad_input(pipe, shape_image):
    with pytest.raises(TypeError, match="image"):
        editing.invert(pipe, 3, SOURCE)
    with pytest.raises(ValueError, match="steps"):
        editing.invert(pipe, shape_image, SOURCE, steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        editing.invert(pipe, shape_image, SOURCE, guidance_scale=0.5)
    with pytest.raises(ValueError, match="one image"):
        editing.invert(pipe, [shape_image, shape_image], SOURCE)
