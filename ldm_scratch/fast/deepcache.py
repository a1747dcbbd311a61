"""DeepCache (Ma, Fang & Wang 2023): reuse the UNet's deep features across neighbouring sampler steps.

Between two adjacent steps the UNet's deep (low-resolution) features barely change; the shallow levels, which see
the current x_t through the skip connections, carry what does. So, with interval N and branch k:

    step i, i mod N = 0   full UNet; keep F = the decoder's hidden state entering the ResBlock that reads skip k
    otherwise             run only the shallow branch: the encoder up to skip k (fresh skips 0 … k), then the
                          decoder from that ResBlock to the output, starting from the cached F instead of
                          everything deeper (the rest of the encoder, the middle block, the deeper decoder)

Skip k is the k-th activation the encoder pushes onto the skip stack (unet.py: 0 = input_conv, then each level's
res/attn outputs and its downsample; SD v1 has 12). With r ResBlocks per down level, skip k is read by decoder
level ⌊k / (r+1)⌋, the ResBlock that is (k mod (r+1)) from that level's last one — the package's
`cache_branch_id`, its `cache_block_id = id // 3` and `cache_layer_id = id % 3` (r = 2). Branch 0, the default,
is the cheapest partial step: input_conv, then the last ResBlock (+ transformer) of the top decoder level and the
output layers. Counted with torch.utils.flop_counter for SD v1 at 512² (latent 64², CFG batch 2; 1.61 TFLOP a full
pass): a branch-0 step costs 7.9 % of a full one (branch 1: 22 %, 2: 38 %, 5: 67 %), so over 30 steps N = 3 does
38.6 % of the plain UNet's FLOPs and N = 2 53.9 %. The images change: DeepCache is an approximation.

As the `DeepCache` package's `DeepCacheSDHelper.set_params(cache_interval=N, cache_branch_id=k)` ("uniform" skip
mode): the first step that runs is full, then every N-th; a step's calls all share that choice (Heun's two calls
in one step both read the cache). `DeepCachedUNet` has the UNet's signature (x, t, context, **kw) → ε̂, like
control.ControlledUNet; it calls the UNet's own levels from outside, the UNet itself is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..samplers.base import StepCounter
from ..unet import UNet, timestep_embedding
from .tome import TokenMergedUNet


def fast_unet(unet: UNet, deepcache_interval: int | None = None, deepcache_branch: int = 0,
              tome_ratio: float | None = None, *, callback=None):
    """(model, callback) for the pipeline: `unet` with the opt-in speed-ups the caller asked for (None = off), and
    the sampler callback that advances DeepCache's step counter. ToMe wraps DeepCache (its merged blocks are the
    ones DeepCache runs); a ControlledUNet goes around both, so a ControlNet's own blocks are never merged."""
    model = unet
    if deepcache_interval is not None or deepcache_branch != 0:
        if deepcache_interval is None:
            raise ValueError("deepcache_branch was given without deepcache_interval (e.g. deepcache_interval=3)")
        model = DeepCachedUNet(unet, deepcache_interval, deepcache_branch)
        callback = model.counting(callback)
    if tome_ratio is not None:
        model = TokenMergedUNet(model, tome_ratio)
    return model, callback


def branch_count(unet: UNet) -> int:
    """How many skips the encoder pushes (valid branches 0 … count − 1): SD v1 has 4 levels × 3 = 12."""
    c = unet.config
    return len(c.channel_mult) * (c.num_res_blocks + 1)


class DeepCachedUNet(StepCounter):
    """unet(x, t, context) that runs in full every `interval` steps and only the shallow `branch` in between.

    `step` counts finished sampler steps; wrap the sampler's callback with `counting` so it advances (the pipeline
    does). control: a ControlNet's residuals (as UNet.forward takes them) are added to the skips computed in the
    call, the middle one on full steps only (a partial step has no middle block).
    """

    def __init__(self, unet: UNet, interval: int, branch: int = 0):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"deepcache_interval must be an integer ≥ 1 (a full UNet pass every N steps; 1 = off, "
                             f"3 is the package's example), got {interval!r}")
        count = branch_count(unet)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
            raise ValueError(f"deepcache_branch must be an integer in 0 … {count - 1} (the skip connection whose "
                             f"decoder ResBlock starts the partial step; 0 = shallowest, fastest), got {branch!r}")
        self.unet, self.interval, self.branch = unet, interval, branch
        r = unet.config.num_res_blocks
        # skip k is read by decoder level k // (r+1), ResBlock j = r − k mod (r+1) (a level pops its skips last first)
        self.level, self.block = branch // (r + 1), r - branch % (r + 1)
        self.step, self.full_steps = 0, 0
        self.cache: torch.Tensor | None = None
        self._cache_key = None

    def is_full_step(self) -> bool:
        """The package's uniform rule: full on steps 0, N, 2N, … (counted from the first step that runs)."""
        return self.step % self.interval == 0

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor, control=None, guidance=None) -> torch.Tensor:
        emb = self._embedding(x, t, guidance)
        key = (x.shape, x.dtype)              # the cache belongs to this batch shape; another one needs a full step
        if self.is_full_step() or self.cache is None or self._cache_key != key:
            h = self._full(x, emb, context, control)
            self._cache_key = key
            self.full_steps += 1
        else:
            h = self._shallow(x, emb, context, control)
        unet = self.unet
        return unet.output_conv(F.silu(unet.output_norm(h), inplace=True))

    # -- the pieces of UNet.forward, called level by level ------------------------------------------------------
    def _embedding(self, x: torch.Tensor, t, guidance) -> torch.Tensor:
        """emb [B, 1280] as UNet.forward makes it (t: a scalar or one per sample; guidance: full LCM UNets)."""
        unet = self.unet
        if x.shape[1] != unet.config.in_channels:
            raise ValueError(f"UNet expects {unet.config.in_channels} input channels, got x of shape {list(x.shape)}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(x.shape[0])
        return unet.time_embedding(timestep_embedding(t, unet.config.model_channels).to(x.dtype), guidance)

    def _full(self, x, emb, context, control) -> torch.Tensor:
        """The whole UNet; caches the decoder's hidden state where the shallow branch will take over."""
        unet = self.unet
        h = unet.input_conv(x)
        skips = [h]
        for level in unet.down:
            h = level(h, emb, context, skips)
        h = unet.middle(h, emb, context)
        if control is not None:
            skips = [s + r for s, r in zip(skips, control[0], strict=True)]
            h = h + control[1]
        return self._decoder(h, emb, context, skips, start=(len(unet.up) - 1, 0), keep=(self.level, self.block))

    def _shallow(self, x, emb, context, control) -> torch.Tensor:
        """Encoder up to skip `branch` (fresh), then the decoder from the cached hidden state."""
        unet = self.unet
        h = unet.input_conv(x)
        skips = [h]
        for level in unet.down[:self.level]:
            h = level(h, emb, context, skips)
        down = unet.down[self.level]
        for j in range(self.branch + 1 - len(skips)):    # the first ResBlocks (+ transformers) of the branch level
            h = down.res[j](h, emb)
            if down.attn is not None:
                h = down.attn[j](h, context)
            skips.append(h)
        if control is not None:
            skips = [s + r for s, r in zip(skips, control[0][:len(skips)])]
        return self._decoder(self.cache, emb, context, skips, start=(self.level, self.block))

    def _decoder(self, h, emb, context, skips, *, start: tuple[int, int], keep=None) -> torch.Tensor:
        """The decoder from up[level].res[j] (start) to the top, popping `skips`; keep=(level, j): store the
        hidden state entering that ResBlock in self.cache. As UpLevel.forward, one ResBlock at a time."""
        unet = self.unet
        first_level, first_block = start
        for index in reversed(range(first_level + 1)):
            level = unet.up[index]
            for j in range(first_block if index == first_level else 0, len(level.res)):
                if (index, j) == keep:
                    self.cache = h
                h = level.res[j](torch.cat([h, skips.pop()], dim=1), emb)     # [B, C + C_skip, h, w]
                if level.attn is not None:
                    h = level.attn[j](h, context)
            if level.upsample is not None:
                h = level.upsample(h, size=skips[-1].shape[-2:])
        return h
