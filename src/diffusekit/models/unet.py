"""The latent diffusion U-Net: LDM/SGM ``openaimodel.UNetModel`` with SpatialTransformer blocks.

One class covers SD1 (1x1-conv transformer projections, fixed head count), SD2 (linear projections,
64-wide heads), SDXL (``label_emb`` for pooled text + size ids, per-level transformer depth, levels
without attention) and the 9-channel inpainting variants. Attribute names follow the original
checkpoints, so ``state_dict()`` keys are the single-file keys with ``model.diffusion_model.`` removed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.models.attention import attention
from diffusekit.models.configs import UNetConfig

__all__ = ["UNetModel", "timestep_embedding", "size_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps, cosines first (LDM / "Attention Is All You Need")."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (N, dim), float32


def size_embedding(ids: Tensor, dim: int) -> Tensor:
    """SDXL size/crop conditioning: each id gets its own `dim`-wide Fourier embedding, concatenated (SGM)."""
    if ids.ndim != 2:
        raise ValueError(
            f"size ids must be (batch, count), e.g. (B, 6) for SDXL; got shape {tuple(ids.shape)}"
        )
    b, k = ids.shape
    return timestep_embedding(ids.reshape(-1), dim).reshape(b, k * dim)  # (B, K * dim)


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (DDPM / ADM ``ResBlock``)."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, groups: int, dd: dict[str, Any]
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, **dd),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1, **dd),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **dd))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, **dd),
            nn.SiLU(),
            nn.Identity(),  # the dropout slot of the original layout (inference only)
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1, **dd)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, out, 1, 1) broadcast
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention without q/k/v biases; the kernel is chosen by `runtime.prepare`."""

    def __init__(
        self, query_dim: int, context_dim: int, heads: int, dim_head: int, dd: dict[str, Any]
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False, **dd)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **dd)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **dd)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **dd))
        self.kernel = "sdpa"  # set by runtime.prepare (see models/attention.py)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context  # (B, T, Dc)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(ctx).view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, T, d)
        v = self.to_v(ctx).view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, T, d)
        out = attention(q, k, v, self.kernel)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, h * d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, **dd)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input projection and 4x inner width."""

    def __init__(self, dim: int, dd: dict[str, Any], mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner, dd), nn.Identity(), nn.Linear(inner, dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, dd)
        self.ff = FeedForward(dim, dd)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.norm3 = nn.LayerNorm(dim, **dd)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence (LDM)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        groups: int,
        dd: dict[str, Any],
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, **dd)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner, **dd)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **dd)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dd) for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = nn.Linear(inner, channels, **dd)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1, **dd)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, hgt, wid = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, -1)  # (B, H*W, C or inner)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H*W, C)
        h = h.reshape(b, hgt, wid, -1).permute(0, 3, 1, 2)  # (B, C or inner, H, W)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution."""

    def __init__(self, channels: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to the size of the matching skip) then a 3x3 convolution."""

    def __init__(self, channels: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **dd)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # odd latent sizes: match the skip
        return self.conv(x)


class EmbedSequential(nn.Sequential):
    """A U-Net stage: hands the timestep embedding, context and upsample size to the layers using them."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Latent diffusion U-Net (Rombach et al. 2022; SDXL: Podell et al. 2023), LDM/SGM checkpoint layout."""

    def __init__(
        self, cfg: UNetConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        levels = len(cfg.channel_mult)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_at(ch)
            if heads < 1 or heads * dim_head != ch:
                raise ValueError(
                    f"attention at {ch} channels cannot be split into heads: num_heads={cfg.num_heads}, "
                    f"num_head_channels={cfg.num_head_channels}; the channel count must be divisible"
                )
            return SpatialTransformer(
                ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, groups, dd
            )

        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim, **dd), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **dd)
        )
        self.label_emb: nn.Sequential | None = None
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(cfg.adm_in_channels, emb_dim, **dd),
                    nn.SiLU(),
                    nn.Linear(emb_dim, emb_dim, **dd),
                )
            )

        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1, **dd))]
        )
        skip_channels = [mc]  # channels of every input block's output, consumed by the output blocks
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups, dd)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch, dd)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch, groups, dd)]
        if cfg.transformer_depth_middle > 0:
            middle.append(transformer(ch, cfg.transformer_depth_middle))
        middle.append(ResBlock(ch, emb_dim, ch, groups, dd))
        self.middle_block = EmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups, dd)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, dd))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, **dd), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1, **dd)
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, which is the compute dtype."""
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict noise (or v) for latents `x` (B, in, H, W) at `timesteps` (B,) given `context` (B, T, D).

        `y` (B, adm_in_channels) is SDXL's pooled text + size embedding. Inputs are cast to the weights'
        dtype; the result has the dtype of `x`.
        """
        emb, context = self.conditioning(x, timesteps, context, y)
        skips = self.run_input_blocks(x.to(self.dtype), emb, context)  # one per input block
        h = self.middle_block(skips[-1], emb, context)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
        h = self.run_output_blocks(h, skips, emb, context)
        return self.out(h).to(x.dtype)  # (B, out, H, W)

    def conditioning(
        self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Check `forward`'s inputs; return embedding (B, 4 * mc) and the context, in the compute dtype."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W); got shape {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must be (B, T, {cfg.context_dim}); got shape {tuple(context.shape)}")
        if (y is None) != (self.label_emb is None):
            raise ValueError(
                f"y must be given exactly when adm_in_channels is set (here {cfg.adm_in_channels}); "
                f"got y={'None' if y is None else tuple(y.shape)}"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))  # (B, 4 * mc)
        if self.label_emb is not None and y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        return emb, context.to(dtype)

    def run_input_blocks(
        self, h: Tensor, emb: Tensor, context: Tensor, stop: int | None = None
    ) -> list[Tensor]:
        """Run `input_blocks[:stop]` on `h` (B, in, H, W); return every block's output (the skips)."""
        skips: list[Tensor] = []
        for block in self.input_blocks[:stop]:
            h = block(h, emb, context)
            skips.append(h)
        return skips

    def run_output_blocks(
        self,
        h: Tensor,
        skips: list[Tensor],
        emb: Tensor,
        context: Tensor,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        """Run `output_blocks[start:stop]` from `h`, popping the skip each block concatenates off `skips`.

        `skips` must end with the skip of `output_blocks[start]`: every input block's output for start 0,
        the first `len(output_blocks) - start` of them otherwise (DeepCache's shallow path).
        """
        for block in self.output_blocks[start:stop]:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = block(h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return h
