"""T5 v1.1 encoder (Raffel et al., 2020; the v1.1 recipe): SD3's third text encoder, T5-XXL.

Pre-norm transformer with RMS layer norms (no mean, no bias), a gated-GELU feed-forward, unscaled attention
and a learned relative position bias (bucketed distances, computed by the first block and shared by all).
Module names follow transformers' ``T5EncoderModel`` (``shared``, ``encoder.block.N.layer.{0,1}``,
``encoder.final_layer_norm``): the keys under ``text_encoders.t5xxl.transformer.`` in an SD3 single file.
The tied ``encoder.embed_tokens.weight`` some files also carry is the same tensor as ``shared.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import _Embedding  # nn.Embedding whose init is skipped on the meta device
from .sd3_configs import T5Config

TIED_EMBED_KEY = "encoder.embed_tokens.weight"


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets: half per direction, exact when small, log-spaced up to max_distance."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    n = relative.abs()
    exact = half // 2
    log_part = (
        exact
        + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    )
    log_part = log_part.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, log_part)


class T5Attention(nn.Module):
    """Multi-head attention with no 1/sqrt(d) scaling; the first block owns ``relative_attention_bias``."""

    def __init__(self, cfg: T5Config, has_bias: bool, factory: dict) -> None:
        super().__init__()
        self.cfg = cfg
        inner = cfg.inner_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False, **factory)
        self.k = nn.Linear(cfg.d_model, inner, bias=False, **factory)
        self.v = nn.Linear(cfg.d_model, inner, bias=False, **factory)
        self.o = nn.Linear(inner, cfg.d_model, bias=False, **factory)
        self.relative_attention_bias = (
            _Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, **factory) if has_bias else None
        )

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """(1, heads, T, T) additive bias from the bucketed key-minus-query distances."""
        pos = torch.arange(length, device=device)
        rel = pos[None, :] - pos[:, None]  # (T, T): memory position - query position
        buckets = relative_position_bucket(
            rel, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # (B, T, D), (B|1, h, T, T) -> (B, T, D)
        h = self.cfg.num_heads
        q, k, v = (proj(x).unflatten(-1, (h, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, h, T, d)
        return self.o(out.transpose(1, 2).flatten(2))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, factory: dict) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias, factory)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, factory)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config, factory: dict) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False, **factory)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False, **factory)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config, factory: dict) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg, factory)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, factory)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool, factory: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, first, factory), T5LayerFF(cfg, factory)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, factory: dict) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, i == 0, factory) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, factory)


class T5EncoderModel(nn.Module):
    """Token ids (B, T) -> last hidden state (B, T, d_model)."""

    def __init__(
        self, cfg: T5Config, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        self.shared = _Embedding(cfg.vocab_size, cfg.d_model, **factory)
        self.encoder = T5Stack(cfg, factory)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        """Accept files that carry the tied ``encoder.embed_tokens.weight`` beside (or instead of) shared."""
        tied = state_dict.pop(prefix + TIED_EMBED_KEY, None)
        if tied is not None and prefix + "shared.weight" not in state_dict:
            state_dict[prefix + "shared.weight"] = tied
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids, optional (B, T) 1/0 mask of real tokens -> (B, T, d_model)."""
        if input_ids.max() >= self.cfg.vocab_size or input_ids.min() < 0:
            raise ValueError(f"token ids must be within 0..{self.cfg.vocab_size - 1}")
        x = self.shared(input_ids)  # (B, T, D)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], input_ids.device).float()  # (1, h, T, T)
        if attention_mask is not None:
            masked = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            bias = bias + masked  # (B, h, T, T)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
