"""The configuration of a whole Stable Diffusion model: the three networks' configs plus the numbers that tie them
together (latent scale, β schedule, native resolution).

Each network keeps its own dataclass beside its code (`CLIPTextConfig` in clip.py, `UNetConfig` in unet.py,
`VAEConfig` in vae.py) with the real SD v1 defaults; `ModelConfig()` is therefore SD v1.x. The bundled tiny model
stores its `ModelConfig` as JSON in the safetensors metadata (key `ldm_scratch_config`); official files carry no
config, so it is inferred from tensor shapes (checkpoint/keymap.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .clip import CLIPTextConfig
from .diffusion import Schedule, ScheduleConfig
from .unet import UNetConfig
from .vae import VAEConfig

METADATA_KEY = "ldm_scratch_config"


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
    kind: str = "sd-v1"               # "sd-v1", "sd-v1-inpainting", or "tiny"
    name: str = "stable-diffusion-v1"  # written into PNG metadata ("Model:")

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    def schedule(self) -> Schedule:
        """The β schedule (T, β_start, β_end) this model is trained and sampled with."""
        return Schedule(ScheduleConfig(n_train_steps=self.num_train_timesteps, beta_start=self.beta_start,
                                       beta_end=self.beta_end))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        parts = {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}
        known = {f.name for f in fields(cls)}
        kwargs = {k: _build(parts[k], v) if k in parts else v for k, v in data.items() if k in known}
        return cls(**kwargs)


def _build(config_class, values: dict):
    """Rebuild a network config from JSON, turning lists back into the tuples the dataclasses use."""
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


def tiny_config() -> ModelConfig:
    """The bundled tiny model (weights/tiny-shapes.safetensors): SD v1's building blocks — a UNet of ResBlocks with
    cross-attention, a KL autoencoder with a mid-block self-attention, a causal CLIP text transformer with the full
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
