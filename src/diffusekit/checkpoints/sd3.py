"""SD3/SD3.5 single files: detection, config from key names and shapes, loading, creation.

A file is SD3 when it has ``model.diffusion_model.joint_blocks.*``. Its MMDiT config comes from the
diffusekit metadata when present, else from the shapes (heads = hidden / 64, true of every released
MMDiT). Text encoders may be in the file, in separate files (``text_encoders.*`` keys or a bare encoder
state dict), or missing: CLIP-L and CLIP-G are required to generate, T5-XXL is optional.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..models.configs import TextEncoderConfig, VAEConfig
from ..models.sd3 import PREFIXES, StableDiffusion3
from ..models.sd3_configs import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    MMDIT_PREFIX,
    SD3_CLIP_G,
    SD3_CLIP_L,
    SD3_VAE,
    SD3_VAE_PREFIX,
    T5_PREFIX,
    T5_XXL,
    MMDiTConfig,
    SD3Config,
    T5Config,
    sd3_config_from_dict,
)
from ..models.t5 import TIED_EMBED_KEY
from .detect import text_config_from_shapes
from .scaled_fp8 import dequantize_scaled_fp8, without_quant_keys
from .single_file import CheckpointError, cast_floats, load_state_dict

SD3_CONFIG_METADATA_KEY = "diffusekit.sd3_config"
_UNUSED = ("text_model.embeddings.position_ids", "logit_scale")

Shapes = Mapping[str, torch.Size]


def is_sd3(keys) -> bool:
    """Whether a single file's keys are an SD3/SD3.5 MMDiT checkpoint."""
    return any(k.startswith(MMDIT_PREFIX + "joint_blocks.") for k in keys)


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def mmdit_config_from_shapes(shapes: Shapes, name: str = "checkpoint") -> MMDiTConfig:
    """The MMDiT structure from ``model.diffusion_model.*`` shapes."""
    p = MMDIT_PREFIX
    try:
        hidden, in_ch, patch, _ = shapes[f"{p}x_embedder.proj.weight"]
        depth = _count(shapes, rf"{re.escape(p)}joint_blocks\.(\d+)\.")
        positions = shapes[f"{p}pos_embed"][1]
        side = math.isqrt(positions)
        if side * side != positions:
            raise CheckpointError(f"{name}: pos_embed holds {positions} positions, not a square grid")
        return MMDiTConfig(
            in_channels=in_ch,
            out_channels=shapes[f"{p}final_layer.linear.weight"][0] // (patch * patch),
            patch_size=patch,
            depth=depth,
            hidden_size=hidden,
            num_heads=max(1, hidden // 64),
            context_dim=shapes[f"{p}context_embedder.weight"][1],
            adm_in_channels=shapes[f"{p}y_embedder.mlp.0.weight"][1],
            pos_embed_max_size=side,
            qk_norm=f"{p}joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
            x_block_self_attn_layers=tuple(
                i for i in range(depth) if f"{p}joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes
            ),
            mlp_ratio=shapes[f"{p}joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
            frequency_embedding_size=shapes[f"{p}t_embedder.mlp.0.weight"][1],
        )
    except KeyError as e:
        raise CheckpointError(f"{name}: incomplete SD3 MMDiT: missing key {e.args[0]}") from None


def sd3_vae_config_from_shapes(shapes: Shapes, name: str = "checkpoint") -> VAEConfig:
    """The VAE structure from ``first_stage_model.*`` shapes (with or without quant convs)."""
    p = SD3_VAE_PREFIX
    if f"{p}encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"{name}: no VAE weights (no {p}encoder.conv_in.weight)")
    ch = shapes[f"{p}encoder.conv_in.weight"][0]
    levels = _count(shapes, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    z = shapes[f"{p}decoder.conv_in.weight"][1]
    return replace(
        SD3_VAE,
        ch=ch,
        ch_mult=tuple(shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(shapes, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."),
        z_channels=z,
        embed_dim=z,
        use_quant_conv=f"{p}quant_conv.weight" in shapes,
    )


def t5_config_from_shapes(shapes: Shapes, name: str = "checkpoint") -> T5Config:
    """The T5 encoder structure from ``text_encoders.t5xxl.transformer.*`` shapes."""
    p = T5_PREFIX
    emb = shapes.get(f"{p}shared.weight") or shapes.get(f"{p}{TIED_EMBED_KEY}")
    if emb is None:
        raise CheckpointError(f"{name}: T5 weights without a token embedding ({p}shared.weight)")
    att = f"{p}encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[f"{att}relative_attention_bias.weight"]
    return replace(
        T5_XXL,
        vocab_size=emb[0],
        d_model=emb[1],
        num_heads=heads,
        d_kv=shapes[f"{att}q.weight"][0] // heads,
        d_ff=shapes[f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=_count(shapes, rf"{re.escape(p)}encoder\.block\.(\d+)\."),
        relative_attention_num_buckets=buckets,
    )


def _clip_config(shapes: Shapes, prefix: str, base: TextEncoderConfig, index: int) -> TextEncoderConfig:
    """A CLIP encoder config from shapes, with SD3's use of it (penultimate layer, no final norm)."""
    derived = text_config_from_shapes(shapes, prefix, "sdxl", index)
    return replace(derived, activation=base.activation, pad_token_id=base.pad_token_id)


def has_component(keys, name: str) -> bool:
    return any(k.startswith(PREFIXES[name]) for k in keys)


def detect_sd3_config(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, name: str = "checkpoint"
) -> SD3Config:
    """The SD3Config of a single-file state dict; absent text encoders get the real SD3 sizes."""
    metadata = metadata or {}
    if SD3_CONFIG_METADATA_KEY in metadata:
        try:
            return sd3_config_from_dict(json.loads(metadata[SD3_CONFIG_METADATA_KEY]))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{name}: unreadable {SD3_CONFIG_METADATA_KEY} metadata: {e}") from None
    shapes = {k: v.shape for k, v in sd.items()}
    if not is_sd3(shapes):
        raise CheckpointError(f"{name}: not an SD3 checkpoint (no {MMDIT_PREFIX}joint_blocks.* keys)")
    mmdit = mmdit_config_from_shapes(shapes, name)
    try:
        clip_l = (
            _clip_config(shapes, CLIP_L_PREFIX, SD3_CLIP_L, 0)
            if has_component(shapes, "clip_l")
            else SD3_CLIP_L
        )
        clip_g = (
            _clip_config(shapes, CLIP_G_PREFIX, SD3_CLIP_G, 1)
            if has_component(shapes, "clip_g")
            else SD3_CLIP_G
        )
        t5 = t5_config_from_shapes(shapes, name) if has_component(shapes, "t5") else T5_XXL
    except KeyError as e:
        raise CheckpointError(f"{name}: incomplete SD3 text encoder: missing key {e.args[0]}") from None
    resolution = 1024
    shift = 1.0 if (not mmdit.qk_norm and mmdit.depth == 24) else 3.0  # SD3 Medium vs SD3.5 (Stability)
    try:
        return SD3Config(
            mmdit=mmdit,
            vae=sd3_vae_config_from_shapes(shapes, name),
            clip_l=clip_l,
            clip_g=clip_g,
            t5=t5,
            shift=shift,
            resolution=resolution,
            name="sd3-detected",
        )
    except ValueError as e:
        raise CheckpointError(f"{name}: inconsistent SD3 components: {e}") from None


def _as_text_encoder_keys(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A separate text-encoder file -> single-file keys: already-prefixed keys stay, a bare transformers
    CLIPTextModelWithProjection or T5EncoderModel state dict is placed by its kind and width."""
    if any(k.startswith("text_encoders.") for k in sd):
        return {k: v for k, v in sd.items() if k.startswith("text_encoders.")}
    if "shared.weight" in sd or TIED_EMBED_KEY in sd:
        return {T5_PREFIX + k: v for k, v in sd.items()}
    emb = sd.get("text_model.embeddings.token_embedding.weight")
    if emb is not None:
        prefix = CLIP_G_PREFIX if emb.shape[1] == SD3_CLIP_G.width else CLIP_L_PREFIX
        return {prefix + k: v for k, v in sd.items()}
    raise CheckpointError(f"{name}: not a CLIP or T5 text encoder file (no token embedding found)")


@dataclass
class LoadedSD3:
    """A ready SD3 model plus where it came from."""

    model: StableDiffusion3
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> SD3Config:
        return self.model.cfg

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def build_sd3(
    sd: Mapping[str, torch.Tensor],
    cfg: SD3Config,
    *,
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[StableDiffusion3, list[str]]:
    """Validate `sd` key by key against a meta-device model and assign it (no copy unless cast)."""
    keys = set(sd)
    with_clip = has_component(keys, "clip_l") or has_component(keys, "clip_g")
    model = StableDiffusion3(cfg, device="meta", with_clip=with_clip, with_t5=has_component(keys, "t5"))
    expected = model.state_dict()
    keep, ignored = {}, []
    for key, value in sd.items():
        if key == T5_PREFIX + TIED_EMBED_KEY:
            if T5_PREFIX + "shared.weight" not in sd:
                keep[T5_PREFIX + "shared.weight"] = value
            continue
        if key not in expected:
            if key.endswith(_UNUSED) or not key.startswith(tuple(PREFIXES.values())):
                ignored.append(key)
                continue
            raise CheckpointError(f"{name}: unexpected key {key} (not part of this SD3 model)")
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{name}: shape mismatch at {key}: expected {tuple(expected[key].shape)}, found "
                f"{tuple(value.shape)}"
            )
        keep[key] = value
    missing = [k for k in expected if k not in keep]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{name}: missing key {missing[0]}{more}; the file is incomplete")
    if dtype is not None:
        keep = cast_floats(keep, dtype, release_mapped=True)
    model.load_state_dict({k: v.to(device) for k, v in keep.items()}, strict=True, assign=True)
    notes = [f"ignored {len(ignored)} unused key(s), e.g. {ignored[0]}"] if ignored else []
    for comp in ("clip_l", "clip_g", "t5"):
        if model.component(comp) is None:
            notes.append(f"no {comp} weights")
    return model.eval().requires_grad_(False), notes


def read_sd3(
    path: str | Path,
    *,
    text_encoders: list[str | Path] | tuple = (),
    dequantize: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], SD3Config, dict[str, str]]:
    """(single-file state dict, config, metadata) of an SD3 file or diffusers folder, with text encoders
    from separate files added. Scaled-fp8 weights are dequantized to `dtype` (default: the file's own
    float dtype), or kept with their scale entries when `dequantize` is False."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        from .sd3_diffusers import read_sd3_diffusers_folder

        sd, folder_cfg = read_sd3_diffusers_folder(path)
        metadata = {SD3_CONFIG_METADATA_KEY: folder_cfg.to_json(), "diffusekit.source": "diffusers"}
    else:
        sd, metadata = load_state_dict(path)
        sd = dict(sd)
    for extra in text_encoders:
        extra_sd, _ = load_state_dict(extra)
        sd.update(_as_text_encoder_keys(extra_sd, Path(extra).name))
    cfg = detect_sd3_config(without_quant_keys(sd), metadata, path.name)
    if dequantize:
        sd = dequantize_scaled_fp8(sd, dtype, name=path.name)
    return sd, cfg, dict(metadata)


def load_sd3(
    path: str | Path,
    *,
    text_encoders: list[str | Path] | tuple = (),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedSD3:
    """Load an SD3/SD3.5 single file or diffusers folder, adding text encoders from separate files."""
    path = Path(path)
    sd, cfg, metadata = read_sd3(path, text_encoders=text_encoders, dequantize=False)
    return assemble_sd3(path, sd, cfg, metadata, device=device, dtype=dtype)


def assemble_sd3(
    path: Path,
    sd: Mapping[str, torch.Tensor],
    cfg: SD3Config,
    metadata: dict[str, str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedSD3:
    """Build the model of `read_sd3(..., dequantize=False)`'s result: scaled-fp8 weights dequantized
    straight to `dtype` (the compute dtype, so no wider copy is made), then validated and cast."""
    sd = dequantize_scaled_fp8(sd, dtype, name=path.name)
    model, notes = build_sd3(sd, cfg, name=path.name, device=device, dtype=dtype)
    return LoadedSD3(model=model, path=path, metadata=metadata, notes=notes)


def sd3_metadata(cfg: SD3Config, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Safetensors metadata diffusekit writes for an SD3 file: the exact config."""
    return {SD3_CONFIG_METADATA_KEY: cfg.to_json(), "modelspec.architecture": "stable-diffusion-v3"} | dict(
        extra or {}
    )


def is_sd3_file(path: str | Path) -> bool:
    """Whether `path` is an SD3/SD3.5 model: a .safetensors file with an MMDiT (from its header alone) or
    a diffusers StableDiffusion3Pipeline folder."""
    from .single_file import detect_format, read_safetensors_header

    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            return (
                index.is_file()
                and json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"
            )
        except (json.JSONDecodeError, AttributeError):
            return False
    if not path.is_file() or detect_format(path) != "safetensors":
        return False
    entries, _ = read_safetensors_header(path)
    return is_sd3(entries)


# A few sentences for the placeholder tokenizer of randomly initialised models (no real vocabulary).
_PLACEHOLDER_CORPUS = (
    "a photo of a cat sitting on a red mat",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of a lighthouse by the sea at sunset",
    "portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, still life",
)


def write_placeholder_spiece(path: Path, vocab_size: int) -> None:
    """Train a tiny SentencePiece unigram model (T5 ids: pad 0, </s> 1, unk 2) for random-weight models."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(_PLACEHOLDER_CORPUS * 20),
        model_prefix=str(path.with_suffix("")),
        vocab_size=min(vocab_size, 48),
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path.with_suffix(".vocab").unlink(missing_ok=True)


def create_sd3(
    cfg: SD3Config, out: str | Path, *, seed: int = 0, dtype: torch.dtype | None = None
) -> list[Path]:
    """Write a random-weight SD3 single file at `cfg` plus a placeholder T5 tokenizer beside it."""
    from ..models.init import randomize_
    from ..pipeline_sd3 import SD3_DEFAULTS
    from .single_file import save_state_dict

    out = Path(out)
    model = randomize_(StableDiffusion3(cfg, dtype=dtype), seed=seed)  # built in `dtype`: half the peak
    sd = model.state_dict()
    defaults = SD3_DEFAULTS.get(cfg.name)
    extra = {"diffusekit.init": f"random seed {seed}"} | (defaults.to_metadata() if defaults else {})
    save_state_dict(sd, out, metadata=sd3_metadata(cfg, extra))
    spiece = out.with_suffix(".spiece.model")
    write_placeholder_spiece(spiece, cfg.t5.vocab_size)
    return [out, spiece]
