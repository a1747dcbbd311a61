"""The pipeline options `deepcache_interval=`, `deepcache_branch=` and `tome_ratio=` (txt2img, img2img, inpaint):
each must be exactly the wrapper path that tests/test_deepcache.py and tests/test_tome.py check against the
packages (the same code on the same dtype, so bit-exact), and bad values are refused before any work.
"""

import pytest
import torch

from ldm_scratch.fast.deepcache import DeepCachedUNet, fast_unet
from ldm_scratch.fast.tome import TokenMergedUNet
from pipeline_fixtures import sample_image, sample_mask, tiny_pipeline, write_tiny_checkpoint, write_vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=7.5, steps=5, sampler="ddim",
            seed=3, output_type="np", progress=False)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast_options")
    vocabulary = write_vocabulary(folder / "tokenizer")
    return {c: tiny_pipeline(write_tiny_checkpoint(folder / f"tiny-{c}.safetensors", c, seed=c), vocabulary)
            for c in (4, 9)}


def with_wrapper(pipe, task, wrapper, **kw):
    """pipe.<task>(**kw) with `wrapper` as the model function's UNet: the path the options must take."""
    original = pipe._eps_model

    def eps_model(context, guidance_scale, extra=None, unet=None, guidance_rescale=0.0):
        return original(context, guidance_scale, extra, wrapper, guidance_rescale)
    pipe._eps_model = eps_model
    counting = getattr(wrapper, "counting", None) or getattr(wrapper.unet, "counting")
    try:
        return getattr(pipe, task)(**kw, callback=counting())
    finally:
        del pipe._eps_model


def test_txt2img_options_are_the_wrappers(pipes):
    pipe = pipes[4]
    args = dict(ARGS, height=96, width=96)
    cached = pipe.txt2img(**args, deepcache_interval=2, deepcache_branch=1)
    assert torch.equal(torch.from_numpy(cached),
                       torch.from_numpy(with_wrapper(pipe, "txt2img", DeepCachedUNet(pipe.unet, 2, 1), **args)))
    merged = pipe.txt2img(**args, tome_ratio=0.5)
    wrapper = TokenMergedUNet(DeepCachedUNet(pipe.unet, 1), 0.5)        # interval 1: every step full
    assert torch.equal(torch.from_numpy(merged), torch.from_numpy(with_wrapper(pipe, "txt2img", wrapper, **args)))
    plain = pipe.txt2img(**args)
    assert abs(cached - plain).max() > 1e-3 and abs(merged - plain).max() > 1e-3
    both = pipe.txt2img(**args, deepcache_interval=3, tome_ratio=0.3)
    wrapper = TokenMergedUNet(DeepCachedUNet(pipe.unet, 3), 0.3)
    assert torch.equal(torch.from_numpy(both), torch.from_numpy(with_wrapper(pipe, "txt2img", wrapper, **args)))


def test_img2img_counts_the_steps_that_run(pipes):
    pipe = pipes[4]
    args = dict(ARGS, init_image=sample_image(64, 64), strength=0.6)    # 3 of the 5 steps run: full at the first
    wrapper = DeepCachedUNet(pipe.unet, 2)
    expected = with_wrapper(pipe, "img2img", wrapper, **args)
    assert wrapper.full_steps == 2                                       # steps 0 and 2 of the 3 that run
    assert torch.equal(torch.from_numpy(pipe.img2img(**args, deepcache_interval=2)), torch.from_numpy(expected))


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_options(pipes, channels):
    pipe = pipes[channels]
    args = dict(ARGS, image=sample_image(64, 64), mask_image=sample_mask(64, 64))
    wrapper = TokenMergedUNet(DeepCachedUNet(pipe.unet, 2), 0.5)
    expected = with_wrapper(pipe, "inpaint", wrapper, **args)
    mine = pipe.inpaint(**args, deepcache_interval=2, tome_ratio=0.5)
    assert torch.equal(torch.from_numpy(mine), torch.from_numpy(expected))


@pytest.mark.parametrize("options, message", [
    (dict(deepcache_interval=0), "deepcache_interval must be an integer ≥ 1"),
    (dict(deepcache_interval=3, deepcache_branch=12), r"deepcache_branch must be an integer in 0 … 11"),
    (dict(deepcache_branch=2), "deepcache_branch was given without deepcache_interval"),
    (dict(tome_ratio=0.9), r"tome_ratio must be a number in \[0, 0.75\]"),
])
def test_bad_options_are_refused_early(pipes, options, message):
    pipe = pipes[4]
    with pytest.raises(ValueError, match=message):
        pipe.txt2img(**ARGS, **options)
    with pytest.raises(ValueError, match=message):
        fast_unet(pipe.unet, **options)
