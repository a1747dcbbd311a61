"""The noise schedule and the forward process of Stable Diffusion v1 (the seed's equations 4.1–4.5).

Diffusion happens in the VAE's latent space (eq 4.5: z = VAE_enc(x), and every x below is such a z, `[B, 4, h, w]`).
The forward process adds Gaussian noise in T = 1000 small steps:

    q(x_t | x_{t-1}) = N(x_t; √(1-β_t) x_{t-1}, β_t I)                         (eq 4.1)
    q(x_t | x_0)     = N(x_t; √ᾱ_t x_0, (1-ᾱ_t) I),   ᾱ_t = ∏_{s≤t} (1-β_s)     (eq 4.1, closed form)

so x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε with ε ~ N(0, I). The network ε_θ(x_t, t) is trained to predict that ε
(eq 4.3: L = E‖ε − ε_θ(x_t, t)‖²) and the reverse process p_θ(x_{t-1}|x_t) (eq 4.2) is built from its prediction
by the samplers in `ldm_scratch/samplers/`. Classifier-free guidance (eq 4.4) mixes a conditional and an
unconditional prediction. The conversions between x_t, x̂₀, ε, v and σ are small functions below (`x0_from_eps`,
`eps_from_x0`, `v_from_x0_eps`, …), written once and used by Schedule's methods and by every sampler.

The seed's own code listing (`diffuse` / `denoise`) swaps the two coefficients (it writes √(1-ᾱ) x_0 + √ᾱ ε);
this file follows the equations, and `tests/test_diffusion.py` checks that it does.

σ-parameterisation (Karras et al. 2022, used by k-diffusion and diffusers' "discrete" σ-schedulers): dividing x_t by
√ᾱ_t gives x_σ = x_0 + σ ε with σ_t = √((1-ᾱ_t)/ᾱ_t). `sigma_to_t` maps a continuous σ back to a (fractional)
timestep by linear interpolation of log σ between neighbouring integer timesteps, exactly as k-diffusion and
diffusers do, so the UNet can be asked about any σ.

Everything schedule-related is float64: ᾱ_999 ≈ 0.0047 is a product of 1000 factors, and float32 would lose digits
that the σ-samplers' first step magnifies.
"""

from dataclasses import dataclass

import torch


@dataclass
class ScheduleConfig:
    """SD v1's training schedule ("scaled_linear"), as in `v1-inference.yaml` and diffusers' SD v1.5 config."""

    n_train_steps: int = 1000  # T
    beta_start: float = 0.00085  # β_1 (linear_start)
    beta_end: float = 0.012  # β_T (linear_end)
    # Lin et al. 2023: shift and scale √ᾱ so that √ᾱ_T = 0 (zero terminal SNR); see rescale_zero_terminal_snr
    rescale_zero_terminal_snr: bool = False
    # What the network predicts: "epsilon" (ε, SD v1, SD 2 512-base and inpainting) or "v_prediction"
    # (v = √ᾱ_t ε − √(1−ᾱ_t) x_0, SD 2 768-v; `parameterization: "v"` in its yaml). The samplers read it and
    # turn the network's output into (ε̂, x̂₀) in one place, `eps_and_x0` below.
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                             f"{self.prediction_type!r}")


def _as_index(t, n: int) -> torch.Tensor:
    """Integer timesteps as a LongTensor, with a clear error when out of range."""
    t = torch.as_tensor(t)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"timestep {t.tolist()} is fractional; use Schedule.t_to_sigma for continuous t")
        t = t.long()
    if (t < 0).any() or (t >= n).any():
        raise ValueError(f"timestep {t.tolist()} out of range: must lie in [0, {n - 1}]")
    return t


def _broadcast(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient, scalar or `[B]`, shaped `[B, 1, 1, 1]` to multiply `x [B, C, h, w]`."""
    values = values.to(device=x.device, dtype=x.dtype)
    return values.reshape(values.shape + (1,) * (x.dim() - values.dim()))


# -- x_t ↔ x̂₀ ↔ ε ↔ v ↔ σ: every conversion, written once ---------------------------------------------------------
# `alpha_bar` (ᾱ_t) is a Python float or a tensor that broadcasts against `[B, C, h, w]` (`[B, 1, 1, 1]`, or a
# scalar). The arithmetic happens in what is given: a float keeps the coefficients in float64 (the samplers), a tensor
# in its own dtype (Schedule's methods cast ᾱ to x's dtype first). The operation order is the one the samplers had
# when their parity with diffusers was measured, so moving them here changed no bit. (For tensors `x ** 0.5` is
# `x.sqrt()` exactly; for a Python float it is the C library's pow, which can differ from sqrt in the last bit.)

def xt_from_x0_eps(x0, eps, alpha_bar):
    """The forward process with a given noise (eq 4.1)."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps  # x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε


def x0_from_eps(x_t, eps, alpha_bar):
    """Eq 4.1 solved for x_0: what the ε̂ a network predicts says about the clean latent."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5  # x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t


def eps_from_x0(x_t, x0, alpha_bar):
    """Eq 4.1 solved for ε."""
    return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5  # ε = (x_t − √ᾱ_t x̂₀) / √(1−ᾱ_t)


def v_from_x0_eps(x0, eps, alpha_bar):
    """The velocity (Salimans & Ho 2022, §4; SD v2's v-prediction target): the rate of change of x_t along the
    circle x_t = cos φ x_0 + sin φ ε, with cos φ = √ᾱ_t."""
    return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0  # v = √ᾱ_t ε − √(1−ᾱ_t) x_0


def x0_from_v(x_t, v, alpha_bar):
    """x_0 from a v-prediction (substitute x_t and v: the cross terms cancel since ᾱ + (1−ᾱ) = 1)."""
    return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * v  # x̂₀ = √ᾱ_t x_t − √(1−ᾱ_t) v


def eps_from_v(x_t, v, alpha_bar):
    """ε from a v-prediction."""
    return (1 - alpha_bar) ** 0.5 * x_t + alpha_bar**0.5 * v  # ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v


PREDICTION_TYPES = ("epsilon", "v_prediction")


def eps_and_x0(x_t, output, alpha_bar, prediction_type: str = "epsilon"):
    """(ε̂, x̂₀) from what the network returned at level ᾱ_t: the one place where ε- and v-prediction differ.

    "epsilon":      ε̂ = output,  x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
    "v_prediction": ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v̂,  x̂₀ = √ᾱ_t x_t − √(1−ᾱ_t) v̂   (both straight from v̂, as diffusers
                    does: x̂₀ never divides by √ᾱ_t, which matters where ᾱ_t is small)
    """
    if prediction_type == "epsilon":
        return output, x0_from_eps(x_t, output, alpha_bar)
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, output, alpha_bar), x0_from_v(x_t, output, alpha_bar)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def sigma_from_alpha_bar(alpha_bar):
    """The noise-to-signal ratio of x_t: σ-scaling x_σ = x_t / √ᾱ_t = x_0 + σ ε (Karras et al. 2022)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5  # σ_t = √((1−ᾱ_t)/ᾱ_t)


def alpha_bar_from_sigma(sigma):
    """The inverse of sigma_from_alpha_bar."""
    return 1 / (1 + sigma**2)  # ᾱ = 1 / (1 + σ²)


def x0_from_eps_sigma(x, eps, sigma):
    """x̂₀ in σ-scaling, where x_σ = x_0 + σ ε (k-diffusion's denoiser output)."""
    return x - sigma * eps  # x̂₀ = x_σ − σ ε̂


def eps_from_x0_sigma(x, x0, sigma):
    """ε in σ-scaling; it is also the probability-flow ODE's slope dx_σ/dσ (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma  # ε̂ = (x_σ − x̂₀) / σ  = dx/dσ


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β_t `[T]` rescaled for zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1).

    SD's schedule ends at ᾱ_T ≈ 0.0047: x_T = 0.068·x_0 + 0.998·ε still holds a trace of the image (SNR_T =
    ᾱ_T/(1−ᾱ_T) ≈ 0.0047 ≠ 0), most of all in its mean, and the network learns to read the overall brightness off
    it — but sampling starts from pure noise, so every image comes out mid-grey on average. The fix moves √ᾱ_t
    linearly so that it ends at exactly 0 while its first value stays put:

        √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T)          (√ᾱ'_T = 0, √ᾱ'_1 = √ᾱ_1)

    and turns ᾱ' back into β: α'_t = ᾱ'_t / ᾱ'_{t−1}, β'_t = 1 − α'_t (so β'_T = 1). With ᾱ_T = 0 an ε-predicting
    network cannot give x̂₀ at t = T (x̂₀ = (x_t − ε̂)/√ᾱ_T divides by 0): use it with v-prediction.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()  # √ᾱ_t
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)  # √ᾱ'_t = (√ᾱ_t − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # α'_t = ᾱ'_t / ᾱ'_{t−1}, α'_1 = ᾱ'_1
    return 1 - alphas  # β'_t = 1 − α'_t


ZERO_SNR_SIGMA_ALPHA_BAR = 2.0**-24  # the ᾱ_T the σ tables use at zero terminal SNR (diffusers' Euler: 2⁻²⁴)


class Schedule:
    """β_t, α_t, ᾱ_t and σ_t for t = 0 … T-1 (0-based, as in the checkpoints and diffusers), plus the forward process.

    Timesteps `t` passed to the methods are ints or LongTensors, scalar or `[B]` (one per sample).
    Tensors `x0`, `x_t`, `eps`, `v` are `[B, C, h, w]`; results have their dtype and device.
    """

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        n = config.n_train_steps
        # β_t = (linspace(√β_1, √β_T, T))²  — "scaled_linear": linear in √β, not in β
        self.betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
        if config.rescale_zero_terminal_snr:  # ᾱ_T = 0: the last step's x_T is pure noise, as sampling assumes
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas  # α_t = 1 − β_t
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)  # ᾱ_t = ∏_{s≤t} α_s   (eq 4.1)
        # σ_t = √((1−ᾱ_t)/ᾱ_t); at zero terminal SNR σ_T = ∞, where no σ-sampler can start, so the σ tables (only
        # they) take ᾱ_T = 2⁻²⁴ instead (σ_T ≈ 4096), as diffusers' σ-schedulers do
        self.sigmas = sigma_from_alpha_bar(self.alpha_bar.clamp(min=ZERO_SNR_SIGMA_ALPHA_BAR))
        self.log_sigmas = self.sigmas.log()  # increasing in t: what sigma_to_t interpolates

    @property
    def n_train_steps(self) -> int:
        return self.config.n_train_steps

    def _alpha_bar_at(self, t, x: torch.Tensor) -> torch.Tensor:
        return _broadcast(self.alpha_bar[_as_index(t, self.n_train_steps)], x)

    # -- forward process -------------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε  (eq 4.1)."""
        return xt_from_x0_eps(x0, eps, self._alpha_bar_at(t, x0))

    def q_mean_variance(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[B, C, h, w]` and variance `[B, 1, 1, 1]` of q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)."""
        alpha_bar = self._alpha_bar_at(t, x0)
        return alpha_bar.sqrt() * x0, 1.0 - alpha_bar

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t, t_prev=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t_prev} | x_t, x_0); t_prev defaults to t − 1 (DDPM eqs 6–7).

        t_prev may be any earlier timestep (strided sampling); t_prev = −1 means "x_0 itself" (ᾱ = 1).
        """
        alpha_bar_t = self._alpha_bar_at(t, x0)
        t_prev = torch.as_tensor(t) - 1 if t_prev is None else torch.as_tensor(t_prev)
        alpha_bar_prev = torch.where(t_prev >= 0, self.alpha_bar[t_prev.clamp(min=0)], torch.ones((), dtype=torch.float64))
        coef_x0, coef_xt, variance = posterior_coefficients(alpha_bar_t, _broadcast(alpha_bar_prev, x0))
        return coef_x0 * x0 + coef_xt * x_t, variance

    # -- ε ↔ x̂₀ ↔ v at timestep t (the equations are the functions above) -------------------------------------------
    def eps_to_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t  (eq 4.1 solved for x_0)."""
        return x0_from_eps(x_t, eps, self._alpha_bar_at(t, x_t))

    def x0_to_eps(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t)  (eq 4.1 solved for ε)."""
        return eps_from_x0(x_t, x0, self._alpha_bar_at(t, x_t))

    def v_from_x0_eps(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Velocity target (Salimans & Ho 2022, §4): v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (used by SD v2-style models)."""
        return v_from_x0_eps(x0, eps, self._alpha_bar_at(t, x0))

    def v_to_x0(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """x̂₀ = √ᾱ_t x_t − √(1−ᾱ_t) v."""
        return x0_from_v(x_t, v, self._alpha_bar_at(t, x_t))

    def v_to_eps(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v."""
        return eps_from_v(x_t, v, self._alpha_bar_at(t, x_t))

    # -- σ ↔ t -----------------------------------------------------------------------------------------------------
    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Continuous timestep for σ (float64 tensor, same shape): log σ interpolated linearly between the two
        neighbouring integer timesteps, clamped to [0, T−1] (k-diffusion's and diffusers' `_sigma_to_t`)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        # low = the last integer t with log σ_t ≤ log σ (kept one below the end so high = low + 1 exists)
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.n_train_steps - 2)
        log_low, log_high = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma - log_low) / (log_high - log_low)).clamp(0.0, 1.0)  # fraction of the way from low to high
        return low + w  # t = (1 − w)·low + w·(low + 1)

    def t_to_sigma(self, t, interpolation: str = "log") -> torch.Tensor:
        """σ at a continuous timestep (float64 tensor). `"log"` interpolates log σ (the exact inverse of sigma_to_t,
        as k-diffusion); `"linear"` interpolates σ itself, which is what diffusers' σ-schedulers use to place their
        σ's on a fractional timestep grid (np.interp), so the samplers use it for parity."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if (t < 0).any() or (t > self.n_train_steps - 1).any():
            raise ValueError(f"t = {t.tolist()} out of range: must lie in [0, {self.n_train_steps - 1}]")
        low = t.floor().long().clamp(max=self.n_train_steps - 2)
        w = t - low
        if interpolation == "log":
            return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()
        if interpolation == "linear":
            return (1 - w) * self.sigmas[low] + w * self.sigmas[low + 1]
        raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")


def posterior_coefficients(alpha_bar_t, alpha_bar_prev):
    """q(x_s | x_t, x_0) = N(c₀ x_0 + c_t x_t, β̃ I) for any s < t (DDPM, Ho et al. 2020, eqs 6–7, with the one-step
    α_t, β_t replaced by the strided ones ᾱ_t/ᾱ_s and 1 − ᾱ_t/ᾱ_s). Works on floats or tensors.
    Returns (c₀, c_t, β̃)."""
    beta = 1 - alpha_bar_t / alpha_bar_prev  # β_t (strided) = 1 − ᾱ_t / ᾱ_s
    coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar_t)  # c₀ = √ᾱ_s β_t / (1 − ᾱ_t)
    coef_xt = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)  # c_t = √α_t (1 − ᾱ_s) / (1 − ᾱ_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta  # β̃_t = (1 − ᾱ_s)/(1 − ᾱ_t) · β_t
    return coef_x0, coef_xt, variance


def eps_loss(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """The simplified DDPM objective (eq 4.3): L = E ‖ε − ε_θ(x_t, t)‖², averaged over every element."""
    return torch.mean((eps - eps_pred) ** 2)  # L = E‖ε − ε_θ(x_t, t)‖²


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (eq 4.4; Ho & Salimans 2022): s = 1 gives the conditional prediction, s = 0 the
    unconditional one, s > 1 pushes further along the direction the condition points to."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # ε̂ = ε_θ(x_t,∅) + s·(ε_θ(x_t,c) − ε_θ(x_t,∅))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale φ (Lin et al. 2023, §3.4, eqs 15–16): `guided` `[B, C, h, w]` (the CFG output) brought back
    to the standard deviation of the conditional prediction `cond`, then blended with itself by φ.

    Large guidance scales inflate the prediction's std (the difference term adds to it), which with zero terminal
    SNR over-exposes images; rescaling to the conditional's std undoes that, and φ < 1 keeps some of the original
    so images do not turn plain. The std is per sample, over every other dimension (as diffusers' rescale_noise_cfg,
    which applies it to the network's output, ε or v; the paper writes it for x̂₀). φ = 0 changes nothing.
    """
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))  # x_cfg·σ_pos/σ_cfg
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided  # x = φ·x_rescaled + (1 − φ)·x_cfg
