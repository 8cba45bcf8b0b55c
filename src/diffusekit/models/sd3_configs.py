"""Frozen configs and named presets for Stable Diffusion 3 / 3.5: the MMDiT, T5-XXL and the whole model.

Sizes are those of the shipped checkpoints (diffusers ``transformer/config.json``; Stability's sd3.5 code):
hidden = 64 x depth and heads = depth for every released MMDiT.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any

from .configs import CLIP_L, OPENCLIP_BIGG, TextEncoderConfig, VAEConfig

MMDIT_PREFIX = "model.diffusion_model."
SD3_VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."


@dataclass(frozen=True)
class MMDiTConfig:
    """The SD3 MMDiT (``mmditx.MMDiTX``): joint blocks over image patches and text tokens."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    depth: int = 24  # number of joint blocks
    hidden_size: int = 1536
    num_heads: int = 24
    context_dim: int = 4096  # width of the text tokens fed to context_embedder (T5-XXL d_model)
    adm_in_channels: int = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
    pos_embed_max_size: int = 192  # the position table covers max x max patches
    pos_embed_base: int = 64  # sample_size // patch_size: the grid the sin-cos init is scaled to
    qk_norm: bool = False  # RMS-norm of q and k per head (SD3.5)
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X: blocks with a second image-only attention
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} outside 0..{self.depth - 1}")


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (transformers ``T5EncoderModel``): RMS norm, gated-GELU FFN, relative position bias."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


@dataclass(frozen=True)
class SD3Config:
    """A whole SD3/SD3.5 model: MMDiT, 16-channel VAE, CLIP-L, OpenCLIP bigG (HF layout) and T5-XXL."""

    mmdit: MMDiTConfig
    vae: VAEConfig
    clip_l: TextEncoderConfig
    clip_g: TextEncoderConfig
    t5: T5Config
    shift: float = 3.0  # flow-matching time shift (sd3.5 ships 3.0; SD3 Medium 1.0 in Stability's code)
    resolution: int = 1024
    t5_max_length: int = 256
    family: str = "sd3"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        need = self.clip_l.width + self.clip_g.width
        # pooled widths: projected, or the width itself (Stability uses CLIP-L's pooled output unprojected;
        # its clip_l files may carry no text_projection, for which diffusers uses an identity)
        pooled = sum(c.projection_dim or c.width for c in (self.clip_l, self.clip_g))
        if self.mmdit.adm_in_channels != pooled:
            raise ValueError(
                f"MMDiT adm_in_channels {self.mmdit.adm_in_channels} must equal the pooled CLIP widths"
            )
        if need > self.mmdit.context_dim or self.t5.d_model != self.mmdit.context_dim:
            raise ValueError(
                f"MMDiT context_dim {self.mmdit.context_dim} must equal T5 d_model {self.t5.d_model} "
                f"and hold the CLIP states ({need})"
            )
        if self.vae.z_channels != self.mmdit.in_channels:
            raise ValueError(
                f"VAE z_channels {self.vae.z_channels} != MMDiT in_channels {self.mmdit.in_channels}"
            )

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downscale x patch size (16 for the real models)."""
        return self.vae.downscale * self.mmdit.patch_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SD3Config:
        return sd3_config_from_dict(json.loads(text))


def sd3_config_from_dict(d: dict[str, Any]) -> SD3Config:
    """Inverse of ``dataclasses.asdict`` for SD3Config."""

    def build(kind: type, values: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown {kind.__name__} field(s): {', '.join(sorted(unknown))}")
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    kinds = {
        "mmdit": MMDiTConfig,
        "vae": VAEConfig,
        "clip_l": TextEncoderConfig,
        "clip_g": TextEncoderConfig,
        "t5": T5Config,
    }
    return build(SD3Config, {**d, **{k: build(kind, d[k]) for k, kind in kinds.items()}})


# ---------------------------------------------------------------------------------------------
# Real-size presets.

SD3_VAE = VAEConfig(
    z_channels=16, embed_dim=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False
)
SD3_CLIP_L = replace(CLIP_L, projection_dim=768, use_layers=11, final_norm=False)  # penultimate state
SD3_CLIP_G = replace(OPENCLIP_BIGG, layout="hf")  # HF CLIPTextModelWithProjection keys
T5_XXL = T5Config()

_MEDIUM = MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192)
SD3_MEDIUM = SD3Config(_MEDIUM, SD3_VAE, SD3_CLIP_L, SD3_CLIP_G, T5_XXL, shift=1.0, name="sd3_medium")
SD35_MEDIUM = replace(
    SD3_MEDIUM,
    mmdit=replace(_MEDIUM, pos_embed_max_size=384, qk_norm=True, x_block_self_attn_layers=tuple(range(13))),
    shift=3.0,
    name="sd35_medium",
)
SD35_LARGE = replace(
    SD3_MEDIUM,
    mmdit=MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True),
    shift=3.0,
    name="sd35_large",
)
SD35_LARGE_TURBO = replace(SD35_LARGE, name="sd35_large_turbo")

# ---------------------------------------------------------------------------------------------
# Tiny presets (tests): the same structure at a size that runs in milliseconds.

_TINY_MMDIT = MMDiTConfig(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    depth=3,
    hidden_size=32,
    num_heads=4,
    context_dim=64,
    adm_in_channels=64,
    pos_embed_max_size=16,
    pos_embed_base=8,
)
_TINY_CLIP_L = TextEncoderConfig(
    width=32, layers=3, heads=4, mlp_width=64, projection_dim=32, use_layers=2, final_norm=False
)
_TINY_CLIP_G = replace(_TINY_CLIP_L, activation="gelu", mlp_width=80, pad_token_id=0)  # pads with "!"
TINY_T5 = T5Config(
    vocab_size=1000,
    d_model=64,
    d_kv=8,
    num_heads=4,
    d_ff=96,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
_TINY_SD3_VAE = replace(SD3_VAE, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_SD3 = SD3Config(
    _TINY_MMDIT,
    _TINY_SD3_VAE,
    _TINY_CLIP_L,
    _TINY_CLIP_G,
    TINY_T5,
    shift=1.0,
    resolution=64,
    t5_max_length=16,
    name="tiny_sd3",
)
TINY_SD35 = replace(
    TINY_SD3,
    mmdit=replace(_TINY_MMDIT, qk_norm=True, x_block_self_attn_layers=(0, 1)),
    shift=3.0,
    name="tiny_sd35",
)

SD3_PRESETS: dict[str, SD3Config] = {
    c.name: c for c in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO, TINY_SD3, TINY_SD35)
}


def sd3_preset(name: str) -> SD3Config:
    """A named SD3 preset; raises ValueError listing the valid names."""
    try:
        return SD3_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown SD3 preset {name!r}; valid: {', '.join(SD3_PRESETS)}") from None
