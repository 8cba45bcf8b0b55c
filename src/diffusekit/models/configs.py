"""Frozen configs for each network and named presets for the Stable Diffusion families.

Field names follow the original LDM/SGM configs (``model_channels``, ``channel_mult``,
``transformer_depth`` ...) so a reader can hold them next to the upstream YAML files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class UNetConfig:
    """openaimodel.UNetModel with SpatialTransformer blocks (LDM / SGM)."""

    in_channels: int = 4  # 9 for inpainting models: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1  # SD2/SDXL: 64, heads = channels // 64
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2/SDXL: Linear proj_in/proj_out, SD1: 1x1 conv
    adm_in_channels: int | None = None  # SDXL: pooled text (1280) + 6 size ids x 256 -> label_emb
    size_embed_dim: int = 256  # Fourier width of each SDXL size/crop id
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} levels but channel_mult has "
                f"{len(self.channel_mult)}; give one depth per level"
            )

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of the attention at a level with `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (LDM ``Encoder``/``Decoder`` with a diagonal Gaussian posterior)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # len(ch_mult) - 1 downsamplings: 8x for 4 levels
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SDXL: 0.13025, SD3: 1.5305
    shift_factor: float = 0.0  # SD3: 0.0609; latent = (z - shift) * scale
    use_quant_conv: bool = True  # SD3's 16-channel VAE has no quant_conv / post_quant_conv

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer in either checkpoint layout.

    layout "hf": transformers' CLIPTextModel keys (``text_model.encoder.layers.N...``), SD1 and SDXL-L.
    layout "openclip": open_clip keys (``transformer.resblocks.N...``), SD2 (ViT-H) and SDXL (bigG).
    """

    layout: str = "hf"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    projection_dim: int | None = None  # text_projection for the pooled output (SD2, SDXL bigG)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 49407  # 49407 (<|endoftext|>) for OpenAI CLIP, 0 ("!") for OpenCLIP tokenizers
    use_layers: int = 12  # how many transformer layers feed the U-Net context (clip skip 1)
    final_norm: bool = True  # apply the final LayerNorm to that hidden state

    def __post_init__(self) -> None:
        if self.layout not in ("hf", "openclip"):
            raise ValueError(f"unknown text encoder layout {self.layout!r}; valid: 'hf', 'openclip'")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {self.activation!r}; valid: 'quick_gelu', 'gelu'")
        if not 1 <= self.use_layers <= self.layers:
            raise ValueError(f"use_layers={self.use_layers} must be within 1..{self.layers}")


# Where each component lives inside an original single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: U-Net, VAE and its text encoder(s)."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction: str = "eps"  # "eps" or "v" (v-prediction, SD2 768-v)
    # trained on the zero-terminal-SNR rescale of the noise schedule (Lin et al. 2023; needs "v")
    zero_terminal_snr: bool = False
    resolution: int = 512  # the native image size
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if self.zero_terminal_snr and self.prediction != "v":
            raise ValueError("zero_terminal_snr needs prediction='v' (eps is undefined at zero SNR)")
        if len(self.text_encoders) != len(TEXT_PREFIXES[self.family]):
            raise ValueError(
                f"family {self.family} has {len(TEXT_PREFIXES[self.family])} text encoder(s), "
                f"config gives {len(self.text_encoders)}"
            )

    @property
    def text_prefixes(self) -> tuple[str, ...]:
        return TEXT_PREFIXES[self.family]

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == 9

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return config_from_dict(json.loads(text))


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of ``dataclasses.asdict`` for ModelConfig (lists become tuples again)."""

    def build(kind: type, values: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown {kind.__name__} field(s): {', '.join(sorted(unknown))}")
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    d = dict(d)
    return build(
        ModelConfig,
        {
            **d,
            "unet": build(UNetConfig, d["unet"]),
            "vae": build(VAEConfig, d["vae"]),
            "text_encoders": tuple(build(TextEncoderConfig, t) for t in d["text_encoders"]),
        },
    )


# ---------------------------------------------------------------------------------------------
# Real-size presets (parameter counts are checked in tests against the published models).

CLIP_L = TextEncoderConfig()  # OpenAI CLIP ViT-L/14 text tower, HF layout
OPENCLIP_H = TextEncoderConfig(
    layout="openclip",
    width=1024,
    layers=24,
    heads=16,
    mlp_width=4096,
    activation="gelu",
    projection_dim=1024,
    pad_token_id=0,
    use_layers=23,
    final_norm=True,
)  # SD2 uses the penultimate layer, then ln_final
OPENCLIP_BIGG = TextEncoderConfig(
    layout="openclip",
    width=1280,
    layers=32,
    heads=20,
    mlp_width=5120,
    activation="gelu",
    projection_dim=1280,
    pad_token_id=0,
    use_layers=31,
    final_norm=False,
)

SD1 = ModelConfig(family="sd1", unet=UNetConfig(), vae=VAEConfig(), text_encoders=(CLIP_L,), name="sd1")
SD1_INPAINT = replace(SD1, unet=replace(SD1.unet, in_channels=9), name="sd1_inpaint")
SD2 = ModelConfig(
    family="sd2",
    unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(),
    text_encoders=(OPENCLIP_H,),
    name="sd2",
)
SD2_V = replace(SD2, prediction="v", resolution=768, name="sd2_v")
SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        num_head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    text_encoders=(replace(CLIP_L, use_layers=11, final_norm=False), OPENCLIP_BIGG),
    resolution=1024,
    name="sdxl",
)

# ---------------------------------------------------------------------------------------------
# Tiny presets: the same structure (levels with and without attention, linear vs conv projections,
# label_emb, penultimate text layers) at a size that runs in milliseconds. Used by the tests.

_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
_TINY_CLIP = TextEncoderConfig(width=32, layers=3, heads=4, mlp_width=64, use_layers=3)
_TINY_OPENCLIP = TextEncoderConfig(
    layout="openclip",
    width=32,
    layers=3,
    heads=4,
    mlp_width=64,
    activation="gelu",
    projection_dim=32,
    pad_token_id=0,
    use_layers=2,
    final_norm=True,
)
TINY_SD1 = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        transformer_depth=(1, 1, 0),
        num_heads=2,
        context_dim=32,
    ),
    vae=_TINY_VAE,
    text_encoders=(_TINY_CLIP,),
    resolution=64,
    name="tiny_sd1",
)
TINY_SD1_INPAINT = replace(TINY_SD1, unet=replace(TINY_SD1.unet, in_channels=9), name="tiny_sd1_inpaint")
TINY_SD2 = ModelConfig(
    family="sd2",
    unet=replace(TINY_SD1.unet, num_head_channels=16, use_linear_in_transformer=True),
    vae=_TINY_VAE,
    text_encoders=(_TINY_OPENCLIP,),
    resolution=64,
    name="tiny_sd2",
)
TINY_SD2_V = replace(TINY_SD2, prediction="v", name="tiny_sd2_v")
TINY_SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        transformer_depth=(0, 1, 2),
        transformer_depth_middle=2,
        num_head_channels=16,
        context_dim=64,
        use_linear_in_transformer=True,
        adm_in_channels=32 + 6 * 8,
        size_embed_dim=8,
    ),
    vae=replace(_TINY_VAE, scaling_factor=0.13025),
    text_encoders=(
        replace(_TINY_CLIP, use_layers=2, final_norm=False),
        replace(_TINY_OPENCLIP, use_layers=2, final_norm=False),
    ),
    resolution=64,
    name="tiny_sdxl",
)

# ---------------------------------------------------------------------------------------------
# The model diffusekit trains itself (64x64 shapes): SD1 layout and key names, small widths, a 4x VAE
# (16x16 latents; README "The default model" has the trade-off against 8x). The VAE's scaling factor
# here is a placeholder; training measures it and the shipped file records it.

DEFAULT = ModelConfig(
    family="sd1",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        transformer_depth=(0, 1, 1),
        num_head_channels=32,
        context_dim=128,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, scaling_factor=1.0),
    text_encoders=(TextEncoderConfig(width=128, layers=4, heads=2, mlp_width=512, use_layers=4),),
    resolution=64,
    prediction="v",  # the recipe's last stage (train/recipe.py)
    zero_terminal_snr=True,
    name="default",
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (SD1, SD1_INPAINT, SD2, SD2_V, SDXL, DEFAULT)
    + (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SD2_V, TINY_SDXL)
}
PRESETS["tiny"] = TINY_SD1


def preset(name: str) -> ModelConfig:
    """A named preset; raises ValueError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
