"""U-Net state dicts and configs between the LDM/SGM layout (ours) and diffusers' UNet2DConditionModel.

The key map is derived from the config: loops over levels and blocks pair each of our stages
(``input_blocks.N``, ``middle_block``, ``output_blocks.N``) with its diffusers counterpart, and the
parameter names inside a stage come from a meta-device ``UNetModel``. Both layouts hold tensors of the
same shapes, so conversion is a pure, exact renaming; any key not in the map is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from torch import Tensor

from diffusekit.models.configs import UNetConfig
from diffusekit.models.unet import UNetModel
from diffusekit.models.validate import (
    MAX_COUNT,
    MAX_WIDTH,
    Bool,
    ConfigError,
    Int,
    Ints,
    Items,
    JsonFields,
    Optional,
    PerLevel,
    Spec,
    Text,
)

__all__ = [
    "unet_config_to_diffusers",
    "unet_config_from_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
]

# ResBlock submodules: ours -> diffusers ResnetBlock2D.
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# ---------------------------------------------------------------------------------------------
# Configs


def _collapse(values: list[Any]) -> Any:
    """A single value when all entries agree (the form diffusers' own configs use), else the list."""
    return values[0] if all(v == values[0] for v in values) else list(values)


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config (kwargs) describing the same network as `cfg`."""
    depth = list(cfg.transformer_depth)
    if depth[-1] > 0 and cfg.transformer_depth_middle > 0 and depth[-1] != cfg.transformer_depth_middle:
        raise ValueError(
            f"transformer_depth_middle={cfg.transformer_depth_middle} differs from the last level's "
            f"transformer_depth={depth[-1]}; diffusers takes both from transformer_layers_per_block[-1]"
        )
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers names the head *count* `attention_head_dim` (a historical misnomer it keeps for configs).
    heads = [cfg.heads_at(c)[0] for c in channels]
    layers = [d if d > 0 else 1 for d in depth]  # levels without attention ignore their entry
    if depth[-1] == 0 and cfg.transformer_depth_middle > 0:
        layers[-1] = cfg.transformer_depth_middle  # the middle block reads the last entry
    d: dict[str, Any] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if n else "DownBlock2D" for n in depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.transformer_depth_middle else "UNetMidBlock2D",
        "up_block_types": ["CrossAttnUpBlock2D" if n else "UpBlock2D" for n in reversed(depth)],
        "transformer_layers_per_block": _collapse(layers),
        "attention_head_dim": _collapse(heads),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
    }
    if cfg.adm_in_channels is not None:
        d["addition_embed_type"] = "text_time"
        d["addition_time_embed_dim"] = cfg.size_embed_dim
        d["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    if sample_size is not None:
        d["sample_size"] = sample_size
    return d


# Fields that select features we do not implement: each must be absent or hold one of these values.
_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "norm_eps": (1e-5,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
# Fields with no effect on the weights or the (numerically equivalent) forward pass.
_IGNORED = {"sample_size", "dropout", "upcast_attention", "addition_embed_type_num_heads"}
# Structural fields we translate, with diffusers' defaults for when a config omits them.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 1280,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}


def _per_level(d: dict[str, Any], name: str, levels: int) -> list[Any]:
    value = d[name]
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers config field {name!r} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _uniform(d: dict[str, Any], name: str, levels: int) -> Any:
    values = _per_level(d, name, levels)
    if any(v != values[0] for v in values):
        raise ValueError(f"diffusers config field {name!r}={d[name]!r}: per-level values must all be equal")
    return values[0]


# The type and range of each structural field a config may give (checked before any arithmetic on it).
_SPECS: dict[str, Spec] = {
    "in_channels": Int(1, 64),
    "out_channels": Int(1, 64),
    "block_out_channels": Ints(Int(1, MAX_WIDTH), 1, 8),
    "layers_per_block": PerLevel(Int(1, MAX_COUNT)),
    "down_block_types": Items(Text(), 1, 8),
    "mid_block_type": Optional(Text()),
    "up_block_types": Items(Text(), 1, 8),
    "only_cross_attention": PerLevel(Bool()),
    "transformer_layers_per_block": PerLevel(Int(1, MAX_COUNT)),
    "attention_head_dim": PerLevel(Int(1, 1024)),
    "num_attention_heads": Optional(PerLevel(Int(1, 1024))),
    "cross_attention_dim": PerLevel(Int(1, MAX_WIDTH)),
    "use_linear_projection": Bool(),
    "norm_num_groups": Optional(Int(1, 1024)),
    "addition_embed_type": Optional(Text()),
    "addition_time_embed_dim": Optional(Int(2, MAX_WIDTH)),
    "projection_class_embeddings_input_dim": Optional(Int(1, MAX_WIDTH)),
}
# Our UNetConfig field -> the diffusers config field it comes from (for error messages).
_CONFIG_NAMES = {
    "model_channels": "block_out_channels",
    "channel_mult": "block_out_channels",
    "num_res_blocks": "layers_per_block",
    "transformer_depth": "transformer_layers_per_block",
    "transformer_depth_middle": "transformer_layers_per_block",
    "num_heads": "attention_head_dim",
    "num_head_channels": "attention_head_dim",
    "context_dim": "cross_attention_dim",
    "use_linear_in_transformer": "use_linear_projection",
    "adm_in_channels": "projection_class_embeddings_input_dim",
    "size_embed_dim": "addition_time_embed_dim",
    "norm_groups": "norm_num_groups",
}


def unet_config_from_diffusers(d: object, source: str = "unet/config.json") -> UNetConfig:
    """UNetConfig from a diffusers ``UNet2DConditionModel`` config; errors name the file and the field."""
    f = JsonFields(d, source)
    checked = {name: f.get(name, spec) for name, spec in _SPECS.items() if name in f}
    try:
        return f.build(UNetConfig, _CONFIG_NAMES, **_unet_fields({**d, **checked}))
    except ConfigError:
        raise
    except ValueError as e:
        raise f.error("", f": {e}") from None


def _unet_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    known = _FIXED.keys() | _DEFAULTS.keys() | _IGNORED
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unsupported diffusers U-Net config field(s): {', '.join(unknown)}")
    for name, allowed in _FIXED.items():
        if name in d and d[name] not in allowed:
            valid = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"unsupported diffusers U-Net config: {name}={d[name]!r} (supported: {valid})")
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if k in _DEFAULTS}}

    boc = list(d["block_out_channels"])
    levels = len(boc)
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ValueError(f"block_out_channels={boc}: every level must be a multiple of the first")
    if d["norm_num_groups"] is None:
        raise ValueError("norm_num_groups=None (no output GroupNorm) is not supported")
    if any(_per_level(d, "only_cross_attention", levels)):
        raise ValueError(
            f"only_cross_attention={d['only_cross_attention']!r} is not supported (must be False)"
        )

    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    kinds = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    if len(down) != levels or any(t not in kinds for t in down):
        raise ValueError(f"down_block_types={down}: need one per level, each one of {', '.join(kinds)}")
    if up != [kinds[t] for t in reversed(down)]:
        raise ValueError(f"up_block_types={up} must mirror down_block_types={down}")

    layers = _per_level(d, "transformer_layers_per_block", levels)
    if any(not isinstance(n, int) for n in layers):
        raise ValueError(
            f"transformer_layers_per_block={layers}: nested (asymmetric) depths are not supported"
        )
    depth = tuple(n if t == "CrossAttnDownBlock2D" else 0 for n, t in zip(layers, down, strict=True))
    mid = d["mid_block_type"]
    if mid == "UNetMidBlock2DCrossAttn":
        depth_middle = layers[-1]
    elif mid == "UNetMidBlock2D":
        depth_middle = 0
    else:
        raise ValueError(f"mid_block_type={mid!r}; valid: 'UNetMidBlock2DCrossAttn', 'UNetMidBlock2D'")

    # Head counts per level (diffusers' `attention_head_dim` holds counts unless num_attention_heads is set).
    heads = _per_level(d, "num_attention_heads" if d["num_attention_heads"] else "attention_head_dim", levels)
    used = [i for i in range(levels) if depth[i] > 0] + ([levels - 1] if depth_middle > 0 else [])
    for i in used:
        if boc[i] % heads[i]:
            raise ValueError(f"attention_head_dim: {heads[i]} heads do not divide {boc[i]} channels")
    used_heads = {heads[i] for i in used}
    used_widths = {boc[i] // heads[i] for i in used}
    use_linear = bool(d["use_linear_projection"])
    # A common head count is SD1's num_heads; a common width is SD2/SDXL's num_head_channels. When both
    # hold (equal channels at every attention level) the two are the same network; follow the family style.
    if len(used_heads) <= 1 and (len(used_widths) > 1 or not use_linear):
        num_heads, num_head_channels = (used_heads.pop() if used_heads else 8), -1
    elif len(used_widths) == 1:
        num_heads, num_head_channels = 8, used_widths.pop()
    else:
        raise ValueError(
            f"attention_head_dim={d['attention_head_dim']!r}: attention levels have neither a common head "
            "count nor a common head width"
        )

    adm, size_dim = None, 256
    if d["addition_embed_type"] == "text_time":
        adm = d["projection_class_embeddings_input_dim"]
        size_dim = d["addition_time_embed_dim"]
        if adm is None or size_dim is None:
            raise ValueError(
                "addition_embed_type='text_time' needs projection_class_embeddings_input_dim and "
                "addition_time_embed_dim"
            )
    elif d["addition_embed_type"] is not None:
        raise ValueError(
            f"addition_embed_type={d['addition_embed_type']!r} is not supported; valid: None, 'text_time'"
        )

    return dict(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=_uniform(d, "layers_per_block", levels),
        transformer_depth=depth,
        transformer_depth_middle=depth_middle,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=_uniform(d, "cross_attention_dim", levels),
        use_linear_in_transformer=use_linear,
        adm_in_channels=adm,
        size_embed_dim=size_dim,
        norm_groups=d["norm_num_groups"],
    )


# ---------------------------------------------------------------------------------------------
# State dicts


def _stages(cfg: UNetConfig) -> Iterable[tuple[str, str, dict[str, str]]]:
    """(our module path, diffusers module path, renames of submodules inside it) for every stage."""
    yield "time_embed.0", "time_embedding.linear_1", {}
    yield "time_embed.2", "time_embedding.linear_2", {}
    if cfg.adm_in_channels is not None:
        yield "label_emb.0.0", "add_embedding.linear_1", {}
        yield "label_emb.0.2", "add_embedding.linear_2", {}
    yield "input_blocks.0.0", "conv_in", {}
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks

    n = 1
    for level in range(levels):
        for j in range(nrb):
            yield f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _RESNET_NAMES
            if cfg.transformer_depth[level] > 0:
                yield f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", {}
            n += 1
        if level != levels - 1:
            yield f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", {}
            n += 1

    yield "middle_block.0", "mid_block.resnets.0", _RESNET_NAMES
    if cfg.transformer_depth_middle > 0:
        yield "middle_block.1", "mid_block.attentions.0", {}
        yield "middle_block.2", "mid_block.resnets.1", _RESNET_NAMES
    else:
        yield "middle_block.1", "mid_block.resnets.1", _RESNET_NAMES

    n = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = cfg.transformer_depth[level] > 0
        for j in range(nrb + 1):
            yield f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", _RESNET_NAMES
            if attn:
                yield f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", {}
            if level > 0 and j == nrb:
                yield f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", {}
            n += 1

    yield "out.0", "conv_norm_out", {}
    yield "out.2", "conv_out", {}


def _rename(name: str, renames: dict[str, str]) -> str:
    module, _, param = name.rpartition(".")
    return f"{renames.get(module, module)}.{param}" if module else name


@lru_cache(maxsize=16)
def _key_map(cfg: UNetConfig) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """({our key: diffusers key}, {our key: shape}) for every parameter of the U-Net described by `cfg`."""
    model = UNetModel(cfg, device="meta")
    ours = model.state_dict()
    key_map: dict[str, str] = {}
    for path, theirs, renames in _stages(cfg):
        for name in model.get_submodule(path).state_dict():
            key_map[f"{path}.{name}"] = f"{theirs}.{_rename(name, renames)}"
    if set(key_map) != set(ours) or len(set(key_map.values())) != len(key_map):
        raise RuntimeError("internal error: the U-Net key map does not cover the model exactly once")
    return key_map, {k: tuple(v.shape) for k, v in ours.items()}


def _remap(
    sd: Mapping[str, Tensor], key_map: dict[str, str], shapes: dict[str, tuple[int, ...]], source: str
) -> dict[str, Tensor]:
    """Rename `sd` by `key_map` (to our keys, which index `shapes`) after checking the key sets agree."""
    unexpected = sorted(set(sd) - set(key_map))
    missing = sorted(set(key_map) - set(sd))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected {source} key(s): {', '.join(unexpected[:5])}")
        if missing:
            parts.append(f"missing {source} key(s): {', '.join(missing[:5])}")
        more = max(len(unexpected), len(missing)) > 5
        raise ValueError(
            "U-Net state dict does not match the config: " + "; ".join(parts) + (" ..." if more else "")
        )
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        ours = key_map[key]
        if tuple(value.shape) != shapes[ours]:
            raise ValueError(
                f"{source} key {key!r} has shape {tuple(value.shape)}, the config expects {shapes[ours]}"
            )
        out[key_map[key]] = value
    return out


def unet_from_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Diffusers ``UNet2DConditionModel`` keys -> our (LDM ``model.diffusion_model.``-stripped) keys."""
    ours_to_theirs, shapes = _key_map(cfg)
    theirs_to_ours = {v: k for k, v in ours_to_theirs.items()}
    return _remap(sd, theirs_to_ours, shapes, "diffusers")


def unet_to_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our (LDM) U-Net keys -> diffusers ``UNet2DConditionModel`` keys; the inverse of unet_from_diffusers."""
    ours_to_theirs, shapes = _key_map(cfg)
    renamed = _remap(sd, {k: k for k in ours_to_theirs}, shapes, "U-Net")
    return {ours_to_theirs[k]: v for k, v in renamed.items()}
