"""DeepCache (fast/deepcache.py): the wrapper against the plain UNet, and parity with the `DeepCache` package's
DeepCacheSDHelper on diffusers' StableDiffusionPipeline holding the same tiny random weights (test_pipeline_parity).

Our side runs through the pipeline with the wrapper handed to its model function (what the pipeline option
`deepcache_interval=` does; tests/test_fast_pipeline_options.py checks that the option is this path).
"""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_scratch.fast.deepcache import DeepCachedUNet, branch_count
from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary
from test_pipeline_parity import diffusers_components, diffusers_pipeline
from tinymodels import random_networks, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 96   # the latent's deepest level is 2×2 (test_pipeline_parity.py: why not the tiny model's native 64²)


@pytest.fixture(scope="module")
def unet():
    return random_networks(tiny_config(), seed=3)[1]


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 12, 12, generator=g), torch.randn(batch, 77, 32, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("branch", range(12))
def test_every_branch_rebuilds_the_full_unet(unet, branch):
    """On the input the cache was made from, the shallow branch + cache is the full UNet: bit-exact (same ops)."""
    x, context = inputs()
    wrapped = DeepCachedUNet(unet, interval=2, branch=branch)
    expected = unet(x, 500, context)
    assert torch.equal(wrapped(x, 500, context), expected)          # step 0: full
    wrapped.step = 1
    assert torch.equal(wrapped(x, 500, context), expected)          # step 1: shallow branch on the cache
    assert wrapped.full_steps == 1


@torch.no_grad()
def test_shallow_steps_reuse_the_cache_and_differ_from_full(unet):
    x, context = inputs()
    x2, _ = inputs(seed=1)
    wrapped = DeepCachedUNet(unet, interval=3, branch=0)
    calls = []
    step_done = wrapped.counting(lambda i, t, x0: calls.append(i))
    for i in range(7):
        out = wrapped(x2 if i else x, 500, context)
        step_done(i, 500, None)
    assert wrapped.full_steps == 3 and calls == list(range(7))       # steps 0, 3, 6
    wrapped.step = 1
    shallow = wrapped(x2, 500, context)                              # cache from step 6 (x2): exact again
    assert torch.equal(shallow, unet(x2, 500, context))
    fresh = DeepCachedUNet(unet, interval=3)
    fresh(x, 500, context)
    fresh.step = 1
    stale = fresh(x2, 500, context)                                  # x2 on x's deep features: not the UNet
    assert (stale - unet(x2, 500, context)).abs().max() > 1e-2
    del out


@torch.no_grad()
def test_another_batch_shape_recomputes(unet):
    x, context = inputs()
    wrapped = DeepCachedUNet(unet, interval=5)
    wrapped(x, 500, context)
    wrapped.step = 1
    one = wrapped(x[:1], 500, context[:1])                            # a new shape cannot read the cache
    assert wrapped.full_steps == 2 and torch.equal(one, unet(x[:1], 500, context[:1]))


@torch.no_grad()
def test_controlnet_residuals_reach_the_skips(unet):
    """control (a ControlNet's residuals, as UNet.forward takes them): the full step adds all of them, the shallow
    step those of its fresh skips; on the cache's own input both equal the plain UNet with control, bit-exact."""
    x, context = inputs()
    g = torch.Generator().manual_seed(2)
    plain = DeepCachedUNet(unet, 2)
    shapes = []
    plain._decoder = lambda h, emb, ctx, skips, **kw: shapes.append(([s.shape for s in skips], h.shape)) or skips[0]
    plain(x, 500, context)
    down = [torch.randn(s, generator=g) for s in shapes[0][0]]
    middle = torch.randn(shapes[0][1], generator=g)
    expected = unet(x, 500, context, control=(down, middle))
    wrapped = DeepCachedUNet(unet, 2, branch=5)
    assert torch.equal(wrapped(x, 500, context, control=(down, middle)), expected)
    wrapped.step = 1
    assert torch.equal(wrapped(x, 500, context, control=(down, middle)), expected)
    assert not torch.equal(expected, unet(x, 500, context))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_interval_is_refused(unet, bad):
    with pytest.raises(ValueError, match="deepcache_interval must be an integer ≥ 1"):
        DeepCachedUNet(unet, interval=bad)


@pytest.mark.parametrize("bad", [-1, 12, 1.0, None])
def test_bad_branch_is_refused(unet, bad):
    assert branch_count(unet) == 12
    with pytest.raises(ValueError, match=r"deepcache_branch must be an integer in 0 … 11"):
        DeepCachedUNet(unet, interval=3, branch=bad)


def test_wrong_channels_named(unet):
    with pytest.raises(ValueError, match="expects 4 input channels"):
        DeepCachedUNet(unet, 2)(torch.zeros(1, 9, 8, 8), 1, torch.zeros(1, 77, 32))


# ---------------------------------------------------------------------------------------------------------------
# parity with the DeepCache package on diffusers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepcache")
    vocabulary = write_vocabulary(folder / "tokenizer")
    path = write_tiny_checkpoint(folder / "tiny.safetensors", seed=4)
    ours = tiny_pipeline(path, vocabulary)
    return ours, diffusers_components(load_file(str(path)), ours.config, vocabulary)


ARGS = dict(prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=7.5,
            height=SIZE, width=SIZE)


def ours_with(pipe, wrapper, args=ARGS, **kw):
    """pipe.txt2img(**args, **kw) with `wrapper` as the UNet the model function calls (what the pipeline option
    wires), a DeepCachedUNet's step counter advanced by the sampler's callback."""
    original = pipe._eps_model

    def eps_model(context, guidance_scale, extra=None, unet=None, guidance_rescale=0.0):
        return original(context, guidance_scale, extra, wrapper, guidance_rescale)
    pipe._eps_model = eps_model
    try:
        callback = wrapper.counting() if hasattr(wrapper, "counting") else None    # ToMe needs no step counter
        return pipe.txt2img(**args, **kw, callback=callback, output_type="np", progress=False)
    finally:
        del pipe._eps_model


def reference(components, steps, eps, interval=None, branch=0):
    pytest.importorskip("DeepCache", reason="needs the [reference] extra")
    from DeepCache import DeepCacheSDHelper
    pipe = diffusers_pipeline("txt2img", components, "ddim")
    helper = None
    if interval is not None:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    try:
        return pipe(**ARGS, num_inference_steps=steps, latents=eps.clone(), output_type="np").images
    finally:
        if helper is not None:
            helper.disable()


@pytest.mark.parity
@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 4), (3, 11)])
def test_matches_deepcache_package(models, interval, branch):
    ours, components = models
    eps = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    steps = 7
    wrapper = DeepCachedUNet(ours.unet, interval, branch)
    mine = ours_with(ours, wrapper, steps=steps, sampler="ddim", latents=eps)
    theirs = reference(components, steps, eps, interval, branch)
    plain = reference(components, steps, eps)
    diff = float(np.abs(mine.astype(np.float64) - theirs).max())
    cost = float(np.abs(plain.astype(np.float64) - theirs).max())
    print(f"\nDeepCache N={interval} branch {branch}: |ours − package| = {diff:.2e}; the cache moves the image "
          f"by {cost:.2e}")
    assert wrapper.full_steps == len(range(0, steps, interval))
    # measured (CPU, 1 thread, torch 2.13, diffusers 0.42.1, DeepCache 0.1.1): 5.1e-6 … 5.6e-6 (the same
    # float32 operations in another order, as test_pipeline_parity), while the cache itself moves the image by
    # 1.6e-2 … 2.9e-1: a wrong step or branch choice cannot pass.
    assert diff < 1e-4
    assert cost > 100 * diff

