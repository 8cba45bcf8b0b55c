"""U-Net: parity with diffusers' UNet2DConditionModel, exact key maps, published parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file
from torch import nn

from diffusekit.checkpoints.convert_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from diffusekit.models.configs import (
    SD1,
    SD1_INPAINT,
    SD2,
    SDXL,
    TINY_SD1,
    TINY_SD1_INPAINT,
    TINY_SD2,
    TINY_SDXL,
    UNetConfig,
)
from diffusekit.models.unet import UNetModel, size_embedding, timestep_embedding

TINY = {c.name: c.unet for c in (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SDXL)}
REAL = {c.name: c.unet for c in (SD1, SD2, SDXL)}


def _randomize(model: nn.Module) -> None:
    """Unit-scale random weights (LeCun normal) and non-trivial norm affines, so activations stay O(1)
    through the depth and a small deviation (a swapped norm, tanh-approximate GELU) shows in the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


def _reference(cfg: UNetConfig) -> UNet2DConditionModel:
    ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    _randomize(ref)
    return ref


def _inputs(cfg: UNetConfig, b: int, h: int, w: int, tokens: int = 7):
    """(x, t, context, diffusers kwargs, our y) for a batch; SDXL gets pooled text and six size ids."""
    x = torch.randn(b, cfg.in_channels, h, w)
    t = torch.rand(b) * 999.0
    ctx = torch.randn(b, tokens, cfg.context_dim)
    if cfg.adm_in_channels is None:
        return x, t, ctx, {}, None
    pooled = torch.randn(b, cfg.adm_in_channels - 6 * cfg.size_embed_dim)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0]]).repeat(b, 1) + torch.arange(b)[:, None]
    y = torch.cat([pooled, size_embedding(ids, cfg.size_embed_dim)], dim=1)
    return x, t, ctx, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}, y


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", TINY)
def test_matches_diffusers(name, tmp_path):
    cfg = TINY[name]
    ref = _reference(cfg)
    ref.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(sd, cfg), strict=True)

    x, t, ctx, kwargs, y = _inputs(cfg, 2, 32, 40)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, **kwargs).sample
        got = ours(x, t, ctx, y)
    assert got.shape == (2, cfg.out_channels, 32, 40)
    assert expected.abs().max() > 0.1
    assert _relative_error(got, expected) <= 1e-4


def test_odd_latent_size_matches_diffusers():
    """Sizes not divisible by the total downscale: upsampling lands on the skip's size, as in diffusers."""
    cfg = TINY["tiny_sd2"]
    ref = _reference(cfg)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    x, t, ctx, _, _ = _inputs(cfg, 1, 30, 34)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == x.shape
    assert _relative_error(got, expected) <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip_is_exact(name):
    cfg = TINY[name]
    sd = _reference(cfg).state_dict()
    ours = unet_from_diffusers(sd, cfg)
    assert set(ours) == set(UNetModel(cfg, device="meta").state_dict())
    back = unet_to_diffusers(ours, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize(
    ("cfg", "count"),
    [
        (SD1.unet, 859_520_964),
        (SD2.unet, 865_910_724),
        (SDXL.unet, 2_567_463_684),
        (SD1_INPAINT.unet, 859_535_364),
    ],
    ids=["sd1", "sd2", "sdxl", "sd1_inpaint"],
)
def test_parameter_counts_on_meta(cfg, count):
    model = UNetModel(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", REAL)
def test_real_size_keys_and_shapes_match_diffusers(name):
    cfg = REAL[name]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
    converted = unet_from_diffusers(ref.state_dict(), cfg)
    ours = UNetModel(cfg, device="meta").state_dict()
    assert set(converted) == set(ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}


def test_ldm_key_layout():
    """Spot checks of the original checkpoint names (model.diffusion_model.* stripped)."""
    sd1 = UNetModel(SD1.unet, device="meta").state_dict()
    for key in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.1.1.transformer_blocks.0.norm3.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.proj_out.weight",
        "middle_block.2.out_layers.3.bias",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "out.0.weight",
        "out.2.bias",
    ):
        assert key in sd1, key
    assert sd1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)  # SD1: 1x1 conv
    assert len(sd1) == 686
    sdxl = UNetModel(SDXL.unet, device="meta").state_dict()
    assert sdxl["label_emb.0.0.weight"].shape == (1280, 2816)
    assert sdxl["label_emb.0.2.weight"].shape == (1280, 1280)
    assert sdxl["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # SD2/SDXL: linear
    assert "input_blocks.7.1.transformer_blocks.9.attn1.to_k.weight" in sdxl
    assert "middle_block.1.transformer_blocks.9.ff.net.2.bias" in sdxl
    assert not any(k.startswith("input_blocks.1.1.") for k in sdxl)  # level 0 has no attention
    assert len(sdxl) == 1680


def test_config_matches_published_diffusers_configs():
    sd1 = unet_config_to_diffusers(SD1.unet)
    assert sd1["attention_head_dim"] == 8 and sd1["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd1["cross_attention_dim"] == 768 and not sd1["use_linear_projection"]
    assert sd1["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd1["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    sd2 = unet_config_to_diffusers(SD2.unet)
    assert sd2["attention_head_dim"] == [5, 10, 20, 20] and sd2["use_linear_projection"]
    assert sd2["cross_attention_dim"] == 1024
    xl = unet_config_to_diffusers(SDXL.unet)
    assert xl["attention_head_dim"] == [5, 10, 20]
    assert xl["transformer_layers_per_block"] == [1, 2, 10]
    assert xl["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert xl["addition_embed_type"] == "text_time"
    assert xl["addition_time_embed_dim"] == 256
    assert xl["projection_class_embeddings_input_dim"] == 2816


@pytest.mark.parametrize(
    "cfg", [SD1.unet, SD1_INPAINT.unet, SD2.unet, SDXL.unet], ids=["sd1", "inp", "sd2", "xl"]
)
def test_config_from_full_diffusers_config(cfg):
    """A config as diffusers stores it (every field, incl. defaults) converts back to our preset exactly."""
    with torch.device("meta"):
        full = dict(UNet2DConditionModel(**unet_config_to_diffusers(cfg, sample_size=64)).config)
    assert unet_config_from_diffusers(full) == cfg


@pytest.mark.parametrize("name", TINY)
def test_config_round_trip(name):
    d = unet_config_to_diffusers(TINY[name])
    back = unet_config_from_diffusers(d)
    assert unet_config_to_diffusers(back) == d
    assert dataclasses.replace(back, num_heads=TINY[name].num_heads) == TINY[name]


def test_config_middle_depth_differs_from_last_level():
    cfg = UNetConfig(channel_mult=(1, 2), transformer_depth=(1, 2), transformer_depth_middle=3)
    with pytest.raises(ValueError, match="transformer_depth_middle"):
        unet_config_to_diffusers(cfg)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        (
            {"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
            "down_block_types",
        ),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]}, "up_block_types"),
        ({"transformer_layers_per_block": [1, [1, 2], 1]}, "transformer_layers_per_block"),
        ({"layers_per_block": [2, 1, 2]}, "layers_per_block"),
        ({"attention_head_dim": [2, 3, 4]}, "attention_head_dim"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"some_future_option": True}, "some_future_option"),
    ],
)
def test_unsupported_diffusers_config_names_the_field(change, field):
    d = {**unet_config_to_diffusers(TINY["tiny_sd1"]), **change}
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers(d)


def test_state_dict_errors_name_the_key():
    cfg = TINY["tiny_sdxl"]
    sd = _reference(cfg).state_dict()
    missing = dict(sd)
    del missing["up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing diffusers key\(s\): up_blocks\.0\.attentions\.1\."):
        unet_from_diffusers(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected diffusers key\(s\): extra\.weight"):
        unet_from_diffusers({**sd, "extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="conv_in.weight"):
        unet_from_diffusers({**sd, "conv_in.weight": torch.zeros(32, 9, 3, 3)}, cfg)
    ours = unet_from_diffusers(sd, cfg)
    del ours["label_emb.0.2.bias"]
    with pytest.raises(ValueError, match=r"missing U-Net key\(s\): label_emb\.0\.2\.bias"):
        unet_to_diffusers(ours, cfg)
    with pytest.raises(ValueError, match="add_embedding"):  # SD1 config given an SDXL state dict
        unet_from_diffusers(sd, TINY["tiny_sd1"])


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (32, 320, 7):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), ref, rtol=0, atol=1e-6)
    e = timestep_embedding(torch.zeros(1), 8)
    assert torch.equal(e, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))  # cos first


def test_size_embedding():
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 512, 768]])
    e = size_embedding(ids, 256)
    assert e.shape == (2, 6 * 256)
    for k in range(6):
        assert torch.equal(e[:, k * 256 : (k + 1) * 256], timestep_embedding(ids[:, k], 256))
    with pytest.raises(ValueError, match="batch, count"):
        size_embedding(ids[0], 256)


def test_channels_last_and_scalar_timestep():
    cfg = TINY["tiny_sdxl"]
    model = UNetModel(cfg).eval()
    _randomize(model)
    x, t, ctx, _, y = _inputs(cfg, 2, 32, 32)
    t = torch.full((2,), 321.0)
    with torch.no_grad():
        base = model(x, t, ctx, y)
        scalar = model(x, torch.tensor(321.0), ctx, y)
        model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last), t, ctx, y)
    assert torch.equal(scalar, base)
    assert _relative_error(cl, base) <= 1e-5


def test_bf16_weights():
    """bf16 weights: inputs are cast to the weights' dtype, the output comes back in the dtype of x."""
    cfg = TINY["tiny_sd2"]
    model = UNetModel(cfg).eval()
    _randomize(model)
    x, t, ctx, _, _ = _inputs(cfg, 2, 32, 32)
    with torch.no_grad():
        ref = model(x, t, ctx)
        low = model.to(torch.bfloat16)(x, t, ctx)
    assert low.dtype == torch.float32
    assert _relative_error(low, ref) <= 0.03  # measured 1.4e-2: bf16 keeps 8 mantissa bits


def test_forward_input_errors():
    xl = UNetModel(TINY["tiny_sdxl"], device="meta")
    x, t, ctx, _, y = _inputs(TINY["tiny_sdxl"], 1, 16, 16)
    with pytest.raises(ValueError, match="adm_in_channels"):
        xl(x, t, ctx)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        xl(torch.zeros(1, 9, 16, 16), t, ctx, y)
    with pytest.raises(ValueError, match=r"context must be \(B, T, 64\)"):
        xl(x, t, torch.zeros(1, 7, 32), y)
    with pytest.raises(ValueError, match="divisible"):
        UNetModel(UNetConfig(model_channels=32, num_heads=3), device="meta")


@pytest.mark.slow
def test_full_size_sd1_matches_diffusers():
    """Real SD1.5 shape, random weights, 64x64 latents, batch 2, fp32."""
    cfg = SD1.unet
    ref = _reference(cfg)
    ours = UNetModel(cfg, device="meta").eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True, assign=True)
    x, t, ctx, _, _ = _inputs(cfg, 2, 64, 64, tokens=77)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    print(
        f"SD1 full size: max abs diff {(got - expected).abs().max().item():.3e}, "
        f"relative {_relative_error(got, expected):.3e}, max |ref| {expected.abs().max().item():.3f}"
    )
    assert _relative_error(got, expected) <= 1e-4
