"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse deep U-Net features.

Adjacent denoising steps change the U-Net's deep, low-resolution features little, so a "full" call runs
the whole U-Net and keeps the feature entering the last `branch + 1` output blocks; the following
`interval - 1` "cached" calls run only the shallow path: `input_blocks[:branch + 1]` (for the skips those
output blocks concatenate) and `output_blocks[-(branch + 1):]`, starting from the cached feature.

Which calls are full: the first of a run, then every `interval`-th U-Net call (the counter counts calls,
not sampler steps; a second-order sampler such as Heun calls the U-Net twice per step, so interval 2 there
refreshes once per step, on its first evaluation). A call whose input shape, dtype or device differs from
the cached one (another batch size, CFG scale 1 vs batched cond + uncond, a hires pass) is always full. One
`DeepCache` belongs to one sampler run: the pipeline makes a fresh one for each and passes it down
explicitly, so nothing is shared between runs or threads.

For SD1.5 (12 input and 12 output blocks) branch 0 caches the (2B, 320, 64, 64) feature at 512 px, and a
cached call costs the first conv, the last output block and the output head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusekit.models.unet import UNetModel

from .errors import AccelError

__all__ = ["DeepCache", "check_branch", "check_settings"]


def check_settings(interval: object, branch: object) -> None:
    """Raise AccelError unless `interval` is an int >= 1 and `branch` an int >= 0 (any U-Net)."""
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise AccelError(f"deepcache_interval must be an int >= 1, got {interval!r}")
    if interval < 1:
        raise AccelError(
            f"deepcache_interval must be >= 1 (1 = off, 3 = a full U-Net every 3rd call), got {interval}"
        )
    if isinstance(branch, bool) or not isinstance(branch, int):
        raise AccelError(f"deepcache_branch must be an int >= 0, got {branch!r}")
    if branch < 0:
        raise AccelError(
            f"deepcache_branch must be >= 0 (0 = the shallowest path: first input and last output "
            f"block), got {branch}"
        )


def check_branch(unet: UNetModel, branch: int) -> None:
    """Raise AccelError unless `branch` names a skip branch of `unet` (0 .. len(output_blocks) - 1)."""
    n = len(unet.output_blocks)
    if not 0 <= branch < n:
        raise AccelError(
            f"DeepCache branch {branch} does not exist in this U-Net: valid branches are 0..{n - 1} "
            f"(it has {n} output blocks; 0 is the shallowest and fastest)"
        )


class DeepCache:
    """Per-run DeepCache state: call it like the U-Net, `cache(unet, x, t, context, y)`."""

    def __init__(self, interval: int, branch: int = 0) -> None:
        check_settings(interval, branch)
        self.interval = interval
        self.branch = branch
        self.calls = 0  # U-Net calls made through this cache
        self.full_calls = 0  # how many of them ran the whole U-Net
        self._feature: Tensor | None = None  # (B, C, h, w) entering output_blocks[-(branch + 1)]
        self._key: tuple[tuple[int, ...], torch.dtype, torch.device] | None = None  # of the x it came from
        self._age = 0  # cached calls since the last full one

    def reset(self) -> None:
        """Forget the cached feature: the next call is full."""
        self._feature, self._key, self._age = None, None, 0

    def next_is_full(self, x: Tensor) -> bool:
        """Whether a call with input `x` (B, in, H, W) would run the whole U-Net."""
        key = (tuple(x.shape), x.dtype, x.device)
        return self._feature is None or key != self._key or self._age + 1 >= self.interval

    def __call__(
        self, unet: UNetModel, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """`unet(x, timesteps, context, y)`, exactly on full calls and through the shallow path otherwise."""
        check_branch(unet, self.branch)
        n = len(unet.output_blocks)
        keep = self.branch + 1  # skip branches on the shallow path
        full = self.next_is_full(x)
        emb, context = unet.conditioning(x, timesteps, context, y)  # (B, 4 * mc), (B, T, D)
        h_in = x.to(unet.dtype)  # (B, in, H, W)
        if full:
            skips = unet.run_input_blocks(h_in, emb, context)  # all len(input_blocks) skips
            h = unet.middle_block(skips[-1], emb, context)  # (B, C_last, H / 2^(L-1), W / 2^(L-1))
            h = unet.run_output_blocks(h, skips, emb, context, stop=n - keep)  # leaves `keep` skips
            self._feature, self._key, self._age = h, (tuple(x.shape), x.dtype, x.device), 0
            self.full_calls += 1
        else:
            skips = unet.run_input_blocks(h_in, emb, context, stop=keep)  # the first `keep` skips only
            h = self._feature
            self._age += 1
        self.calls += 1
        assert h is not None
        h = unet.run_output_blocks(h, skips, emb, context, start=n - keep)  # (B, mc * mult_0, H, W)
        return unet.out(h).to(x.dtype)  # (B, out, H, W)
