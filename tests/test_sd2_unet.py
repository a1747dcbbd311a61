"""SD 2's UNet differences as configuration: 64-channel heads, linear proj_in/proj_out, a 1024-wide context and
upcast attention; the config's JSON round trip with those fields. (Parity of the whole v2 UNet against diffusers:
tests/test_sd2_pipeline.py.)"""
import json

import pytest
import torch

from ldm_scratch import spatial_transformer
from ldm_scratch.clip import openclip_text_config
from ldm_scratch.configs import ModelConfig
from ldm_scratch.spatial_transformer import Attention, SpatialTransformer
from ldm_scratch.unet import UNet, UNetConfig

SD2 = dict(context_dim=1024, head_dim=64, linear_projection=True, upcast_attention=True)


def test_sd2_unet_has_64_channel_heads_and_linear_projections():
    with torch.device("meta"):
        unet = UNet(UNetConfig(**SD2))
    heads = [unet.down[level].attn[0].blocks[0].self_attn.n_heads for level in (0, 1, 2)]
    assert heads == [5, 10, 20] and unet.middle.attn.blocks[0].cross_attn.n_heads == 20   # widths / 64
    attn = unet.down[0].attn[0]
    assert isinstance(attn.proj_in, torch.nn.Linear) and tuple(attn.proj_in.weight.shape) == (320, 320)
    assert tuple(attn.blocks[0].cross_attn.to_k.weight.shape) == (320, 1024)
    with torch.device("meta"):
        v1 = UNet(UNetConfig())
    assert v1.down[0].attn[0].blocks[0].self_attn.n_heads == 8 and isinstance(v1.down[0].attn[0].proj_in,
                                                                              torch.nn.Conv2d)


def test_linear_projection_is_the_1x1_convolution_on_tokens():
    """SD 2's Linear proj_in/proj_out compute what SD v1's 1×1 convolutions compute, given the same numbers."""
    torch.manual_seed(0)
    conv = SpatialTransformer(64, 2, 32, groups=8).eval()
    linear = SpatialTransformer(64, 2, 32, groups=8, linear=True).eval()
    state = {k: (v[:, :, 0, 0] if k.startswith(("proj_in.weight", "proj_out.weight")) else v)
             for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, context = torch.randn(2, 64, 5, 7), torch.randn(2, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, context), conv(x, context), rtol=0, atol=2e-6)   # measured 3.6e-7 (values ≈ 4)


def test_upcast_attention_runs_the_attention_in_float32(monkeypatch):
    seen = []
    real = spatial_transformer.attention
    monkeypatch.setattr(spatial_transformer, "attention", lambda q, k, v, *a, **kw: seen.append(q.dtype) or
                        real(q, k, v, *a, **kw))
    x = torch.randn(1, 6, 64)
    for upcast in (False, True):
        layer = Attention(64, 1, upcast=upcast).to(torch.bfloat16)
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
        assert Attention(64, 1, upcast=upcast)(x).dtype == torch.float32     # a no-op in float32
    assert seen == [torch.bfloat16, torch.float32, torch.float32, torch.float32]


def test_v2_fields_round_trip_through_json_and_are_checked():
    config = ModelConfig(text_encoder=openclip_text_config(), unet=UNetConfig(**SD2), kind="sd-v2",
                         prediction_type="v_prediction")
    again = ModelConfig.from_json(config.to_json())
    assert again == config and again.schedule().config.prediction_type == "v_prediction"
    assert again.tokenizer_pad_id == 0 and ModelConfig().tokenizer_pad_id is None
    data = json.loads(config.to_json())
    for path, value, message in ((("unet", "head_dim"), 0, "null or a positive whole number"),
                                 (("unet", "linear_projection"), 1, "true or false"),
                                 (("prediction_type",), "v", "must be one of epsilon, v_prediction")):
        bad = json.loads(json.dumps(data))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="divisible by norm_groups=32 and head_dim=64"):
        UNetConfig(model_channels=96, head_dim=64)
