"""Every sampler at the edges of the step count (issue 14, security item 3): for steps in {1, 2, 3, 61, 999,
1000, 1001, 5000}, every spacing and Karras on/off, a sampler either runs, asks the model only about trained
timesteps and ends finite, or refuses before its first model call with a ValueError that names the limit. Which
cases refuse, and why, is written out in `refusal` below; spaced_timesteps' docstring says where and why that
differs from diffusers."""

import math

import numpy as np
import pytest
import torch

from ldm_scratch.diffusion import Schedule
from ldm_scratch.samplers import SAMPLERS, get_sampler, spaced_timesteps
from ldm_scratch.samplers.base import SPACINGS, max_steps

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
STEP_COUNTS = (1, 2, 3, 61, 999, 1000, 1001, 5000)  # 61: "trailing" used to add a step at t = −1
KARRAS = ("lms", "euler", "euler_a", "heun", "dpmpp_2m")
CONFIGS = [(name, spacing, karras) for name in SAMPLERS if name != "lcm" for spacing in SPACINGS
           for karras in ((False, True) if name in KARRAS else (False,))]
LOG_SIGMAS = Schedule().log_sigmas.numpy()
MU = 0.5


class CountingModel:
    """ε* for data N(μ, I), exactly: ε̂(x_t, t) = √(1−ᾱ_t) (x_t − √ᾱ_t μ), with ᾱ from log σ interpolated at
    fractional t (cheap: no UNet, a few tensor ops). Counts its calls and checks each t is a trained timestep."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x_t, t):
        assert t.dtype == torch.float32 and t.dim() == 0 and 0 <= float(t) <= T - 1, float(t)
        self.calls += 1
        alpha_bar = 1 / (1 + math.exp(2 * np.interp(float(t), np.arange(T), LOG_SIGMAS)))  # ᾱ = 1 / (1 + σ²)
        return (1 - alpha_bar) ** 0.5 * (x_t - alpha_bar**0.5 * MU)


def refusal(name, spacing, karras, steps):
    """(words the ValueError must contain, the step count it must suggest), or None where the sampler must run."""
    dpm = name == "dpmpp_2m"
    if dpm and karras:  # its Karras σ's span the whole training range whatever the spacing: only T limits it
        return ("> 1000 training timesteps", 1000) if steps > T else None
    # "leading" with steps_offset 1 puts t = n − 1 + 1 = T on a grid of n ≥ T points: DPM-Solver's n is steps + 1
    most = {"leading": T - 2 if dpm else T - 1, "linspace": T - 1 if dpm else T, "trailing": T}[spacing]
    if steps > T:
        return "> 1000 training timesteps", most
    if steps <= most:
        return None
    if dpm and steps == T:  # n = T + 1 integer points on T timesteps: "leading" (k = 0) and "linspace" repeat one
        return "repeats timestep", most
    return "past the last training timestep 999", most


def expected_calls(name, steps):
    """Model calls for a txt2img run: Heun 2N − 1 (the last step is Euler), PLMS one extra on its first step,
    PNDM steps + 1 entries ([t_0, t_1, t_1, …]; one for a single step), the rest one per step."""
    return {"heun": 2 * steps - 1, "plms": steps + 1, "pndm": steps + 1 if steps > 1 else 1}.get(name, steps)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, spacing, karras", CONFIGS, ids=str)
def test_every_sampler_runs_finite_or_refuses_up_front(name, spacing, karras, steps):
    sampler = get_sampler(name, timestep_spacing=spacing, **({"karras": True} if karras else {}))
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    model, expected = CountingModel(), refusal(name, spacing, karras, steps)
    if expected is None:
        out = sampler.sample(model, noise, steps, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out).all()
        assert model.calls == expected_calls(name, steps)
    else:
        words, limit = expected
        with pytest.raises(ValueError, match=rf"^steps={steps} .*{words}.*use steps ≤ {limit}\b"):
            sampler.sample(model, noise, steps, generator=torch.Generator().manual_seed(1))
        assert model.calls == 0  # refused before the first model call
        with pytest.raises(ValueError, match=words):
            sampler.check_steps(steps)  # what a caller can ask before any other work


@pytest.mark.parametrize("intervals, integer", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_each_step_count_up_to_the_limit_gives_that_many_distinct_trained_timesteps(spacing, intervals, integer):
    """All of 1 … T: `steps` timesteps, strictly descending, inside [0, T−1] ("trailing" had steps + 1 ending at
    t = −1 at 62 counts, e.g. 61, 103, 121), and every count above the limit is refused."""
    limit = max_steps(spacing, 1, T, intervals, integer)
    assert limit == {"leading": T - 1, "linspace": T, "trailing": T}[spacing] - (intervals and spacing != "trailing")
    for steps in range(1, T + 1):
        if steps > limit:
            with pytest.raises(ValueError, match=f"use steps ≤ {limit}"):
                spaced_timesteps(steps, spacing, 1, T, intervals=intervals, integer=integer)
            continue
        t = spaced_timesteps(steps, spacing, 1, T, intervals=intervals, integer=integer)
        assert len(t) == steps and (np.diff(t) < 0).all() and t[0] <= T - 1 and t[-1] >= 0, steps


def test_trailing_keeps_the_first_steps_points_of_diffusers_rule():
    """The departure is only the dropped −1: the kept points are diffusers' own (np.arange's), bit for bit."""
    for steps in (61, 103, 121):
        rule = np.round(np.arange(T, 0, -T / steps)) - 1
        assert len(rule) == steps + 1 and rule[-1] == -1
        assert spaced_timesteps(steps, "trailing", 1).tolist() == rule[:-1].tolist()


BAD_STEPS = [  # (steps, options, the error's words)
    (0, {}, "steps must be a positive int, got 0"),
    (-3, {}, "steps must be a positive int, got -3"),
    (True, {}, "steps must be a positive int, got True"),  # Python's bool is an int; a count it is not
    (2.5, {}, "steps must be a positive int, got 2.5"),
    ("10", {}, "steps must be a positive int, got '10'"),
    (10**12, {}, "steps=1000000000000 > 1000 training timesteps.*use steps ≤ 999"),  # no 10¹² grid is built
    (1000, {"timestep_spacing": "leading"},
     "t=1000, past the last training timestep 999; use steps ≤ 999 \\(or timestep_spacing 'linspace' / 'trailing'"),
    (5, {"steps_offset": -1}, "steps_offset=-1 leaves no valid step count .*below the first training timestep 0"
                              ".*raise steps_offset to 0 or more"),
    (5, {"steps_offset": 2000}, "steps_offset=2000 leaves no valid step count .*lower steps_offset"),
]


@pytest.mark.parametrize("steps, options, words", BAD_STEPS, ids=str)
def test_bad_step_counts_are_explained(steps, options, words):
    model = CountingModel()
    with pytest.raises(ValueError, match=words):
        get_sampler("ddim", **options).sample(model, torch.zeros(1, 4, 2, 2), steps)
    assert model.calls == 0


def test_dpmpp_2m_default_names_the_limit_and_a_way_around_it():
    """The default sampler at the issue's --steps 1000: refused (it used to divide by zero at step 499), with the
    count that works and the spacing that allows 1000; Karras σ's run 1000 steps to a finite image."""
    model = CountingModel()
    with pytest.raises(ValueError, match=r"repeats timestep\(s\) t=500: 1000 \+ 1 = 1001 grid points .* use steps "
                                         r"≤ 999 \(or timestep_spacing 'trailing', which allows 1000\)"):
        get_sampler("dpmpp_2m").sample(model, torch.zeros(1, 4, 2, 2), 1000)
    assert model.calls == 0
    for options in ({"timestep_spacing": "trailing"}, {"karras": True}):
        assert torch.isfinite(get_sampler("dpmpp_2m", **options).sample(model, torch.ones(1, 4, 2, 2), 1000)).all()
