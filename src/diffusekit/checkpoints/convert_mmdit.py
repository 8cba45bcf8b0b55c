"""SD3 MMDiT keys <-> diffusers ``SD3Transformer2DModel`` keys and config, in both directions.

Our keys are the original single-file keys (``joint_blocks.N.x_block.attn.qkv`` ...) with the
``model.diffusion_model.`` prefix stripped. diffusers splits each fused qkv into to_q/to_k/to_v (image)
or add_q_proj/add_k_proj/add_v_proj (text), and stores the final layer's and the last context block's
(shift, scale) modulation as (scale, shift).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..models.sd3_configs import MMDiTConfig

# Top-level modules: ours -> diffusers (".weight"/".bias" appended by the caller).
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

# Per joint block, unfused modules: ours (under joint_blocks.N.) -> diffusers (under transformer_blocks.N.).
_BLOCK = {
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}

# Fused qkv: ours -> the three diffusers projections.
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0 of a (2C, ...) modulation weight or bias."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _swapped(key: str, depth: int) -> bool:
    """Whether our key holds a (shift, scale) pair that diffusers stores as (scale, shift)."""
    return key.startswith("final_layer.adaLN_modulation.1.") or key.startswith(
        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1."
    )


def mmdit_to_diffusers(sd: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Our MMDiT state dict (prefix stripped) -> ``SD3Transformer2DModel`` state dict."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if _swapped(key, depth):
            value = _swap_halves(value)
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
        elif module in _TOP:
            out[f"{_TOP[module]}.{param}"] = value
        elif key.startswith("joint_blocks."):
            _, i, rest = key.split(".", 2)
            sub = rest.rpartition(".")[0]
            if sub in _QKV:
                for name, part in zip(_QKV[sub], value.chunk(3, dim=0), strict=True):
                    out[f"transformer_blocks.{i}.{name}.{param}"] = part
            elif sub in _BLOCK:
                out[f"transformer_blocks.{i}.{_BLOCK[sub]}.{param}"] = value
            else:
                raise ValueError(f"no diffusers name for MMDiT key {key!r}")
        else:
            raise ValueError(f"no diffusers name for MMDiT key {key!r}")
    return out


def mmdit_from_diffusers(sd: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """``SD3Transformer2DModel`` state dict -> our MMDiT keys (the single-file keys, prefix stripped)."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    parts = {name: (ours, j) for ours, names in _QKV.items() for j, name in enumerate(names)}
    out: dict[str, Tensor] = {}
    pending: dict[str, list[Tensor | None]] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            ours = "pos_embed"
        elif module in top:
            ours = f"{top[module]}.{param}"
        elif key.startswith("transformer_blocks."):
            _, i, rest = key.split(".", 2)
            sub = rest.rpartition(".")[0]
            if sub in parts:
                fused, j = parts[sub]
                pending.setdefault(f"joint_blocks.{i}.{fused}.{param}", [None, None, None])[j] = value
                continue
            if sub not in block:
                raise ValueError(f"no MMDiT name for diffusers key {key!r}")
            ours = f"joint_blocks.{i}.{block[sub]}.{param}"
        else:
            raise ValueError(f"no MMDiT name for diffusers key {key!r}")
        out[ours] = _swap_halves(value) if _swapped(ours, depth) else value
    for ours, qkv in pending.items():
        if any(t is None for t in qkv):
            raise ValueError(f"diffusers checkpoint lacks one of q/k/v for {ours!r}")
        out[ours] = torch.cat(qkv, dim=0)
    return out


def mmdit_diffusers_config(cfg: MMDiTConfig) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` constructor arguments of an MMDiTConfig."""
    return {
        "sample_size": cfg.pos_embed_base * cfg.patch_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.adm_in_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": tuple(cfg.x_block_self_attn_layers),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def mmdit_config_from_diffusers(d: Mapping[str, Any]) -> MMDiTConfig:
    """MMDiTConfig from a diffusers ``transformer/config.json`` dict."""
    heads, head_dim = int(d.get("num_attention_heads", 18)), int(d.get("attention_head_dim", 64))
    if int(d.get("caption_projection_dim", heads * head_dim)) != heads * head_dim:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")
    qk = d.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"qk_norm {qk!r} is not supported; valid: None, 'rms_norm'")
    patch = int(d.get("patch_size", 2))
    return MMDiTConfig(
        in_channels=int(d.get("in_channels", 16)),
        out_channels=int(d.get("out_channels") or d.get("in_channels", 16)),
        patch_size=patch,
        depth=int(d.get("num_layers", 18)),
        hidden_size=heads * head_dim,
        num_heads=heads,
        context_dim=int(d.get("joint_attention_dim", 4096)),
        adm_in_channels=int(d.get("pooled_projection_dim", 2048)),
        pos_embed_max_size=int(d.get("pos_embed_max_size", 96)),
        pos_embed_base=int(d.get("sample_size", 128)) // patch,
        qk_norm=qk == "rms_norm",
        x_block_self_attn_layers=tuple(int(i) for i in d.get("dual_attention_layers", ())),
    )
