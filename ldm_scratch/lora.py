"""LoRA: low-rank updates of the UNet's and the text encoder's layers, loaded from kohya / AUTOMATIC1111 and
diffusers / PEFT files, several at once, each with its own scale.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq 3) learns, for a frozen weight
W ∈ R^{out×in}, two small matrices A ∈ R^{r×in} ("down") and B ∈ R^{out×r} ("up") with r ≪ in, out, and the layer
computes W x + (α/r)·B A x. α is a constant stored beside A and B (α = r when a file has none, so α/r = 1); the user's
`scale` multiplies the update on top. Loading merges the update into the weight:

    W' = W + Σ_i scale_i · (α_i / r_i) · B_i A_i          (one term per loaded LoRA that touches this layer)

A convolution is a matrix too: a Conv2d weight [out, in, k, k] is W ∈ R^{out×(in·k·k)}; a LoCon's A is a Conv2d
[r, in, k, k] and its B a 1×1 Conv2d [out, r, 1, 1], so B A = B[:, :, 0, 0] @ A.reshape(r, in·k·k), reshaped back.

LyCORIS' other two updates are read too (kohya names, `.alpha` as above), each written as a full-size ΔW:

    LoHa (Hadamard product, FedPara)   ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b)     r = rows of W1b
    LoKr (Kronecker product)           ΔW = (α/r) · W1 ⊗ W2                    W1 = w1 or W1a W1b, W2 likewise;
                                                                               r = a factored one's rank (none: 1)

Why merge instead of adding B(Ax) in the forward pass (as PEFT does): the networks stay plain (unet.py and clip.py
know nothing of LoRA), and sampling costs nothing extra. W' is always recomputed from the original W, which is
kept (the Parameter itself, never a copy): unloading puts that very tensor back, bit for bit, instead of
subtracting the update again (W + Δ − Δ ≠ W in floating point).

Loading is strict: every tensor of the file is used, every layer it names exists in our networks, and every
shape fits; otherwise `LoraError` lists the offending keys and nothing is changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint.lora_keys import Target, lora_targets, other_kind, parse_key
from .checkpoint.tensor_file import CheckpointError, TensorFile, key_list


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model (unknown keys, missing layers, wrong shapes) or a bad LoRA call."""


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """[rows, …] → [rows, everything else], float32: a conv kernel [o, i, k, k] as the matrix [o, i·k·k]."""
    return t.float().reshape(t.shape[0], -1)


def _lora(f: dict) -> torch.Tensor:
    return _matrix(f["up"]) @ _matrix(f["down"])                                    # B A


def _loha(f: dict) -> torch.Tensor:
    return (_matrix(f["hada_w1_a"]) @ _matrix(f["hada_w1_b"])) * (_matrix(f["hada_w2_a"]) @ _matrix(f["hada_w2_b"]))


def _lokr(f: dict) -> torch.Tensor:
    w1 = f["lokr_w1"].float() if "lokr_w1" in f else _matrix(f["lokr_w1_a"]) @ _matrix(f["lokr_w1_b"])
    if "lokr_w2" in f:
        w2 = f["lokr_w2"].float()
    else:                                  # W2 = W2a W2b, back in W2b's kernel shape: [o2, r] @ [r, i2(, k, k)]
        w2 = (_matrix(f["lokr_w2_a"]) @ _matrix(f["lokr_w2_b"])).reshape(-1, *f["lokr_w2_b"].shape[1:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]          # [o1, i1] ⊗ [o2, i2, k, k] = [o1·o2, i1·i2, k, k]
    return torch.kron(w1, w2)                                                       # W1 ⊗ W2


PRODUCTS = {"lora": _lora, "loha": _loha, "lokr": _lokr}
LOKR_W1 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
LOKR_W2 = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})


def kind_of(roles) -> str | None:
    """'lora', 'loha' or 'lokr' for a complete set of factor names (alpha aside); None for an incomplete one."""
    factors = set(roles) - {"alpha"}
    if factors == {"down", "up"}:
        return "lora"
    if factors == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        return "loha"
    if any(factors == a | b for a in LOKR_W1 for b in LOKR_W2):
        return "lokr"
    return None


@dataclass
class LoraUpdate:
    """One layer's update: its factors by name ("down" = A [r, in(, k, k)] and "up" = B [out, r(, 1, 1)] for a LoRA;
    hada_*/lokr_* for LoHa/LoKr) and α (None: α = r)."""
    target: Target
    factors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.factors)

    @property
    def rank(self) -> int | None:
        """The r of α/r: A's rows (LoRA), W1b's (LoHa), a factored Kronecker factor's (LoKr; None if neither is)."""
        for name in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if name in self.factors:
                return self.factors[name].shape[0]
        return None

    def delta(self) -> torch.Tensor:
        """(α / r) · B A (or the LoHa / LoKr product) in the layer's weight shape, float32; the user's scale is
        applied by the caller."""
        r = self.rank
        ratio = 1.0 if r is None or self.alpha is None else self.alpha / r   # α = r when the file has no alpha
        return ratio * PRODUCTS[self.kind](self.factors).reshape(self.target.module.weight.shape)


@dataclass
class Lora:
    """One loaded file: its name, its scale, and the updates of the layers it touches."""
    name: str
    scale: float
    updates: list[LoraUpdate]
    source: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Reading a file, strictly.
# ---------------------------------------------------------------------------------------------------------------

def read_lora(path: str | os.PathLike, networks: dict[str, nn.Module]) -> list[LoraUpdate]:
    """The updates a LoRA file holds, matched to the layers of `networks` ({"unet": …, "text_encoder": …}).
    .safetensors (preferred) or .ckpt/.pt/.bin read with torch.load(weights_only=True), never unpickled freely."""
    file = TensorFile(Path(path))
    return parse_lora({key: file.get for key in file.keys()}, file.shapes, networks, str(path))


def parse_lora(getters: dict, shapes: dict[str, tuple], networks: dict[str, nn.Module],
               source: str = "the LoRA") -> list[LoraUpdate]:
    """Match every key to (layer, role), check names, pairs and shapes, then read the tensors.
    getters: {key: function(key) → tensor}; shapes: {key: shape}. Raises LoraError before reading any tensor."""
    what = other_kind(shapes)
    if what and not any(parse_key(k) for k in shapes):
        raise LoraError(f"cannot load {source}: it is {what}.")
    targets = lora_targets(networks)
    groups: dict[str, dict[str, str]] = {}
    unknown, unmatched = [], []
    for key in shapes:
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        layer, role = parsed
        if layer not in targets:
            unmatched.append(key)
            continue
        groups.setdefault(layer, {})[role] = key
    problems = []
    if unknown:
        hint = f" It looks like {what}." if what else ""
        problems.append(f"{len(unknown)} key(s) are not LoRA weights of any format we read: {key_list(unknown)}.{hint}")
    if unmatched:
        problems.append(f"{len(unmatched)} key(s) name layers our UNet / text encoder do not have: "
                        f"{key_list(unmatched)} (a LoRA for another model, e.g. SD 2.x or SDXL?)")
    incomplete = [f"{layer} (has {', '.join(sorted(roles))})" for layer, roles in groups.items()
                  if kind_of(roles) is None]
    if incomplete:
        problems.append(f"{len(incomplete)} layer(s) lack their down/up pair (or LoHa/LoKr factors): "
                        f"{key_list(incomplete, 6)}")
    if not problems:
        problems += _shape_problems(groups, shapes, targets)
    if problems:
        raise LoraError(f"cannot load {source}: " + " ".join(problems) + " Nothing was changed.")
    if not groups:
        raise LoraError(f"cannot load {source}: it holds no LoRA weights.")
    updates, broken = [], []
    for layer, roles in groups.items():
        tensors = {role: getters[key](key) for role, key in roles.items()}
        broken += [roles[role] for role, t in tensors.items() if not torch.isfinite(t.float()).all()]
        alpha = tensors.pop("alpha").float().item() if "alpha" in tensors else None
        updates.append(LoraUpdate(targets[layer], tensors, alpha))
    if broken:
        raise LoraError(f"cannot load {source}: {len(broken)} tensor(s) hold NaN or inf: {key_list(broken)}. The "
                        "file is corrupt (or was saved from a diverged training run). Nothing was changed.")
    return updates


def _shape_problems(groups, shapes, targets) -> list[str]:
    """A [r, in(, k, k)] and B [out, r(, 1, 1)] must fit the layer's weight [out, in(, k, k)]; a LoHa's or LoKr's
    product (computed on the meta device: shapes only) must have its numbers."""
    kernel = lambda shape: tuple(shape[2:]) or (1, 1)       # a Linear is a 1×1 convolution
    bad = []
    for layer, roles in groups.items():
        weight = tuple(targets[layer].module.weight.shape)
        factors = {role: tuple(shapes[key]) for role, key in roles.items() if role != "alpha"}
        fits = "alpha" not in roles or tuple(shapes[roles["alpha"]]) in ((), (1,))      # α is one number
        if kind_of(roles) == "lora":
            down, up = factors["down"], factors["up"]
            fits = fits and (len(down) in (2, 4) and len(up) in (2, 4) and kernel(up) == (1, 1)
                             and up[:2] == (weight[0], down[0]) and down[1] == weight[1]
                             and kernel(down) == kernel(weight))
        else:
            fits = fits and _product_fits(kind_of(roles), factors, weight)
        if not fits:
            bad.append(f"{layer}: " + ", ".join(f"{role} {list(shape)}" for role, shape in sorted(factors.items()))
                       + f" for a weight {list(weight)}")
    return [f"{len(bad)} layer(s) have shapes that do not fit: {key_list(bad, 6)}"] if bad else []


def _product_fits(kind: str, shapes: dict[str, tuple], weight: tuple) -> bool:
    meta = {role: torch.empty(shape, device="meta") for role, shape in shapes.items()}
    try:
        product = PRODUCTS[kind](meta)
    except RuntimeError:                                   # the factors do not even multiply
        return False
    return product.shape[0] == weight[0] and product.numel() == torch.Size(weight).numel()


# ---------------------------------------------------------------------------------------------------------------
# Patching the layers: W' = W + Σ scale·(α/r)·B A, always from the original W.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LoraSet:
    """The LoRAs loaded into a pair of networks, and the original weight of every layer they touch."""
    networks: dict[str, nn.Module]
    loras: dict[str, Lora] = field(default_factory=dict)
    originals: dict[int, nn.Parameter] = field(default_factory=dict)   # id(module) → its own weight Parameter

    def add(self, lora: Lora) -> None:
        if lora.name in self.loras:
            raise LoraError(f"a LoRA named {lora.name!r} is already loaded: pass another name=, or unload it first")
        self.loras[lora.name] = lora
        self._refresh({id(u.target.module): u.target.module for u in lora.updates})

    def set_scale(self, name: str, scale: float) -> None:
        self._get(name).scale = float(scale)
        self._refresh({id(u.target.module): u.target.module for u in self.loras[name].updates})

    def remove(self, name: str | None = None) -> None:
        names = list(self.loras) if name is None else [self._get(name).name]
        touched = {}
        for n in names:
            touched.update({id(u.target.module): u.target.module for u in self.loras.pop(n).updates})
        self._refresh(touched)

    def _get(self, name: str) -> Lora:
        if name not in self.loras:
            raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        return self.loras[name]

    @torch.no_grad()
    def _refresh(self, modules: dict[int, nn.Module]) -> None:
        """Recompute W' for these layers from their original W; put W itself back where no LoRA is left."""
        for key, module in modules.items():
            original = self.originals.setdefault(key, module.weight)
            current = module.weight
            if (original.dtype, original.device) != (current.dtype, current.device):   # the pipeline was .to()'d
                original.data = original.data.to(device=current.device, dtype=current.dtype)
            terms = [(lora.scale, u) for lora in self.loras.values() for u in lora.updates
                     if u.target.module is module]
            if not terms:
                module.weight = self.originals.pop(key)             # the very tensor we took: bit for bit
                continue
            delta = sum(scale * u.delta().to(original.device) for scale, u in terms)  # Σ scale·(α/r)·B A
            merged = torch.empty_like(original)                 # keeps the weight's dtype and memory format
            merged.copy_(original.float() + delta)              # W' = W + Σ scale·(α/r)·B A, in float32
            module.weight = nn.Parameter(merged, requires_grad=original.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# On a pipeline (anything with .unet and .text_encoder): what pipe.load_lora & co. call.
# ---------------------------------------------------------------------------------------------------------------

def lora_set(pipe) -> LoraSet:
    """The pipeline's LoraSet, made on first use."""
    loras = getattr(pipe, "loras", None)
    if loras is None:
        loras = LoraSet({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        pipe.loras = loras
    return loras


def load_lora(pipe, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Merge a LoRA file into the pipeline's UNet and text encoder; returns its name (default: the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist (expected a .safetensors file from kohya/AUTOMATIC1111 "
                        "or diffusers)")
    loras = lora_set(pipe)
    name = path.stem if name is None else name
    if name in loras.loras:
        raise LoraError(f"a LoRA named {name!r} is already loaded: pass another name=, or unload it first")
    loras.add(Lora(name, float(scale), read_lora(path, loras.networks), path))
    return name


def set_lora_scale(pipe, name: str, scale: float) -> None:
    """Change one loaded LoRA's scale (0 switches it off without unloading it)."""
    lora_set(pipe).set_scale(name, scale)


def unload_lora(pipe, name: str | None = None) -> None:
    """Remove one LoRA (or all, name=None); layers no LoRA touches any more get their original weights back."""
    lora_set(pipe).remove(name)


class LoraMethods:
    """`pipe.load_lora`, `pipe.set_lora_scale`, `pipe.unload_lora`: the pipeline class inherits these three thin
    methods; the work is the functions above."""

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
        """Merge a LoRA file (kohya / AUTOMATIC1111 or diffusers / PEFT) into the UNet and the text encoder:
        W' = W + scale·(α/r)·B A. Returns its name (default: the file's stem); several may be loaded at once."""
        return load_lora(self, path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (W' is recomputed from the original W)."""
        set_lora_scale(self, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all (None): untouched layers get their original weights back, bit for bit."""
        unload_lora(self, name)


def parse_lora_option(text: str) -> tuple[str, float]:
    """The CLI's `--lora PATH[:SCALE]` → (path, scale). The scale is what follows the last ':' when it is a number
    (so C:\\loras\\x.safetensors keeps its drive letter)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0
