"""ControlNets in the sampling loop: the glue between the pipeline's UNet call and one or more ControlNets.

The pipeline asks `eps = unet(x, t, context)` at every model call. With ControlNets it asks `ControlledUNet` instead,
which has the same signature and computes

    (r_1 … r_12, r_mid) = Σ_k  s_k · ControlNet_k(x, t, context, hint_k)       over the ControlNets active now
    eps = UNet(x, t, context, control=(r_1 … r_12, r_mid))

as diffusers' StableDiffusionControlNetPipeline does (multi-ControlNet: the residuals of all nets are summed).

- **Scale** s_k: `controlnet_scale` (one number, or one per ControlNet).
- **Window**: ControlNet k acts on step i of the n steps that run only if  i/n ≥ start_k  and  (i+1)/n ≤ end_k
  (diffusers' `controlnet_keep`). For img2img, n counts the steps that run, as diffusers does. A step is counted
  once however many model calls a sampler makes in it (Heun makes two; diffusers' Heun counts both calls in its
  doubled timestep list, so a window's edge can fall one call differently there).
- **Guess mode** (diffusers): with classifier-free guidance, the ControlNet sees only the conditional half of the
  [uncond; cond] batch, and the unconditional half gets zero residuals, so the control steers the image through
  the guidance difference alone (useful with an empty prompt). The 13 residuals are scaled by
  logspace(−1, 0, 13) · s = 10^(−(12 − i)/12) · s (0.1 for the first skip … 1 for the middle), shallow features
  weighing less. The original ControlNet code scales by 0.825^(12 − i): the same geometric curve with its ratio
  10^(−1/12) = 0.82540… rounded to 0.825, so its scales are lower by up to 9.4e-4 (0.4 %) and its guess-mode images
  differ slightly from diffusers'. We follow diffusers, our parity target. diffusers applies the logspace scales in
  guess mode even without guidance; so do we.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .control_images import control_tensor
from .controlnet import ControlNet
from .samplers.base import StepCounter



@dataclass
class Control:
    """One ControlNet with its hint [K, 3, H, W] in [0, 1] (K = 1 or the batch), scale and window."""
    controlnet: ControlNet
    hint: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, n_steps: int) -> bool:
        """diffusers' controlnet_keep: on for step i of n iff i/n ≥ start and (i+1)/n ≤ end."""
        return not (step / n_steps < self.start or (step + 1) / n_steps > self.end)


def _per_net(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} ControlNet(s); give one, or one per ControlNet")
    return values


def prepare_controls(controlnet, control_image, unet_config, *, scale=1.0, start=0.0, end=1.0, height: int,
                     width: int, batch: int, device=None) -> list[Control]:
    """Check the ControlNet arguments and load the hints: one Control per ControlNet ([] for controlnet=None).

    controlnet: a ControlNet or a list; control_image: one image per ControlNet (a list for several; each as
    images.load_images takes it, one for the batch or one per image); scale/start/end: a number or one per net.
    """
    if controlnet is None:
        if control_image is not None:
            raise ValueError("control_image was given without controlnet: load one with "
                             "ldm_scratch.load_controlnet(path) and pass controlnet=")
        return []
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not nets:
        raise ValueError("controlnet is an empty list; give a ControlNet (ldm_scratch.load_controlnet(path))")
    if control_image is None:
        raise ValueError("controlnet needs control_image: the map it was trained on (e.g. canny edges), see "
                         "ldm_scratch.control_images")
    images = list(control_image) if len(nets) > 1 and isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(nets):
        raise ValueError(f"control_image: got {len(images)} for {len(nets)} ControlNets; give one per ControlNet")
    scales, starts, ends = (_per_net(v, len(nets), name) for v, name in
                            ((scale, "controlnet_scale"), (start, "control_start"), (end, "control_end")))
    controls = []
    for k, (net, image, s, a, b) in enumerate(zip(nets, images, scales, starts, ends)):
        if not isinstance(net, ControlNet):
            raise TypeError(f"controlnet {k}: expected a ControlNet (ldm_scratch.load_controlnet), got "
                            f"{type(net).__name__}")
        _check_fits(net, unet_config, k)
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"control_start / control_end of ControlNet {k} must satisfy 0 ≤ start < end ≤ 1, "
                             f"got {a}, {b}")
        hint = control_tensor(image, height, width, batch).to(device)
        controls.append(Control(net, hint, float(s), float(a), float(b)))
    return controls


def _check_fits(net: ControlNet, unet_config, k: int) -> None:
    """The residuals must have the UNet's skip shapes: same widths, levels and ResBlocks per level."""
    c = net.config.unet
    fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim")
    theirs = {f: getattr(c, f) for f in fields}
    ours = {f: getattr(unet_config, f) for f in fields}
    if theirs != ours:
        raise ValueError(f"controlnet {k} was made for another UNet: its encoder has {theirs}, this model's UNet "
                         f"{ours}. Use a ControlNet trained for this base model (SD v1 ControlNets for SD v1).")


class ControlledUNet(StepCounter):
    """unet(x, t, context) with the ControlNets' residuals added: the callable the pipeline gives its samplers.

    n_steps: the steps that run (the window is measured in them); guided: context is [uncond; cond] (CFG).
    `step` counts finished steps; wrap the sampler's callback with `counting` so it advances.
    """

    def __init__(self, unet, controls: Sequence[Control], *, guess_mode: bool, guided: bool, n_steps: int):
        self.unet, self.controls = unet, list(controls)
        self.guess_mode, self.guided, self.n_steps = guess_mode, guided, n_steps
        self.step = 0

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        total = None
        for control in self.controls:
            if not control.active(self.step, self.n_steps):
                continue
            down, middle = self.residuals(control, x, t, context)
            total = (down, middle) if total is None else (
                [a + b for a, b in zip(total[0], down)], total[1] + middle)
        return self.unet(x, t, context, control=total)

    def residuals(self, control: Control, x: torch.Tensor, t, context: torch.Tensor):
        """One ControlNet's scaled residuals for the whole batch x [B or 2B, C, h, w]."""
        net = control.controlnet
        weight = next(net.parameters())              # the ControlNet may sit in another dtype or on another device
        out_device, out_dtype, device, dtype = x.device, x.dtype, weight.device, weight.dtype
        x = x[:, :net.config.unet.in_channels].to(device, dtype)      # an inpainting UNet's 9 channels: the first 4
        context = context.to(device, dtype)
        only_cond = self.guess_mode and self.guided   # guess mode: the ControlNet sees the conditional half only
        half = x.shape[0] // 2
        if only_cond:
            x, context = x[half:], context[half:]
        hint = control.hint
        if hint.shape[0] != x.shape[0]:               # one hint for the batch, or [hint; hint] for [uncond; cond]
            hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
        t_net = torch.as_tensor(t, device=x.device).reshape(-1)
        if t_net.shape[0] > 1 and only_cond:
            t_net = t_net[half:]
        down, middle = net(x, t_net.to(device), context, hint.to(device))
        down, middle = [r.to(out_device, out_dtype) for r in down], middle.to(out_device, out_dtype)
        n = len(down) + 1
        if self.guess_mode:   # diffusers: s · logspace(−1, 0, n) over the n residuals, the middle one last
            scales = (torch.logspace(-1, 0, n) * control.scale).tolist()
        else:
            scales = [control.scale] * n
        down = [r * s for r, s in zip(down, scales[:-1])]
        middle = middle * scales[-1]
        if only_cond:                                 # the unconditional half gets no control: zeros
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            middle = torch.cat([torch.zeros_like(middle), middle])
        return down, middle
