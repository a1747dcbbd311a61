"""What decides a training run (`TrainConfig`) and which fields stage 2 may change when resuming.

A run's TrainConfig is stored in its checkpoint as JSON; resuming takes the recipe from there (see run.py), and a
caller asking for a different recipe is refused with the differences listed, so a resumed run cannot silently change
what it trains (run.SAFE_ON_RESUME lists the fields that do not change it, which the caller may set).
`STAGE2_FIELDS` lists the fields only stage 2 reads: those may still change while stage 2 has not begun
(`train(..., new_stage2=True)`, `--new-stage2`).

SD 2's and Lin et al.'s options (issue 19): `prediction` "epsilon" (L = ‖ε − ε_θ‖², the seed's eq 4.3) or "v"
(L = ‖v − v_θ‖², v = √ᾱ_t ε − √(1−ᾱ_t) z_0, Salimans & Ho 2022); `zero_snr` rescales the β schedule so ᾱ_T = 0
(diffusion.rescale_zero_terminal_snr); `extreme_backgrounds` adds pure black / pure white backgrounds to the data;
`init` fine-tunes stage 2 from a model file instead of training from scratch (its autoencoder and latent scale
are kept, stage 1 is skipped).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..configs import ModelConfig, tiny_config

# --prediction NAME → the schedule's prediction_type (diffusion.ScheduleConfig, diffusers' name)
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


@dataclass
class TrainConfig:
    """Everything that decides a run; the defaults are the recipe of the bundled model."""
    out_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=tiny_config)
    seed: int = 0
    device: str = "cpu"
    n_images: int = 12_000          # the fixed training set, rendered once
    # stage 1: the autoencoder
    vae_steps: int = 1_500
    vae_batch_size: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-5
    # stage 2: text encoder + UNet
    steps: int = 2_500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    caption_dropout: float = 0.1    # p(caption → "") so the model also learns ε_θ(z_t, t, ∅) for CFG
    offset_noise: float = 0.1       # std of a per-image, per-channel constant added to ε (train.training_noise)
    prediction: str = "epsilon"     # the network's target: "epsilon" (ε) or "v" (v = √ᾱ_t ε − √(1−ᾱ_t) z_0)
    zero_snr: bool = False          # β rescaled so ᾱ_T = 0 (Lin et al. 2023); use with prediction "v"
    # data and start
    extreme_backgrounds: bool = False  # also pure black / pure white backgrounds (data.shapes.EXTREME_BACKGROUNDS)
    init: str = ""                  # a model file to fine-tune stage 2 from ("": train both stages from scratch)
    grad_clip: float = 1.0
    # bookkeeping
    sample_every: int = 500         # sample grid every N steps of stage 2 (0: never)
    checkpoint_every: int = 500     # ckpt.safetensors every N steps (either stage)
    sample_steps: int = 30          # grids use the pipeline's defaults: DPM-Solver++ 2M, 30 steps, guidance 7.5
    guidance_scale: float = 7.5
    progress: bool = True

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(map(repr, PREDICTIONS))}, got "
                             f"{self.prediction!r}")

    @property
    def prediction_type(self) -> str:
        """The schedule's name for `prediction`: "epsilon" or "v_prediction"."""
        return PREDICTIONS[self.prediction]

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["model"] = json.loads(self.model.to_json())
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = json.loads(text)
        values["model"] = ModelConfig.from_json(json.dumps(values["model"]))
        return cls(**values)


# the fields that only stage 2 reads: `new_stage2` may change them while stage 2 has not begun
STAGE2_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "caption_dropout", "offset_noise",
                 "sample_every", "prediction", "zero_snr")

