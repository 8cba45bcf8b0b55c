"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al., 2024), with SD3.5 Medium's
MMDiT-X variant (a second, image-only self-attention in the first blocks) and QK RMS-norm.

Module names follow the original single-file layout, so ``state_dict()`` keys equal the
``model.diffusion_model.*`` keys of an SD3/SD3.5 checkpoint once that prefix is stripped
(``joint_blocks.N.{x_block,context_block}.{attn,attn2,mlp,adaLN_modulation}``, ``x_embedder.proj``,
``pos_embed``, ``t_embedder.mlp``, ``y_embedder.mlp``, ``context_embedder``, ``final_layer``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .sd3_configs import MMDiTConfig

_EPS = 1e-6  # every LayerNorm and RMSNorm of the MMDiT


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, C) shift/scale broadcast over the tokens of (B, N, C)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosines first (DiT / SD3 order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int, base: int | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position table (grid*grid, dim): half the channels for rows, half for columns.

    Only the initial value of ``pos_embed`` for freshly created models; checkpoints carry their own table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    scale = (base or grid) / grid
    coords = torch.arange(grid, dtype=torch.float64) * scale
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def axis(pos: Tensor) -> Tensor:  # (grid*grid,) -> (grid*grid, dim/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()  # (grid*grid, dim)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (``ln_q``/``ln_k``), computed in float32."""

    def __init__(self, dim: int, factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS)
        return (y * self.weight.float()).to(x.dtype)


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2."""

    def __init__(self, dim: int, hidden: int, factory: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused ``qkv`` projection with optional per-head RMS-norm of q and k; ``proj`` unless pre_only."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool, factory: dict) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.proj = None if pre_only else nn.Linear(dim, dim, **factory)
        self.ln_q = RMSNorm(head_dim, factory) if qk_norm else None
        self.ln_k = RMSNorm(head_dim, factory) if qk_norm else None

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v each (B, N, h, d), q and k normalised per head when configured."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # (B, N, h, d) each
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def joint_attention(qkvs: list[tuple[Tensor, Tensor, Tensor]], kernel: str = "sdpa") -> list[Tensor]:
    """Attention over the concatenated token sequences; returns each sequence's (B, N_i, h*d) output."""
    # heads-first before the concatenation, so SDPA gets contiguous (B, h, N, d) tensors
    q, k, v = (torch.cat([t[i].transpose(1, 2) for t in qkvs], dim=2) for i in range(3))  # (B, h, N, d)
    out = attention(q, k, v, kernel).transpose(1, 2).flatten(2)  # (B, N, h*d)
    return list(out.split([t[0].shape[1] for t in qkvs], dim=1))


class DismantledBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN-Zero modulation around attention and MLP.

    pre_only (the last context block): only the q/k/v of the attention; its output is discarded.
    self_attn2 (MMDiT-X): a second attention over this stream alone, from its own modulation.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool, self_attn2: bool, factory: dict) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS, **factory)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, pre_only, factory)
        self.attn2 = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, False, factory) if self_attn2 else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS, **factory)
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), factory)
        # (shift, scale) for pre_only; + gate and the MLP's (shift, scale, gate); + attn2's three
        self.n_mod = 2 if pre_only else (9 if self_attn2 else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim, **factory))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple]:
        """(B, N, C) tokens, (B, C) conditioning -> q/k/v for the joint attention and what post needs."""
        mods = self.adaLN_modulation(c).chunk(self.n_mod, dim=1)  # n_mod x (B, C)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), mods[0], mods[1]))
        return qkv, mods

    def post_attention(self, x: Tensor, attn: Tensor, mods: tuple, kernel: str = "sdpa") -> Tensor:
        """Residual updates of the block input x (B, N, C) from the joint attention output, the MMDiT-X
        attention (over this stream alone, from x) and the MLP."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        update = gate_msa.unsqueeze(1) * self.attn.proj(attn)
        if self.attn2 is not None:
            shift2, scale2, gate2 = mods[6:]
            q, k, v = (
                t.transpose(1, 2).contiguous()
                for t in self.attn2.pre_attention(modulate(self.norm1(x), shift2, scale2))
            )  # (B, h, N, d)
            out = attention(q, k, v, kernel).transpose(1, 2).flatten(2)  # (B, N, C)
            update = update + gate2.unsqueeze(1) * self.attn2.proj(out)
        x = x + update
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """A ``context_block`` and an ``x_block`` whose tokens attend jointly (text first, then image)."""

    def __init__(self, cfg: MMDiTConfig, index: int, factory: dict) -> None:
        super().__init__()
        last = index == cfg.depth - 1
        self.context_block = DismantledBlock(cfg, pre_only=last, self_attn2=False, factory=factory)
        self.x_block = DismantledBlock(
            cfg, pre_only=False, self_attn2=index in cfg.x_block_self_attn_layers, factory=factory
        )

    def forward(
        self, context: Tensor, x: Tensor, c: Tensor, kernel: str = "sdpa"
    ) -> tuple[Tensor | None, Tensor]:
        """(B, L, C) text tokens, (B, N, C) image tokens, (B, C) conditioning -> updated (context, x)."""
        ctx_qkv, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        ctx_attn, x_attn = joint_attention([ctx_qkv, x_qkv], kernel)
        x = self.x_block.post_attention(x, x_attn, x_mods, kernel)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_attn, ctx_mods, kernel), x


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: a strided conv ``proj``, flattened row-major."""

    def __init__(self, cfg: MMDiTConfig, factory: dict) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, p, stride=p, **factory)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, H/p * W/p, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class EmbedMLP(nn.Module):
    """Linear - SiLU - Linear (``mlp.0``/``mlp.2``), the timestep and pooled-text embedders."""

    def __init__(self, in_dim: int, dim: int, factory: dict) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim, **factory), nn.SiLU(), nn.Linear(dim, dim, **factory))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) over a non-affine LayerNorm, then a linear map to p*p*out channels per token."""

    def __init__(self, cfg: MMDiTConfig, factory: dict) -> None:
        super().__init__()
        dim, p = cfg.hidden_size, cfg.patch_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS, **factory)
        self.linear = nn.Linear(dim, p * p * cfg.out_channels, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, **factory))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # (B, N, C), (B, C) -> (B, N, p*p*out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """SD3/SD3.5 diffusion transformer: (latent, timestep, text tokens, pooled text) -> velocity."""

    def __init__(
        self, cfg: MMDiTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention_kernel = "sdpa"
        factory = {"device": device, "dtype": dtype}
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg, factory)
        self.t_embedder = EmbedMLP(cfg.frequency_embedding_size, dim, factory)
        self.y_embedder = EmbedMLP(cfg.adm_in_channels, dim, factory)
        self.context_embedder = nn.Linear(cfg.context_dim, dim, **factory)
        m = cfg.pos_embed_max_size
        table = torch.zeros(1, m * m, dim, **factory)
        if table.device.type != "meta":
            table.copy_(sincos_pos_embed_2d(dim, m, cfg.pos_embed_base))
        self.register_buffer("pos_embed", table)  # (1, m*m, C), saved in the checkpoint
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i, factory) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, factory)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w window of the (m x m) position table -> (1, h*w, C)."""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(
                f"latent of {h}x{w} patches exceeds this model's {m}x{m} position table "
                f"(at most {m * self.cfg.patch_size * 8} px per side)"
            )
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.unflatten(1, (m, m))  # (1, m, m, C)
        return grid[:, top : top + h, left : left + w].flatten(1, 2)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) latent."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        y: Tensor,
        skip_layers: tuple[int, ...] = (),
    ) -> Tensor:
        """Velocity (B, Cout, H, W) of latent (B, Cin, H, W) at timestep (B,) = sigma*1000 given text tokens
        (B, L, context_dim) and pooled text (B, adm).

        skip_layers: joint blocks to bypass (skip-layer guidance, SD3.5 Medium).
        """
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be divisible by the patch size {p}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)  # (B, N, C)
        emb = timestep_embedding(t, self.cfg.frequency_embedding_size).to(x.dtype)
        c = self.t_embedder(emb) + self.y_embedder(y)  # (B, C)
        ctx = self.context_embedder(context)  # (B, L, C)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            ctx, tokens = block(ctx, tokens, c, self.attention_kernel)
        return self.unpatchify(self.final_layer(tokens, c), h, w)
