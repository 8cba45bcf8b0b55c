"""MMDiT (SD3 / SD3.5): parity with diffusers' SD3Transformer2DModel, key round trips, real-size counts."""

from __future__ import annotations

import pytest
import torch

from diffusekit.checkpoints.convert_mmdit import (
    mmdit_config_from_diffusers,
    mmdit_diffusers_config,
    mmdit_from_diffusers,
    mmdit_to_diffusers,
)
from diffusekit.models.init import randomize_
from diffusekit.models.mmdit import MMDiT
from diffusekit.models.sd3_configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, TINY_SD3, TINY_SD35, sd3_preset

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _pair(cfg):
    ours = randomize_(MMDiT(cfg), seed=1).eval()
    theirs = diffusers.SD3Transformer2DModel(**mmdit_diffusers_config(cfg)).eval()
    theirs.load_state_dict(mmdit_to_diffusers(ours.state_dict(), cfg.depth), strict=True)
    return ours, theirs


@pytest.mark.parametrize("preset", [TINY_SD3, TINY_SD35], ids=lambda c: c.name)
def test_mmdit_matches_diffusers(preset) -> None:
    cfg = preset.mmdit
    ours, theirs = _pair(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 10, generator=g)  # non-square, smaller than the position table
    t = torch.tensor([999.0, 3.0])
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g)
    with torch.no_grad():
        a = ours(x, t, ctx, y)
        b = theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y).sample
    assert a.shape == (2, 16, 12, 10)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-5, rel


def test_mmdit_skip_layers_changes_output() -> None:
    cfg = TINY_SD35.mmdit
    model = randomize_(MMDiT(cfg)).eval()
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    ctx, y = torch.randn(1, 5, cfg.context_dim), torch.randn(1, cfg.adm_in_channels)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, ctx, y), model(x, t, ctx, y, skip_layers=(1,)))


def test_mmdit_key_round_trip_and_config() -> None:
    cfg = TINY_SD35.mmdit
    ours, theirs = _pair(cfg)
    back = mmdit_from_diffusers(theirs.state_dict(), cfg.depth)
    mine = ours.state_dict()
    assert set(back) == set(mine)
    assert all(torch.equal(back[k], v) for k, v in mine.items())
    assert mmdit_config_from_diffusers(dict(theirs.config)) == cfg


def test_mmdit_single_file_key_names() -> None:
    keys = set(MMDiT(TINY_SD35.mmdit, device="meta").state_dict())
    for k in (
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.mlp.0.weight",
        "context_embedder.weight",
        "joint_blocks.0.x_block.attn2.qkv.weight",
        "joint_blocks.0.x_block.attn.ln_q.weight",
        "joint_blocks.2.context_block.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert k in keys, k
    assert "joint_blocks.2.context_block.attn.proj.weight" not in keys  # the last context block is pre-only
    assert "joint_blocks.2.x_block.attn2.qkv.weight" not in keys


def test_mmdit_rejects_too_large_latent() -> None:
    cfg = TINY_SD3.mmdit
    model = MMDiT(cfg)
    x = torch.zeros(1, 16, 2 * (cfg.pos_embed_max_size + 1), 8)
    with pytest.raises(ValueError, match="position table"):
        model(x, torch.zeros(1), torch.zeros(1, 1, cfg.context_dim), torch.zeros(1, cfg.adm_in_channels))
    with pytest.raises(ValueError, match="unknown SD3 preset"):
        sd3_preset("sd4")


@pytest.mark.parametrize(
    "preset,params,pos",
    [(SD3_MEDIUM, 2_028_328_000, 192), (SD35_MEDIUM, 2_243_171_520, 384), (SD35_LARGE, 8_056_627_520, 192)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_real_size_parameter_counts(preset, params, pos) -> None:
    with torch.device("meta"):
        ours = MMDiT(preset.mmdit)
        theirs = diffusers.SD3Transformer2DModel(**mmdit_diffusers_config(preset.mmdit))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == params
    assert ours.pos_embed.shape == (1, pos * pos, preset.mmdit.hidden_size)
