"""AutoencoderKL: the KL-regularised convolutional autoencoder of Latent Diffusion (Rombach et al., 2022).

Module names follow ``ldm.modules.diffusionmodules.model`` so that ``state_dict()`` keys equal the
``first_stage_model.*`` keys of an original single-file checkpoint once that prefix is stripped.
The latent scaling factor (``VAEConfig.scaling_factor``) is *not* applied here; the pipeline does it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VAEConfig

_NORM_EPS = 1e-6  # every GroupNorm of the LDM autoencoder uses eps=1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # LDM clamps the posterior log-variance to this range


def _group_norm(channels: int, groups: int, factory: dict) -> nn.GroupNorm:
    if channels % groups != 0:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS, affine=True, **factory)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GroupNorm-SiLU-Conv3x3 twice, 1x1 ``nin_shortcut`` if widths differ."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups, factory)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, **factory)
        self.norm2 = _group_norm(out_ch, groups, factory)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, **factory)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, **factory) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 at inference
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (LDM ``AttnBlock``), via SDPA."""

    def __init__(self, ch: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.norm = _group_norm(ch, groups, factory)
        self.q = nn.Conv2d(ch, ch, 1, **factory)
        self.k = nn.Conv2d(ch, ch, 1, **factory)
        self.v = nn.Conv2d(ch, ch, 1, **factory)
        self.proj_out = nn.Conv2d(ch, ch, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)
        # One head as a 4-D contiguous (B, 1, HW, C): the form CPU SDPA runs fused, without ever
        # materializing the (HW x HW) score matrix (3-D transposed views take the quadratic path).
        q = self.q(y).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)  # (B, 1, HW, C)
        k = self.k(y).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        v = self.v(y).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C), scale 1/sqrt(C)
        out = out.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad of one pixel on the right and bottom (LDM)."""

    def __init__(self, ch: int, factory: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int, factory: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution (``mid.block_1/attn_1/block_2``)."""

    def __init__(self, ch: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, factory)
        self.attn_1 = AttnBlock(ch, groups, factory)
        self.block_2 = ResnetBlock(ch, ch, groups, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ``block.J`` ResnetBlocks, then an optional ``downsample``."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, downsample: bool, groups: int, factory: dict):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(out_ch if j else in_ch, out_ch, groups, factory) for j in range(n_blocks)
        )
        self.downsample = Downsample(out_ch, factory) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ``block.J`` ResnetBlocks, then an optional ``upsample``."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, upsample: bool, groups: int, factory: dict):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(out_ch if j else in_ch, out_ch, groups, factory) for j in range(n_blocks)
        )
        self.upsample = Upsample(out_ch, factory) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """LDM encoder: image (B, 3, H, W) -> Gaussian moments (B, 2*z, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: VAEConfig, factory: dict) -> None:
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **factory)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.down = nn.ModuleList(
            DownLevel(widths[i], widths[i + 1], cfg.num_res_blocks, i != n - 1, g, factory) for i in range(n)
        )
        top = widths[-1]
        self.mid = MidBlock(top, g, factory)
        self.norm_out = _group_norm(top, g, factory)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, 2z, h, w)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM decoder: latent (B, z, h, w) -> image (B, 3, h*f, w*f).

    ``up`` is indexed like LDM: ``up[0]`` is the full-resolution level (no upsample) and runs last;
    ``up[levels-1]`` is the lowest resolution and runs first.
    """

    def __init__(self, cfg: VAEConfig, factory: dict) -> None:
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1, **factory)
        self.mid = MidBlock(top, g, factory)
        # Level i receives the output width of level i+1 (or the mid width for the lowest level).
        ins = [cfg.ch * cfg.ch_mult[min(i + 1, n - 1)] for i in range(n)]
        nb = cfg.num_res_blocks + 1  # the decoder has one more block per level than the encoder
        self.up = nn.ModuleList(
            UpLevel(ins[i], cfg.ch * cfg.ch_mult[i], nb, i != 0, g, factory) for i in range(n)
        )
        bottom = cfg.ch * cfg.ch_mult[0]
        self.norm_out = _group_norm(bottom, g, factory)
        self.conv_out = nn.Conv2d(bottom, cfg.out_ch, 3, padding=1, **factory)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, z, h, w) -> (B, Cout, H, W)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """The VAE posterior q(z|x) = N(mean, exp(logvar)), diagonal; logvar already clamped to [-30, 20]."""

    mean: torch.Tensor  # (B, z, h, w)
    logvar: torch.Tensor  # (B, z, h, w)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split (B, 2z, h, w) encoder moments into mean and clamped log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps; eps is drawn in float32 on the generator's device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """LDM AutoencoderKL: Encoder -> quant_conv -> DiagonalGaussian; post_quant_conv -> Decoder."""

    def __init__(
        self, cfg: VAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not cfg.ch_mult:
            raise ValueError("VAEConfig.ch_mult must name at least one level")
        self.cfg = cfg
        factory = {"device": device, "dtype": dtype}
        self.encoder = Encoder(cfg, factory)
        self.decoder = Decoder(cfg, factory)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, **factory)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1, **factory)
        else:  # SD3: the encoder's moments are the posterior, the latent goes straight to the decoder
            if cfg.embed_dim != cfg.z_channels:
                raise ValueError("a VAE without quant_conv needs embed_dim == z_channels")
            self.quant_conv = self.post_quant_conv = None

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2*embed_dim, H/f, W/f) posterior mean and log-variance, stacked."""
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f) unscaled latents."""
        f = self.cfg.downscale
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode expects (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode needs H and W divisible by {f}, got {tuple(x.shape[-2:])}")
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) unscaled latents -> (B, 3, h*f, w*f) image, roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"decode expects (B, {self.cfg.embed_dim}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruct x through the latent (posterior mode, or a sample when `sample_posterior`)."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mode())
