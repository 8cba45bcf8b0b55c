"""Opt-in inference accelerators: DeepCache, token merging, dynamic int8 weights and torch.compile.

Each lives in its own module and acts only on the objects it is given. `Accel` is the one switchboard the
pipeline and the CLI pass around; every field's default is "off", so `Accel()` changes nothing.

- `deepcache_interval` (deepcache.py): deep U-Net features reused for `interval - 1` of every
  `interval` U-Net calls; `deepcache_branch` picks how shallow the cached path is.
- `tome_ratio` (tome.py): a share of the top-level tokens merged before self-attention.
- `int8` (int8.py): the U-Net's transformer Linears with int8 weights, activations quantized per call.
- `compile` (compile.py): inductor-compiled U-Net stages; same math, a slow first call.

Model-level ones (int8, tome, compile) are applied once by `apply_accel` after `runtime.prepare`;
DeepCache is per sampler run: `Accel.deepcache()` makes a fresh cache object for each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .deepcache import DeepCache, check_settings
from .errors import AccelError
from .tome import MAX_TOME_RATIO

__all__ = ["Accel", "AccelError", "DeepCache", "apply_accel"]


@dataclass(frozen=True)
class Accel:
    """Which accelerators a pipeline uses; the defaults leave the model and its outputs untouched."""

    deepcache_interval: int = 1  # full U-Net every N calls, cached deep features in between; 1 = off
    deepcache_branch: int = 0  # shallow path: the first/last branch+1 input/output blocks
    tome_ratio: float = 0.0  # share of top-level tokens merged before self-attention; 0 = off
    int8: bool = False  # dynamic int8 U-Net Linear layers (fbgemm, VNNI on x86)
    compile: bool = False  # torch.compile (inductor) of every U-Net stage

    def __post_init__(self) -> None:
        check_settings(self.deepcache_interval, self.deepcache_branch)
        if not isinstance(self.tome_ratio, int | float) or isinstance(self.tome_ratio, bool):
            raise AccelError(f"tome_ratio must be a number in [0, {MAX_TOME_RATIO}], got {self.tome_ratio!r}")
        if not 0.0 <= self.tome_ratio <= MAX_TOME_RATIO:
            raise AccelError(
                f"tome_ratio must be within [0, {MAX_TOME_RATIO}] (0 = off; at most the 3 of every 4 tokens "
                f"that are not merge destinations), got {self.tome_ratio}"
            )
        for name in ("int8", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise AccelError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def active(self) -> bool:
        """True when any accelerator is on."""
        return self != Accel()

    def deepcache(self) -> DeepCache | None:
        """A fresh DeepCache for one sampler run, or None when DeepCache is off."""
        if self.deepcache_interval == 1:
            return None
        return DeepCache(self.deepcache_interval, self.deepcache_branch)

    def infotext(self) -> dict[str, Any]:
        """The infotext fields recording the accelerators in use (A1111's key for ToMe)."""
        out: dict[str, Any] = {}
        if self.tome_ratio > 0:
            out["Token merging ratio"] = self.tome_ratio
        if self.deepcache_interval > 1:
            out["DeepCache interval"] = self.deepcache_interval
            out["DeepCache branch"] = self.deepcache_branch
        if self.int8:
            out["Quantization"] = "int8-dynamic"
        if self.compile:
            out["Compile"] = "inductor"
        return out


def apply_accel(model: nn.Module, accel: Accel) -> None:
    """Apply the model-level accelerators to a prepared `StableDiffusion` in place: int8, ToMe, compile.

    Order matters: int8 replaces Linear modules before compile traces them, and ToMe patches the
    transformer blocks that compile then traces. DeepCache is not applied here (see `Accel.deepcache`).
    """
    unet = model.unet
    if accel.deepcache_interval > 1:
        from .deepcache import check_branch

        check_branch(unet, accel.deepcache_branch)
    if accel.int8:
        from .int8 import quantize_linears

        quantize_linears(unet)
    if accel.tome_ratio > 0:
        from .tome import apply_tome

        apply_tome(unet, accel.tome_ratio)
    if accel.compile:
        from .compile import compile_unet

        compile_unet(unet)
