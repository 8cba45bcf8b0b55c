"""Predict a generation's peak memory before running it, and refuse with a message instead of dying."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .models.configs import ModelConfig


class MemoryBudgetError(ValueError):
    """The requested size/batch would not fit; the message says how much and what would fit."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: weights resident, U-Net activations (CFG batch), VAE decode of one image, and their peak."""

    weights: int
    unet: int
    vae_decode: int

    @property
    def peak(self) -> int:
        return self.weights + max(self.unet, self.vae_decode)


def unet_activation_bytes(cfg: ModelConfig, width: int, height: int, batch: int, dtype_bytes: int) -> int:
    """Skip connections kept for the decoder plus the working set of the widest level (CFG doubles batch)."""
    u = cfg.unet
    down = cfg.vae.downscale
    hw = (width // down) * (height // down)
    skips = 0
    for level, mult in enumerate(u.channel_mult):
        skips += (u.num_res_blocks + 1) * u.model_channels * mult * hw // 4**level
    widest = max(u.model_channels * m * hw // 4**lvl for lvl, m in enumerate(u.channel_mult))
    # working set: a res block's norm/act/conv temporaries plus a transformer's GEGLU (8x channels)
    working = 14 * widest
    return batch * 2 * (skips + working) * dtype_bytes


def vae_decode_bytes(cfg: ModelConfig, width: int, height: int, dtype_bytes: int) -> int:
    """Decoding one image: the last up levels run at full resolution with ch*mult channels."""
    v = cfg.vae
    full_res_channels = v.ch * max(v.ch_mult[:2])
    # input, norm, activation, conv output and shortcut of a res block alive at once
    return 5 * full_res_channels * width * height * dtype_bytes


def estimate(
    cfg: ModelConfig, width: int, height: int, batch: int, *, weight_bytes: int, dtype_bytes: int = 4
) -> MemoryEstimate:
    """Peak memory for generating `batch` images at width x height (images are decoded one at a time)."""
    return MemoryEstimate(
        weights=weight_bytes,
        unet=unet_activation_bytes(cfg, width, height, batch, dtype_bytes),
        vae_decode=vae_decode_bytes(cfg, width, height, dtype_bytes),
    )


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(est: MemoryEstimate, *, limit: int | None = None, what: str = "this generation") -> None:
    """Raise MemoryBudgetError if the activations (weights are already loaded) exceed `limit` bytes."""
    env = os.environ.get("DIFFUSEKIT_MEMORY_LIMIT_MB")
    if limit is None and env:
        limit = int(env) * 2**20
    if limit is None:
        limit = available_bytes()
    if limit is None:
        return
    need = max(est.unet, est.vae_decode)
    if need > limit:
        raise MemoryBudgetError(
            f"{what} needs about {need / 2**30:.1f} GiB for activations but only {limit / 2**30:.1f} GiB is "
            "available; lower width/height or batch_size"
        )
