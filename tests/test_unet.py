"""The UNet: official key map, config inference, the timestep embedding's equation, parity with diffusers.

Parity tests build random weights under the OFFICIAL key names (the reference key list; a tiny model keeps SD v1's
topology so its names are the full-size ones), load them into our UNet through checkpoint.UNET_RULES and into
diffusers' UNet2DConditionModel through diffusers' own single-file conversion, and compare eps_pred.
"""
import math
import time

import pytest
import torch

from ldm_scratch import checkpoint
from ldm_scratch.checkpoint.keymap import unet_config_from_shapes
from ldm_scratch.unet import UNet, UNetConfig, timestep_embedding

PREFIX = "model.diffusion_model."
REFERENCE = checkpoint.reference_keys()
TINY = dict(model_channels=32, n_heads=2, context_dim=32)   # SD v1 topology, widths 32, 64, 128, 128


def reference_unet_shapes(in_channels: int = 4) -> dict[str, tuple]:
    """{official key: shape} of the full-size SD v1 UNet (in_channels 9: the inpainting model)."""
    shapes = {key: tuple(shape) for key, shape in REFERENCE["unet"].items()}
    if in_channels == 9:
        shapes.update({k: tuple(v) for k, v in REFERENCE["inpainting"]["changed_shapes"].items()})
    return shapes


def our_shapes(config: UNetConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in UNet(config).state_dict().items()}


def load_unet(config: UNetConfig, state: dict[str, torch.Tensor], prefix: str = PREFIX,
              rules=checkpoint.UNET_RULES) -> UNet:
    """Our UNet built on the meta device and filled, strictly, from a {file key: tensor} dict."""
    with torch.device("meta"):
        unet = UNet(config)
    mapping = checkpoint.map_component(state.keys(), prefix, rules)
    shapes = {key: tuple(t.shape) for key, t in state.items()}
    return checkpoint.fill_module(unet, mapping, state.__getitem__, shapes, "UNet").eval()


def random_official_state(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for EVERY tensor, under the official names, shaped for `config`.

    Conv/Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the 25 residual blocks; norm scales
    1 + N(0, 0.1²); biases N(0, 0.1²). Nothing is zero (the original zero-initialises the output convs, which
    would let a parity test pass on a network that ignores most of its input).
    """
    shapes = our_shapes(config)
    mapping = checkpoint.map_component(REFERENCE["unet"], PREFIX, checkpoint.UNET_RULES)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for ours, key in mapping.items():
        shape = shapes[ours]
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif "norm" in ours and ours.endswith("weight"):
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |ours − reference|, that divided by max |reference|)."""
    max_abs = (ours - reference).abs().max().item()
    return max_abs, max_abs / reference.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# The key map: every official tensor lands on exactly one of our parameters, and fills all of them.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [4, 9])
def test_official_keys_fill_every_parameter_once(in_channels):
    official = reference_unet_shapes(in_channels)
    assert len(official) == 686
    mapping = checkpoint.map_component(official, PREFIX, checkpoint.UNET_RULES)  # raises on two keys → one name
    assert len(mapping) == len(official)

    mapped_shapes = {ours: official[key] for ours, key in mapping.items()}
    config = unet_config_from_shapes(mapped_shapes)
    assert config == UNetConfig(in_channels=in_channels)              # SD v1 (inpainting: 9 input channels)
    expected = our_shapes(config)
    assert mapped_shapes == expected                                  # same names, same shapes, nothing left over
    assert sum(math.prod(s) for s in expected.values()) == 859_520_964 + 5 * 320 * 9 * (in_channels == 9)


def test_tiny_config_keeps_the_official_names():
    """The tiny test model has the same official names (only shapes shrink): export relies on it."""
    tiny = our_shapes(UNetConfig(**TINY))
    full = our_shapes(UNetConfig())
    assert tiny.keys() == full.keys()
    mapping = checkpoint.map_component(REFERENCE["unet"], PREFIX, checkpoint.UNET_RULES)
    # the head count is not visible in shapes: unet_config_from_shapes takes it as an argument (SD v1: 8)
    assert unet_config_from_shapes({ours: tiny[ours] for ours in mapping}, n_heads=2) == UNetConfig(**TINY)


def test_config_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        UNetConfig(model_channels=48)


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding: the equation in its docstring, checked in float64 by hand.
# ---------------------------------------------------------------------------------------------------------------

def test_timestep_embedding_matches_its_equation():
    t = torch.tensor([0.0, 1.0, 17.0, 500.25, 999.0])                 # fractional t allowed (σ-samplers)
    emb = timestep_embedding(t, dim=320)
    assert emb.shape == (5, 320) and emb.dtype == torch.float32
    for b, t_value in enumerate(t.tolist()):
        for i in range(160):
            freq = 10000.0 ** (-i / 160)                               # freq_i = 10000^(−i/160), in float64
            # measured max error 5.2e-5: float32 rounding of t · freq_i (≈ 1000 at t = 999) is ~3e-5 in phase
            assert emb[b, i].item() == pytest.approx(math.cos(t_value * freq), abs=2e-4)        # cos half first
            assert emb[b, 160 + i].item() == pytest.approx(math.sin(t_value * freq), abs=2e-4)  # then sin
    assert torch.equal(timestep_embedding(torch.tensor([3, 7])), timestep_embedding(torch.tensor([3.0, 7.0])))
    # a fractional step lies strictly between its neighbours in the slowest channel, cos(t · 10000^(−159/160))
    e = timestep_embedding(torch.tensor([500.0, 500.5, 501.0]))[:, 159]
    assert e[0] > e[1] > e[2]


def test_forward_takes_scalar_int_and_float_timesteps():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(**TINY)).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        per_sample = unet(x, torch.tensor([250, 250]), context)
        assert per_sample.shape == (2, 4, 16, 16)
        assert torch.equal(unet(x, 250, context), per_sample)
        assert torch.equal(unet(x, torch.tensor(250.0), context), per_sample)
        assert not torch.equal(unet(x, 250.5, context), per_sample)
        with pytest.raises(ValueError, match="9 input channels|expects 4 input channels"):
            unet(torch.randn(2, 9, 16, 16), 250, context)
        with pytest.raises(ValueError, match="one entry per sample"):
            unet(x, torch.tensor([1, 2, 3]), context)


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers on identical random weights.
# ---------------------------------------------------------------------------------------------------------------

def diffusers_from_single_file(state: dict[str, torch.Tensor], config: UNetConfig):
    """diffusers' UNet2DConditionModel converted by its own single-file code from the CompVis v1-inference.yaml
    (with the tiny config's widths written into it)."""
    diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
    yaml = pytest.importorskip("yaml", reason="needs pyyaml (installed with diffusers)")
    from importlib.resources import files
    original_config = yaml.safe_load(files("ldm_scratch.checkpoint").joinpath("keys").joinpath("v1-inference.yaml").read_text())
    params = original_config["model"]["params"]["unet_config"]["params"]
    params.update(in_channels=config.in_channels, model_channels=config.model_channels,
                  num_heads=config.n_heads, context_dim=config.context_dim)
    model = diffusers.UNet2DConditionModel.from_single_file(state, original_config=original_config)
    return model.eval()


def run_parity(config: UNetConfig, batch: int, size: tuple[int, int], seed: int = 0):
    state = random_official_state(config, seed)
    ours = load_unet(config, state)
    reference = diffusers_from_single_file(state, config)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, config.in_channels, *size, generator=generator)
    t = torch.tensor([981.0, 20.5][:batch])                           # one fractional step: float t matches too
    context = torch.randn(batch, 77, config.context_dim, generator=generator)
    with torch.no_grad():
        eps_ours = ours(x, t, context)
        eps_reference = reference(x, t, encoder_hidden_states=context).sample
    return ours, reference, (x, t, context), eps_ours, eps_reference


@pytest.mark.parity
@pytest.mark.parametrize("in_channels, size", [(4, (32, 32)), (4, (24, 20)), (9, (32, 32))])
def test_tiny_parity_with_diffusers(in_channels, size):
    """(24, 20) is not a multiple of 8: the upsamples must follow the skips' sizes, as diffusers' do."""
    config = UNetConfig(in_channels=in_channels, **TINY)
    _, _, _, eps_ours, eps_reference = run_parity(config, batch=2, size=size)
    max_abs, rel = compare(eps_ours, eps_reference)
    print(f"tiny UNet in_channels={in_channels} {size}: max abs {max_abs:.2e}, rel {rel:.2e}")
    assert eps_reference.abs().max() > 0.1                            # the comparison is not vacuous
    # measured (CPU, torch 2.13, diffusers 0.42.1): max abs 0, rel 0 for all three cases: the same float32 ops in
    # the same order. Another CPU's kernels (AVX2 vs AVX-512 blocking, ARM) may sum in another order; what that
    # costs here, measured by running OUR side in channels_last (another conv order) against diffusers: max abs
    # 3.8e-6…4.2e-6, rel 1.8e-6…1.9e-6 for the three cases. The bound is ~3× that, and still fails on a 0.1% change
    # of one cross-attention weight (measured rel 1.1e-5) or a swapped rule (0.2).
    assert max_abs < 2e-5 and rel < 6e-6


@pytest.mark.parity
def test_diffusers_state_dict_through_folder_rules_gives_the_same_model():
    """diffusers' own state dict (the diffusers-folder layout), mapped by DIFFUSERS_UNET_RULES, equals the model
    loaded from the single file bit for bit: same numbers in the same places. Several tensors share shapes (e.g.
    up.3.res.0/1/2), so a swapped rule would change the output without tripping the strict loader."""
    config = UNetConfig(**TINY)
    ours, reference, (x, t, context), eps_ours, _ = run_parity(config, batch=2, size=(16, 16))
    from_folder = load_unet(config, reference.state_dict(), prefix="", rules=checkpoint.DIFFUSERS_UNET_RULES)
    assert from_folder.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(from_folder.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(from_folder(x, t, context), eps_ours)


@pytest.mark.parity
def test_full_size_diffusers_keys_fill_every_parameter_once():
    """The diffusers layout of the full-size model, on the meta device (no memory)."""
    diffusers = pytest.importorskip("diffusers", reason="needs the [reference] extra")
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    their_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mapping = checkpoint.map_component(their_shapes, "", checkpoint.DIFFUSERS_UNET_RULES)
    assert {ours: their_shapes[key] for ours, key in mapping.items()} == our_shapes(UNetConfig())


@pytest.mark.slow
@pytest.mark.parity
def test_full_size_parity_with_diffusers():
    """SD v1 at full size (860M parameters, 3.4 GB per model in fp32) on a [2, 4, 64, 64] latent."""
    config = UNetConfig()
    start = time.perf_counter()
    _, _, _, eps_ours, eps_reference = run_parity(config, batch=2, size=(64, 64))
    max_abs, rel = compare(eps_ours, eps_reference)
    print(f"full-size UNet: max abs {max_abs:.2e}, rel {rel:.2e} ({time.perf_counter() - start:.0f} s)")
    assert eps_reference.abs().max() > 0.1
    # measured (CPU, torch 2.13, diffusers 0.42.1): max abs 0, rel 0 (identical float32 ops). The bound allows
    # another platform's summation order through 860M weights: our UNet in channels_last (another conv order)
    # against itself, same weights and inputs, differs by max abs 7.6e-6, rel 3.5e-6 (outputs up to 2.2), ~3× below.
    assert max_abs < 1e-4 and rel < 1e-5
