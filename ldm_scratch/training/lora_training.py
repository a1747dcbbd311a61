"""Trainable LoRA layers for fine-tuning, and writing them as kohya (web UI / ComfyUI) or diffusers files.

Hu et al. 2021 (LoRA, eq 3) freeze a layer's weight W₀ ∈ R^{out×in} and learn a low-rank update beside it:

    h = W₀ x + (α/r) · B (A x)        A ∈ R^{r×in} ("down"), B ∈ R^{out×r} ("up"), r ≪ in, out

A starts random (Kaiming-uniform, as microsoft/LoRA's loralib does) and B starts at zero, so B A = 0: the first
step sees exactly the base model, and training moves away from it only as far as the data asks. α/r keeps the
update's size comparable when the rank changes (α = r: factor 1).

How the update reaches the layer: a forward hook on the frozen module adds (α/r)·B(A x) to its output, so the
networks stay the plain classes of unet.py / clip.py (nothing is renamed, a saved file names the module by its
own path) and removing the hooks gives the base model back untouched. A Conv2d gets a LoCon pair: A is a Conv2d
with the layer's kernel, stride and padding [r, in, k, k], B a 1×1 Conv2d [out, r, 1, 1] — what lora.py loads.

Files (loaded back by lora.py, `pipe.load_lora`):
    kohya      lora_unet_<diffusers path with _>.lora_down.weight [r, in(, k, k)], .lora_up.weight, .alpha (scalar)
    diffusers  unet.<diffusers path>.lora_A.weight, .lora_B.weight (α/r folded into B: B' = (α/r)·B, no alpha key,
               so every reader's default α = r gives the same update)
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..checkpoint.lora_keys import diffusers_unet_module, kohya_name, transformers_text_module

# --lora-targets NAME → which layers of the UNet get a LoRA (a regular expression on our module names, or
# "cross-kv": the layers context_kv_names finds); the text encoder's (--lora-text-encoder) are its attention
# projections and MLP.
TARGET_PRESETS = {
    "attention": r"\.(self_attn|cross_attn)\.(to_q|to_k|to_v|to_out)$",           # the usual LoRA targets
    "transformer": r"\.(self_attn\.|cross_attn\.|ff\.|proj_in$|proj_out$)",        # + the MLPs and projections
    "all": r".",                                                                   # every Linear and Conv2d (LoCon)
    "cross-kv": None,           # only the K and V projections of the prompt (Custom Diffusion, Kumari et al. 2023)
}
TEXT_TARGETS = r"\.(attn\.(q|k|v|out)|mlp\.(fc1|fc2))$"


def context_kv_names(unet: nn.Module) -> list[str]:
    """The UNet's layers that read the prompt: W_k and W_v of every attention whose keys and values come from the
    context, K = W_k c, V = W_v c (c [B, 77, D] the text encoder's output). Everything else in the UNet sees the
    prompt only through what these produce, so a change to them alone reaches an old prompt only through its own
    tokens' c (Kumari et al. 2023, Custom Diffusion §3.1: "cross-attention K, V" are what fine-tuning moves most).
    A block with self_attends=False cross-attends in its first attention too: its K, V are included."""
    names = []
    for name, module in unet.named_modules():
        if hasattr(module, "cross_attn") and hasattr(module, "self_attends"):      # spatial_transformer's block
            attentions = ["cross_attn"] if module.self_attends else ["self_attn", "cross_attn"]
            names += [f"{name}.{a}.{p}" for a in attentions for p in ("to_k", "to_v")]
    return names


def target_names(network: nn.Module, targets: str) -> set[str]:
    """The module names of `network` a LoRA may go on: "cross-kv" (context_kv_names), a TARGET_PRESETS name, or
    a regular expression on our module names (TEXT_TARGETS)."""
    if targets == "cross-kv":
        return set(context_kv_names(network))
    pattern = TARGET_PRESETS.get(targets, targets)
    return {name for name, _ in network.named_modules() if re.search(pattern, name)}


class LoraAdapter(nn.Module):
    """The update (α/r)·B(A x) of one frozen layer: Linear x [..., in] → [..., out], Conv2d [B, in, H, W] →
    [B, out, H', W']."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                  bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))   # A: loralib's init
        nn.init.zeros_(self.up.weight)                               # B = 0: training starts at the base model
        self.rank, self.alpha = rank, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.alpha / self.rank) * self.up(self.down(x))     # (α/r) · B (A x)


class LoraLayers(nn.Module):
    """All adapters of one fine-tune, keyed by "unet:<our module name>" / "text_encoder:<name>" (dots as "|",
    which nn.ModuleDict allows), with the hooks that add them to the frozen layers' outputs."""

    def __init__(self, networks: dict[str, nn.Module], rank: int, alpha: float, unet_targets: str,
                 text_encoder: bool):
        super().__init__()
        if rank < 1:
            raise ValueError(f"--lora-rank {rank}: the rank must be at least 1")
        if unet_targets not in TARGET_PRESETS:
            raise ValueError(f"--lora-targets {unet_targets!r}: choose one of {', '.join(TARGET_PRESETS)}")
        self.adapters = nn.ModuleDict()
        self.layers: dict[str, tuple[str, str, nn.Module]] = {}       # key → (network, our name, the layer)
        self.n_levels = len(networks["unet"].config.channel_mult)
        targets = {"unet": target_names(networks["unet"], unet_targets),
                   "text_encoder": target_names(networks["text_encoder"], TEXT_TARGETS) if text_encoder else set()}
        for network, names in targets.items():
            for name, layer in networks[network].named_modules():
                if name in names and isinstance(layer, (nn.Linear, nn.Conv2d)):
                    key = f"{network}:{name.replace('.', '|')}"
                    self.adapters[key] = LoraAdapter(layer, rank, alpha)
                    self.layers[key] = (network, name, layer)
        if not self.adapters:
            raise ValueError(f"--lora-targets {unet_targets!r} matched no layer of this model")
        self.hooks: list = []

    def attach(self) -> None:
        """Add each adapter to its layer's output: h = W₀x (+ b) + (α/r)·B(Ax)."""
        self.detach()
        for key, (_, _, layer) in self.layers.items():
            adapter = self.adapters[key]
            self.hooks.append(layer.register_forward_hook(lambda _m, inputs, out, a=adapter: out + a(inputs[0])))

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """The kohya / web UI layout: lora_down = A, lora_up = B, alpha = α (a 0-d tensor)."""
        tensors = {}
        for key, (network, name, _) in self.layers.items():
            adapter, prefix = self.adapters[key], kohya_name(network, name, self.n_levels)
            tensors[f"{prefix}.lora_down.weight"] = adapter.down.weight.detach().cpu().contiguous()
            tensors[f"{prefix}.lora_up.weight"] = adapter.up.weight.detach().cpu().contiguous()
            tensors[f"{prefix}.alpha"] = torch.tensor(adapter.alpha)
        return tensors

    def diffusers_tensors(self) -> dict[str, torch.Tensor]:
        """The diffusers / PEFT layout: lora_A = A, lora_B = (α/r)·B (so α = r, the default, is exact)."""
        tensors = {}
        for key, (network, name, _) in self.layers.items():
            adapter = self.adapters[key]
            path = diffusers_unet_module(name, self.n_levels) if network == "unet" else transformers_text_module(name)
            tensors[f"{network}.{path}.lora_A.weight"] = adapter.down.weight.detach().cpu().contiguous()
            up = adapter.up.weight.detach().cpu() * (adapter.alpha / adapter.rank)
            tensors[f"{network}.{path}.lora_B.weight"] = up.contiguous()
        return tensors
