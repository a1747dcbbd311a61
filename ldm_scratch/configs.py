"""The configuration of a whole Stable Diffusion model: the three networks' configs plus the numbers that tie them
together (latent scale, β schedule, native resolution).

Each network keeps its own dataclass beside its code (`CLIPTextConfig` in clip.py, `UNetConfig` in unet.py,
`VAEConfig` in vae.py) with the real SD v1 defaults; `ModelConfig()` is therefore SD v1.x. The bundled tiny model
stores its `ModelConfig` as JSON in the safetensors metadata (key `ldm_scratch_config`); official files carry no
config, so it is inferred from tensor shapes (checkpoint/keymap.py).

That JSON comes from a file, so `ModelConfig.from_json` trusts none of it: every field must be known, of its
dataclass type, and in range, else a ValueError names the field (`unet.model_channels`, `latent_scale`) — before
any network is built or any weight is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from .clip import CLIPTextConfig
from .diffusion import PREDICTION_TYPES, Schedule, ScheduleConfig
from .tokenizer import CONTEXT_LENGTH
from .unet import UNetConfig
from .vae import VAEConfig

METADATA_KEY = "ldm_scratch_config"
KINDS = ("sd-v1", "sd-v1-inpainting", "sd-v2", "sd-v2-inpainting", "sd-v2-upscaler", "tiny")
OPENCLIP_PAD_ID = 0   # SD 2's OpenCLIP tokenizer pads with id 0 ("!"), not with end-of-text as SD v1's does
# T, the number of training timesteps, in the range every sampler handles. Measured: with T = 100 each sampler
# runs 1, 2, 30 and 50 steps (the CLI's and the API's defaults are 30) and stays finite; with T = 50, 50 steps
# index past the schedule. SD v1 and the tiny model use 1000. The upper end keeps the float64 schedule tables
# (a few arrays of T numbers) small.
MIN_TRAIN_TIMESTEPS, MAX_TRAIN_TIMESTEPS = 100, 100_000


@dataclass
class ModelConfig:
    text_encoder: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    # z = latent_scale · E(x): SD v1's VAE latents have std ≈ 5.5; scaling by 0.18215 ≈ 1/5.5 makes them unit
    # variance, which the diffusion process (built for data of variance ≈ 1) assumes. Applied by the pipeline.
    latent_scale: float = 0.18215
    beta_start: float = 0.00085       # "scaled_linear" β schedule: β_t = linspace(√β_start, √β_end, T)²
    beta_end: float = 0.012
    num_train_timesteps: int = 1000   # T
    image_size: int = 512             # the resolution the model was trained at (default height/width)
    kind: str = "sd-v1"               # one of KINDS: "sd-v1", "sd-v2", "sd-v2-upscaler", "tiny", …
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction" (SD 2 768-v)
    rescale_zero_terminal_snr: bool = False  # β rescaled so ᾱ_T = 0 (Lin et al. 2023; `train --zero-snr`)
    name: str = "stable-diffusion-v1"  # written into PNG metadata ("Model:")

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def tokenizer_pad_id(self) -> int | None:
        """What the tokenizer pads prompts with for this model's text encoder: None = end-of-text (SD v1's CLIP),
        0 for SD 2's OpenCLIP tower. It matters: the UNet cross-attends to all 77 positions, padding included."""
        return OPENCLIP_PAD_ID if self.kind.startswith("sd-v2") else None

    def schedule(self) -> Schedule:
        """The β schedule (T, β_start, β_end) this model is trained and sampled with, and what it predicts."""
        return Schedule(ScheduleConfig(n_train_steps=self.num_train_timesteps, beta_start=self.beta_start,
                                       beta_end=self.beta_end, prediction_type=self.prediction_type,
                                       rescale_zero_terminal_snr=self.rescale_zero_terminal_snr))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """The config `to_json` wrote, checked field by field (fields left out keep their SD v1 defaults).
        Raises ValueError naming the first bad field: not JSON, not an object, an unknown field, a wrong type, a
        value out of range, or networks that do not fit together."""
        if not isinstance(text, (str, bytes)):
            raise ValueError(f"the model config must be JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"the model config is not valid JSON ({error})") from None
        config = _from_dict(cls, data, "")
        _check_model(config)
        return config


# ---------------------------------------------------------------------------------------------------------------
# Checking a config read from JSON
# ---------------------------------------------------------------------------------------------------------------

def _from_dict(config_class, data, where: str):
    """Build `config_class` from a JSON object: known fields only, each of its default's type. `where` is the
    dotted path of this object in the whole config ("" for the top, "unet" for the UNet's), for messages."""
    what = f"the model config's '{where}'" if where else "the model config"
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object {{field: value}}, got {_json_type(data)}")
    known = {f.name: f for f in fields(config_class)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {unknown}; known fields: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        default = known[name].default if known[name].default is not MISSING else known[name].default_factory()
        if isinstance(default, (CLIPTextConfig, UNetConfig, VAEConfig)):
            values[name] = _from_dict(type(default), value, path)
        else:
            values[name] = _checked_value(path, value, default)
    try:
        return config_class(**values)     # the network configs check their own divisibility rules
    except (ValueError, TypeError) as error:
        raise ValueError(f"{what} is inconsistent: {error}") from None


def _checked_value(path: str, value, default):
    """`value` if it has the type of the field's default (int, float, str, tuple of ints) and is positive."""
    def bad(expected: str):
        return ValueError(f"model config field '{path}' must be {expected}, got {value!r} ({_json_type(value)})")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)   # JSON true is not the number 1
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if default is None:                                                 # an optional count (UNetConfig.head_dim)
        if value is not None and (not is_int(value) or value < 1):
            raise bad("null or a positive whole number")
        return value
    if isinstance(default, int):
        if not is_int(value) or value < 1:
            raise bad("a positive whole number")
        return value
    if isinstance(default, float):
        if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value <= 0:
            raise bad("a positive finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
            raise bad("a list of whole numbers ≥ 0")
        return tuple(value)
    raise TypeError(f"no JSON rule for field '{path}' of type {type(default).__name__}")


def _check_model(config: ModelConfig) -> None:
    """The ranges and cross-network agreements the types alone do not give."""
    def bad(path: str, message: str):
        return ValueError(f"model config field '{path}' {message}")
    if not config.beta_start < config.beta_end < 1:
        raise bad("beta_end", f"must satisfy beta_start < beta_end < 1 (β_t = linspace(√β_start, √β_end, T)²), "
                              f"got beta_start={config.beta_start}, beta_end={config.beta_end}")
    if not MIN_TRAIN_TIMESTEPS <= config.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise bad("num_train_timesteps", f"must be between {MIN_TRAIN_TIMESTEPS} and {MAX_TRAIN_TIMESTEPS:,} (the "
                                         f"samplers need that many timesteps; SD v1 uses 1000), got "
                                         f"{config.num_train_timesteps}")
    if config.kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}, got {config.kind!r}")
    if config.prediction_type not in PREDICTION_TYPES:
        raise bad("prediction_type", f"must be one of {', '.join(PREDICTION_TYPES)}, got {config.prediction_type!r}")
    unet, vae, text = config.unet, config.vae, config.text_encoder
    factor = vae.downsample_factor
    if config.image_size % factor:
        raise bad("image_size", f"must be a multiple of {factor} (the VAE's downsampling), got {config.image_size}")
    for path, levels in (("unet.channel_mult", unet.channel_mult), ("vae.channel_mult", vae.channel_mult)):
        if not levels or 0 in levels:
            raise bad(path, f"must list at least one level, each ≥ 1, got {list(levels)}")
    if any(level >= len(unet.channel_mult) for level in unet.attention_levels):
        raise bad("unet.attention_levels", f"names levels of a {len(unet.channel_mult)}-level UNet (0 to "
                                           f"{len(unet.channel_mult) - 1}), got {list(unet.attention_levels)}")
    if unet.context_dim != text.width:
        raise bad("unet.context_dim", f"must equal text_encoder.width ({text.width}): the UNet cross-attends to the "
                                      f"text encoder's output, got {unet.context_dim}")
    z = vae.z_channels
    # latent; + image latent (instruct); + mask (inpainting); + a low-resolution RGB image (×4 upscaler)
    if unet.in_channels not in (z, 2 * z, 2 * z + 1, z + 3):
        raise bad("unet.in_channels", f"must be {z}, {2 * z} or {2 * z + 1} (vae.z_channels = {z}: the latent, "
                                      f"+ an image latent, + a mask) or {z + 3} (the ×4 upscaler: + an RGB image), "
                                      f"got {unet.in_channels}")
    if any(level >= len(unet.channel_mult) for level in unet.disable_self_attention):
        raise bad("unet.disable_self_attention", f"names levels of a {len(unet.channel_mult)}-level UNet, got "
                                                 f"{list(unet.disable_self_attention)}")
    if unet.out_channels != z:
        raise bad("unet.out_channels", f"must equal vae.z_channels ({z}): ε̂ has the latent's shape, got "
                                       f"{unet.out_channels}")
    if text.max_positions < CONTEXT_LENGTH:
        raise bad("text_encoder.max_positions", f"must be at least {CONTEXT_LENGTH} (the tokenizer always gives "
                                                f"{CONTEXT_LENGTH} ids), got {text.max_positions}")


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def tiny_config() -> ModelConfig:
    """The bundled tiny model (ldm_scratch/bundled/tiny-shapes.safetensors): SD v1's building blocks — a UNet of
    ResBlocks with cross-attention, a KL autoencoder with a mid-block self-attention, a causal CLIP text transformer with the full
    49,408-token vocabulary — at widths that train on 2 CPU cores in under 30 minutes. 64×64 images.

    Two departures from SD v1's shape, both measured (README, *Train your own*): the autoencoder has 3 levels, so it
    downsamples 4× (16×16×4 latents) instead of 8×: with 8×8 latents the thin decoder took too long to learn colours
    (80 % of its reconstructions read back right by the checker after 1,500 steps, 100 % here). The UNet has 3 levels
    (16², 8², 4²) with attention at 8² and 4² only, which keeps a training step about as cheap as 8×8 latents.

    3.2 M parameters (13.0 MB in float32), half of them CLIP's token table (49,408 × 32). latent_scale is a
    placeholder: training sets it to 1 / std of the VAE's latents over the data.
    """
    return ModelConfig(
        text_encoder=CLIPTextConfig(width=32, n_layers=2, n_heads=2, mlp_width=128),
        unet=UNetConfig(model_channels=24, channel_mult=(1, 2, 2), attention_levels=(1, 2), n_heads=2,
                        context_dim=32, norm_groups=8),
        vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 4), norm_groups=4),
        latent_scale=1.0, image_size=64, kind="tiny", name="tiny-shapes")
