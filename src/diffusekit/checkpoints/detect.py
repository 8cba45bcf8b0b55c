"""Work out a checkpoint's ModelConfig from its key names and tensor shapes.

A file written by diffusekit carries its exact config in the safetensors metadata
(``diffusekit.config``); anything else is derived from the state dict, like ComfyUI's model
detection but exact: the family must match exactly one rule, or the error names the candidates.
Prediction type (eps/v) is read from metadata or given explicitly, never guessed from outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from ..models.configs import (
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    config_from_dict,
)
from .single_file import CheckpointError

CONFIG_METADATA_KEY = "diffusekit.config"
PREDICTION_METADATA_KEYS = ("diffusekit.prediction", "modelspec.prediction_type", "prediction_type")

Shapes = Mapping[str, torch.Size]


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in sd.items()}


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct integers N for which some key matches `pattern` (with `(\\d+)` for N)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def detect_family(shapes: Shapes, name: str = "checkpoint") -> str:
    """'sd1' | 'sd2' | 'sdxl' from which text encoder layout the file carries; exact or an error."""
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise CheckpointError(
            f"{name}: no U-Net weights (no key starts with {UNET_PREFIX!r}); this is not a Stable Diffusion "
            "checkpoint (a VAE or LoRA file is loaded with its own option)"
        )
    matches = [
        family
        for family, prefixes in TEXT_PREFIXES.items()
        if all(any(k.startswith(p) for k in shapes) for p in prefixes)
    ]
    # SDXL's second-embedder prefix also satisfies nothing else, but SD1/SD2 prefixes could co-occur in a
    # broken merge: that is ambiguous and must be an error, not a guess.
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{f}: {', '.join(p)}" for f, p in TEXT_PREFIXES.items())
    if not matches:
        raise CheckpointError(
            f"{name}: has U-Net weights but no known text encoder; expected key prefixes {expected}"
        )
    raise CheckpointError(f"{name}: matches several families ({', '.join(matches)}): its keys are ambiguous")


def unet_config_from_shapes(shapes: Shapes, family: str, pooled_dim: int | None) -> UNetConfig:
    """Derive the U-Net structure from `model.diffusion_model.*` shapes (heads follow the family rule)."""
    p = UNET_PREFIX
    first = shapes[f"{p}input_blocks.0.0.weight"]  # (C, in, 3, 3)
    model_channels, in_channels = first[0], first[1]
    out_channels = shapes[f"{p}out.2.weight"][0]
    n_input = _count(shapes, rf"{re.escape(p)}input_blocks\.(\d+)\.")
    downsamples = sorted(
        int(m.group(1))
        for k in shapes
        if (m := re.match(rf"{re.escape(p)}input_blocks\.(\d+)\.0\.op\.weight$", k))
    )
    levels = len(downsamples) + 1
    num_res_blocks = (n_input - 1 - len(downsamples)) // levels
    channel_mult, depth = [], []
    for level in range(levels):
        block = 1 + level * (num_res_blocks + 1)
        out_ch = shapes[f"{p}input_blocks.{block}.0.out_layers.3.weight"][0]
        channel_mult.append(out_ch // model_channels)
        depth.append(_count(shapes, rf"{re.escape(p)}input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\."))
    depth_middle = _count(shapes, rf"{re.escape(p)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    attn_k = next((s for k, s in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.startswith(p) and k.endswith("proj_in.weight")), None)
    adm = shapes.get(f"{p}label_emb.0.0.weight")
    adm_in = adm[1] if adm is not None else None
    size_embed_dim = 256
    if adm_in is not None and pooled_dim is not None:
        size_embed_dim = (adm_in - pooled_dim) // 6
    heads = dict(num_heads=8, num_head_channels=-1) if family == "sd1" else dict(num_head_channels=64)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depth),
        transformer_depth_middle=depth_middle,
        context_dim=attn_k[1] if attn_k is not None else 768,
        use_linear_in_transformer=proj_in is not None and len(proj_in) == 2,
        adm_in_channels=adm_in,
        size_embed_dim=size_embed_dim,
        **heads,
    )


def vae_config_from_shapes(shapes: Shapes, family: str, name: str = "checkpoint") -> VAEConfig:
    """Derive the AutoencoderKL structure from `first_stage_model.*` shapes."""
    p = VAE_PREFIX
    if f"{p}encoder.conv_in.weight" not in shapes:
        raise CheckpointError(
            f"{name}: no VAE weights (no {p}encoder.conv_in.weight); pass a separate VAE file with --vae"
        )
    ch = shapes[f"{p}encoder.conv_in.weight"][0]
    levels = _count(shapes, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    ch_mult = tuple(shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels))
    return VAEConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(shapes, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."),
        in_channels=shapes[f"{p}encoder.conv_in.weight"][1],
        out_ch=shapes[f"{p}decoder.conv_out.weight"][0],
        z_channels=shapes[f"{p}decoder.conv_in.weight"][1],
        embed_dim=shapes[f"{p}post_quant_conv.weight"][1],
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def text_config_from_shapes(shapes: Shapes, prefix: str, family: str, index: int) -> TextEncoderConfig:
    """Derive a CLIP text encoder config; heads = width / 64 (true of CLIP-L, ViT-H and bigG)."""
    if f"{prefix}token_embedding.weight" in shapes:  # open_clip layout
        vocab, width = shapes[f"{prefix}token_embedding.weight"]
        layers = _count(shapes, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        mlp = shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = shapes[f"{prefix}positional_embedding"][0]
        proj = shapes.get(f"{prefix}text_projection")
        layout, activation, pad = "openclip", "gelu", 0
        projection = proj[1] if proj is not None else None
    elif f"{prefix}text_model.embeddings.token_embedding.weight" in shapes:  # transformers layout
        tm = f"{prefix}text_model."
        vocab, width = shapes[f"{tm}embeddings.token_embedding.weight"]
        layers = _count(shapes, rf"{re.escape(tm)}encoder\.layers\.(\d+)\.")
        mlp = shapes[f"{tm}encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes[f"{tm}embeddings.position_embedding.weight"][0]
        proj = shapes.get(f"{prefix}text_projection.weight")
        layout, activation, pad = "hf", "quick_gelu", 49407
        projection = proj[0] if proj is not None else None
    else:
        raise CheckpointError(f"text encoder {index} under {prefix!r} has no token embedding")
    if family == "sd1":
        use_layers, final_norm = layers, True
    elif family == "sd2":  # SD2 runs 23 of ViT-H's 24 layers, then ln_final (a 23-layer file uses all)
        use_layers, final_norm = (23 if layers in (23, 24) else layers - 1), True
    else:  # SDXL: penultimate hidden state of both encoders, no final norm
        use_layers, final_norm = layers - 1, False
    return TextEncoderConfig(
        layout=layout,
        width=width,
        layers=layers,
        heads=max(1, width // 64),
        mlp_width=mlp,
        vocab_size=vocab,
        max_positions=positions,
        activation=activation,
        projection_dim=projection,
        pad_token_id=pad,
        use_layers=max(1, use_layers),
        final_norm=final_norm,
    )


def prediction_from_metadata(metadata: Mapping[str, str], shapes: Shapes) -> str | None:
    """'eps' / 'v' if the file says so (metadata or ComfyUI's `v_pred` marker key), else None."""
    for key in PREDICTION_METADATA_KEYS:
        value = str(metadata.get(key, "")).strip().lower()
        if value in ("v", "v_prediction", "v-prediction"):
            return "v"
        if value in ("eps", "epsilon"):
            return "eps"
    if "v_pred" in shapes:
        return "v"
    return None


def zero_terminal_snr_from_file(sd: Mapping[str, torch.Tensor], shapes: Shapes) -> bool:
    """True if the file marks a zero-terminal-SNR model: ComfyUI's `ztsnr` marker key, or an LDM
    training checkpoint whose stored `alphas_cumprod` table ends at (nearly) zero."""
    if "ztsnr" in shapes:
        return True
    table = sd.get("alphas_cumprod")
    return table is not None and table.ndim == 1 and table.numel() > 1 and float(table[-1]) < 1e-6


def detect_config(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    prediction: str | None = None,
    name: str = "checkpoint",
) -> ModelConfig:
    """The ModelConfig of a full single-file state dict (original LDM/SGM keys)."""
    metadata = metadata or {}
    shapes = _shapes(sd)
    if CONFIG_METADATA_KEY in metadata:
        cfg = config_from_metadata(metadata, name)
        try:
            return replace(cfg, prediction=prediction) if prediction else cfg
        except ValueError as e:  # e.g. eps forced on a zero-terminal-SNR model
            raise CheckpointError(f"{name}: {e}") from None
    family = detect_family(shapes, name)
    text = tuple(text_config_from_shapes(shapes, p, family, i) for i, p in enumerate(TEXT_PREFIXES[family]))
    pooled_dim = text[-1].projection_dim or text[-1].width
    pred = prediction or prediction_from_metadata(metadata, shapes) or "eps"
    zero_snr = zero_terminal_snr_from_file(sd, shapes)
    if zero_snr and pred != "v":
        raise CheckpointError(f"{name}: marked zero-terminal-SNR, which needs prediction 'v', not {pred!r}")
    resolution = {"sd1": 512, "sd2": 768 if pred == "v" else 512, "sdxl": 1024}[family]
    try:
        return ModelConfig(
            family=family,
            unet=unet_config_from_shapes(shapes, family, pooled_dim),
            vae=vae_config_from_shapes(shapes, family, name),
            text_encoders=text,
            prediction=pred,
            zero_terminal_snr=zero_snr,
            resolution=resolution,
            name=f"{family}-detected",
        )
    except KeyError as e:
        raise CheckpointError(f"{name}: incomplete {family} checkpoint: missing key {e.args[0]}") from None
    except (ValueError, IndexError, ZeroDivisionError) as e:  # shapes that describe no valid network
        raise CheckpointError(f"{name}: its tensor shapes give no valid {family} model: {e}") from None


def config_from_metadata(metadata: Mapping[str, str], name: str = "checkpoint") -> ModelConfig:
    """The exact config a diffusekit file records, validated field by field; errors name file and field."""
    text = metadata[CONFIG_METADATA_KEY]
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        why = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else "nested too deep"
        raise CheckpointError(f"{name}: {CONFIG_METADATA_KEY} metadata is not valid JSON ({why})") from None
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{name}: {CONFIG_METADATA_KEY} metadata: {e}") from None


def precheck_header(
    shapes: Shapes, metadata: Mapping[str, str], name: str = "checkpoint", *, needs_unet: bool = True
) -> None:
    """What can be refused from a safetensors header alone (before any tensor is opened): a bad
    recorded config, or key names that are no Stable Diffusion model."""
    if CONFIG_METADATA_KEY in metadata:
        config_from_metadata(metadata, name)
    elif needs_unet:
        detect_family(shapes, name)
