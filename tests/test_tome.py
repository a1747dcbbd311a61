"""Token merging (fast/tome.py): the matching against tomesd's own function, the wrapper against the plain UNet,
and parity with `tomesd.apply_patch(pipe, ratio, use_rand=False)` on diffusers' StableDiffusionPipeline holding
the same tiny random weights (test_pipeline_parity).

Our side runs through the pipeline with the wrapper handed to its model function (what the pipeline option
`tome_ratio=` does; tests/test_fast_pipeline_options.py checks that the option is this path).
"""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_scratch.fast.tome import MergeOptions, TokenMergedUNet, bipartite_soft_matching, dst_positions
from ldm_scratch.spatial_transformer import TransformerBlock
from pipeline_fixtures import tiny_pipeline, write_tiny_checkpoint, write_vocabulary
from test_deepcache import ours_with
from test_pipeline_parity import diffusers_components, diffusers_pipeline
from tinymodels import random_networks, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 128   # a 16×16 latent: the top level has 256 tokens to merge (and 96² is 12×12, checked below too)


def test_dst_tokens_are_the_top_left_of_each_cell():
    mask = dst_positions(5, 5, 2, 2).reshape(5, 5)                  # 5 = 2·2 + 1: the last row/column are all src
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0:4:2, 0:4:2] = True
    assert torch.equal(mask, expected)


@pytest.mark.parity
@pytest.mark.parametrize("h, w, ratio", [(8, 8, 0.5), (12, 10, 0.3), (7, 9, 0.6), (16, 16, 0.75)])
def test_matching_is_tomesds(h, w, ratio):
    tomesd_merge = pytest.importorskip("tomesd.merge", reason="needs the [reference] extra")
    g = torch.Generator().manual_seed(h * w)
    metric = torch.randn(2, h * w, 16, generator=g)
    values = torch.randn(2, h * w, 24, generator=g)
    r = int(h * w * ratio)
    merge, unmerge = bipartite_soft_matching(metric, h, w, r)
    their_merge, their_unmerge = tomesd_merge.bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=True)
    merged, theirs = merge(values), their_merge(values)
    assert merged.shape == theirs.shape == (2, h * w - min(r, (h * w) - (h // 2) * (w // 2)), 24)
    # tomesd lists the tokens in the order of an unstable argsort (platform-dependent), ours in raster order; the
    # groups merged are the same, so the round trip through any per-token map must agree position by position.
    # measured: 0 in all four cases; the bound leaves room for a mean summed in another order elsewhere
    ours_back, their_back = unmerge(torch.tanh(merged)), their_unmerge(torch.tanh(theirs))
    print(f"\n{h}×{w} ratio {ratio}: |ours − tomesd| round trip {(ours_back - their_back).abs().max():.1e}")
    assert (ours_back - their_back).abs().max() < 1e-6

def test_unmerge_of_merge_keeps_unmerged_tokens():
    metric = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_soft_matching(metric, 8, 8, 20)
    back = unmerge(merge(metric))
    same = (back == metric).all(dim=-1)[0]
    assert int(same.sum()) >= 64 - 20 - 16     # every token but the merged src and the dst they joined
    assert int(same.sum()) < 64


@pytest.fixture(scope="module")
def unet():
    return random_networks(tiny_config(), seed=5)[1]


def inputs(h=16, w=16, batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 77, 32, generator=g)


@torch.no_grad()
def test_ratio_zero_is_the_plain_unet_and_blocks_are_restored(unet):
    x, context = inputs()
    plain = unet(x, 300, context)
    assert torch.equal(TokenMergedUNet(unet, 0.0)(x, 300, context), plain)
    merged = TokenMergedUNet(unet, 0.5)(x, 300, context)
    assert 1e-4 < (merged - plain).abs().max() < 10 * plain.abs().max()
    assert all("forward" not in m.__dict__ for m in unet.modules() if isinstance(m, TransformerBlock))
    assert torch.equal(unet(x, 300, context), plain)


def test_blocks_are_restored_after_an_error(unet):
    with pytest.raises(ValueError, match="input channels"):
        TokenMergedUNet(unet, 0.5)(torch.zeros(1, 9, 8, 8), 1, torch.zeros(1, 77, 32))
    assert all("forward" not in m.__dict__ for m in unet.modules() if isinstance(m, TransformerBlock))


@torch.no_grad()
def test_only_top_level_blocks_merge_by_default(unet):
    """max_downsample 1: a block one level down (64 of 256 tokens) is untouched; with 2 it merges too."""
    calls = []
    import ldm_scratch.fast.tome as tome
    original = tome.bipartite_soft_matching
    tome.bipartite_soft_matching = lambda metric, *a: calls.append(metric.shape[1]) or original(metric, *a)
    try:
        x, context = inputs()
        TokenMergedUNet(unet, 0.5)(x, 300, context)
        top = sorted(set(calls))
        calls.clear()
        TokenMergedUNet(unet, 0.5, max_downsample=2)(x, 300, context)
    finally:
        tome.bipartite_soft_matching = original
    assert top == [256] and sorted(set(calls)) == [64, 256]


@pytest.mark.parametrize("bad", [-0.1, 0.8, True, "0.5", None])
def test_bad_ratio_is_refused(unet, bad):
    with pytest.raises(ValueError, match=r"tome_ratio must be a number in \[0, 0.75\]"):
        TokenMergedUNet(unet, bad)


def test_bad_max_downsample_is_refused():
    with pytest.raises(ValueError, match="max_downsample must be 1, 2, 4 or 8"):
        MergeOptions(0.5, max_downsample=3)


# ---------------------------------------------------------------------------------------------------------------
# parity with tomesd on diffusers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tome")
    vocabulary = write_vocabulary(folder / "tokenizer")
    path = write_tiny_checkpoint(folder / "tiny.safetensors", seed=6)
    ours = tiny_pipeline(path, vocabulary)
    return ours, diffusers_components(load_file(str(path)), ours.config, vocabulary)


@pytest.mark.parity
@pytest.mark.parametrize("ratio, size, max_downsample", [(0.5, SIZE, 1), (0.3, 96, 2), (0.75, SIZE, 1)])
def test_matches_tomesd(models, ratio, size, max_downsample):
    tomesd = pytest.importorskip("tomesd", reason="needs the [reference] extra")
    ours, components = models
    args = dict(prompt="a red circle on a blue background", negative_prompt="blurry", guidance_scale=7.5,
                height=size, width=size)
    eps = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(9))
    wrapper = TokenMergedUNet(ours.unet, ratio, max_downsample=max_downsample)
    mine = ours_with(ours, wrapper, args, steps=4, sampler="ddim", latents=eps)
    pipe = diffusers_pipeline("txt2img", components, "ddim")
    plain = pipe(**args, num_inference_steps=4, latents=eps.clone(), output_type="np").images
    tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    try:
        theirs = pipe(**args, num_inference_steps=4, latents=eps.clone(), output_type="np").images
    finally:
        tomesd.remove_patch(pipe)
    diff = float(np.abs(mine.astype(np.float64) - theirs).max())
    cost = float(np.abs(plain.astype(np.float64) - theirs).max())
    print(f"\nToMe ratio {ratio} at {size}², max_downsample {max_downsample}: |ours − tomesd| = {diff:.2e}; "
          f"merging moves the image by {cost:.2e}")
    # measured (CPU, 1 thread, torch 2.13, diffusers 0.42.1, tomesd 0.1.3): 6.6e-6 … 7.6e-6 (attention over the
    # same tokens listed in another order, see test_matching_is_tomesds), while merging itself moves the image
    # by 0.33 … 0.45: merging a different set of tokens cannot pass.
    assert diff < 1e-4
    assert cost > 100 * diff
