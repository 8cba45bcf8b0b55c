"""Predict a generation's peak memory before running it, and refuse with a message instead of dying.

The estimate is what is resident now (the loaded weights and the runtime) plus the larger of the U-Net's
and the VAE decode's activations. The activation formulas count the tensors alive at once and were
calibrated against measured peak RSS (`bench/memory_estimate.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .models.configs import ModelConfig
from .models.vae_chunked import DEFAULT_STRIP_BYTES, decode_peak_bytes

# Resident size of a Python process with torch and diffusekit imported and nothing loaded (measured on
# Linux x86-64 with torch 2.13 CPU: 300-330 MiB); used only when the live RSS cannot be read.
RUNTIME_BYTES = 320 * 2**20
UNET_WORKING_PLANES = 40  # per CFG U-Net call, in planes of the widest level: see unet_activation_bytes


class MemoryBudgetError(ValueError):
    """The requested size/batch would not fit; the message says how much and what would fit."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: resident before the run (weights + runtime), U-Net activations (CFG batch), VAE decode."""

    resident: int
    unet: int
    vae: int
    vae_chunked: bool = False

    @property
    def activations(self) -> int:
        return max(self.unet, self.vae)

    @property
    def peak(self) -> int:
        return self.resident + self.activations


def unet_activation_bytes(cfg: ModelConfig, width: int, height: int, batch: int, dtype_bytes: int) -> int:
    """One CFG U-Net call (2 x batch): the skips kept for the decoder plus the widest level's working set.

    The working set is counted in planes of the widest level (its channels times its pixels). A
    transformer block holds its input, norm output, q/k/v, attention output, reshaped copies, the GEGLU
    projection (8 planes), GELU and product (4 each) and the residual sums; with the allocator's free
    lists that came to 40 planes when measured (SD1.5, bf16, 512/768, batch 1-2: within 7%,
    `bench/memory_estimate.py`).
    """
    u = cfg.unet
    down = cfg.vae.downscale
    hw = (width // down) * (height // down)
    skips = 0
    for level, mult in enumerate(u.channel_mult):
        skips += (u.num_res_blocks + 1) * u.model_channels * mult * hw // 4**level
    widest = max(u.model_channels * m * hw // 4**lvl for lvl, m in enumerate(u.channel_mult))
    return 2 * batch * (skips + UNET_WORKING_PLANES * widest) * dtype_bytes


def estimate(
    cfg: ModelConfig,
    width: int,
    height: int,
    batch: int,
    *,
    resident: int,
    dtype_bytes: int = 4,
    vae_chunked: bool = False,
    strip_bytes: int = DEFAULT_STRIP_BYTES,
) -> MemoryEstimate:
    """Peak memory for generating `batch` images at width x height (images are decoded one at a time)."""
    vae = decode_peak_bytes(cfg.vae, width, height, dtype_bytes, chunked=vae_chunked, strip_bytes=strip_bytes)
    return MemoryEstimate(
        resident=resident,
        unet=unet_activation_bytes(cfg, width, height, batch, dtype_bytes),
        vae=vae,
        vae_chunked=vae_chunked,
    )


def proc_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    """A kB field of a Linux /proc file (VmRSS, VmHWM, RssAnon, MemAvailable...) in bytes; None elsewhere."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_mib(field: str) -> float:
    """`proc_bytes(field)` of this process in MiB; NaN where the field is missing (for benchmark tables)."""
    value = proc_bytes(field)
    return float("nan") if value is None else value / 2**20


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    return proc_bytes("MemAvailable", "/proc/meminfo")


def resident_bytes(weight_bytes: int) -> int:
    """This process's resident size now (Linux), else the weights plus a typical runtime."""
    rss = proc_bytes("VmRSS")
    return rss if rss is not None else weight_bytes + RUNTIME_BYTES


LIMIT_ENV = "DIFFUSEKIT_MEMORY_LIMIT_MB"


def env_limit_bytes() -> int | None:
    """The memory limit set by $DIFFUSEKIT_MEMORY_LIMIT_MB (a whole number of MiB above 0), else None."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        mib = int(text)
    except ValueError:
        mib = 0
    if mib <= 0:
        valid = "a whole number of MiB above 0, e.g. 4096"
        raise MemoryBudgetError(f"{LIMIT_ENV}={text!r} is invalid; valid: {valid}")
    return mib * 2**20


def check_fits(est: MemoryEstimate, *, limit: int | None = None, what: str = "this generation") -> None:
    """Raise MemoryBudgetError if the activations (weights are already loaded) exceed `limit` bytes."""
    if limit is None:
        limit = env_limit_bytes()
    if limit is None:
        limit = available_bytes()
    if limit is None:
        return
    if est.activations > limit:
        raise MemoryBudgetError(
            f"{what} needs about {est.activations / 2**30:.1f} GiB for activations but only "
            f"{limit / 2**30:.1f} GiB is available; lower width/height or batch_size"
        )
