"""AutoencoderKL: numerical parity with diffusers, LDM key layout, exact key maps, posterior."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file
from torch import nn

from diffusekit.checkpoints.convert_vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_key_map,
    vae_to_diffusers,
)
from diffusekit.models.configs import SD1, SDXL, TINY_SD1, TINY_SDXL, VAEConfig
from diffusekit.models.sd3_configs import TINY_SD3
from diffusekit.models.vae import AutoencoderKL, DiagonalGaussian

TOL = 1e-4  # max |ours - reference| / max |reference|, fp32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize_norms(model: nn.Module) -> None:
    """Give every GroupNorm non-trivial affine parameters so that a swapped norm cannot go unnoticed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def diffusers_reference(cfg: VAEConfig, folder: Path) -> tuple[DiffusersAutoencoderKL, dict]:
    """A seeded random diffusers VAE, saved and reloaded; returns it and the weights as stored on disk."""
    torch.manual_seed(1)
    ref = DiffusersAutoencoderKL(**vae_config_to_diffusers(cfg))
    randomize_norms(ref)
    ref.save_pretrained(folder)
    ref = DiffusersAutoencoderKL.from_pretrained(folder).eval()
    return ref, load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("cfg", [TINY_SD1.vae, TINY_SDXL.vae, TINY_SD3.vae], ids=["sd1", "sdxl", "sd3"])
def test_matches_diffusers(cfg: VAEConfig, tmp_path: Path) -> None:
    ref, stored = diffusers_reference(cfg, tmp_path)
    assert vae_config_from_diffusers(ref.config) == cfg  # scaling factor included
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(stored, cfg), strict=True)

    x = torch.rand(2, 3, 48, 32) * 2 - 1  # non-square, exercises the asymmetric downsampling pad
    z = torch.randn(2, cfg.embed_dim, 5, 7)
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        dec_ref, dec = ref.decode(post_ref.mean).sample, ours.decode(post.mean)
        zdec_ref, zdec = ref.decode(z).sample, ours.decode(z)

    assert post.mean.shape == (2, cfg.embed_dim, 6, 4)
    assert dec.shape == x.shape and zdec.shape == (2, 3, 40, 56)
    for name, a, b in [
        ("mean", post.mean, post_ref.mean),
        ("logvar", post.logvar, post_ref.logvar),
        ("decode(mean)", dec, dec_ref),
        ("decode(z)", zdec, zdec_ref),
    ]:
        assert b.abs().max() > 1e-2, f"{name}: reference output is degenerate"
        assert rel_err(a, b) <= TOL, f"{name}: relative error {rel_err(a, b):.2e}"


def test_channels_last_matches_contiguous() -> None:
    ours = AutoencoderKL(TINY_SD1.vae).eval()
    randomize_norms(ours)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        a, b = ours.encode(x).mean, ours.decode(z)
        ours.to(memory_format=torch.channels_last)
        c = ours.encode(x.to(memory_format=torch.channels_last)).mean
        d = ours.decode(z.to(memory_format=torch.channels_last))
    assert rel_err(c, a) <= 1e-5 and rel_err(d, b) <= 1e-5


def test_ldm_key_layout_and_size() -> None:
    """Our keys are the LDM keys: diffusers' own single-file converter must accept them unchanged."""
    cfg = SD1.vae
    sd = AutoencoderKL(cfg, device="meta").state_dict()
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    assert len(sd) == 248
    for key, shape in {
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd

    reference = convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in sd.items()},
        {
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
    )
    ours = vae_to_diffusers(sd, cfg)
    assert set(ours) == set(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)
    with torch.device("meta"):
        real = DiffusersAutoencoderKL(**vae_config_to_diffusers(cfg)).state_dict()
    assert {k: v.shape for k, v in real.items()} == {k: v.shape for k, v in ours.items()}


@pytest.mark.parametrize("cfg", [TINY_SD1.vae, SDXL.vae], ids=["tiny", "sdxl"])
def test_key_maps_round_trip_exactly(cfg: VAEConfig) -> None:
    model = AutoencoderKL(cfg) if cfg is TINY_SD1.vae else AutoencoderKL(cfg, device="meta")
    sd = model.state_dict()
    there = vae_to_diffusers(sd, cfg)
    back = vae_from_diffusers(there, cfg)
    assert set(back) == set(sd)
    assert len(set(vae_key_map(cfg).values())) == len(sd)  # the map is one-to-one
    assert there["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    if cfg is TINY_SD1.vae:
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        again = vae_to_diffusers(back, cfg)
        assert all(torch.equal(again[k], there[k]) for k in there)
    assert vae_config_from_diffusers(vae_config_to_diffusers(cfg)) == cfg


def test_key_map_errors_name_the_key() -> None:
    cfg = TINY_SD1.vae
    there = vae_to_diffusers(AutoencoderKL(cfg).state_dict(), cfg)
    with pytest.raises(ValueError, match="unexpected key 'encoder.extra.weight'"):
        vae_from_diffusers({**there, "encoder.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="missing key 'decoder.conv_out.bias'"):
        vae_from_diffusers({k: v for k, v in there.items() if k != "decoder.conv_out.bias"}, cfg)
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        vae_from_diffusers({**there, "decoder.conv_in.weight": torch.zeros(3, 3, 3, 3)}, cfg)
    with pytest.raises(ValueError, match="missing key 'quant_conv.bias'"):
        vae_to_diffusers(
            {k: v for k, v in AutoencoderKL(cfg).state_dict().items() if k != "quant_conv.bias"}, cfg
        )


def test_config_conversion_rejects_unsupported() -> None:
    d = vae_config_to_diffusers(TINY_SD1.vae)
    with pytest.raises(ValueError, match="latents_mean"):
        vae_config_from_diffusers({**d, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_config_from_diffusers({**d, "use_quant_conv": False})  # post_quant_conv still on
    with pytest.raises(ValueError, match="ch_mult"):
        vae_config_to_diffusers(VAEConfig(ch_mult=(2, 2)))
    with pytest.raises(ValueError, match="embed_dim"):
        vae_config_to_diffusers(VAEConfig(embed_dim=8))


def test_posterior() -> None:
    moments = torch.randn(2, 8, 3, 3)
    moments[0, 4] = 100.0  # log-variance beyond LDM's clamp
    post = DiagonalGaussian.from_moments(moments)
    assert torch.equal(post.mean, moments[:, :4]) and post.logvar.max() == 20.0
    assert torch.equal(post.mode(), post.mean)
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar))
    s1 = post.sample(torch.Generator().manual_seed(7))
    s2 = post.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    assert torch.allclose(s1, post.mean + post.std * eps)


def test_meta_device_and_input_checks() -> None:
    vae = AutoencoderKL(TINY_SD1.vae, device="meta")
    post = vae.encode(torch.empty(1, 3, 64, 64, device="meta"))
    assert post.mean.shape == (1, 4, 8, 8) and post.mean.device.type == "meta"
    assert vae.decode(post.mean).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.empty(1, 3, 60, 64, device="meta"))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.empty(1, 3, 8, 8, device="meta"))


@pytest.mark.slow
def test_full_size_matches_diffusers(tmp_path: Path) -> None:
    ref, stored = diffusers_reference(SD1.vae, tmp_path)
    ours = AutoencoderKL(SD1.vae).eval()
    ours.load_state_dict(vae_from_diffusers(stored, SD1.vae), strict=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post_ref, post = ref.encode(x).latent_dist, ours.encode(x)
        dec_ref, dec = ref.decode(post_ref.mean).sample, ours.decode(post.mean)
    assert rel_err(post.mean, post_ref.mean) <= TOL
    assert rel_err(post.logvar, post_ref.logvar) <= TOL
    assert rel_err(dec, dec_ref) <= TOL
