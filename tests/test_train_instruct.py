"""Training a tiny InstructPix2Pix (ldm_scratch/training/instruct.py, instruct_data.py, scripts/train_instruct.py):
the widened UNet starts as the old one, the edit pairs differ in one attribute only, the conditioning dropout has
the paper's rates, a 2-step run writes a file that `load_pipeline` loads and `pipe.instruct` runs, an existing
output is never replaced without --force, and bad input fails early with a clear message.
"""
import json

import numpy as np
import pytest
import torch

from ldm_scratch.checkpoint import load_models
from ldm_scratch.data import check
from ldm_scratch.pipeline import load_pipeline
from ldm_scratch.samplers import get_sampler
from ldm_scratch.diffusion import PREDICTION_TYPES, Schedule, ScheduleConfig
from ldm_scratch.training.instruct import (EditData, InstructTrainConfig, drop_conditions, history_path,
                                           instruct_loss, loss_weights, train_instruct)
from ldm_scratch.training.instruct_network import InstructEps, copy_image_init, fold_image_scale, widen_input
from ldm_scratch.training.instruct_data import (HELDOUT_EDITS, VALIDATION_EDITS, Edit, allowed_edits, edit_pairs,
                                                 instruction)
from ldm_scratch.train import training_target
from ldm_scratch.unet import UNet
from pipeline_fixtures import write_tiny_checkpoint, write_vocabulary
from tinymodels import randomize, tiny_config
from train_instruct import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------------------------

def test_widened_unet_starts_as_the_old_one():
    unet = randomize(UNet(tiny_config().unet), seed=1).eval()
    wide = widen_input(unet, 8).eval()
    assert wide.config.in_channels == 8 and wide.input_conv.weight.shape[1] == 8
    assert torch.equal(wide.input_conv.weight[:, :4], unet.input_conv.weight)         # old weights copied
    assert torch.count_nonzero(wide.input_conv.weight[:, 4:]) == 0                      # new ones exactly 0
    old_state, new_state = unet.state_dict(), wide.state_dict()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state if k != "input_conv.weight")
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet(x, t, context)
        # zero extra channels: the 8-channel convolution adds exact zeros to the same products
        zeros = wide(torch.cat([x, torch.zeros_like(x)], dim=1), t, context)
        # any image latents: 0 · c_I is 0 too, so the output is still the old model's
        image = wide(torch.cat([x, 3 * torch.randn(x.shape, generator=generator)], dim=1), t, context)
    # measured max |Δ| = 0.0 on this CPU (bit-identical); the bound allows another CPU's convolution kernel to sum
    # the same nonzero products in another order for 8 input channels than for 4
    torch.testing.assert_close(zeros, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_copied_image_start_shows_the_old_unet_the_source():
    """copy_image_init(β): UNet_wide(cat[z_t, c_I]) = UNet(z_t + β·latent_scale·c_I), the old model seeing the
    source's latents added at strength β."""
    unet = randomize(UNet(tiny_config().unet), seed=4).eval()
    wide = widen_input(unet, 8).eval()
    copy_image_init(wide, 0.1, 0.25, 4)
    generator = torch.Generator().manual_seed(0)
    x, c_image = torch.randn(2, 4, 8, 8, generator=generator), 3 * torch.randn(2, 4, 8, 8, generator=generator)
    t, context = torch.tensor([10, 950]), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet(x + 0.1 * 0.25 * c_image, t, context)
        got = wide(torch.cat([x, c_image], dim=1), t, context)
    # W_z·(β s c_I) summed apart from W_z·z_t instead of W_z·(z_t + β s c_I): measured max |Δ| = 2.9e-6 on
    # outputs up to 2.0 in size; the bound leaves ~3× for another CPU's kernels
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_widening_refuses_an_instruct_or_inpainting_unet():
    for channels in (8, 9):
        with pytest.raises(ValueError, match="already an instruct or inpainting model"):
            widen_input(UNet(tiny_config(channels).unet), 8)
    with pytest.raises(ValueError, match="does not widen"):
        widen_input(UNet(tiny_config().unet), 4)


def test_conditioning_dropout_has_the_papers_rates():
    """p = 0.05: text only, image only and both each 5 % (binomial std at n = 200,000: 0.05 %, bound 0.3 %)."""
    drop_text, drop_image = drop_conditions(200_000, 0.05, torch.Generator().manual_seed(0))
    rates = [(drop_text & ~drop_image).float().mean(), (drop_image & ~drop_text).float().mean(),
             (drop_text & drop_image).float().mean()]
    for rate in rates:
        assert abs(float(rate) - 0.05) < 0.003
    none_text, none_image = drop_conditions(1000, 0.0, torch.Generator().manual_seed(0))
    assert not none_text.any() and not none_image.any()


def test_high_noise_weights():
    """w_t = clamp(1/SNR_t, 1, γ) / mean: γ = 1 is the paper's plain loss; otherwise mean 1, flat where SNR ≥ 1,
    rising with t, and exactly γ times the flat part from 1/SNR_t ≥ γ on."""
    schedule = Schedule(ScheduleConfig())                                   # SD v1's scaled-linear β
    assert torch.equal(loss_weights(schedule, 1.0), torch.ones(1000))
    weights = loss_weights(schedule, 20.0)
    snr = schedule.alpha_bar / (1 - schedule.alpha_bar)
    assert abs(weights.mean().item() - 1) < 1e-6
    assert (weights[1:] >= weights[:-1]).all()                              # never lower at higher noise
    flat = weights[snr >= 1]
    assert torch.equal(flat, flat[:1].expand_as(flat))
    torch.testing.assert_close(weights[-1] / weights[0], torch.tensor(20.0))
    torch.testing.assert_close(weights[500] / weights[0], 1 / snr[500].float())  # 1/SNR between the clamps


def test_image_input_scale_folds_into_the_saved_weights():
    """InstructEps(k) reads k·c_I; after fold_image_scale the bare UNet gives the same ε from c_I itself."""
    config = tiny_config(8)
    unet = randomize(UNet(config.unet), seed=2).eval()
    text_encoder = torch.nn.Embedding(100, 32)                           # any ids → [B, 77, 32] context
    generator = torch.Generator().manual_seed(0)
    z_t, c_image = torch.randn(2, 4, 8, 8, generator=generator), 3 * torch.randn(2, 4, 8, 8, generator=generator)
    t, ids = torch.tensor([5, 900]), torch.randint(100, (2, 77), generator=generator)
    with torch.no_grad():
        trained = InstructEps(text_encoder, unet, image_scale=4.0)(z_t, t, c_image, ids)
        fold_image_scale(unet, 4.0, 4)
        saved = unet(torch.cat([z_t, c_image], dim=1), t, text_encoder(ids))
    # measured max |Δ| = 0.0 (k = 4, a power of 2, scales exactly); the bound allows a k·W·c vs W·(k·c) rounding
    # difference for other k or CPU kernels
    torch.testing.assert_close(saved, trained, rtol=0, atol=1e-5)


def test_weights_of_one_are_the_plain_loss():
    """instruct_loss with w ≡ 1 is the paper's E‖ε − ε_θ‖² (the same draws: same generator seed)."""
    config = tiny_config(8)
    model = InstructEps(torch.nn.Embedding(100, 32), randomize(UNet(config.unet), seed=3).eval())
    generator = torch.Generator().manual_seed(1)
    data = EditData(torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator),
                    torch.rand(6, 4, 8, 8, generator=generator), torch.randint(100, (6, 77), generator=generator),
                    torch.zeros(77, dtype=torch.long))
    cfg, schedule, index = InstructTrainConfig(), Schedule(ScheduleConfig()), torch.tensor([0, 3, 5, 1])
    with torch.no_grad():
        plain = instruct_loss(model, data, schedule, 0.5, index, cfg, torch.Generator().manual_seed(7))
        ones = instruct_loss(model, data, schedule, 0.5, index, cfg, torch.Generator().manual_seed(7),
                             torch.ones(1000))
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)       # the same sum, grouped per example first


def test_empty_text_copies_train_the_empty_instruction_to_keep_the_source(monkeypatch):
    """empty_text_copies: the examples with the text dropped and the image kept get z_0 = latent_scale · c_I (the
    source); every other example keeps the edited target's z_0. Without the option, all keep the target."""
    import ldm_scratch.training.instruct as instruct
    config = tiny_config(8)
    seen = {}

    def recording_model(z_t, t, c_image, ids):
        seen["z_t"], seen["t"], seen["c_image"] = z_t, t, c_image
        return torch.zeros_like(z_t)

    # text only dropped, image only dropped, both, neither; no noise, so z_t = √ᾱ_t · z_0
    pattern = (torch.tensor([True, False, True, False]), torch.tensor([False, True, True, False]))
    monkeypatch.setattr(instruct, "drop_conditions", lambda batch, p, generator: pattern)
    monkeypatch.setattr(instruct, "training_noise", lambda shape, offset, generator: torch.zeros(shape))
    data = EditData(torch.full((4, 4, 8, 8), 2.0), torch.full((4, 4, 8, 8), -1.0), torch.zeros(4, 4, 8, 8),
                    torch.ones(4, 77, dtype=torch.long), torch.zeros(77, dtype=torch.long))
    schedule, index = Schedule(ScheduleConfig()), torch.arange(4)
    for copies, expected in ((True, [2.0, -1.0, -1.0, -1.0]), (False, [-1.0, -1.0, -1.0, -1.0])):
        cfg = InstructTrainConfig(empty_text_copies=copies)
        instruct_loss(recording_model, data, schedule, 0.5, index, cfg, torch.Generator().manual_seed(0))
        z0 = seen["z_t"] / schedule.alpha_bar[seen["t"]].sqrt().float()[:, None, None, None]
        torch.testing.assert_close(z0.mean(dim=(1, 2, 3)), 0.5 * torch.tensor(expected))
        assert seen["c_image"][[1, 2]].eq(0).all() and seen["c_image"][[0, 3]].eq(2.0).all()


def test_sampling_t_by_weight_draws_t_from_the_weights_and_drops_them_from_the_loss():
    """sample_t_by_weight: t ~ w_t / Σw and the loss unweighted. With all the weight on t = 999 every draw is 999;
    with uniform t the same weights would multiply the loss instead (and draw other t's)."""
    seen = []

    def recording_model(z_t, t, c_image, ids):
        seen.append(t.clone())
        return torch.zeros_like(z_t)
    data = EditData(torch.ones(8, 4, 8, 8), torch.ones(8, 4, 8, 8), torch.zeros(8, 4, 8, 8),
                    torch.ones(8, 77, dtype=torch.long), torch.zeros(77, dtype=torch.long))
    weights = torch.zeros(1000)
    weights[999] = 1000.0                                                       # mean 1, all on t = 999
    schedule, index = Schedule(ScheduleConfig()), torch.arange(8)
    by_weight = instruct_loss(recording_model, data, schedule, 0.5, index,
                              InstructTrainConfig(sample_t_by_weight=True), torch.Generator().manual_seed(0), weights)
    assert seen[-1].eq(999).all()
    # ε-prediction of 0: the unweighted loss is mean ε², about 1 (+ offset noise); weighting by w_t would give ~0
    # for most t or 1000× at t = 999
    assert 0.5 < by_weight.item() < 2.0
    instruct_loss(recording_model, data, schedule, 0.5, index, InstructTrainConfig(),
                  torch.Generator().manual_seed(0), weights)
    assert not seen[-1].eq(999).all()


def test_edit_pairs_change_one_attribute_and_keep_the_layout():
    assert instruction("colour", ("circle", "red", "blue"), "green") == "make the circle green"
    assert instruction("shape", ("circle", "red", "blue"), "square") == "turn it into a square"
    assert instruction("background", ("circle", "red", "blue"), "white") == "change the background to white"
    sources, targets, edits = edit_pairs("train", 30, seed=3)
    for source, target, edit in zip(sources, targets, edits):
        assert check(source.permute(1, 2, 0).numpy()).matches(*edit.source)
        assert check(target.permute(1, 2, 0).numpy()).matches(*edit.target)
        assert sum(a != b for a, b in zip(edit.source, edit.target)) == 1
        if edit.kind != "shape":     # same jitter: the shape covers the very same pixels
            changed_src = (source != source[:, :1, :1]).any(0)
            changed_tgt = (target != target[:, :1, :1]).any(0)
            assert torch.equal(changed_src, changed_tgt)
    again = edit_pairs("train", 30, seed=3)
    assert torch.equal(again[0], sources) and again[2] == edits                      # reproducible
    # a data-parallel process's share: pairs i ≡ k (mod m), the very ones the whole set has at those places
    for k in range(3):
        part = edit_pairs("train", 30, seed=3, part=(k, 3))
        assert torch.equal(part[0], sources[k::3]) and torch.equal(part[1], targets[k::3])
        assert part[2] == edits[k::3]
    with pytest.raises(ValueError, match="part"):
        edit_pairs("train", 30, part=(3, 3))


def test_heldout_edits_are_never_trained():
    train, heldout = allowed_edits("train"), allowed_edits("heldout")
    assert {e.triple for e in heldout} == set(HELDOUT_EDITS)
    assert not {e.triple for e in train} & set(HELDOUT_EDITS)
    assert {e.kind for e in train} == {"colour", "shape", "background"}
    assert Edit(("circle", "red", "blue"), "colour", "yellow").triple in HELDOUT_EDITS
    with pytest.raises(ValueError, match="unknown edit split"):
        allowed_edits("test")


def test_validation_edits_are_a_second_unseen_set():
    """15 triples, 5 per kind, disjoint from the held-out ones; every shape / colour once as key and once as value
    where the kind allows it; trained unless hold_out_validation, and then never drawn."""
    assert len(set(VALIDATION_EDITS)) == 15 and not set(VALIDATION_EDITS) & set(HELDOUT_EDITS)
    for kind in ("colour", "shape", "background"):
        triples = [t for t in VALIDATION_EDITS if t[0] == kind]
        assert len(triples) == 5 and len({t[1] for t in triples}) == 5 and len({t[2] for t in triples}) == 5
    validation = allowed_edits("validation")
    assert {e.triple for e in validation} == set(VALIDATION_EDITS)
    plain, without = allowed_edits("train"), allowed_edits("train", hold_out_validation=True)
    assert {e.triple for e in plain} >= set(VALIDATION_EDITS)
    assert not {e.triple for e in without} & (set(VALIDATION_EDITS) | set(HELDOUT_EDITS))
    assert len(plain) == len(without) + len(validation)
    drawn = edit_pairs("train", 400, size=32, seed=5, hold_out_validation=True)[2]
    assert not {e.triple for e in drawn} & set(VALIDATION_EDITS)
    cases = edit_pairs("validation", 30, size=32, seed=777)[2]
    assert {e.triple for e in cases} <= set(VALIDATION_EDITS)


# ---------------------------------------------------------------------------------------------------------------
# a run: a micro model, 2 steps
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A random 4-channel base model in the official layout and a small vocabulary."""
    folder = tmp_path_factory.mktemp("train_instruct")
    return write_tiny_checkpoint(folder / "base.safetensors", 4, seed=5), write_vocabulary(folder / "tokenizer")


def micro_config(base, path, **changes) -> InstructTrainConfig:
    return InstructTrainConfig(**{"out": str(path), "base_model": str(base), "steps": 2, "batch_size": 2,
                                  "n_pairs": 4, "warmup_steps": 1, "log_every": 1, **changes})


def test_two_steps_write_a_loadable_instruct_model(micro, tmp_path):
    base, vocabulary = micro
    out = tmp_path / "runs" / "instruct.safetensors"
    history = train_instruct(micro_config(base, out), tokenizer=vocabulary, say=lambda *_: None)
    assert history["steps_done"] == 2 and len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    assert json.loads(history_path(out).read_text())["steps_done"] == 2
    loaded = load_models(out)
    assert loaded.config.unet.in_channels == 8 and loaded.config.name.endswith("-instruct")
    assert torch.count_nonzero(loaded.unet.input_conv.weight[:, 4:]) > 0          # the image channels learnt
    pipe = load_pipeline(out, tokenizer=vocabulary)
    source = np.zeros((64, 64, 3), dtype=np.uint8)
    edited = pipe.instruct(source, "make the circle green", steps=2, seed=0, output_type="np", progress=False)
    assert edited.shape == (1, 64, 64, 3) and np.isfinite(edited).all()


def test_v_prediction_model_says_so_and_learns_v(micro, tmp_path, monkeypatch):
    """prediction_type "v_prediction": the saved file's config says v (so the samplers read the output as v), and
    the loss's target is v = √ᾱ_t ε − √(1−ᾱ_t) z_0 on the very draws instruct_loss makes."""
    base, vocabulary = micro
    out = tmp_path / "v.safetensors"
    train_instruct(micro_config(base, out, prediction_type="v_prediction"), tokenizer=vocabulary,
                   say=lambda *_: None)
    assert load_models(out).config.prediction_type == "v_prediction"
    assert load_models(base).config.prediction_type == "epsilon"
    pipe = load_pipeline(out, tokenizer=vocabulary)
    assert pipe.schedule.config.prediction_type == "v_prediction"
    edited = pipe.instruct(np.zeros((64, 64, 3), dtype=np.uint8), "make the circle green", steps=2, seed=0,
                           output_type="np", progress=False)
    assert np.isfinite(edited).all()

    import ldm_scratch.training.instruct as instruct_module
    seen = []

    def recording_target(schedule, z0, t, eps):
        target = training_target(schedule, z0, t, eps)
        seen.append((schedule, z0, t, eps, target))
        return target
    monkeypatch.setattr(instruct_module, "training_target", recording_target)
    config = tiny_config(8)
    zero = InstructEps(torch.nn.Embedding(100, 32), randomize(UNet(config.unet), seed=3).eval())
    for p in zero.parameters():
        torch.nn.init.zeros_(p)                                  # outputs 0: the loss is E‖target‖²
    generator = torch.Generator().manual_seed(1)
    data = EditData(torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator),
                    torch.rand(6, 4, 8, 8, generator=generator), torch.randint(100, (6, 77), generator=generator),
                    torch.zeros(77, dtype=torch.long))
    for kind in PREDICTION_TYPES:
        with torch.no_grad():
            loss = instruct_loss(zero, data, Schedule(ScheduleConfig(prediction_type=kind)), 0.5,
                                 torch.tensor([0, 3, 5, 1]), InstructTrainConfig(), torch.Generator().manual_seed(7))
        schedule, z0, t, eps, target = seen[-1]
        alpha_bar = schedule.alpha_bar[t].float()[:, None, None, None]
        expected = eps if kind == "epsilon" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z0
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, (expected ** 2).mean(), rtol=1e-5, atol=0)


def test_v_loss_is_the_eps_loss_over_alpha_bar():
    """The docstring's ‖v − v̂‖² = ‖ε − ε̂‖²/ᾱ_t: at a fixed z_t, a prediction read as ε̂ or as v̂ (the same x̂₀)."""
    schedule = Schedule(ScheduleConfig())
    generator = torch.Generator().manual_seed(3)
    z0, eps, eps_hat = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(3))
    t = torch.tensor([10, 400, 800, 999])
    alpha_bar = schedule.alpha_bar[t].double()[:, None, None, None]
    z0, eps, eps_hat = z0.double(), eps.double(), eps_hat.double()
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps
    x0_hat = (z_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()
    v, v_hat = (alpha_bar.sqrt() * e - (1 - alpha_bar).sqrt() * x for e, x in ((eps, z0), (eps_hat, x0_hat)))
    per_step = lambda d: (d ** 2).sum(dim=(1, 2, 3))                                      # noqa: E731
    torch.testing.assert_close(per_step(v - v_hat), per_step(eps - eps_hat) / alpha_bar.flatten(), rtol=1e-10, atol=0)


def test_zero_snr_model_says_so_and_sees_no_target_at_t_equal_T(micro, tmp_path):
    """zero_snr: the saved file's schedule has ᾱ_T = 0, so the noisiest training input is pure noise (z_T = ε,
    nothing of z_0 left to read) and its v target is −z_0; such a model samples from t = T (trailing)."""
    base, vocabulary = micro
    out = tmp_path / "zero.safetensors"
    train_instruct(micro_config(base, out, prediction_type="v_prediction", zero_snr=True), tokenizer=vocabulary,
                   say=lambda *_: None)
    config = load_models(out).config
    assert config.rescale_zero_terminal_snr and config.prediction_type == "v_prediction"
    assert not load_models(base).config.rescale_zero_terminal_snr
    pipe = load_pipeline(out, tokenizer=vocabulary)
    assert pipe.schedule.alpha_bar[-1] == 0 and pipe.schedule.alpha_bar[-2] > 0
    sampler = get_sampler("dpmpp_2m", schedule=pipe.schedule, timestep_spacing="trailing")
    edited = pipe.instruct(np.zeros((64, 64, 3), dtype=np.uint8), "make the circle green", steps=3, seed=0,
                           sampler=sampler, output_type="np", progress=False)
    assert np.isfinite(edited).all()

    z0, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    t_last = torch.tensor([pipe.schedule.n_train_steps - 1])
    torch.testing.assert_close(pipe.schedule.q_sample(z0[None], t_last, eps[None])[0], eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(training_target(pipe.schedule, z0[None], t_last, eps[None])[0], -z0, rtol=0,
                               atol=1e-6)                           # z_T = ε holds nothing of z_0; v_T = −z_0
    sd_schedule = Schedule(ScheduleConfig())                          # the docstring's "6.8 % of the target"
    assert sd_schedule.alpha_bar[-1].sqrt() == pytest.approx(0.068, abs=5e-4)


def test_freeze_text_path_keeps_the_words_as_the_base_model_read_them(micro, tmp_path):
    """freeze_text_path: the text encoder and every cross-attention's W_K, W_V come out exactly as in the base
    model; the cross-attention's W_Q and the rest of the UNet train."""
    base, vocabulary = micro
    out = tmp_path / "frozen.safetensors"
    train_instruct(micro_config(base, out, freeze_text_path=True), tokenizer=vocabulary, say=lambda *_: None)
    before, after = load_models(base), load_models(out)
    for name, tensor in after.text_encoder.state_dict().items():
        assert torch.equal(tensor, before.text_encoder.state_dict()[name]), name
    unet_before, unet_after = before.unet.state_dict(), after.unet.state_dict()
    keys_values = [n for n in unet_after if ".cross_attn.to_k." in n or ".cross_attn.to_v." in n]
    assert keys_values and all(torch.equal(unet_after[n], unet_before[n]) for n in keys_values)
    queries = [n for n in unet_after if ".cross_attn.to_q." in n]
    assert queries and any(not torch.equal(unet_after[n], unet_before[n]) for n in queries)


def test_half_copy_loads_as_the_same_model(micro, tmp_path):
    """--half-copy-of: a float16 file, about half the size, that loads back (as float32) to weights within
    float16's rounding (relative 2⁻¹¹) of the trained ones."""
    base, vocabulary = micro
    out = tmp_path / "m.safetensors"
    train_instruct(micro_config(base, out), tokenizer=vocabulary, say=lambda *_: None)
    half = tmp_path / "m16.safetensors"
    assert train_main(["--half-copy-of", str(out), "--out", str(half)]) == 0
    assert half.stat().st_size < 0.55 * out.stat().st_size
    full, small = load_models(out), load_models(half)
    assert small.config == full.config
    for name, tensor in small.unet.state_dict().items():
        reference = full.unet.state_dict()[name]
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(tensor.float(), reference, rtol=2 ** -11, atol=6e-8)   # 6e-8: fp16 subnormals
    assert train_main(["--half-copy-of", str(out), "--out", str(half)]) == 2         # exists: refused


def test_existing_output_is_refused_without_force(micro, tmp_path, capsys):
    base, vocabulary = micro
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the user's file")
    argv = ["--out", str(out), "--base-model", str(base), "--steps", "2", "--batch-size", "2", "--n-pairs", "4",
            "--tokenizer", str(vocabulary[0].parent)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err
    assert out.read_bytes() == b"the user's file"                                   # untouched
    assert train_main(argv + ["--force"]) == 0
    assert load_models(out).config.unet.in_channels == 8                             # replaced, loadable


def test_kind_shares_draw_kinds_with_those_probabilities():
    only_background = edit_pairs("train", 12, size=32, seed=3, kind_shares=(0, 0, 1))[2]
    assert {e.kind for e in only_background} == {"background"}
    assert all(e.triple not in HELDOUT_EDITS for e in only_background)
    kinds = [e.kind for e in edit_pairs("train", 300, size=32, seed=3, kind_shares=(1, 1, 3))[2]]
    # background share 0.6: binomial(300, 0.6) has σ ≈ 8.5, so ±4σ ≈ ±34
    assert abs(kinds.count("background") - 180) < 34, kinds.count("background")
    assert edit_pairs("train", 30, size=32, seed=3, kind_shares=None)[2] == edit_pairs("train", 30, size=32,
                                                                                       seed=3)[2]
    with pytest.raises(ValueError, match="kind_shares"):
        edit_pairs("train", 3, kind_shares=(1, 1))
    with pytest.raises(ValueError, match="kind_shares"):
        InstructTrainConfig(kind_shares="0.3,-0.3,1")


@pytest.mark.parametrize("changes, error, words", [
    ({"base_model": "missing.safetensors"}, FileNotFoundError, ["no such file", "text-to-image"]),
    ({"out": "model.ckpt"}, ValueError, [".safetensors"]),
    ({"dropout": 0.5}, ValueError, ["dropout", "1/3"]),
    ({"steps": 0}, ValueError, ["steps", "≥ 1"]),
    ({"lr": -1.0}, ValueError, ["lr"]),
    ({"snr_clip": 0.5}, ValueError, ["snr_clip", "≥ 1"]),
    ({"image_input_scale": 0.0}, ValueError, ["image_input_scale"]),
    ({"image_init": -0.1}, ValueError, ["image_init", "≥ 0"]),
    ({"prediction_type": "x0"}, ValueError, ["prediction_type", "v_prediction"]),
    ({"zero_snr": True}, ValueError, ["zero_snr", "--prediction-type v_prediction"]),
])
def test_bad_settings_fail_early(micro, tmp_path, changes, error, words):
    base, vocabulary = micro
    with pytest.raises(error) as raised:
        train_instruct(micro_config(base, tmp_path / "m.safetensors", **changes), tokenizer=vocabulary,
                       say=lambda *_: None)
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_an_instruct_model_is_no_base(micro, tmp_path):
    base, vocabulary = micro
    eight = write_tiny_checkpoint(tmp_path / "eight.safetensors", 8, seed=1)
    with pytest.raises(ValueError, match="8-channel UNet input; start from a text-to-image model"):
        train_instruct(micro_config(eight, tmp_path / "m.safetensors"), tokenizer=vocabulary, say=lambda *_: None)
    out = tmp_path / "folder.safetensors"
    out.mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        train_instruct(micro_config(base, out), tokenizer=vocabulary, say=lambda *_: None, force=True)
