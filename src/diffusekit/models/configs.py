"""Frozen configs for each network and named presets for the Stable Diffusion families.

Field names follow the original LDM/SGM configs (``model_channels``, ``channel_mult``,
``transformer_depth`` ...) so a reader can hold them next to the upstream YAML files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any

from .validate import (
    MAX_COUNT,
    MAX_WIDTH,
    Bool,
    Choice,
    ConfigError,
    Float,
    Int,
    Ints,
    Optional,
    Text,
    check_fields,
    invalid,
)

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("eps", "v")
MAX_RESOLUTION = 16384

_UNET_SPECS = {
    "in_channels": Int(1, 64),
    "out_channels": Int(1, 64),
    "model_channels": Int(1, MAX_WIDTH),
    "channel_mult": Ints(Int(1, 64), 1, 8),
    "num_res_blocks": Int(1, MAX_COUNT),
    "transformer_depth": Ints(Int(0, MAX_COUNT), 1, 8),
    "transformer_depth_middle": Int(0, MAX_COUNT),
    "num_heads": Int(1, 1024),
    "num_head_channels": Int(1, MAX_WIDTH, also=(-1,)),
    "context_dim": Int(1, MAX_WIDTH),
    "use_linear_in_transformer": Bool(),
    "adm_in_channels": Optional(Int(1, MAX_WIDTH)),
    "size_embed_dim": Int(2, MAX_WIDTH),
    "norm_groups": Int(1, 1024),
}
_VAE_SPECS = {
    "ch": Int(1, MAX_WIDTH),
    "ch_mult": Ints(Int(1, 64), 1, 8),
    "num_res_blocks": Int(1, MAX_COUNT),
    "in_channels": Int(1, 64),
    "out_ch": Int(1, 64),
    "z_channels": Int(1, 1024),
    "embed_dim": Int(1, 1024),
    "norm_groups": Int(1, 1024),
    "scaling_factor": Float(0.0, 100.0),
}
_TEXT_SPECS = {
    "layout": Choice(("hf", "openclip")),
    "width": Int(1, MAX_WIDTH),
    "layers": Int(1, MAX_COUNT),
    "heads": Int(1, 1024),
    "mlp_width": Int(1, MAX_WIDTH),
    "vocab_size": Int(1, MAX_WIDTH),
    "max_positions": Int(77, 65536),
    "activation": Choice(("quick_gelu", "gelu")),
    "projection_dim": Optional(Int(1, MAX_WIDTH)),
    "layer_norm_eps": Float(0.0, 1.0),
    "pad_token_id": Int(0, MAX_WIDTH),
    "use_layers": Int(1, MAX_COUNT),
    "final_norm": Bool(),
}
_MODEL_SPECS = {
    "family": Choice(FAMILIES),
    "prediction": Choice(PREDICTIONS),
    "zero_terminal_snr": Bool(),
    "resolution": Int(8, MAX_RESOLUTION),
    "name": Text(),
}


def _divides(field: str, value: int, channels: list[int], what: str) -> None:
    bad = [c for c in channels if c % value]
    if bad:
        listed = ", ".join(str(c) for c in sorted(set(channels)))
        raise invalid(
            field, value, f"a number every {what} channel count ({listed}) is divisible by; {bad[0]} is not"
        )


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
        check_fields(self, _UNET_SPECS)
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ConfigError(
                "transformer_depth",
                f" has {len(self.transformer_depth)} levels but channel_mult has {len(self.channel_mult)}; "
                "valid: one depth per level",
            )
        widths = [self.model_channels * m for m in self.channel_mult]
        _divides("norm_groups", self.norm_groups, [self.model_channels, *widths], "U-Net level's")
        attention = [w for w, d in zip(widths, self.transformer_depth, strict=True) if d > 0]
        attention += [widths[-1]] if self.transformer_depth_middle > 0 else []
        if self.num_head_channels == -1:
            _divides("num_heads", self.num_heads, attention, "attention level's")
        else:
            _divides("num_head_channels", self.num_head_channels, attention, "attention level's")
        if self.adm_in_channels is not None and self.size_embed_dim % 2:
            raise invalid("size_embed_dim", self.size_embed_dim, "an even integer (sin and cos halves)")

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

    def __post_init__(self) -> None:
        check_fields(self, _VAE_SPECS)
        _divides("norm_groups", self.norm_groups, [self.ch * m for m in (1, *self.ch_mult)], "VAE level's")

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
        check_fields(self, _TEXT_SPECS)
        if not 1 <= self.use_layers <= self.layers:
            raise invalid("use_layers", self.use_layers, f"an integer in 1..{self.layers} (layers)")
        _divides("heads", self.heads, [self.width], "text encoder")
        if self.pad_token_id >= self.vocab_size:
            raise invalid("pad_token_id", self.pad_token_id, f"a token id below vocab_size {self.vocab_size}")


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
        check_fields(self, _MODEL_SPECS)
        for name, kind in (("unet", UNetConfig), ("vae", VAEConfig)):
            if not isinstance(getattr(self, name), kind):
                raise invalid(name, getattr(self, name), f"a {kind.__name__}")
        if not isinstance(self.text_encoders, tuple) or not all(
            isinstance(t, TextEncoderConfig) for t in self.text_encoders
        ):
            raise invalid("text_encoders", self.text_encoders, "a tuple of TextEncoderConfig")
        if self.zero_terminal_snr and self.prediction != "v":
            raise invalid("zero_terminal_snr", True, "false unless prediction is 'v'")
        wanted = len(TEXT_PREFIXES[self.family])
        if len(self.text_encoders) != wanted:
            raise ConfigError(
                "text_encoders",
                f" has {len(self.text_encoders)} entries; valid: {wanted} for family {self.family}",
            )
        self._check_compatible()

    def _check_compatible(self) -> None:
        """The components must fit together: latent channels, text context width, SDXL's pooled input."""
        unet, z = self.unet, self.vae.z_channels
        if unet.in_channels not in (z, 2 * z + 1):
            raise invalid("unet.in_channels", unet.in_channels, f"{z} or {2 * z + 1} (VAE z_channels {z})")
        if unet.out_channels != z:
            raise invalid("unet.out_channels", unet.out_channels, f"{z} (the VAE's z_channels)")
        context = sum(t.width for t in self.text_encoders)
        if unet.context_dim != context:
            raise invalid("unet.context_dim", unet.context_dim, f"{context} (the text encoders' width)")
        if unet.adm_in_channels is not None:
            last = self.text_encoders[-1]
            adm = (last.projection_dim or last.width) + 6 * unet.size_embed_dim
            if unet.adm_in_channels != adm:
                raise invalid("unet.adm_in_channels", unet.adm_in_channels, f"{adm} (pooled + 6 size ids)")
        step = self.vae.downscale
        if self.resolution % step:
            valid = f"a multiple of {step} (the VAE's downscale) in 8..{MAX_RESOLUTION}"
            raise invalid("resolution", self.resolution, valid)

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


def config_from_dict(d: Any) -> ModelConfig:
    """Inverse of ``dataclasses.asdict`` for ModelConfig, typed and range-checked field by field.

    Raises ConfigError naming the dotted field (``unet.num_heads``) and what is valid; lists become tuples.
    """

    def build(kind: type, values: Any, where: str) -> Any:
        if not isinstance(values, dict):
            raise invalid(where or kind.__name__, values, f"a JSON object of {kind.__name__} fields")
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(where, f"{'.' if where else ''}{unknown[0]} is not a {kind.__name__} field; "
                              f"valid: {', '.join(sorted(names))}")  # fmt: skip
        return kind(**values)

    if not isinstance(d, dict):
        raise invalid("config", d, "a JSON object with family, unet, vae, text_encoders ...")
    missing = [k for k in ("family", "unet", "vae", "text_encoders") if k not in d]
    if missing:
        raise ConfigError(missing[0], " is missing; valid: an object with family, unet, vae, text_encoders")
    parts: dict[str, Any] = {}
    for name, kind in (("unet", UNetConfig), ("vae", VAEConfig)):
        try:
            parts[name] = build(kind, d[name], name)
        except ConfigError as e:
            raise (e if e.field.startswith(name) else e.within(name)) from None
    texts = d["text_encoders"]
    if not isinstance(texts, list) or not 1 <= len(texts) <= 2:
        raise invalid("text_encoders", texts, "a list of 1 or 2 text encoder objects")
    encoders = []
    for i, t in enumerate(texts):
        try:
            encoders.append(build(TextEncoderConfig, t, f"text_encoders[{i}]"))
        except ConfigError as e:
            raise (e if e.field.startswith("text_encoders") else e.within(f"text_encoders[{i}]")) from None
    return build(ModelConfig, {**d, **parts, "text_encoders": tuple(encoders)}, "")


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
