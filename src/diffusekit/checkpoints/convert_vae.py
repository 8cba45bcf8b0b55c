"""AutoencoderKL weights and configs: LDM single-file layout <-> diffusers ``AutoencoderKL`` layout.

The key map is derived from our module tree (built on the meta device) by renaming path segments, so it
is total by construction: every key of one layout has exactly one partner in the other. The differences:

* ``{encoder,decoder}.{down,up}.I.block.J`` <-> ``{down,up}_blocks.I'.resnets.J``, where the decoder
  level index is reversed (LDM ``up.0`` is the full-resolution level, diffusers ``up_blocks.0`` the lowest);
* ``downsample.conv`` / ``upsample.conv`` <-> ``downsamplers.0.conv`` / ``upsamplers.0.conv``;
* ``mid.block_1/block_2/attn_1`` <-> ``mid_block.resnets.0/1``, ``mid_block.attentions.0``;
* ``nin_shortcut`` <-> ``conv_shortcut``, ``norm_out`` <-> ``conv_norm_out``;
* attention ``norm/q/k/v/proj_out`` (1x1 convs, (C, C, 1, 1)) <-> ``group_norm/to_q/to_k/to_v/to_out.0``
  (Linear, (C, C)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..models.configs import VAEConfig
from ..models.vae import AutoencoderKL
from ..models.validate import MAX_COUNT, MAX_WIDTH, Bool, Float, Int, Ints, Items, JsonFields, Text

_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
_ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LINEAR = ("q", "k", "v", "proj_out")  # LDM 1x1 convs that diffusers stores as Linear

_DOWN_TYPE, _UP_TYPE = "DownEncoderBlock2D", "UpDecoderBlock2D"


# ---------------------------------------------------------------------------------------------
# Configs


def vae_config_to_diffusers(cfg: VAEConfig, *, sample_size: int = 512) -> dict[str, Any]:
    """Keyword arguments of diffusers ``AutoencoderKL`` (its ``config.json``) describing `cfg`."""
    if cfg.ch_mult[0] != 1:
        raise ValueError(
            f"diffusers' AutoencoderKL has conv_in output block_out_channels[0]; ch_mult={cfg.ch_mult} "
            "must start with 1 to be representable"
        )
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(
            f"diffusers' AutoencoderKL needs embed_dim == z_channels; got embed_dim={cfg.embed_dim}, "
            f"z_channels={cfg.z_channels}"
        )
    n = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": [_DOWN_TYPE] * n,
        "up_block_types": [_UP_TYPE] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv,
    }


def vae_config_from_diffusers(d: object, source: str = "vae/config.json") -> VAEConfig:
    """VAEConfig from a diffusers ``AutoencoderKL`` config dict; rejects variants we do not implement."""
    f = JsonFields(d, source)
    blocks = f.get("block_out_channels", Ints(Int(1, MAX_WIDTH), 1, 8), (64,))
    n = len(blocks)
    problems = []
    if list(f.get("down_block_types", Items(Text(), n, n), [_DOWN_TYPE] * n)) != [_DOWN_TYPE] * n:
        problems.append(f"down_block_types must all be {_DOWN_TYPE}")
    if list(f.get("up_block_types", Items(Text(), n, n), [_UP_TYPE] * n)) != [_UP_TYPE] * n:
        problems.append(f"up_block_types must all be {_UP_TYPE}")
    if f.get("act_fn", Text(), "silu") != "silu":
        problems.append(f"act_fn must be 'silu', got {d['act_fn']!r}")
    if f.get("mid_block_add_attention", Bool(), True) is not True:
        problems.append("mid_block_add_attention=False is not supported")
    quant = f.get("use_quant_conv", Bool(), True)  # SD3's 16-channel VAE has no quant convs
    if f.get("use_post_quant_conv", Bool(), True) != quant:
        problems.append("use_quant_conv and use_post_quant_conv must agree")
    for field in ("latents_mean", "latents_std"):
        if d.get(field) is not None:
            problems.append(f"{field} is set (latent normalisation beyond a scaling factor is not supported)")
    ch = blocks[0]
    if any(c % ch for c in blocks):
        problems.append(f"block_out_channels {list(blocks)} are not multiples of the first entry")
    if problems:
        raise f.error("", ": unsupported diffusers AutoencoderKL config: " + "; ".join(problems))
    latent = f.get("latent_channels", Int(1, 1024), 4)
    return f.build(
        VAEConfig,
        _CONFIG_NAMES,
        ch=ch,
        ch_mult=tuple(c // ch for c in blocks),
        num_res_blocks=f.get("layers_per_block", Int(1, MAX_COUNT), 1),
        in_channels=f.get("in_channels", Int(1, 64), 3),
        out_ch=f.get("out_channels", Int(1, 64), 3),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=f.get("norm_num_groups", Int(1, 1024), 32),
        scaling_factor=f.get("scaling_factor", Float(0.0, 100.0), 0.18215),
        shift_factor=0.0
        if d.get("shift_factor") is None  # SD1/2/XL folders write null
        else f.get("shift_factor", Float(-100.0, 100.0, False)),
        use_quant_conv=bool(quant),
    )


# Our VAEConfig field -> the diffusers config field it comes from (for error messages).
_CONFIG_NAMES = {
    "ch": "block_out_channels",
    "ch_mult": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "out_ch": "out_channels",
    "z_channels": "latent_channels",
    "embed_dim": "latent_channels",
    "norm_groups": "norm_num_groups",
}


# ---------------------------------------------------------------------------------------------
# Key maps


def _diffusers_name(key: str, levels: int) -> str:
    """The diffusers key of one LDM AutoencoderKL key."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv / post_quant_conv
    p = rest.split(".")
    if p[0] in ("down", "up") and p[2] == "block":  # {down,up}.I.block.J.<module>.<param>
        i = int(p[1]) if p[0] == "down" else levels - 1 - int(p[1])
        mod = _RESNET_RENAMES.get(p[4], p[4])
        out = [f"{p[0]}_blocks", str(i), "resnets", p[3], mod, *p[5:]]
    elif p[0] in ("down", "up"):  # {down,up}.I.{down,up}sample.conv.<param>
        i = int(p[1]) if p[0] == "down" else levels - 1 - int(p[1])
        out = [f"{p[0]}_blocks", str(i), f"{p[2]}rs", "0", *p[3:]]
    elif p[0] == "mid" and p[1].startswith("block_"):  # mid.block_K.<module>.<param>
        j = int(p[1][len("block_") :]) - 1
        out = ["mid_block", "resnets", str(j), _RESNET_RENAMES.get(p[2], p[2]), *p[3:]]
    elif p[0] == "mid":  # mid.attn_1.<module>.<param>
        out = ["mid_block", "attentions", "0", _ATTN_RENAMES[p[2]], *p[3:]]
    elif p[0] == "norm_out":
        out = ["conv_norm_out", *p[1:]]
    else:  # conv_in, conv_out
        out = p
    return ".".join([side, *out])


def _is_attn_linear(ldm_key: str) -> bool:
    p = ldm_key.split(".")
    return len(p) == 5 and p[1] == "mid" and p[2] == "attn_1" and p[3] in _ATTN_LINEAR and p[4] == "weight"


def vae_key_map(cfg: VAEConfig) -> dict[str, str]:
    """{LDM key: diffusers key} for every parameter of an AutoencoderKL with config `cfg`."""
    keys = AutoencoderKL(cfg, device="meta").state_dict().keys()
    return {k: _diffusers_name(k, len(cfg.ch_mult)) for k in keys}


def _expected_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in AutoencoderKL(cfg, device="meta").state_dict().items()}


def _first(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check_keys(given: Mapping[str, torch.Tensor], expected: set[str], what: str) -> None:
    unexpected = sorted(set(given) - expected)
    missing = sorted(expected - set(given))
    parts = [f"unexpected key {_first(unexpected)}"] if unexpected else []
    parts += [f"missing key {_first(missing)}"] if missing else []
    if parts:
        raise ValueError(f"{what} state dict does not match the VAE config: " + "; ".join(parts))


def vae_from_diffusers(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> our (LDM-keyed) state dict; exact, shapes checked."""
    to_ldm = {d: k for k, d in vae_key_map(cfg).items()}
    _check_keys(sd, set(to_ldm), "diffusers AutoencoderKL")
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for dkey, value in sd.items():
        key = to_ldm[dkey]
        if _is_attn_linear(key) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        if value.shape != shapes[key]:
            raise ValueError(f"{dkey}: shape {tuple(value.shape)} does not fit {key} {tuple(shapes[key])}")
        out[key] = value
    return out


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our (LDM-keyed) state dict -> diffusers ``AutoencoderKL`` state dict; exact, shapes checked."""
    key_map = vae_key_map(cfg)
    _check_keys(sd, set(key_map), "AutoencoderKL (LDM layout)")
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if value.shape != shapes[key]:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
        out[key_map[key]] = value[:, :, 0, 0] if _is_attn_linear(key) else value  # (C, C, 1, 1) -> (C, C)
    return out
