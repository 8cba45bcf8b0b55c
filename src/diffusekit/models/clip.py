"""CLIP text transformers (Radford et al., 2021) in the two checkpoint layouts Stable Diffusion uses.

* ``CLIPTextModel``: transformers' key layout (``text_model.encoder.layers.N...``): OpenAI CLIP ViT-L/14
  in SD1 and as SDXL's first encoder, optionally with a ``text_projection`` Linear like transformers'
  ``CLIPTextModelWithProjection``.
* ``OpenCLIPTextModel``: open_clip's layout (``transformer.resblocks.N...``, packed ``in_proj``): ViT-H in
  SD2 and ViT-bigG as SDXL's second encoder; ``text_projection`` is a (width, proj) matrix used as x @ P.

Both are pre-LayerNorm causal transformers over learned token + position embeddings. ``forward`` returns
the hidden state after the first ``use_layers`` layers (the U-Net context, "clip skip") and the pooled
embedding: the full stack + final LayerNorm at the end-of-text token, projected when a projection exists.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TextEncoderConfig

# Key suffixes real checkpoints carry that hold nothing used at inference; a loader may drop them.
UNUSED_KEY_SUFFIXES: tuple[str, ...] = (
    "text_model.embeddings.position_ids",  # transformers' arange buffer, persisted by older versions
    "logit_scale",  # CLIP's contrastive temperature (open_clip text model kept by SD2/SDXL wrappers)
    "attn_mask",  # open_clip's causal-mask buffer, present in files from older open_clip versions
)


class TextEncoderOutput(NamedTuple):
    """``hidden``: (B, T, W) U-Net context; ``pooled``: (B, P) EOS embedding, or None if not requested."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return _quick_gelu
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as open_clip's nn.GELU and transformers' "gelu"
    raise ValueError(f"unknown activation {name!r}; valid: 'quick_gelu', 'gelu'")


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal scaled dot-product attention on (B, T, W) projections -> (B, T, W)."""
    b, t, w = q.shape
    q, k, v = (y.view(b, t, heads, w // heads).transpose(1, 2) for y in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d)
    return out.transpose(1, 2).reshape(b, t, w)


# ---------------------------------------------------------------------------------------------
# transformers layout


class _HFAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.q_proj = nn.Linear(w, w, **factory)
        self.k_proj = nn.Linear(w, w, **factory)
        self.v_proj = nn.Linear(w, w, **factory)
        self.out_proj = nn.Linear(w, w, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W)
        out = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class _HFMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width, **factory)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width, **factory)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)
        self.self_attn = _HFAttention(cfg, factory)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)
        self.mlp = _HFMLP(cfg, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _normal_(p: torch.Tensor, std: float) -> None:
    """Default init, skipped on the meta device: torch's first meta normal_ costs ~1 s of lazy setup."""
    if not p.is_meta:
        nn.init.normal_(p, std=std)


class _Embedding(nn.Embedding):
    """nn.Embedding (same keys) whose N(0, 1) init is skipped on the meta device."""

    def reset_parameters(self) -> None:
        _normal_(self.weight, 1.0)


class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.token_embedding = _Embedding(cfg.vocab_size, cfg.width, **factory)
        self.position_embedding = _Embedding(cfg.max_positions, cfg.width, **factory)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, W)
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class _HFEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_HFLayer(cfg, factory) for _ in range(cfg.layers))


class _HFTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg, factory)
        self.encoder = _HFEncoder(cfg, factory)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)


# ---------------------------------------------------------------------------------------------
# open_clip layout


class _InProjection(nn.Module):
    """The packed q/k/v projection as a call of its own (no parameters: they stay on the attention
    module under their original names), so adapters can hook it like a Linear."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)  # (B, T, 3W)


class _PackedAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout: one (3W, W) in-projection for q, k, v."""

    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * w, w, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * w, **factory))
        self.out_proj = nn.Linear(w, w, **factory)
        self.in_proj = _InProjection()
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W)
        q, k, v = self.in_proj(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, W)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width, **factory)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width, **factory)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)
        self.attn = _PackedAttention(cfg, factory)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)
        self.mlp = _OpenCLIPMLP(cfg, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, factory: dict) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(cfg, factory) for _ in range(cfg.layers))


# ---------------------------------------------------------------------------------------------
# The two models


class _TextEncoder(nn.Module):
    """Shared forward of both layouts; subclasses name the embedding, blocks, final norm and projection."""

    cfg: TextEncoderConfig

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, W)
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, W) -> (B, P)
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled output: projection_dim when a projection exists, else the model width."""
        return self.cfg.projection_dim or self.cfg.width

    def forward(
        self,
        input_ids: torch.Tensor,
        use_layers: int | None = None,
        final_norm: bool | None = None,
        *,
        return_pooled: bool = True,
    ) -> TextEncoderOutput:
        """(B, T) token ids -> hidden (B, T, W) after `use_layers` layers, pooled (B, P) at the EOS token.

        `use_layers` / `final_norm` default to the config. With ``return_pooled=False`` only the first
        `use_layers` layers run and ``pooled`` is None.
        """
        cfg = self.cfg
        use_layers = cfg.use_layers if use_layers is None else int(use_layers)
        final_norm = cfg.final_norm if final_norm is None else bool(final_norm)
        if not 1 <= use_layers <= cfg.layers:
            raise ValueError(f"use_layers={use_layers} must be within 1..{cfg.layers}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_positions:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {cfg.max_positions} positions"
            )

        x = self._embed(input_ids)  # (B, T, W)
        blocks = self._blocks()
        run = cfg.layers if return_pooled else use_layers
        hidden = x
        for i in range(run):
            x = blocks[i](x)
            if i + 1 == use_layers:
                hidden = x
        if not return_pooled:
            return TextEncoderOutput(self._final_norm(hidden) if final_norm else hidden, None)

        last = self._final_norm(x)  # (B, T, W)
        if final_norm:
            hidden = last if use_layers == cfg.layers else self._final_norm(hidden)
        eos = input_ids.argmax(dim=-1)  # first <|endoftext|>: it is the largest id in the vocabulary
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, W)
        return TextEncoderOutput(hidden, self._project(pooled))


class CLIPTextModel(_TextEncoder):
    """OpenAI CLIP text tower with transformers' key layout (+ ``text_projection.weight`` if configured)."""

    def __init__(
        self,
        cfg: TextEncoderConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.layout != "hf":
            raise ValueError(f"CLIPTextModel needs layout 'hf', got {cfg.layout!r}")
        _check_heads(cfg)
        factory = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.text_model = _HFTextTransformer(cfg, factory)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False, **factory)
        else:
            self.text_projection = None

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embeddings(input_ids)

    def _blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model.final_layer_norm(x)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.text_projection is None else self.text_projection(pooled)


class OpenCLIPTextModel(_TextEncoder):
    """open_clip text tower (token_embedding, positional_embedding, transformer.resblocks, ln_final)."""

    def __init__(
        self,
        cfg: TextEncoderConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cfg.layout != "openclip":
            raise ValueError(f"OpenCLIPTextModel needs layout 'openclip', got {cfg.layout!r}")
        _check_heads(cfg)
        factory = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.token_embedding = _Embedding(cfg.vocab_size, cfg.width, **factory)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width, **factory))
        self.transformer = _Transformer(cfg, factory)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **factory)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim, **factory))
            _normal_(self.text_projection, 1.0 / math.sqrt(cfg.width))
        else:
            self.text_projection = None
        _normal_(self.positional_embedding, 0.01)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.text_projection is None else pooled @ self.text_projection  # (B, W) @ (W, P)


def _check_heads(cfg: TextEncoderConfig) -> None:
    if cfg.heads < 1 or cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} must be divisible by heads {cfg.heads}")


def build_text_encoder(
    cfg: TextEncoderConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> CLIPTextModel | OpenCLIPTextModel:
    """The text encoder class for ``cfg.layout``: "hf" -> CLIPTextModel, "openclip" -> OpenCLIPTextModel."""
    if cfg.layout == "hf":
        return CLIPTextModel(cfg, device=device, dtype=dtype)
    if cfg.layout == "openclip":
        return OpenCLIPTextModel(cfg, device=device, dtype=dtype)
    raise ValueError(f"unknown text encoder layout {cfg.layout!r}; valid: 'hf', 'openclip'")
