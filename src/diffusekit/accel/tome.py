"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

In the transformer blocks of the highest-resolution attention level, a share `ratio` of the H*W tokens is
merged into similar tokens by bipartite soft matching before self-attention and copied back ("unmerged")
after it, so attention runs on fewer queries and keys while the block's output keeps every token.

Matching: the destination set is one token per 2x2 cell of the token grid (the cell's top-left token, a
fixed choice: no randomness, so an image depends only on its seed); every other token is a source. Each
source picks its most cosine-similar destination (similarity of the block's input tokens); the `r = ratio
* N` sources with the highest such similarity are averaged into their destinations, ties broken by token
order. Unmerging gives every merged source its destination's output. As in the paper's default only
self-attention is merged; `cross_attn` and `mlp` extend merging to the other two sub-layers.

`apply_tome` patches the blocks of one model instance (an instance `forward`, plus a forward pre-hook on
each SpatialTransformer to learn its grid size); the returned handle's `remove()` restores them exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from diffusekit.models.unet import BasicTransformerBlock, Downsample, SpatialTransformer, UNetModel, Upsample

from .errors import AccelError

__all__ = ["MAX_TOME_RATIO", "Merge", "ToMePatch", "apply_tome", "bipartite_merge", "top_level_transformers"]

MAX_TOME_RATIO = 0.75  # 3 of every 4 tokens are sources; at most all of them can be merged


@dataclass(frozen=True)
class Merge:
    """One bipartite matching of N tokens on a grid: `merge` (B, N, C) -> (B, N - r, C), `unmerge` back."""

    n: int  # tokens before merging
    dst_idx: Tensor  # (Nd,) token positions of the destinations
    kept_pos: Tensor  # (B, Ns - r) token positions of the sources left alone
    merged_pos: Tensor  # (B, r) token positions of the sources merged away
    target: Tensor  # (B, r) which destination (0 .. Nd - 1) each merged source went into

    @property
    def r(self) -> int:
        return self.merged_pos.shape[1]

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N - r, C): kept sources first, then destinations averaged with their sources."""
        b, n, c = x.shape
        if n != self.n:
            raise AccelError(f"token merge planned for {self.n} tokens was given {n}")
        kept = x.gather(1, self.kept_pos[..., None].expand(-1, -1, c))  # (B, Ns - r, C)
        moved = x.gather(1, self.merged_pos[..., None].expand(-1, -1, c))  # (B, r, C)
        dst = x[:, self.dst_idx]  # (B, Nd, C)
        index = self.target[..., None].expand(-1, -1, c)  # (B, r, C)
        dst = dst.scatter_reduce(1, index, moved, "mean", include_self=True)
        return torch.cat([kept, dst], dim=1)  # (B, Ns - r + Nd, C)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, N - r, C) -> (B, N, C): every merged source takes its destination's value."""
        b, m, c = y.shape
        n_kept = self.kept_pos.shape[1]
        if m != n_kept + self.dst_idx.shape[0]:
            raise AccelError(f"token unmerge expected {n_kept + self.dst_idx.shape[0]} tokens, got {m}")
        kept, dst = y[:, :n_kept], y[:, n_kept:]  # (B, Ns - r, C), (B, Nd, C)
        out = y.new_empty(b, self.n, c)  # (B, N, C)
        out[:, self.dst_idx] = dst
        out.scatter_(1, self.kept_pos[..., None].expand(-1, -1, c), kept)
        moved = dst.gather(1, self.target[..., None].expand(-1, -1, c))  # (B, r, C)
        return out.scatter_(1, self.merged_pos[..., None].expand(-1, -1, c), moved)


def grid_split(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row-major token positions of the destinations (top-left of each 2x2 cell) and of the sources."""
    ys = torch.arange(height, device=device)[:, None]  # (H, 1)
    xs = torch.arange(width, device=device)[None, :]  # (1, W)
    is_dst = ((ys % 2 == 0) & (xs % 2 == 0)).reshape(-1)  # (H * W,)
    return is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)  # (Nd,), (Ns,)


def bipartite_merge(metric: Tensor, height: int, width: int, ratio: float) -> Merge:
    """Plan merging `ratio` of the tokens of `metric` (B, H*W, C) into their most similar destinations."""
    b, n, _ = metric.shape
    if n != height * width:
        raise AccelError(f"{n} tokens do not form the {height}x{width} grid they were recorded with")
    if not 0.0 <= ratio <= MAX_TOME_RATIO:
        raise AccelError(f"token merging ratio must be within [0, {MAX_TOME_RATIO}], got {ratio}")
    dst_idx, src_idx = grid_split(height, width, metric.device)
    r = min(int(n * ratio), src_idx.shape[0])
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, N, C), unit rows
        scores = m[:, src_idx] @ m[:, dst_idx].transpose(1, 2)  # (B, Ns, Nd) cosine similarities
        best, best_dst = scores.max(dim=-1)  # (B, Ns) each
        order = best.float().argsort(dim=-1, descending=True, stable=True)  # (B, Ns), most similar first
    merged, kept = order[:, :r], order[:, r:]  # (B, r), (B, Ns - r) indices into the sources
    return Merge(
        n=n,
        dst_idx=dst_idx,
        kept_pos=src_idx[kept],
        merged_pos=src_idx[merged],
        target=best_dst.gather(1, merged),
    )


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class _Grid:
    """The (H, W) of the feature map a SpatialTransformer was last called with (set by a pre-hook)."""

    size: tuple[int, int] | None = None


def _merging_forward(
    block: BasicTransformerBlock,
    grid: _Grid,
    ratio: float,
    cross_attn: bool,
    mlp: bool,
    x: Tensor,
    context: Tensor,
) -> Tensor:
    """BasicTransformerBlock.forward with its sub-layers run on merged tokens (x: (B, N, C))."""
    if grid.size is None:
        raise AccelError("token merging needs the grid size; call the block through its SpatialTransformer")
    if int(x.shape[1] * ratio) == 0:  # nothing to merge at this size: the unpatched block, bit for bit
        return type(block).forward(block, x, context)
    plan = bipartite_merge(x, *grid.size, ratio)
    off: Callable[[Tensor], Tensor] = _identity
    x = x + plan.unmerge(block.attn1(plan.merge(block.norm1(x))))  # (B, N, C)
    m, u = (plan.merge, plan.unmerge) if cross_attn else (off, off)
    x = x + u(block.attn2(m(block.norm2(x)), context))
    m, u = (plan.merge, plan.unmerge) if mlp else (off, off)
    return x + u(block.ff(m(block.norm3(x))))


def top_level_transformers(unet: UNetModel, levels: int = 1) -> list[SpatialTransformer]:
    """The SpatialTransformers of the `levels` highest-resolution levels that have attention."""
    by_level: dict[int, list[SpatialTransformer]] = {}
    level = 0
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                by_level.setdefault(level, []).append(layer)
        level += any(isinstance(layer, Downsample) for layer in block)
    for layer in unet.middle_block:
        if isinstance(layer, SpatialTransformer):
            by_level.setdefault(level, []).append(layer)
    for block in unet.output_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                by_level.setdefault(level, []).append(layer)
        level -= any(isinstance(layer, Upsample) for layer in block)
    chosen = sorted(by_level)[:levels]
    return [t for lvl in chosen for t in by_level[lvl]]


class ToMePatch:
    """Token merging applied to one U-Net instance; `remove()` restores the original blocks."""

    def __init__(
        self, unet: UNetModel, ratio: float, *, levels: int = 1, cross_attn: bool = False, mlp: bool = False
    ) -> None:
        if not 0.0 <= ratio <= MAX_TOME_RATIO:
            raise AccelError(f"token merging ratio must be within [0, {MAX_TOME_RATIO}], got {ratio}")
        if levels < 1:
            raise AccelError(f"token merging levels must be >= 1 (1 = the top attention level), got {levels}")
        transformers = top_level_transformers(unet, levels)
        if not transformers:
            raise AccelError("token merging found no attention blocks in this U-Net")
        blocks = [blk for t in transformers for blk in t.transformer_blocks]
        if any("forward" in vars(blk) for blk in blocks):
            raise AccelError("token merging is already applied to this U-Net; remove() it before reapplying")
        self.ratio = ratio
        self.blocks: list[nn.Module] = blocks
        self._hooks: list[RemovableHandle] = []
        for t in transformers:
            grid = _Grid()
            self._hooks.append(t.register_forward_pre_hook(partial(_record_grid, grid)))
            for blk in t.transformer_blocks:
                blk.forward = partial(_merging_forward, blk, grid, ratio, cross_attn, mlp)

    def remove(self) -> None:
        """Restore the class forward of every patched block and drop the grid hooks."""
        for blk in self.blocks:
            vars(blk).pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self.blocks, self._hooks = [], []


def _record_grid(grid: _Grid, module: nn.Module, args: tuple[Tensor, ...]) -> None:
    grid.size = (int(args[0].shape[-2]), int(args[0].shape[-1]))  # x: (B, C, H, W)


def apply_tome(
    unet: UNetModel, ratio: float, *, levels: int = 1, cross_attn: bool = False, mlp: bool = False
) -> ToMePatch:
    """Merge `ratio` of the tokens in the attention blocks of `unet`'s top `levels` attention level(s)."""
    return ToMePatch(unet, ratio, levels=levels, cross_attn=cross_attn, mlp=mlp)
