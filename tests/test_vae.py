"""The KL autoencoder (ldm_scratch/vae.py) and its key maps (VAE_RULES, DIFFUSERS_VAE_RULES in checkpoint.py).

- every official `first_stage_model.*` tensor lands on exactly one of our parameters, and fills all of them;
- parity with diffusers' AutoencoderKL on identical random weights, converted by diffusers' own single-file code;
- diffusers' folder layout (its own state dict) loads to exactly the same module as the single file;
- the same parity for the VAE on the fast path (`ldm_scratch.fast.install`: channels_last, row bands), which is
  what `load_pipeline` gives;
- the equations of the docstrings: the (0,1,0,1)-padded downsample grid, KL(q‖N(0,I)), the seeded sample.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm_scratch import checkpoint, fast
from ldm_scratch.checkpoint.keymap import vae_config_from_shapes
from ldm_scratch.vae import VAE, DiagonalGaussian, Downsample, VAEConfig

PREFIX = "first_stage_model."
OFFICIAL = checkpoint.reference_keys()["vae"]  # {official key: shape}, SD v1 full size, 248 tensors
# SD v1 topology (4 levels, 2 ResBlocks, widths growing at the same levels, so the same 1×1 skip convs) with a
# quarter of the width: its official key NAMES equal the full-size ones (5.2 M parameters instead of 83.7 M).
TINY = VAEConfig(base_channels=32)


def build_meta(config: VAEConfig) -> VAE:
    with torch.device("meta"):
        return VAE(config)


def official_shapes(config: VAEConfig) -> dict[str, tuple]:
    """The official key names with the shapes a VAE of `config` has in the official layout (attention 1×1 convs)."""
    ours = {k: tuple(v.shape) for k, v in build_meta(config).state_dict().items()}
    mapping = checkpoint.map_component(OFFICIAL, PREFIX, checkpoint.VAE_RULES)
    return {key: ours[name] + (1, 1) * (len(OFFICIAL[key]) == 4 and len(ours[name]) == 2)
            for name, key in mapping.items()}


def random_official_state(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (none left at an initialiser's zeros or ones, so no path can agree by accident):
    weights ~ N(0, 1/fan_in) keep activations O(1) through the depth, GroupNorm scales ~ 1 + N(0, 0.2²),
    biases ~ N(0, 0.1²)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(config).items():
        t = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            t /= (t[0].numel()) ** 0.5
        elif key.endswith("weight"):  # GroupNorm γ
            t = 1 + 0.2 * t
        else:
            t *= 0.1
        state[key] = t
    return state


def load_ours(state: dict[str, torch.Tensor], config: VAEConfig, prefix: str = PREFIX,
              rules=checkpoint.VAE_RULES) -> VAE:
    """Our VAE filled strictly from a {file key: tensor} dict, through the loader's own functions."""
    module = build_meta(config)
    mapping = checkpoint.map_component(state.keys(), prefix, rules)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return checkpoint.fill_module(module, mapping, state.__getitem__, shapes, "VAE").eval()


def diffusers_vae(state: dict[str, torch.Tensor], config: VAEConfig):
    """diffusers' AutoencoderKL from the same official-layout tensors, converted by diffusers' single-file code
    with the CompVis v1-inference.yaml (its widths edited to `config`)."""
    pytest.importorskip("diffusers", reason="needs the [reference] extra")
    import yaml
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    original = yaml.safe_load((Path(checkpoint.__file__).parent / "keys" / "v1-inference.yaml").read_text())
    ddconfig = original["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    ddconfig.update(ch=config.base_channels, ch_mult=list(config.channel_mult), num_res_blocks=config.num_res_blocks)
    diffusers_config = create_vae_diffusers_config_from_ldm(original, state)
    converted = convert_ldm_vae_checkpoint(state, diffusers_config)
    model = AutoencoderKL(**diffusers_config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |ours − ref|, that divided by max |ref|)."""
    abs_err = (ours - reference).abs().max().item()
    return abs_err, abs_err / reference.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# The key map
# ---------------------------------------------------------------------------------------------------------------

def test_every_official_vae_key_maps_to_exactly_one_parameter_and_fills_all():
    module = build_meta(VAEConfig())
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mapping = checkpoint.map_component(OFFICIAL, PREFIX, checkpoint.VAE_RULES)  # raises on two keys → one name
    assert len(OFFICIAL) == 248
    assert official_shapes(VAEConfig()) == {k: tuple(v) for k, v in OFFICIAL.items()}  # the helper the tests use
    assert len(mapping) == len(OFFICIAL), "two official keys share a name, or a key lacks the prefix"
    assert set(mapping) == set(ours), (set(mapping) ^ set(ours))
    misshapen = {n: (OFFICIAL[k], ours[n]) for n, k in mapping.items()
                 if not checkpoint._same_numbers(tuple(OFFICIAL[k]), ours[n])}
    assert not misshapen
    # the 1×1-conv attention projections are the only tensors whose shapes differ (by the trailing 1×1)
    assert {n for n, k in mapping.items() if tuple(OFFICIAL[k]) != ours[n]} == {
        f"{side}.mid.attention.to_{p}.weight" for side in ("encoder", "decoder") for p in ("q", "k", "v", "out")}


def test_config_from_shapes_recovers_the_config():
    for config in (VAEConfig(), TINY, VAEConfig(base_channels=64, channel_mult=(1, 2, 4), num_res_blocks=1,
                                                z_channels=8)):
        shapes = {k: tuple(v.shape) for k, v in build_meta(config).state_dict().items()}
        assert vae_config_from_shapes(shapes) == config


def test_config_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        VAEConfig(base_channels=48)


def test_tiny_official_layout_loads_strictly_and_round_trips_shapes():
    state = random_official_state(TINY)
    vae = load_ours(state, TINY)
    posterior = vae.encode(torch.rand(1, 3, 64, 48) * 2 - 1)
    assert posterior.mean.shape == posterior.std.shape == (1, 4, 8, 6)
    assert vae.decode(posterior.mean).shape == (1, 3, 64, 48)
    # a missing tensor is an error naming it, not a half-loaded module
    del state[PREFIX + "decoder.up.2.upsample.conv.bias"]
    with pytest.raises(checkpoint.CheckpointError, match="decoder.levels.2.upsample.conv.bias"):
        load_ours(state, TINY)


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------------------

def check_parity(state: dict, reference, config: VAEConfig, size: int, batch: int, tolerance: float,
                 dtype=torch.float32, fast_path: bool = False):
    """Our VAE (from `state`; on the fast path if asked) against diffusers' (`reference`, converted from the same
    `state`): posterior mean and std of one random image batch, and the decoding of one random latent batch.
    Prints the errors."""
    ours = load_ours(state, config)
    if fast_path:
        fast.install(vae=ours)
    ours, reference = ours.to(dtype), reference.to(dtype)
    generator = torch.Generator().manual_seed(2)
    x = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(dtype)
    z = torch.randn(batch, config.z_channels, size // 8, size // 8, generator=generator).to(dtype)
    with torch.no_grad():
        posterior, ref_posterior = ours.encode(x), reference.encode(x).latent_dist
        decoded, ref_decoded = ours.decode(z), reference.decode(z).sample
    report = {}
    for name, a, b in [("mean", posterior.mean, ref_posterior.mean), ("std", posterior.std, ref_posterior.std),
                       ("decode", decoded, ref_decoded)]:
        assert a.shape == b.shape, name
        report[name] = errors(a, b)
    print(f"VAE parity {size}² {dtype}{' fast path' if fast_path else ''}: "
          + ", ".join(f"{k} max abs {a:.2e} rel {r:.2e}" for k, (a, r) in report.items()))
    for name, (_, rel) in report.items():
        assert rel < tolerance, (name, report)


def assert_diffusers_folder_loads_identically(state, reference, config):
    """diffusers' own state dict (the vae/ folder's tensors) through DIFFUSERS_VAE_RULES gives the very same
    tensors as the single file through VAE_RULES."""
    from_file = load_ours(state, config).state_dict()
    folder = reference.state_dict()
    from_folder = load_ours(folder, config, prefix="", rules=checkpoint.DIFFUSERS_VAE_RULES).state_dict()
    assert from_file.keys() == from_folder.keys()
    for name in from_file:
        assert torch.equal(from_file[name], from_folder[name]), name
    # folders saved by diffusers < 0.14 name the attention projections query/key/value/proj_attn
    new_names = checkpoint.map_component(folder, "", checkpoint.DIFFUSERS_VAE_RULES)
    old_names = checkpoint.map_component(
        [k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn")
         for k in folder], "", checkpoint.DIFFUSERS_VAE_RULES)
    assert old_names.keys() == new_names.keys() and old_names != new_names


@pytest.mark.parity
def test_parity_with_diffusers_tiny_and_the_diffusers_folder_layout():
    state = random_official_state(TINY, seed=1)
    reference = diffusers_vae(state, TINY)
    assert_diffusers_folder_loads_identically(state, reference, TINY)
    # Tolerances are relative, max |Δ| / max |reference|, measured with torch 2.13 CPU and diffusers 0.42.1.
    # Plain layers, float32: 0.0 for mean, std and decode (the same kernels in the same order); float64: 1.1e-15,
    # 1.4e-15, 4.6e-15. 2e-5 (float32) and 1e-12 (float64) leave room for other kernels' summation order, while a
    # wrong weight or grid gives errors ~1.
    check_parity(state, reference, TINY, size=64, batch=2, tolerance=2e-5)
    check_parity(state, reference, TINY, size=64, batch=1, tolerance=1e-12, dtype=torch.float64)
    # The fast path (channels_last, row bands at work on the 64-row layers), float32: 1.4e-6 (mean), 1.6e-6 (std),
    # 2.7e-6 (decode), rounding through ~30 layers, 2e-5 is ~8× that; float64: 3.3e-15, 2.4e-15, 4.7e-15.
    check_parity(state, reference, TINY, size=64, batch=2, tolerance=2e-5, fast_path=True)
    check_parity(state, reference, TINY, size=64, batch=1, tolerance=1e-12, dtype=torch.float64, fast_path=True)


@pytest.mark.parity
@pytest.mark.slow
def test_parity_with_diffusers_full_size_and_the_diffusers_folder_layout():
    state = random_official_state(VAEConfig(), seed=1)
    reference = diffusers_vae(state, VAEConfig())
    assert_diffusers_folder_loads_identically(state, reference, VAEConfig())
    # Measured at 256², full SD v1 widths (83.7 M parameters), fp32 on CPU: max rel 1.0e-6 (mean), 6.9e-7 (std),
    # 4.7e-6 (decode) with the plain layers (in row bands, fast/vae_bands.py: 1.6e-6, 9.2e-7, 3.4e-6) — rounding
    # either way. Other hardware reorders sums too: errors grow with width and depth, so 1e-4 relative; a real
    # mistake gives errors of order 1.
    check_parity(state, reference, VAEConfig(), size=256, batch=1, tolerance=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The equations and conventions
# ---------------------------------------------------------------------------------------------------------------

def test_downsample_grid_is_pad_0101_then_stride_2():
    """Output pixel (i, j) must see input rows 2i…2i+2 and columns 2j…2j+2 with kernel tap (r − 2i, c − 2j):
    an impulse at (r, c) shows up exactly there, weighted by that tap (bottom/right border included)."""
    torch.manual_seed(0)
    down = Downsample(1)
    with torch.no_grad():
        down.conv.bias.zero_()
    kernel = down.conv.weight[0, 0]
    for r, c in [(0, 0), (1, 1), (2, 5), (6, 7), (7, 7), (3, 0)]:
        x = torch.zeros(1, 1, 8, 8)
        x[0, 0, r, c] = 1
        with torch.no_grad():
            out = down(x)[0, 0]
            symmetric = F.conv2d(x, down.conv.weight, stride=2, padding=1)[0, 0]
        assert out.shape == (4, 4)
        expected = torch.zeros(4, 4)
        for i in range(4):
            for j in range(4):
                if 0 <= r - 2 * i <= 2 and 0 <= c - 2 * j <= 2:
                    expected[i, j] = kernel[r - 2 * i, c - 2 * j]
        # one impulse picks one tap (the rest are exact zeros): exact with a direct conv; 1e-7 leaves room for a
        # kernel that transforms the weights first (Winograd, float32 rounding of taps ≤ 0.33); a wrong tap is ~0.1
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
        # the grid a symmetric padding=1 conv would use is a different one: the test can tell them apart
        assert not torch.allclose(symmetric, expected), (r, c)
    assert down(torch.zeros(1, 1, 65, 64)).shape[-2:] == (32, 32)  # ⌊H/2⌋: the extra odd row is dropped


def random_posterior(shape=(3, 8, 5, 6), seed=0) -> DiagonalGaussian:
    generator = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(shape, generator=generator) * 2)


def test_kl_matches_torch_distributions():
    posterior = random_posterior()
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    prior = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.std))
    expected = torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    # another path (torch's ½(σ² + μ² − 1 − log σ²) from σ, not from logvar) summed in another order, 240 terms:
    # measured max relative difference 7.1e-8 on KLs of 400…2900; rtol 1e-5 leaves room for other CPUs' exp/log,
    # while a missing term (the −1 alone is 120 per image) or a wrong ½ is off by ≥ 4%
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)


def test_posterior_splits_and_clamps_the_moments():
    moments = torch.randn(2, 8, 3, 3)
    moments[:, 4:, 0, 0] = 100.0
    moments[:, 4:, 0, 1] = -100.0
    posterior = DiagonalGaussian(moments)
    assert torch.equal(posterior.mean, moments[:, :4]) and torch.equal(posterior.mode(), moments[:, :4])
    assert (posterior.logvar[:, :, 0, 0] == 20).all() and (posterior.logvar[:, :, 0, 1] == -30).all()
    torch.testing.assert_close(posterior.var, posterior.std ** 2)
    torch.testing.assert_close(posterior.std[:, :, 1:], torch.exp(0.5 * moments[:, 4:, 1:]))


def test_sample_is_reproducible_from_a_seeded_cpu_generator():
    posterior = random_posterior()
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # z = mean + σ·ε with ε the generator's first float32 normal draws
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, posterior.mean + posterior.std * eps, rtol=0, atol=0)
    # the noise is drawn in float32 whatever the posterior's dtype, so the seed means the same z in float64 — up to
    # float32's rounding of mean + σ·ε in `a` (σ = exp(½ logvar) also differs in its last float32 bits between the
    # two dtypes, and exp's last bit differs between CPUs' vector libraries: 1.8e-7 was seen on a Xeon). So the
    # claim is float32's precision, not float64's: the float32 defaults of assert_close (rtol 1.3e-6, atol 1e-5).
    as_double = DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).double())
    torch.testing.assert_close(as_double.sample(torch.Generator().manual_seed(7)).float(), a)
