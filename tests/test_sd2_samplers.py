"""v-prediction (SD 2 768-v): every sampler against diffusers' scheduler with prediction_type="v_prediction", on
the same model function, noise and seeds, every spacing and Karras σ's where diffusers has them; plus the
conversions themselves and the one place a sampler reads the prediction type.

Measured max relative difference over the whole 20-step trajectory (max |ours − theirs| / max |theirs|), worst
over spacings and Karras: ddpm 3.8e-7, ddim 5.2e-7, pndm 5.8e-7, lms 7.9e-7, euler 8.3e-7, euler_a 5.8e-7,
heun 8.3e-7, dpmpp_2m 8.7e-7 — the same float32-ᾱ rounding as the ε parity tests (test_sampler_parity.py),
so the same tolerance, 1e-5. Reading the model's v̂ as ε̂ (the bug this guards against) moves every trajectory by
0.73 relative or more (measured; asserted > 0.1 below).
"""
import pytest
import torch

from ldm_scratch.diffusion import (Schedule, ScheduleConfig, alpha_bar_from_sigma, eps_and_x0, eps_from_v,
                                   v_from_x0_eps, x0_from_v, xt_from_x0_eps)
from ldm_scratch.samplers import get_sampler

diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

TOL = 1e-5
V_SCHEDULE = Schedule(ScheduleConfig(prediction_type="v_prediction"))
SD2_CONFIG = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (a DDIMScheduler), minus its class
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "v_prediction",
}
REFERENCE = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
EXTRA = {"dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2}}
KARRAS = ("lms", "euler", "heun", "dpmpp_2m")


def v_model(x_t, t):
    """A made-up v̂(x_t, t): t-dependent and nonlinear, so the level each conversion uses matters."""
    sigma = float(V_SCHEDULE.t_to_sigma(torch.as_tensor(t, dtype=torch.float64).clamp(0, 999)))
    alpha_bar = alpha_bar_from_sigma(sigma)
    return alpha_bar**0.5 * (0.8 * x_t + 0.1) - 0.3 * (1 - alpha_bar) ** 0.5 * torch.tanh(x_t) \
        + 0.05 * torch.sin(x_t * float(t) / 500)


def run_reference(name, noise, steps, seed, spacing, karras, prediction_type="v_prediction"):
    """diffusers' txt2img loop on the scheduler alone; the states after each step, in our scaling."""
    config = {**SD2_CONFIG, **EXTRA.get(name, {}), "timestep_spacing": spacing, "prediction_type": prediction_type}
    sched = getattr(diffusers, REFERENCE[name]).from_config({**config, **({"use_karras_sigmas": True} if karras else {})})
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    states = []
    for i, t in enumerate(sched.timesteps):
        kwargs = {"generator": generator} if name in ("ddpm", "euler_a") else {}
        x = sched.step(v_model(sched.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
        if name != "heun" or sched.state_in_first_order or i == len(sched.timesteps) - 1:
            sigma = float(sched.sigmas[sched.step_index]) if hasattr(sched, "sigmas") else 0.0
            states.append(x * ((sigma**2 + 1) ** 0.5 if name == "dpmpp_2m" else 1.0))  # DPM keeps x_t, we x_σ
    return states


def run_ours(name, noise, steps, seed, spacing, karras, schedule=V_SCHEDULE, model=v_model):
    sampler = get_sampler(name, schedule=schedule, timestep_spacing=spacing, **({"karras": True} if karras else {}))
    states = []
    sampler.sample(model, noise, steps, generator=torch.Generator().manual_seed(seed),
                   after_step=lambda i, x: states.append(x.clone()) or x)
    return states


def relative_difference(ours, theirs):
    assert len(ours) == len(theirs)
    scale = max(x.abs().max().item() for x in theirs)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs)) / scale


CASES = [(name, spacing, karras) for name in REFERENCE for spacing in ("leading", "linspace", "trailing")
         for karras in ((False, True) if name in KARRAS else (False,))]


@pytest.mark.parametrize("name, spacing, karras", CASES, ids=str)
def test_v_prediction_trajectory_matches_diffusers(name, spacing, karras):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = run_reference(name, noise, 20, 1, spacing, karras)
    assert relative_difference(run_ours(name, noise, 20, 1, spacing, karras), theirs) < TOL
    # the same model read as an ε-model lands far away: the prediction type is really used
    as_eps = run_ours(name, noise, 20, 1, spacing, karras, schedule=Schedule())
    assert relative_difference(as_eps, theirs) > 0.1


def test_plms_reads_each_output_at_its_own_level():
    """CompVis' PLMS (SD 2's own repository) converts every v̂ to ε̂ at the level of the call that made it (the
    second call of the first step is at t_{i+1}, not t_i); diffusers' PNDM combines the raw v̂'s first. So PLMS with a
    v-model equals PLMS with the ε-model that converts each output with its own ᾱ_t — and differs from pndm."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_model = lambda x, t: eps_from_v(x, v_model(x, t), float(V_SCHEDULE.alpha_bar[int(t)]))
    ours = run_ours("plms", noise, 20, 1, "leading", False)
    converted = run_ours("plms", noise, 20, 1, "leading", False, schedule=Schedule(), model=eps_model)
    assert relative_difference(ours, converted) < 1e-6   # measured 0.0 (the same operations in the same order)
    # measured 0.065: the two bookkeepings really differ for v-models (for ε-models they agree to 1e-6)
    assert relative_difference(ours[-1:], run_ours("pndm", noise, 20, 1, "leading", False)[-1:]) > 1e-2


def test_v_conversions_round_trip():
    """v = √ᾱ ε − √(1−ᾱ) x₀ and its inverses x̂₀ = √ᾱ x_t − √(1−ᾱ) v, ε̂ = √(1−ᾱ) x_t + √ᾱ v, at every level."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    for alpha_bar in (0.9991, 0.5, 0.0047, 0.0):          # SD's ᾱ_0, a middle one, ᾱ_999, and zero terminal SNR
        x_t = xt_from_x0_eps(x0, eps, alpha_bar)
        v = v_from_x0_eps(x0, eps, alpha_bar)
        torch.testing.assert_close(x0_from_v(x_t, v, alpha_bar), x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps_from_v(x_t, v, alpha_bar), eps, rtol=0, atol=1e-12)
        eps_hat, x0_hat = eps_and_x0(x_t, v, alpha_bar, "v_prediction")
        torch.testing.assert_close((eps_hat, x0_hat), (eps, x0), rtol=0, atol=1e-12)
        if alpha_bar > 0:
            torch.testing.assert_close(eps_and_x0(x_t, eps, alpha_bar, "epsilon")[1], x0, rtol=0, atol=1e-9)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction"):
        ScheduleConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        eps_and_x0(torch.zeros(1), torch.zeros(1), 0.5, "v")
