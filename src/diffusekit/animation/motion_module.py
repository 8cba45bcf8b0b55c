"""AnimateDiff motion modules (Guo et al. 2023): temporal self-attention over the frames of a batch,
inserted after each spatial block of a frozen SD1.x or SDXL U-Net.

Module names mirror the original motion-module files (``down_blocks.{i}.motion_modules.{j}.
temporal_transformer.transformer_blocks.{k}.attention_blocks.{a}.to_q.weight``, ``mid_block.*``,
``up_blocks.*``), so an ``mm_sd_v15*.ckpt``/``.safetensors`` loads by name; diffusers ``MotionAdapter``
folders are renamed back to that layout (checkpoints-side code in ``animatediff.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.unet import FeedForward


@dataclass(frozen=True)
class MotionConfig:
    """A motion adapter's shape: one entry of `channels` per U-Net level (SD1.5: 320, 640, 1280, 1280)."""

    # SDXL (mm_sdxl_v10_beta): channels (320, 640, 1280), no mid-block module

    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # the U-Net's num_res_blocks; up blocks have one more
    heads: int = 8
    norm_groups: int = 32
    max_frames: int = 32  # length of the sinusoidal position table (v1 files: 24)
    transformer_depth: int = 1
    mid_block: bool = True  # v2 and later have a mid-block motion module

    def __post_init__(self) -> None:
        for c in self.channels:
            if c % self.heads or c % self.norm_groups:
                raise ValueError(
                    f"motion module channels {c} must be divisible by heads ({self.heads}) and norm groups "
                    f"({self.norm_groups})"
                )


class PositionalEncoding(nn.Module):
    """Sinusoidal frame positions added to the attention input (the table is stored in original files)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div)
        pe[0, :, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)  # (1, L, D)

    def forward(self, x: Tensor) -> Tensor:
        frames = x.shape[1]
        if frames > self.pe.shape[1]:
            raise ValueError(
                f"{frames} frames in one window exceed the motion module's {self.pe.shape[1]} positions; "
                "use a shorter --context window"
            )
        return x + self.pe[:, :frames].to(x.dtype)


class TemporalAttention(nn.Module):
    """Self-attention across frames at each spatial position: (B*H*W, F, C) -> same."""

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_encoder(x)
        n, f, c = x.shape
        q, k, v = (p(x).view(n, f, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))  # (N, h, F, d) each  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, F, d)
        return self.to_out(out.transpose(1, 2).reshape(n, f, c))


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions and a GEGLU MLP, each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, {})
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = x + attn(norm(x))
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    """GroupNorm over (C, F, H, W), project, temporal blocks, project back, residual."""

    def __init__(self, channels: int, cfg: MotionConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(channels, cfg.heads, cfg.max_frames)
                for _ in range(cfg.transformer_depth)
            ]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, h: Tensor, frames: int) -> Tensor:
        n, c, hh, ww = h.shape  # (B*F, C, H, W), the frames of each video consecutive
        if n % frames:
            raise ValueError(f"a batch of {n} latents is not a whole number of {frames}-frame videos")
        b = n // frames
        x = h.view(b, frames, c, hh, ww).transpose(1, 2)  # (B, C, F, H, W)
        x = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * hh * ww, frames, c)  # (B*H*W, F, C)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = x.view(b, hh, ww, frames, c).permute(0, 3, 4, 1, 2).reshape(n, c, hh, ww)  # (B*F, C, H, W)
        return x + h


class MotionModule(nn.Module):
    """One inserted temporal layer; `frames` is set by the animation that runs it."""

    def __init__(self, channels: int, cfg: MotionConfig) -> None:
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, cfg)
        self.frames = 1

    def forward(self, h: Tensor) -> Tensor:
        return self.temporal_transformer(h, self.frames)


class MotionBlock(nn.Module):
    def __init__(self, channels: int, count: int, cfg: MotionConfig) -> None:
        super().__init__()
        self.motion_modules = nn.ModuleList([MotionModule(channels, cfg) for _ in range(count)])


class MotionAdapter(nn.Module):
    """All motion modules of one file, in the original layout (down, optional mid, up)."""

    def __init__(self, cfg: MotionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.layers_per_block
        self.down_blocks = nn.ModuleList([MotionBlock(c, n, cfg) for c in cfg.channels])
        self.mid_block = MotionBlock(cfg.channels[-1], 1, cfg) if cfg.mid_block else None
        self.up_blocks = nn.ModuleList([MotionBlock(c, n + 1, cfg) for c in reversed(cfg.channels)])

    def modules_with_frames(self):
        return [m for m in self.modules() if isinstance(m, MotionModule)]

    def set_frames(self, frames: int) -> None:
        for m in self.modules_with_frames():
            m.frames = frames
