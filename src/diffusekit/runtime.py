"""Compute precision and the inference fast path: which dtype to run in, and how to lay a model out for it.

`resolve_precision` turns the user's choice ("auto", "fp32", "bf16", "fp16") into a dtype for a device and
model; `prepare` casts a model and applies the layout choices that only pay off outside the fp32 parity
path (channels-last convolutions, sliced attention on CPU in bf16). Everything acts on the objects passed,
except `retain_freed_memory`, which sets the C allocator of the process (there is only one).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Below this many U-Net parameters a model is too small for bf16 matmuls to beat fp32 on a CPU (the
# per-op overhead and casts dominate), so "auto" keeps fp32 there, which is also the parity path.
AUTO_BF16_MIN_UNET_PARAMS = 200_000_000


# glibc's mallopt parameters (malloc.h) and the block size below which freed memory is kept for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAIN_BELOW_BYTES = 1 << 30


class PrecisionError(ValueError):
    """An unknown precision name, or one the device cannot run."""


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str) -> torch.device:
    """The torch device for a `--device` value: "auto" is CUDA where PyTorch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this PyTorch sees no CUDA GPU; use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 dot products natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (private)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(
    precision: str, device: torch.device | str, unet_params: int | None = None
) -> torch.dtype:
    """The compute dtype for `precision` on `device`, for a model whose U-Net has `unet_params` parameters.

    "auto": fp16 on CUDA; bf16 on a CPU with native bf16 for SD-size models; fp32 otherwise.
    "fp32" is the bit-for-bit parity path; "bf16"/"fp16" are honoured where the device can run them.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            big = unet_params is None or unet_params >= AUTO_BF16_MIN_UNET_PARAMS
            return torch.bfloat16 if big else torch.float32
        return torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise PrecisionError(
            "fp16 compute is not supported on CPU (no fast fp16 kernels); use bf16 or fp32 there, "
            "or auto to let diffusekit choose"
        )
    return _DTYPES[precision]


@dataclass(frozen=True)
class FastPath:
    """What `prepare` changed; kept on the pipeline so it can lay inputs out the same way."""

    dtype: torch.dtype
    channels_last: bool
    attention: str  # the U-Net's attention kernel, see models/attention.py
    retains_freed_memory: bool = False  # see retain_freed_memory

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) U-Net or VAE input in the compute dtype and memory format they were prepared for."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def prepare(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> FastPath:
    """Cast `model` in place to `dtype` on `device` and lay it out for inference there.

    fp32 keeps the default layout (the parity path). Otherwise convolutions run channels-last, which
    lets oneDNN skip reordering every activation; the cast writes 4-D weights in that layout directly,
    in the same pass. On CPU in bf16, attention runs sliced (a bf16 matmul per head and slice of
    queries), which beats the fused CPU SDPA kernel there; elsewhere it stays SDPA. On CPU, at any
    precision, the process's allocator is told to keep freed memory (`retain_freed_memory`).
    """
    device = torch.device(device)
    fast = dtype != torch.float32
    kernel = "sliced" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"
    retains = device.type == "cpu" and retain_freed_memory()
    to_compute(model, device, dtype, torch.channels_last if fast else None)
    if not fast:
        return FastPath(dtype, channels_last=False, attention="sdpa", retains_freed_memory=retains)
    model.to(memory_format=torch.channels_last)  # weights that needed no cast (a bf16 file, say)
    for module in model.modules():
        if hasattr(module, "kernel"):
            module.kernel = kernel
    return FastPath(dtype, channels_last=True, attention=kernel, retains_freed_memory=retains)


def retain_freed_memory() -> bool:
    """Make the process's C allocator keep freed blocks below 1 GiB for reuse; True where it took effect.

    glibc hands every block above its mmap threshold (128 KiB to 32 MiB, adjusted on the fly) back to the
    kernel on free, and trims the heap's free top, so each U-Net step maps and zero-fills its activations
    afresh: about 120,000 page faults (~470 MiB) per SD1.5 CFG step at 512, 10-15% of the step's time.
    With the threshold at 1 GiB and no trimming, a step reuses the previous step's memory: the process
    keeps its peak resident between jobs (what it needs for the next one anyway) instead of shrinking.
    Allocator tuning of the same kind is why AUTOMATIC1111 preloads tcmalloc. Process-wide by nature, and
    idempotent; a no-op (False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, RETAIN_BELOW_BYTES) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def to_compute(
    model: nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    memory_format: torch.memory_format | None = None,
) -> nn.Module:
    """Move/cast `model` in place to `device` and `dtype`; tensors already there are kept (a memory-mapped
    checkpoint in the compute dtype stays mapped), a cast releases the mapped pages it read and writes
    4-D weights in `memory_format` when given."""
    from .checkpoints.single_file import cast_floats

    state = model.state_dict(keep_vars=True)
    if any(t.is_floating_point() and t.dtype != dtype for t in state.values()):
        detached = {k: t.detach() for k, t in state.items()}
        cast = cast_floats(detached, dtype, release_mapped=True, memory_format=memory_format)
        model.load_state_dict(cast, strict=True, assign=True)
    return model.to(device, dtype)  # non-persistent buffers; a no-op for what is already in place
