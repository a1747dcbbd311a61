"""Zero terminal SNR (Lin et al. 2023): rescaled betas and guidance rescale φ in diffusion.py (against diffusers),
the v-prediction training target, the black / white backgrounds of the shapes data, and `train --prediction v
--zero-snr` (issue 19, items 5–6)."""

import numpy as np
import pytest
import torch

from ldm_scratch.diffusion import (Schedule, ScheduleConfig, classifier_free_guidance, rescale_guidance,
                                   rescale_zero_terminal_snr, x0_from_v)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zero_snr():
    return Schedule(ScheduleConfig(rescale_zero_terminal_snr=True))


# --- the schedule ---------------------------------------------------------------------------------------------

def test_rescaled_schedule_ends_at_zero_snr_and_keeps_the_first_step(zero_snr):
    plain = Schedule()
    assert zero_snr.alpha_bar[-1].item() == 0.0                         # √ᾱ_T = 0 exactly: SNR_T = ᾱ/(1−ᾱ) = 0
    assert plain.alpha_bar[-1].item() == pytest.approx(0.0047, abs=1e-4)  # SD's: SNR_T ≈ 0.0047
    assert zero_snr.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-14)
    assert zero_snr.betas[-1].item() == 1.0                              # β_T = 1 − ᾱ_T/ᾱ_{T−1}
    # √ᾱ' is an affine map of √ᾱ: (√ᾱ'_t) = a·√ᾱ_t + b, checked on every t
    s, s_new = plain.alpha_bar.sqrt(), zero_snr.alpha_bar.sqrt()
    a = s[0] / (s[0] - s[-1])
    torch.testing.assert_close(s_new, a * (s - s[-1]), rtol=1e-12, atol=1e-15)
    assert (zero_snr.betas > 0).all() and (zero_snr.betas <= 1).all()
    # the σ tables take ᾱ_T = 2⁻²⁴ (σ_T = √(2²⁴ − 1) ≈ 4096), everything before is exact
    assert zero_snr.sigmas[-1].item() == pytest.approx((2.0**24 - 1) ** 0.5)
    torch.testing.assert_close(zero_snr.sigmas[:-1], ((1 - zero_snr.alpha_bar[:-1]) / zero_snr.alpha_bar[:-1]).sqrt())


def test_default_schedule_is_untouched():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(Schedule().betas.numpy(), betas, rtol=1e-14)
    assert ScheduleConfig().rescale_zero_terminal_snr is False


@pytest.mark.parity
def test_rescaled_betas_match_diffusers(zero_snr):
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs
    betas = Schedule().betas
    # the same float64 arithmetic, grouped differently ((√ᾱ − √ᾱ_T)·√ᾱ_1/(…) in one line vs in place): measured
    # max |Δβ| 8.9e-16, a few ulps of β ≤ 1
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), theirs(betas.clone()), rtol=0, atol=1e-14)
    # diffusers' scheduler computes in float32 (its cumprod too): measured max |Δᾱ| 4.2e-7, relative 1.2e-6
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True)
    torch.testing.assert_close(zero_snr.alpha_bar.float(), scheduler.alphas_cumprod, rtol=0, atol=1e-6)


def test_v_prediction_at_zero_snr_gives_x0_from_the_network_alone(zero_snr):
    # at t = T: x_T = ε exactly, v = √ᾱ ε − √(1−ᾱ) x_0 = −x_0, and x̂₀ = √ᾱ x_T − √(1−ᾱ) v̂ = −v̂ (finite, no 1/√ᾱ)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_T = zero_snr.q_sample(x0, 999, eps)
    assert torch.equal(x_T, eps)
    v = zero_snr.v_from_x0_eps(x0, 999, eps)
    assert torch.equal(v, -x0)
    torch.testing.assert_close(x0_from_v(x_T, v, 0.0), x0)
    # ε-prediction there: x̂₀ = (x_T − ε̂)/√ᾱ_T is 0/0
    assert not torch.isfinite(zero_snr.eps_to_x0(x_T, 999, eps)).all()


# --- guidance rescale φ ---------------------------------------------------------------------------------------

def test_guidance_rescale_equations():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    guided = classifier_free_guidance(uncond, cond, 7.5)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)          # φ = 0: plain CFG
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))  # φ = 1: the conditional's std
    torch.testing.assert_close(full / guided, (cond.std(dim=(1, 2, 3)) / guided.std(dim=(1, 2, 3)))
                               [:, None, None, None].expand_as(guided))    # …by one factor per sample
    half = rescale_guidance(guided, cond, 0.7)
    torch.testing.assert_close(half, 0.7 * full + 0.3 * guided)


@pytest.mark.parity
def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    guided = classifier_free_guidance(uncond, cond, 5.0)
    for phi in (0.0, 0.5, 0.7, 1.0):
        # the same float32 operations in the same order: bit-equal (measured)
        assert torch.equal(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, guidance_rescale=phi))


# --- the data: pure black and pure white backgrounds, only when asked ----------------------------------------

def test_extreme_backgrounds_only_when_asked():
    from ldm_scratch.data import (EXTREME_BACKGROUNDS, ShapesDataset, combinations, extreme_background_combinations,
                                  parse_caption, train_combinations)
    extremes = extreme_background_combinations()
    assert len(extremes) == 5 * 6 + 5 * 5 == 55 and ("circle", "white", "pure white") not in extremes
    assert combinations("train") == train_combinations()                       # the default is untouched
    assert combinations("train", extreme_backgrounds=True) == train_combinations() + extremes
    assert combinations("heldout", extreme_backgrounds=True) == combinations("heldout")
    plain = ShapesDataset("train", length=200, seed=0)
    assert not any(plain.sample(i)[1][2] in EXTREME_BACKGROUNDS for i in range(200))
    both = ShapesDataset("train", length=200, seed=0, extreme_backgrounds=True)
    drawn = [both.sample(i)[1] for i in range(200)]
    assert 0.15 < np.mean([c[2] in EXTREME_BACKGROUNDS for c in drawn]) < 0.45   # 55/195 = 28 %
    image, text = both[next(i for i, c in enumerate(drawn) if c[2] == "pure black")]
    assert text.endswith("on a pure black background") and parse_caption(text)[2] == "pure black"
    assert image[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]                       # (0, 0, 0) → −1 in the VAE's range
    with pytest.raises(ValueError, match="invisible"):
        parse_caption("a white ring on a pure white background")
    with pytest.raises(ValueError, match="unknown background"):
        parse_caption("a red ring on a pure grey background")


def test_checker_reads_the_extreme_backgrounds_when_asked():
    from ldm_scratch.data import check, extreme_background_combinations, render
    rng = np.random.default_rng(0)
    for combo in extreme_background_combinations():  # measured: all 55 read right (shape, colour and background)
        assert check(render(*combo, rng=rng), extreme_backgrounds=True).matches(*combo), combo
    # without the flag the checker names palette colours only, as before: pure black → nearest palette colour
    assert check(render("circle", "red", "pure black")).background in ("green", "blue", "purple")
    assert check(render("circle", "red", "pure white")).background == "white"


# --- training: --prediction v --zero-snr, and fine-tuning from a file -----------------------------------------

def tiny_run(out_dir, **changes):
    from test_train import short_run  # the tiny-tiny model and short recipe of tests/test_train.py
    values = dict(n_images=64, vae_steps=10, steps=12, checkpoint_every=0)
    values.update(changes)
    return short_run(out_dir, **values)


def test_training_schedule_and_flags():
    import argparse

    from ldm_scratch.configs import tiny_config
    from ldm_scratch.train import TrainConfig, add_train_arguments, training_schedule
    from ldm_scratch.training.command import config_from_flags
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--out", "/nonexistent/run", "--prediction", "v", "--zero-snr", "--no-resume"])
    cfg = config_from_flags(args)
    assert (cfg.prediction, cfg.prediction_type, cfg.zero_snr, cfg.offset_noise) == ("v", "v_prediction", True, 0.1)
    schedule = training_schedule(dataclasses_replace(tiny_config(), prediction_type=cfg.prediction_type), cfg)
    assert schedule.alpha_bar[-1].item() == 0.0 and schedule.config.prediction_type == "v_prediction"
    assert training_schedule(tiny_config(), TrainConfig()).alpha_bar[-1].item() > 0.004   # default: SD's schedule
    assert config_from_flags(parser.parse_args(["--out", "/nonexistent/run", "--no-zero-snr"])).zero_snr is False
    with pytest.raises(SystemExit):                                            # argparse: invalid choice
        parser.parse_args(["--prediction", "x0"])
    with pytest.raises(ValueError, match="prediction must be one of 'epsilon', 'v'"):
        TrainConfig(prediction="v_prediction")


def dataclasses_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_v_zero_snr_run_then_fine_tune_from_its_file(tmp_path):
    """`train --prediction v --zero-snr` from scratch writes a file that says v_prediction; `init` fine-tunes stage 2
    from a file: stage 1 skipped, the file's autoencoder and latent scale kept, the UNet changed."""
    from ldm_scratch.checkpoint import load_models
    from ldm_scratch.train import train

    history = train(tiny_run(tmp_path / "v", prediction="v", zero_snr=True, extreme_backgrounds=True), resume=False)
    assert all(np.isfinite(history["loss"])) and len(history["loss"]) == 12
    first = load_models(history["model"])
    assert first.config.prediction_type == "v_prediction"

    tuned = train(tiny_run(tmp_path / "eps", init=str(history["model"]), vae_steps=0, steps=6), resume=False)
    assert tuned["vae_loss"] == [] and len(tuned["loss"]) == 6
    second = load_models(tuned["model"])
    assert second.config.prediction_type == "epsilon" and second.config.latent_scale == first.config.latent_scale
    assert all(torch.equal(a, b) for a, b in zip(first.vae.state_dict().values(), second.vae.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.unet.state_dict().values(),
                                                     second.unet.state_dict().values()))


def test_training_target_is_eps_or_v():
    from ldm_scratch.train import training_target
    g = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    assert training_target(Schedule(), z0, t, eps) is eps
    v_schedule = Schedule(ScheduleConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True))
    v = training_target(v_schedule, z0, t, eps)
    a = v_schedule.alpha_bar[t].float()[:, None, None, None]
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * z0)  # v = √ᾱ_t ε − √(1−ᾱ_t) z_0
    assert torch.equal(v[3], -z0[3])                                       # t = T at zero SNR: v = −z_0


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_samplers_reach_the_data_from_t_T_with_an_exact_v_model(zero_snr, sampler):
    """Data that is one constant image c (as bright as a latent gets): the exact v-model is
    v(x_t, t) = √ᾱ ε − √(1−ᾱ) c with ε = (x_t − √ᾱ c)/√(1−ᾱ), and at t = T (ᾱ_T = 0) simply −c. Starting from
    pure noise at t = T ("trailing"), the samplers must end at c — finite, although ᾱ_T = 0."""
    import dataclasses

    from ldm_scratch.samplers import get_sampler
    schedule = Schedule(dataclasses.replace(zero_snr.config, prediction_type="v_prediction"))
    c = 3.0

    def v_model(x_t, t):
        a = float(schedule.alpha_bar[int(round(float(t)))])
        eps = (x_t - a**0.5 * c) / (1 - a) ** 0.5
        return a**0.5 * eps - (1 - a) ** 0.5 * c

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    options = {"timestep_spacing": "trailing"} | ({"set_alpha_to_one": True} if sampler == "ddim" else {})
    x = get_sampler(sampler, schedule=schedule, **options).sample(v_model, noise, 10)
    assert torch.isfinite(x).all()
    # measured: 2.4e-7 for each (float32 rounding of c = 3; the σ-samplers start at σ_T = 4096, not ∞)
    assert (x - c).abs().max() < 1e-5, (x - c).abs().max()


def test_a_missing_init_file_is_refused_before_anything_runs(tmp_path, capsys):
    from ldm_scratch.train import main
    code = main(["--out", str(tmp_path / "run"), "--init", str(tmp_path / "nope.safetensors"), "--no-progress"])
    assert code == 2 and "no such model file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()   # refused before the run folder was made


def test_the_experiments_measure_on_drawn_images():
    """scripts/zero_snr_experiment.py's measure: drawn images score 0 error, a mid-grey background scores 127.5."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import zero_snr_experiment as experiment
    from ldm_scratch.data import extreme_background_combinations, render
    combos = extreme_background_combinations()
    drawn = np.stack([np.asarray(render(*c, rng=np.random.default_rng(i))) for i, c in enumerate(combos)])
    result = experiment.grade(drawn, combos)
    for background in ("pure black", "pure white"):
        assert result[background]["error"] == 0.0 and result[background]["within"] == 1.0
        assert result[background]["read_right"] == 1.0
    assert result["pure black"]["n"] == 30 and result["pure white"]["n"] == 25
    grey = np.full_like(drawn, 128)
    grey_result = experiment.grade(grey, combos)
    assert grey_result["pure black"]["error"] == 128.0 and grey_result["pure white"]["error"] == 127.0
    assert grey_result["pure white"]["within"] == 0.0
    # the sampling grids: SD's leading (offset 1) and Lin et al.'s trailing, as the samplers' spaced_timesteps
    from ldm_scratch.samplers import spaced_timesteps
    assert experiment.timesteps(20, 1000, "leading") == spaced_timesteps(20, "leading", 1).astype(int).tolist()
    assert experiment.timesteps(20, 1000, "trailing") == spaced_timesteps(20, "trailing", 0).astype(int).tolist()
    assert experiment.timesteps(20, 1000, "trailing")[0] == 999


def test_train_command_prediction_v_zero_snr(tmp_path, capsys):
    """`ldm-scratch train --prediction v --zero-snr` end to end (tiny-tiny model, a few steps): the exported file
    loads as a v-prediction model, and the run's config.json records the flags."""
    from test_train import tiny_tiny_model

    from ldm_scratch.checkpoint import load_models
    from ldm_scratch.train import main
    (tmp_path / "model.json").write_text(tiny_tiny_model().to_json())
    code = main(["--out", str(tmp_path / "run"), "--model-config", str(tmp_path / "model.json"), "--prediction", "v",
                 "--zero-snr", "--offset-noise", "0", "--n-images", "32", "--vae-steps", "4", "--vae-batch-size", "8",
                 "--steps", "4", "--batch-size", "8", "--sample-every", "0", "--checkpoint-every", "0",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert load_models(tmp_path / "run" / "model.safetensors").config.prediction_type == "v_prediction"
    import json
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["prediction"], recorded["zero_snr"], recorded["offset_noise"]) == ("v", True, 0.0)
