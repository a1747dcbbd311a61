"""Convolutions and linear layers with their weights packed once, in oneDNN's own layout (CPU inference).

PyTorch's CPU convolution hands the weight [C_out, C_in, k, k] to oneDNN, which first copies it into the blocked
layout its kernel reads (e.g. 16 output × 16 input channels per block) and only then convolves. For the UNet at 512²
that copy is paid 98 times per step, on 589 M weights: measured here (2 cores, AVX-512 BF16), one 3×3
convolution 1280 → 1280 at 16×16 took 44 ms with the weight as it is and 32 ms with the weight packed beforehand,
320 → 320 at 64×64 42.6 ms vs 32.7 ms (bfloat16, channels_last; the outputs were identical). Over a whole bf16
UNet step the convolutions took 2.20 s plain and 2.00 s packed (profile, README "bfloat16 on a CPU").

    y = W ⋆ x + b   (convolution),   y = x Wᵀ + b   (linear)
                    the same equations; only where W's numbers sit in memory changes

bfloat16 linear layers gain the same way (oneDNN's bf16 matrix product also reorders W at each call); float32
linear layers run through MKL, which does not, so they are left alone. Whole SD UNet step at 512² with CFG,
bfloat16 (scripts/benchmark.py --prepack): see the README's "bfloat16 on a CPU" for the measured ratios.

`prepack(unet)` switches every nn.Conv2d of a network to `PackedConv2d` and every nn.Linear to `PackedLinear`
(the class only: parameters, state_dict keys, `.to()` and training are untouched). On the first inference call each layer packs its weight for
the input's shape and keeps the packed copy beside the module; the copy is made again when the weight changes
(a LoRA merged or unloaded, `.to(dtype)`, an in-place edit: the weight's identity, storage and version counter are
checked at every call). With autograd recording, on another device, or for padding modes oneDNN does not take,
the layer runs nn.Conv2d's (nn.Linear's) own forward.

The cost is memory: one more copy of the packed weights (the SD UNet's 589 M convolution and 270 M linear
weights: +1.6 GiB in bfloat16; +2.2 GiB in float32, convolutions only). So `load_pipeline` packs by default only
in bfloat16 on the CPU, where weights and copy together (3.2 GiB) are still less than the float32 UNet (3.4 GiB)
and the gain is larger; `prepack=True/False` (`--prepack`, `--no-prepack`) decides it either way, and `unpack`
drops the copies and restores the plain classes.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

__all__ = ["PackedConv2d", "PackedLinear", "prepack", "unpack", "packed_bytes"]

# module → (key, weak reference to the weight packed, packed weight). Kept outside the modules so that deepcopy,
# torch.save and state_dict never meet the opaque oneDNN tensor; an entry goes when its module is garbage-collected.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _inference_on_cpu(layer: nn.Module, x: torch.Tensor, dtypes: tuple) -> bool:
    """Whether the packed path applies: oneDNN present, x on the CPU in one of `dtypes` and in the layer's dtype,
    and no autograd graph to record (the packed ops have no backward)."""
    return (torch.backends.mkldnn.is_available() and x.device.type == "cpu" and x.dtype in dtypes
            and layer.weight.dtype == x.dtype and (layer.bias is None or layer.bias.dtype == x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)))


def _packed(layer: nn.Module, shape: tuple, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """layer's weight packed by `pack` for inputs of `shape`, from the cache while it is still that weight.

    The key is what the packed copy depends on: which tensor the weight is (a LoRA merge or unload assigns another),
    where its numbers live (`.to()` moves them), how often they were written in place (`_version`), its dtype, and
    the input's shape (oneDNN picks the blocked layout for that shape)."""
    w = layer.weight
    key = (id(w), w.data_ptr(), w._version, w.dtype, shape)
    cached = _PACKED.get(layer)
    if cached is not None and cached[0] == key and cached[1]() is w:
        return cached[2]
    _PACKED.pop(layer, None)                                   # free the stale copy before making the new one
    with torch.no_grad():
        packed = pack(w.detach())
    _PACKED[layer] = (key, weakref.ref(w), packed)
    return packed


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d that convolves with a weight packed once for oneDNN (float32 or bfloat16); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x [B, C_in, H, W] → [B, C_out, H', W']
        if not (_inference_on_cpu(self, x, (torch.float32, torch.bfloat16)) and x.dim() == 4
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return super().forward(x)
        geometry = list(self.padding), list(self.stride), list(self.dilation), self.groups
        weight = _packed(self, tuple(x.shape), lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.to_mkldnn(), *geometry, list(x.shape)))
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry, "none", [], "")


class PackedLinear(nn.Linear):
    """nn.Linear that multiplies by a weight packed once for oneDNN (bfloat16 only); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x [..., K] → [..., N]
        if not _inference_on_cpu(self, x, (torch.bfloat16,)):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])                          # [M, K]: oneDNN's matrix product is 2-D
        weight = _packed(self, (rows.shape[0],), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]))
        y = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")    # [M, N]
        return y.reshape(*x.shape[:-1], y.shape[-1])


PACKED_CLASS = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}
PLAIN_CLASS = {packed: plain for plain, packed in PACKED_CLASS.items()}


def prepack(network: nn.Module) -> nn.Module:
    """Switch network's plain nn.Conv2d and nn.Linear layers to their packed classes, in place (the class only);
    returns network. Weights are packed lazily, at each layer's first inference call. Twice is harmless."""
    for module in network.modules():
        packed = PACKED_CLASS.get(type(module))
        if packed is not None:
            module.__class__ = packed
    return network


def unpack(network: nn.Module) -> nn.Module:
    """Undo `prepack`: drop the packed copies and make the layers plain nn.Conv2d / nn.Linear again."""
    for module in network.modules():
        plain = PLAIN_CLASS.get(type(module))
        if plain is not None:
            _PACKED.pop(module, None)
            module.__class__ = plain
    return network


def packed_bytes(network: nn.Module) -> int:
    """Bytes held by the packed copies of network's layers (their weights' size; oneDNN may pad a little)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in network.modules() if m in _PACKED)
