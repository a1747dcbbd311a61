"""What every sampler shares: the model-function convention, timestep spacing, Karras σ's, the denoiser wrapper,
img2img / inpainting entry points and the per-step hooks.

Model function (what the pipeline passes in; the UNet with classifier-free guidance folded in):

    eps_model(x_t, t) -> ε̂        x_t `[B, C, h, w]` in DDPM scaling, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
                                  t   a 0-dim float32 tensor on x_t's device (one timestep for the whole batch;
                                      fractional for σ-samplers; broadcast it to `[B]` yourself if you need to)

The model may predict ε̂ or v̂ = √ᾱ_t ε − √(1−ᾱ_t) x_0 (SD 2 768-v): the schedule's `prediction_type` says which,
and every sampler turns the output into (ε̂, x̂₀) at one point — `Sampler.predicted` (DDPM family) or `Denoiser`
(σ-samplers), both through diffusion.eps_and_x0 — so the updates below are written once, for ε̂ and x̂₀.

Two families of samplers:
- DDPM-family (ddpm, ddim, plms, pndm) keep their state x_t in DDPM scaling and call the model at integer t.
- σ-samplers (euler, euler_a, heun, lms, dpmpp_2m) keep x_σ = x_0 + σ ε (Karras et al. 2022, eq. 1's σ-scaling)
  and see the network through `Denoiser`: x_t = x_σ / √(σ²+1), t = t(σ). That is exactly what diffusers'
  `scale_model_input` and its timesteps amount to, so the UNet sees identical inputs.

Sampler.sample(eps_model, noise, steps, ...) returns the final state: x_0 for σ-samplers, and for the DDPM family
the state at the last level, which with SD v1.5's `set_alpha_to_one=False` is ᾱ_0 = 0.99915, not 1 — as diffusers.

img2img: with `x0` and `strength`, only the last `min(int(steps × strength), steps)` of the `steps` steps run,
starting from x0 noised (with `noise`) to the first of them — diffusers' `get_timesteps` + `add_noise`.
Inpainting by mask blending: `after_step(i, x) -> x` runs after step i, and `noise_to_level(x0, noise, i)` gives x0
noised to the level diffusers' inpaint pipeline blends with after step i (x0 itself after the last step).

Random numbers: ancestral samplers draw one `torch.randn` of the state's shape and dtype per step, after that
step's model call, on the generator's device (the CPU for a default `torch.Generator()`), then move it to the
state's device — the order and device diffusers' `randn_tensor` uses, so a seed gives the same image everywhere.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import Schedule, alpha_bar_from_sigma, eps_and_x0, x0_from_eps_sigma, xt_from_x0_eps

SPACINGS = ("leading", "linspace", "trailing")


def check_spacing(timestep_spacing: str) -> str:
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
    return timestep_spacing


def spaced_timesteps(steps: int, spacing: str, steps_offset: int, n_train: int = 1000, *, intervals: bool = False,
                     integer: bool = False) -> np.ndarray:
    """The timesteps a sampler visits, descending, as in Table 2 of Lin et al. 2024 ("Common diffusion noise
    schedules and sample steps are flawed") and diffusers. On a grid of n points (n = steps unless `intervals`):
        leading:  0, k, 2k, … (k = T // n), + steps_offset     (SD v1.5: offset 1 → 1, 21, …, 981 for 50 steps)
        linspace: linspace(0, T−1, n)                          (fractional unless `integer`)
        trailing: round(T, T − T/steps, …) − 1                 (always starts at T−1 = 999)
    intervals: DPM-Solver's own rule (diffusers' DPMSolverMultistepScheduler): lay steps + 1 points, so that the
        `steps` intervals between them span the range, and visit all but the last (t = 0, or steps_offset for
        "leading"), where the final step lands. "trailing" is the same either way: its points are T/steps apart
        and its grid already stops short of its own end point, −1.
    integer: round to int64 (the DDPM family and DPM-Solver); otherwise float64 (the other σ-samplers, which
        interpolate σ at fractional t).

    Every sampler runs on this list (DPM-Solver with Karras σ's excepted: dpmpp.py), so the limits live here. The
    result is always `steps` distinct timesteps in [0, T−1]; otherwise a ValueError, raised before any model call,
    names the problem and the largest step count that works (`grid_problem`, `max_steps`). diffusers differs:
    - "trailing": np.arange(T, 0, −T/steps) has steps + 1 points at 62 counts ≤ T (61, 103, 121, …; float
      rounding of the length), the extra one round(≈0) − 1 = −1. diffusers runs one more step there: the DDPM
      family reads ᾱ[−1] = ᾱ_999 (pure noise) for it, σ-schedulers clamp t = −1 to σ_0. We keep the first
      `steps` points: the same timesteps as diffusers at every other count, one model call fewer at these.
    - "leading" with steps_offset 1 starts at t = T for steps = T (DPM-Solver: T − 1): diffusers indexes past ᾱ's
      end (IndexError: DDIM, DDPM, PNDM), clamps σ (Euler, Heun) or ends non-finite (LMS, DPM-Solver). Refused.
    - steps > T: DDIM and DDPM refuse too; PNDM runs repeated timesteps, Euler/LMS/Heun run (LMS goes non-finite
      on "trailing", whose rounded t's repeat), DPM-Solver ends non-finite. Refused for every sampler: the model
      knows T noise levels, and each step needs one of its own.
    - DPM-Solver's integer "linspace" grid (steps + 1 points) repeats a timestep at steps = T: diffusers ends
      non-finite, ours divided by the zero step (ZeroDivisionError at step 499, issue 14). Refused.
    """
    check_spacing(spacing)
    if steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    t, problem = grid_problem(steps, spacing, steps_offset, n_train, intervals, integer)
    if problem is None:
        return t
    limit = max_steps(spacing, steps_offset, n_train, intervals, integer)
    setting = f"timestep_spacing={spacing!r}, steps_offset={steps_offset}"
    if limit == 0:
        fix = "raise steps_offset to 0 or more" if steps_offset < 0 else "lower steps_offset"
        raise ValueError(f"{setting} leaves no valid step count ({problem}): {fix}")
    if steps > n_train:
        most = "" if limit == n_train else f" (the most that {setting} allows)"
        raise ValueError(f"steps={steps} {problem}; use steps ≤ {limit}{most}")
    others = [s for s in SPACINGS if s != spacing and max_steps(s, steps_offset, n_train, intervals, integer) >= steps]
    allow = "allows" if len(others) == 1 else "allow"
    alternative = f" (or timestep_spacing {' / '.join(map(repr, others))}, which {allow} {steps})" if others else ""
    raise ValueError(f"steps={steps} with {setting} {problem}; use steps ≤ {limit}{alternative}")


def _grid(steps: int, spacing: str, steps_offset: int, n_train: int, intervals: bool, integer: bool) -> np.ndarray:
    """spaced_timesteps' rule itself, unchecked (1 ≤ steps ≤ T)."""
    n = steps + 1 if intervals else steps
    if spacing == "leading":
        t = (np.arange(n) * (n_train // n))[::-1] + steps_offset
    elif spacing == "linspace":
        t = np.linspace(0, n_train - 1, n)[::-1]
    else:  # arange's float step can leave a (steps + 1)-th point at ≈ 0, i.e. t = −1: keep the first `steps`
        t = (np.round(np.arange(n_train, 0, -n_train / steps)) - 1)[:steps]
    if intervals and spacing != "trailing":
        t = t[:-1]
    return t.round().astype(np.int64) if integer else t.astype(np.float64)


def grid_problem(steps: int, spacing: str, steps_offset: int, n_train: int, intervals: bool = False,
                 integer: bool = False) -> tuple[np.ndarray | None, str | None]:
    """(the grid, None) if it can be run, else (the grid or None, why not in words). A sampler needs one distinct
    noise level per step (a repeated one is a zero step size: LMS and DPM-Solver divide by it) inside the trained
    range [0, T−1]. More steps than T is refused before any grid is built (steps may be huge)."""
    if steps > n_train:
        return None, too_many_steps(n_train)
    t = _grid(steps, spacing, steps_offset, n_train, intervals, integer)
    if t[0] > n_train - 1:
        return t, f"puts the first timestep at t={t[0]:g}, past the last training timestep {n_train - 1}"
    if t[-1] < 0:
        return t, f"puts the last timestep at t={t[-1]:g}, below the first training timestep 0"
    if not (np.diff(t) < 0).all():
        repeated = sorted({float(a) for a, b in zip(t[:-1], t[1:]) if a <= b}, reverse=True)[:3]
        points = f"{steps} + 1 = {steps + 1} grid points" if intervals else f"{steps} steps"
        return t, (f"repeats timestep(s) t={', '.join(f'{r:g}' for r in repeated)}: {points} do not fit on "
                   f"{n_train} training timesteps with this spacing")
    return t, None


def too_many_steps(n_train: int) -> str:
    return f"> {n_train} training timesteps: the model knows {n_train} noise levels, and each step needs one of its own"


def max_steps(spacing: str, steps_offset: int, n_train: int = 1000, intervals: bool = False,
              integer: bool = False) -> int:
    """The largest step count ≤ T whose grid `spaced_timesteps` accepts (0 if none): what its errors suggest.
    (Scans down from T; only ever run on the way to an error.)"""
    for steps in range(n_train, 0, -1):
        if grid_problem(steps, spacing, steps_offset, n_train, intervals, integer)[1] is None:
            return steps
    return 0


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. (5): σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7.
    Spends more steps at small σ, where the image's detail is decided."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def steps_to_run(steps: int, strength: float, img2img: bool) -> int:
    """Index of the first step that runs: 0 for txt2img; for img2img steps − min(int(steps·strength), steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # True is an int to Python, not a count
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not img2img:
        return 0
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n_run = min(int(steps * strength), steps)
    if n_run == 0:
        raise ValueError(f"strength {strength} × steps {steps} rounds down to 0 steps; raise steps or strength")
    return steps - n_run


class StepCounter:
    """Something that must know which step of the run it is in (a ControlNet's window, DeepCache's schedule):
    `step` counts the sampler's finished steps; wrap the sampler's per-step callback with `counting` to advance it.
    A step counts once however many model calls the sampler makes in it."""
    step = 0

    def counting(self, callback=None):
        """A sampler callback that advances `step` after each step, then calls `callback` (if any)."""
        def step_done(i, t, x0_pred):
            self.step += 1
            if callback is not None:
                callback(i, t, x0_pred)
        return step_done


def draw_noise(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One N(0, I) draw shaped like `like`, on the generator's device, then moved (see module docstring).
    A list of generators (one per batch row) draws row i from generator i, as diffusers' `randn_tensor`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}; pass one per row")
        return torch.cat([draw_noise(like[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def as_model_t(t: float, x: torch.Tensor) -> torch.Tensor:
    """The timestep as the model receives it: a 0-dim float32 tensor (diffusers' σ-schedulers keep t in float32)."""
    return torch.tensor(float(t), dtype=torch.float32, device=x.device)


class Denoiser:
    """k-diffusion's denoiser (Karras et al. 2022, Table 1, "VP" column): turns the model into
    D(x_σ, σ) = x̂₀ = x_σ − σ ε̂(x_σ / √(σ²+1), t(σ)) for an ε-model, and for a v-model (the schedule's
    prediction_type) x̂₀ = √ᾱ x_t − √(1−ᾱ) v̂ with x_t = x_σ / √(σ²+1), ᾱ = 1 / (1 + σ²) (diffusion.eps_and_x0).

    `t` defaults to `schedule.sigma_to_t(σ)`; samplers pass the timestep their schedule pairs with σ, since
    diffusers does not always use t(σ) (on a linspace grid it keeps the grid's t and interpolates σ linearly).
    """

    def __init__(self, eps_model, schedule: Schedule):
        self.eps_model, self.schedule = eps_model, schedule

    def output(self, x: torch.Tensor, sigma: float, t: float | None = None) -> torch.Tensor:
        """The model's raw output (ε̂ or v̂) at x_σ."""
        if t is None:
            t = float(self.schedule.sigma_to_t(sigma))
        return self.eps_model(x / (sigma**2 + 1) ** 0.5, as_model_t(t, x))  # x_t = x_σ / √(σ²+1) = √ᾱ x_σ

    def __call__(self, x: torch.Tensor, sigma: float, t: float | None = None) -> torch.Tensor:
        output = self.output(x, sigma, t)
        if self.schedule.config.prediction_type == "epsilon":
            return x0_from_eps_sigma(x, output, sigma)  # x̂₀ = x_σ − σ ε̂
        alpha_bar = alpha_bar_from_sigma(sigma)  # the level x_t = x_σ / √(σ²+1) is at: ᾱ = 1 / (1 + σ²)
        return eps_and_x0(x / (sigma**2 + 1) ** 0.5, output, alpha_bar, self.schedule.config.prediction_type)[1]


class Sampler:
    """Base class: the spacing options, argument checks, the img2img start, hooks. Subclasses implement `_run` and
    `_noised`, and list their options in their own `__init__` (get_sampler reads its signature).

    `_run(eps_model, noise, steps, start, x0, generator, step_done)` runs the steps from index `start`, sets
    `self._levels` (one noise level per step that runs: what diffusers' add_noise would use for that step) and
    calls `x = step_done(i, t, x0_pred, x)` after each step.
    """

    def __init__(self, schedule: Schedule | None = None, *, timestep_spacing: str, steps_offset: int):
        self.schedule = schedule if schedule is not None else Schedule()
        self.timestep_spacing, self.steps_offset = check_spacing(timestep_spacing), steps_offset
        self._levels: list[float] | None = None

    def sample(self, eps_model, noise: torch.Tensor, steps: int, *, generator=None,
               callback=None, x0: torch.Tensor | None = None, strength: float = 1.0, after_step=None,
               progress: bool = False) -> torch.Tensor:
        """Run the sampler; returns the final latents `[B, C, h, w]` (see module docstring).

        noise: ε ~ N(0, I), `[B, C, h, w]`; scaled by the sampler (txt2img) or used to noise `x0` (img2img).
        generator: a torch.Generator, a list of B of them (row i's noise from generator i), or None (global RNG);
            only ancestral samplers (ddpm, ddim with η > 0, euler_a) draw from it.
        callback(i, t, x0_pred): after each step, with the step's x̂₀ in x_0 scaling.
        after_step(i, x) -> x: after each step, on the state (for mask-blend inpainting).
        """
        if x0 is not None and x0.shape != noise.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)} but noise has {tuple(noise.shape)}; they must match")
        self.check_steps(steps)
        start = steps_to_run(steps, strength, img2img=x0 is not None)
        bar = tqdm(total=steps - start, disable=not progress, desc=type(self).__name__)

        def step_done(i, t, x0_pred, x):
            if callback is not None:
                callback(i, t, x0_pred)
            if after_step is not None:
                x = after_step(i, x)
            bar.update()
            return x

        try:
            return self._run(eps_model, noise, steps, start, x0, generator, step_done)
        finally:
            bar.close()

    def check_steps(self, steps: int) -> None:
        """Raise ValueError now, before any model call, if this sampler cannot run `steps` steps: not a positive
        int, more steps than training timesteps, or a grid that leaves [0, T−1] or repeats a timestep (the message
        says which, and the largest count that works). `sample` calls it first; callers may call it earlier."""
        steps_to_run(steps, 1.0, img2img=False)
        self.step_plan(steps)

    def step_plan(self, steps: int):
        """The levels the sampler visits for `steps` steps (timesteps, or σ's and timesteps); raises as above."""
        raise NotImplementedError

    def noise_to_level(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x0 noised to the level the state is at after step i of the current/last run, in the sampler's own scaling
        (diffusers' inpaint: add_noise(x0, noise, timesteps[i+1]); x0 itself after the last step)."""
        if self._levels is None:
            raise RuntimeError("noise_to_level needs the step plan: call it from after_step, during sample()")
        if not 0 <= i < len(self._levels):
            raise ValueError(f"step index {i} out of range: this run has {len(self._levels)} steps")
        return x0 if i + 1 == len(self._levels) else self._noised(x0, noise, self._levels[i + 1])

    def _run(self, eps_model, noise, steps, start, x0, generator, step_done):
        raise NotImplementedError

    def predicted(self, x_t: torch.Tensor, output: torch.Tensor, alpha_bar: float):
        """(ε̂, x̂₀) from the model's output at level ᾱ in DDPM scaling — the DDPM family's one conversion point for
        ε- and v-prediction (the schedule's `prediction_type`; diffusion.eps_and_x0 has the equations)."""
        return eps_and_x0(x_t, output, alpha_bar, self.schedule.config.prediction_type)

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
        raise NotImplementedError


class AlphaBarSampler(Sampler):
    """DDPM-family base: integer timesteps, state in DDPM scaling, levels are ᾱ values, x_t = √ᾱ x_0 + √(1−ᾱ) ε."""

    def timesteps(self, steps: int) -> np.ndarray:
        """The integer timesteps visited, descending (`[steps]`)."""
        return spaced_timesteps(steps, self.timestep_spacing, self.steps_offset, self.schedule.n_train_steps,
                                integer=True)

    def step_plan(self, steps: int) -> np.ndarray:
        return self.timesteps(steps)

    def _noised(self, x0, noise, alpha_bar):
        return xt_from_x0_eps(x0, noise, alpha_bar)  # x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε  (eq 4.1)

    def _begin(self, noise, x0, ts):
        """Record the levels ᾱ_t of the timesteps that run; the initial state: x_T = ε (DDPM scaling needs no σ),
        or for img2img x0 noised to the first of them."""
        self._levels = [float(self.schedule.alpha_bar[t]) for t in ts]
        return noise if x0 is None else self._noised(x0, noise, self._levels[0])

    def _alpha_bar(self, t: int, final: float) -> float:
        """ᾱ_t, or `final` for t < 0 (the level after the last step)."""
        return float(self.schedule.alpha_bar[t]) if t >= 0 else final


class SigmaSampler(Sampler):
    """σ-sampler base: state x_σ = x_0 + σ ε, the σ/t plan shared by Euler, Euler-a, Heun and LMS.

    Defaults follow diffusers' `from_config(<SD v1.5 config>)` for these schedulers: timestep_spacing "linspace"
    (their own default; the SD v1.5 config does not set it), steps_offset 1 (only used by "leading"),
    use_karras_sigmas False.
    """

    intervals = integer_timesteps = False  # how spaced_timesteps lays the grid out (DPM-Solver++ differs: dpmpp.py)

    def __init__(self, schedule: Schedule | None = None, *, timestep_spacing: str = "linspace", steps_offset: int = 1,
                 karras: bool = False):
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        self.karras = karras

    def sigmas_and_timesteps(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """σ_0 > … > σ_{N−1} > σ_N = 0 (`[N+1]`) and the timesteps the model sees at σ_0 … σ_{N−1} (`[N]`, float64).

        Without Karras: the spaced timesteps and σ interpolated linearly in t on them (diffusers' np.interp).
        With Karras: eq. (5) between the σ's of the first and last spaced timestep, and t = sigma_to_t(σ).
        """
        t = spaced_timesteps(steps, self.timestep_spacing, self.steps_offset, self.schedule.n_train_steps,
                             intervals=self.intervals, integer=self.integer_timesteps).astype(np.float64)
        sigmas = self.schedule.t_to_sigma(t, interpolation="linear").numpy()
        if self.karras:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], steps)
            t = self.schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy()
        return np.append(sigmas, 0.0), t

    def step_plan(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sigmas_and_timesteps(steps)

    def initial_scale(self, sigma_max: float) -> float:
        """What txt2img multiplies ε by. The forward process at σ_max has std √(σ_max²+1) around x_0 ≈ 0 data, but
        diffusers (following k-diffusion) uses σ_max for "linspace"/"trailing" and √(σ_max²+1) for "leading";
        we do the same so the latents match."""
        return (sigma_max**2 + 1) ** 0.5 if self.timestep_spacing == "leading" else sigma_max

    def _plan(self, eps_model, noise, steps, start, x0):
        """What every σ-sampler does first: the σ/t plan from step `start` on, the denoiser, the initial state."""
        sigmas, ts = self.sigmas_and_timesteps(steps)
        sigmas, ts = sigmas[start:], ts[start:]
        self._levels = list(sigmas[:-1])
        return sigmas, ts, Denoiser(eps_model, self.schedule), self._start(noise, x0, sigmas[0])

    def _noised(self, x0, noise, sigma):
        return x0 + sigma * noise  # x_σ = x_0 + σ ε

    def _start(self, noise, x0, sigma_start):
        """Initial state: ε scaled for txt2img, or x0 noised to σ_start for img2img."""
        if x0 is None:
            return noise * self.initial_scale(sigma_start)
        return self._noised(x0, noise, sigma_start)
