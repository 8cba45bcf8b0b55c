"""Compute precision and the inference fast path: which dtype to run in, and how to lay a model out for it.

`choose_path` turns the user's choice ("auto", "fp32", "fp32-fast", "bf16", "fp16", "int8") into a
`ComputePath` (a name, a dtype and why) for a device, a model and the CPU's features (`cpu_features`, one
probe, replaceable in tests); `resolve_precision` is its dtype. `prepare` casts a model and applies the
layout choices that only pay off outside the fp32 parity path (channels-last convolutions, sliced
attention on CPU in bf16). Everything acts on the objects passed, except `retain_freed_memory`, which sets
the C allocator of the process (there is only one). The paths on CPU:

- "fp32": the bit-for-bit parity path (default layout, SDPA attention);
- "fp32-fast": fp32 with channels-last convolutions (same math, oneDNN's blocked kernels without a
  reorder per call); the relative error against "fp32" is bounded by tests, not zero;
- "bf16": channels-last, sliced attention, bf16 weights and activations (CPUs with native bf16);
- "int8": a checkpoint quantized by `diffusekit convert --quantize int8` (int8 weights and activations
  for the U-Net's convolutions and linears, accel/int8_static.py), the rest as "fp32-fast";
- "openvino" / "openvino-int8": the U-Net converted to an OpenVINO graph (fp32 math, or nncf int8),
  cached on disk (accel/openvino_backend.py); the rest as "fp32". Needs the openvino package.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from dataclasses import astuple, dataclass

import torch
from torch import nn

from .precisions import OPENVINO_PRECISIONS, PRECISIONS

_DTYPES = {
    "fp32": torch.float32,
    "fp32-fast": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.float32,  # everything that is not an int8 layer computes in fp32
    "openvino": torch.float32,  # what stays in PyTorch (text encoder, VAE) runs the fp32 parity path
    "openvino-int8": torch.float32,
}

# Whether "auto" takes "fp32-fast" instead of "fp32" on a CPU without native bf16. Only where an
# interleaved measurement (bench/cpu_paths.py) showed it faster: see docs/guides/cpu-paths.md.
AUTO_FP32_FAST = False

# Below this many U-Net parameters a model is too small for bf16 matmuls to beat fp32 on a CPU (the
# per-op overhead and casts dominate), so "auto" keeps fp32 there, which is also the parity path.
AUTO_BF16_MIN_UNET_PARAMS = 200_000_000
# Whether "auto" takes the OpenVINO backend on a CPU without native bf16. Off: in the latest quiet emulated
# Ice Lake run its fp32 graph was level with PyTorch fp32 (12.61 s against 12.43 s per step at 512), while
# it costs a first-load conversion, memory, and batched jobs that are no longer bit-identical to solo ones
# (docs/guides/cpu-paths.md). `--precision openvino` / `openvino-int8` choose it by name.
AUTO_OPENVINO = False
# The same floor for the OpenVINO backend: below it the first load's conversion costs more than it saves.
AUTO_OPENVINO_MIN_UNET_PARAMS = AUTO_BF16_MIN_UNET_PARAMS


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


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU computes natively, as far as the paths care."""

    avx2: bool
    avx512: bool
    vnni: bool  # AVX512-VNNI or AVX-VNNI int8 dot products
    bf16: bool  # AVX512-BF16 or AMX bf16 dot products

    @property
    def kind(self) -> str:
        """A short description, e.g. "AVX-512, VNNI, native bf16"."""
        isa = "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "no AVX2"
        return ", ".join([isa, *(["VNNI"] if self.vnni else []), "native bf16" if self.bf16 else "no bf16"])


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA) -> what it leaves usable.
# A cap below AVX512_CORE_BF16 means torch's oneDNN kernels compute no bf16 natively, whatever the CPU.
_ONEDNN_CAPS = {
    "SSE41": (False, False, False, False),  # (avx2, avx512, vnni, bf16)
    "AVX": (False, False, False, False),
    "AVX2": (True, False, False, False),
    "AVX2_VNNI": (True, False, True, False),
    "AVX512_CORE": (True, True, False, False),
    "AVX512_CORE_VNNI": (True, True, True, False),
}


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped to by the environment (upper case), or None."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip().upper() != "ALL" else None


def cpu_features() -> CpuFeatures:
    """This CPU's features from torch.cpu's probes (private, in torch 2.x; an absent one reads False),
    lowered to what a oneDNN ISA cap in the environment (`onednn_isa_cap`) leaves usable."""

    def probe(name: str) -> bool:
        return bool(getattr(torch.cpu, name, lambda: False)())

    bf16 = probe("_is_avx512_bf16_supported") or probe("_is_amx_tile_supported")
    found = CpuFeatures(
        avx2=probe("_is_avx2_supported"),
        avx512=probe("_is_avx512_supported"),
        vnni=probe("_is_vnni_supported") or probe("_is_avx512_vnni_supported"),
        bf16=bf16,
    )
    cap = _ONEDNN_CAPS.get(onednn_isa_cap() or "")
    if cap is None:
        return found
    return CpuFeatures(*(have and allowed for have, allowed in zip(astuple(found), cap, strict=True)))


def openvino_missing(int8: bool = False) -> str | None:
    """Why the OpenVINO backend cannot run here (a package is not installed), or None; imports nothing."""
    if importlib.util.find_spec("openvino") is None:
        return 'the openvino package is not installed (pip install "diffusekit[openvino]")'
    if int8 and importlib.util.find_spec("nncf") is None:
        return 'openvino-int8 also needs nncf (pip install "diffusekit[openvino]")'
    return None


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 dot products natively (AVX512-BF16 or AMX)."""
    return cpu_features().bf16


@dataclass(frozen=True)
class ComputePath:
    """The path a model runs on: its name (one of PRECISIONS but "auto"), compute dtype, and why."""

    name: str
    dtype: torch.dtype
    reason: str


def choose_path(
    precision: str,
    device: torch.device | str,
    unet_params: int | None = None,
    *,
    quantized: bool = False,
    features: CpuFeatures | None = None,
    openvino: bool = True,
) -> ComputePath:
    """The compute path for `precision` on `device`, for a model whose U-Net has `unet_params` parameters.

    "auto": int8 for an int8-quantized checkpoint; fp16 on CUDA; bf16 on a CPU with native bf16 for
    SD-size models; on other CPUs fp32 (or, where AUTO_OPENVINO / AUTO_FP32_FAST say they measured
    faster, the OpenVINO backend for SD-size U-Nets where openvino is installed, or fp32-fast; `openvino`
    False: a model the backend does not apply to, e.g. an MMDiT). "fp32" is the bit-for-bit parity path;
    the others are honoured where the device can run them. `features` defaults to `cpu_features()`.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cpu = device.type == "cpu"
    if quantized and precision not in ("auto", "int8"):
        raise PrecisionError(
            f"this checkpoint is int8-quantized; it runs with --precision int8 (or auto), not {precision}. "
            "Use the original checkpoint for other precisions"
        )
    if precision == "int8":
        if not cpu:
            raise PrecisionError("int8 runs on CPU only (oneDNN kernels); use fp16/bf16 on a GPU")
        if not quantized:
            raise PrecisionError(
                "--precision int8 needs an int8-quantized checkpoint: make one once with "
                "`diffusekit convert MODEL OUT.safetensors --quantize int8`, then generate with OUT"
            )
        return ComputePath("int8", torch.float32, "asked for; the checkpoint is int8-quantized")
    if precision in OPENVINO_PRECISIONS:
        if not cpu:
            raise PrecisionError(f"--precision {precision} runs on the CPU only; use fp16/bf16 on a GPU")
        if not openvino:
            raise PrecisionError(f"--precision {precision} is a U-Net path; this model has no U-Net")
        why = openvino_missing(int8=precision == "openvino-int8")
        if why is not None:
            raise PrecisionError(f"--precision {precision}: {why}; or use --precision fp32 (or auto)")
        return ComputePath(precision, torch.float32, "asked for")
    if precision in ("fp16", "bf16", "fp32", "fp32-fast"):
        if precision == "fp16" and cpu:
            raise PrecisionError(
                "fp16 compute is not supported on CPU (no fast fp16 kernels); use bf16 or fp32 there, "
                "or auto to let diffusekit choose"
            )
        return ComputePath(precision, _DTYPES[precision], "asked for")
    # auto
    if quantized:
        return ComputePath("int8", torch.float32, "auto: the checkpoint is int8-quantized")
    if not cpu:
        return ComputePath("fp16", torch.float16, f"auto: {device.type} device")
    features = features or cpu_features()
    if features.bf16:
        big = unet_params is None or unet_params >= AUTO_BF16_MIN_UNET_PARAMS
        if big:
            return ComputePath("bf16", torch.bfloat16, f"auto: the CPU has native bf16 ({features.kind})")
        small = f"auto: U-Net of {unet_params:,} parameters, below {AUTO_BF16_MIN_UNET_PARAMS:,} for bf16"
        return ComputePath("fp32", torch.float32, small)
    no_bf16 = f"auto: the CPU has no native bf16 ({features.kind})"
    big = unet_params is not None and unet_params >= AUTO_OPENVINO_MIN_UNET_PARAMS
    missing = openvino_missing() if openvino and big and AUTO_OPENVINO else "not used"
    if missing is None:
        faster = "OpenVINO fp32 U-Net (measured faster than PyTorch fp32 there)"
        return ComputePath("openvino", torch.float32, f"{no_bf16}; {faster}")
    why = "" if not (openvino and big and AUTO_OPENVINO) else f"; OpenVINO unavailable: {missing}"
    if AUTO_OPENVINO and not big and unet_params is not None and openvino:
        why = f"; U-Net of {unet_params:,} parameters, below {AUTO_OPENVINO_MIN_UNET_PARAMS:,} for OpenVINO"
    if AUTO_FP32_FAST:
        return ComputePath("fp32-fast", torch.float32, no_bf16 + why)
    return ComputePath("fp32", torch.float32, f"{no_bf16}; fp32 parity path{why}")


def load_path(
    precision: str,
    device: torch.device | str,
    denoiser_params: int | None,
    *,
    dtype: torch.dtype | None = None,
    quantized: bool = False,
    openvino: bool = True,
) -> ComputePath:
    """The compute path a pipeline's ``from_file`` runs a model on: an explicit `dtype` wins, else
    `choose_path` for `precision` and the size of the model's denoiser (U-Net or MMDiT; `openvino`
    False for a denoiser the OpenVINO backend does not convert)."""
    if dtype is not None:
        return ComputePath(str(dtype).removeprefix("torch."), dtype, "dtype given")
    return choose_path(precision, device, denoiser_params, quantized=quantized, openvino=openvino)


def resolve_precision(
    precision: str, device: torch.device | str, unet_params: int | None = None
) -> torch.dtype:
    """The compute dtype of `choose_path(precision, device, unet_params)` (an unquantized model)."""
    return choose_path(precision, device, unet_params).dtype


@dataclass(frozen=True)
class FastPath:
    """What `prepare` changed; kept on the pipeline so it can lay inputs out the same way."""

    dtype: torch.dtype
    channels_last: bool
    attention: str  # the U-Net's attention kernel, see models/attention.py
    retains_freed_memory: bool = False  # see retain_freed_memory
    path: str = ""  # the ComputePath name it was prepared for ("" when prepared by dtype alone)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) U-Net or VAE input in the compute dtype and memory format they were prepared for."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def prepare(
    model: nn.Module, dtype: torch.dtype, device: torch.device | str, path: str | None = None
) -> FastPath:
    """Cast `model` in place to `dtype` on `device` and lay it out for inference there.

    fp32 keeps the default layout (the parity path) unless `path` is "fp32-fast" or "int8", which lay
    convolutions out channels-last and keep SDPA attention (in fp32 the sliced kernel measured no
    faster than SDPA, see docs/guides/cpu-paths.md). Otherwise convolutions run channels-last, which
    lets oneDNN skip reordering every activation; the cast writes 4-D weights in that layout directly,
    in the same pass. On CPU in bf16, attention runs sliced (a bf16 matmul per head and slice of
    queries), which beats the fused CPU SDPA kernel there; elsewhere it stays SDPA. On CPU, at any
    precision, the process's allocator is told to keep freed memory (`retain_freed_memory`).
    """
    device = torch.device(device)
    name = path or ""
    fast = dtype != torch.float32 or name in ("fp32-fast", "int8")
    kernel = "sliced" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"
    retains = device.type == "cpu" and retain_freed_memory()
    to_compute(model, device, dtype, torch.channels_last if fast else None)
    if not fast:
        return FastPath(dtype, channels_last=False, attention="sdpa", retains_freed_memory=retains, path=name)
    model.to(memory_format=torch.channels_last)  # weights that needed no cast (a bf16 file, say)
    for module in model.modules():
        if hasattr(module, "kernel"):
            module.kernel = kernel
    return FastPath(dtype, channels_last=True, attention=kernel, retains_freed_memory=retains, path=name)


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
