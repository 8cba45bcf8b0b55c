"""Static int8 U-Net: int8 weights and int8 activations for the convolutions and linears (oneDNN, x86).

Post-training static quantization, the scheme of PyTorch's x86 quantization stack (per-channel symmetric
int8 weights, per-tensor asymmetric uint8 activations with ranges calibrated once on the model itself):

- weights: scale = max |w| / 127 per output channel, stored as int8 in the layer's own `weight` key;
- activations: each quantized layer's input range [lo, hi] is observed while the fp32 model generates a
  few images (`Calibrator`), then frozen as `input_scale` = (hi - lo) / 255 and `input_zero_point`;
- compute: oneDNN's `qconv2d_pointwise` / `qlinear_pointwise` (the kernels torch's x86 inductor lowering
  uses; VNNI `vpdpbusd` where the CPU has it, AVX2/AVX-512 otherwise) with int32 accumulation and the
  bias and dequantization fused, returning fp32. Only the layer's input is quantized (one pass over it);
  everything between the layers (GroupNorm, SiLU, GEGLU, softmax, residual adds) stays fp32.

Which layers (`quantizable`): every Conv2d except the U-Net's first (4 latent channels in), its last
(4 out) and the ResBlocks' 1x1 `skip_connection`s, and every Linear inside the SpatialTransformers except
the cross-attention keys/values, which read the text context (77 rows per prompt: no measurable time, and
the context's range is the prompt's, not the image's). The timestep/label embedding Linears see one row
per sample and stay fp32 too. The skip convolutions read the concatenation of the decoder's features and
the encoder's skip features, whose scales differ by orders of magnitude, so one per-tensor input scale
wipes out the smaller half: on the bundled model they alone took the int8 U-Net step's relative error
from 2.7% to 25% (measured by leaving out one kind of layer at a time).

Dynamic activations (`quantize_unet(..., dynamic=True)`, the default of `diffusekit convert --quantize
int8`): instead of a calibrated range, each call quantizes its input with that input's own min/max (one
more pass over it). Activation ranges of a diffusion U-Net move with the timestep and the prompt, so one
static range per layer is too wide for most calls: on the bundled model static ranges gave images at
28.6 dB PSNR against fp32 and dynamic ones 40.1 dB (bench/int8_sensitivity.py).

A quantized layer's state dict is the original's keys (`weight` now int8, `bias` fp32) plus
`weight_scale` (out,), `input_scale` () and `input_zero_point` () (`input_scale` 0: dynamic), so a
quantized U-Net saves and loads as an ordinary single-file checkpoint with a few more keys (see
`diffusekit.quantize`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from diffusekit.models.unet import SpatialTransformer, UNetModel

from .errors import AccelError

__all__ = [
    "Calibrator",
    "Int8Conv2d",
    "Int8Linear",
    "QUANT_SUFFIXES",
    "int8_unavailable",
    "candidates",
    "combine",
    "quantizable",
    "quantize_unet",
    "restore_int8_unet",
]

QUANT_SUFFIXES = (".weight_scale", ".input_scale", ".input_zero_point")  # keys a quantized layer adds


@dataclass
class Tuning:
    """Switches for the glue around the int8 kernels (bench/int8_profile.py compares them in one run).

    `alias_uint8`: hand oneDNN the quantized tensor's bytes as a uint8 view of the same storage instead of
    copying them with `int_repr()` (a full pass per layer: 0.29 s of a 10.9 s SD1.5 step at 512, one
    thread); the same bytes, so the same results. `fused_dynamic_linear`: a dynamic Linear with
    `out_features <= in_features` runs torch's `quantized::linear_dynamic` (fbgemm on x86), which finds
    the input's range and quantizes it inside the kernel, instead of min/max + quantize + oneDNN's
    `qlinear_pointwise` (the same quantization). Faster on those shapes alone (microbenchmarks), but in a
    whole SD1.5 step its kernel time grew by what the separate quantize pass lost, so it is off.
    """

    name: str = "after"
    alias_uint8: bool = True
    fused_dynamic_linear: bool = False


TUNINGS = {
    "before": Tuning("before", alias_uint8=False),
    "after": Tuning("after"),
    "fused-linear": Tuning("fused-linear", fused_dynamic_linear=True),
}
TUNING = Tuning()


def set_tuning(name: str) -> None:
    """Switch every int8 layer to the named glue variant ("before": as first shipped; "after": the
    default now; "fused-linear": "after" with `fused_dynamic_linear`)."""
    if name not in TUNINGS:
        raise AccelError(f"unknown int8 tuning {name!r}; valid: {', '.join(TUNINGS)}")
    for f in fields(Tuning):
        setattr(TUNING, f.name, getattr(TUNINGS[name], f.name))


@functools.cache
def _has_vnni() -> bool:
    """VNNI int8 dot products (fbgemm saturates int16 pairs without them: 7-bit activations then)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private, present in torch 2.x
    return bool(probe()) if probe is not None else False


def int8_unavailable() -> str | None:
    """Why static int8 cannot run here (no x86 quantized engine / oneDNN in this torch), or None."""
    if "x86" not in torch.backends.quantized.supported_engines and (
        "onednn" not in torch.backends.quantized.supported_engines
    ):
        engines = torch.backends.quantized.supported_engines
        return f"this torch build has no x86/onednn quantized engine ({engines})"
    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        return "this torch build lacks oneDNN's quantized kernels (torch.ops.onednn.qconv2d_pointwise)"
    return None


def _activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 (scale, zero point) covering [lo, hi] (widened to include 0, so 0 is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = int(min(255, max(0, round(-lo / scale))))
    return scale, zero_point


def _weight_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, fp32 scale per output channel): symmetric per-channel quantization of `w`."""
    w = w.detach().float()
    scale = (w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
    view = (-1,) + (1,) * (w.ndim - 1)
    q = torch.round(w / scale.view(view)).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Int8Layer(nn.Module):
    """Shared state of Int8Conv2d and Int8Linear: int8 weight, scales, static input qparams."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, scale: float, zp: int):
        super().__init__()
        if weight.dtype != torch.int8:
            raise AccelError(f"int8 layer: weight must be int8, got {weight.dtype}")
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("input_scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.tensor(int(zp), dtype=torch.int32))
        self._w_zp = torch.zeros(weight.shape[0], dtype=torch.int32)
        self._packed: Tensor | None = None
        self._packed_dynamic: object | None = None  # Int8Linear's fbgemm packing, see Tuning
        self._qparams = (float(scale), int(zp))
        self.dynamic = scale == 0.0  # input_scale 0 marks a layer whose input range is taken per call

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed = self._packed_dynamic = None  # repack from the loaded weight on the next call
        self._qparams = (float(self.input_scale), int(self.input_zero_point))
        self.dynamic = self._qparams[0] == 0.0

    def _input_qparams(self, x: Tensor) -> tuple[float, int]:
        """(scale, zero point) of this call's input: calibrated, or from `x`'s own range when dynamic."""
        if not self.dynamic:
            return self._qparams
        x = x.detach()
        if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(0, 2, 3, 1)  # (B, H, W, C): the same memory, dense (aminmax would copy otherwise)
        lo, hi = torch.aminmax(x.reshape(-1))
        return _activation_qparams(float(lo), float(hi))

    def _quantize_input(self, x: Tensor, scale: float, zp: int) -> Tensor:
        """uint8 values of `x` (fp32, any layout kept) at `scale` and zero point `zp`."""
        with warnings.catch_warnings():  # "quantized tensor creation is deprecated" (one fused kernel)
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_tensor(x.float(), scale, zp, torch.quint8)
        if not TUNING.alias_uint8:
            return q.int_repr()
        # the same bytes as plain uint8: a view of q's storage (which it keeps alive), no copy
        u8 = torch.empty(0, dtype=torch.uint8)
        return u8.set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


class Int8Conv2d(_Int8Layer):
    """A Conv2d with int8 weights and a statically quantized uint8 input; fp32 out (oneDNN)."""

    def __init__(self, conv: nn.Conv2d | None = None, scale: float = 1.0, zp: int = 0, **shape) -> None:
        if conv is not None:
            weight, w_scale = _weight_int8(conv.weight)
            bias = conv.bias
            shape = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        else:  # built from a file: `shape` has weight, weight_scale, bias, stride, padding, dilation, groups
            weight, w_scale, bias = shape.pop("weight"), shape.pop("weight_scale"), shape.pop("bias")
        if isinstance(shape["padding"], str):
            raise AccelError(f"int8 conv: string padding {shape['padding']!r} is not supported")
        super().__init__(weight, w_scale, bias, scale, zp)
        self.stride = list(shape["stride"])
        self.padding = list(shape["padding"])
        self.dilation = list(shape["dilation"])
        self.groups = int(shape["groups"])

    def _pack(self) -> Tensor:
        if self._packed is None:
            scale, zp = self._qparams
            scale = scale or 1.0  # a dynamic layer: the packing does not depend on the input's qparams
            w = self.weight.contiguous(memory_format=torch.channels_last)
            self._packed = torch.ops.onednn.qconv_prepack(
                w, self.weight_scale, scale, zp, self.stride, self.padding, self.dilation, self.groups, None
            )
        return self._packed

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out, H', W') fp32, channels-last
        x = x.contiguous(memory_format=torch.channels_last)
        scale, zp = self._input_qparams(x)
        qx = self._quantize_input(x, scale, zp)
        y = torch.ops.onednn.qconv2d_pointwise(
            qx, scale, zp, self._pack(), self.weight_scale, self._w_zp, self.bias, self.stride,
            self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, int8"


class Int8Linear(_Int8Layer):
    """A Linear with int8 weights and a statically quantized uint8 input; fp32 out (oneDNN)."""

    def __init__(self, linear: nn.Linear | None = None, scale: float = 1.0, zp: int = 0, **state) -> None:
        if linear is not None:
            weight, w_scale = _weight_int8(linear.weight)
            bias = linear.bias
        else:
            weight, w_scale, bias = state["weight"], state["weight_scale"], state["bias"]
        super().__init__(weight, w_scale, bias, scale, zp)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def _pack(self) -> Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight, None)
        return self._packed

    def _fused_dynamic(self) -> bool:
        """Whether this call runs `quantized::linear_dynamic` (see Tuning.fused_dynamic_linear)."""
        return TUNING.fused_dynamic_linear and self.dynamic and self.out_features <= self.in_features

    def _pack_dynamic(self) -> object:
        """The weight prepacked for `quantized::linear_dynamic` (the same int8 values and scales)."""
        if self._packed_dynamic is None:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # "quantized tensor creation is deprecated"
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                scale = self.weight_scale.double()
                qw = torch._make_per_channel_quantized_tensor(self.weight, scale, zeros, 0)
                self._packed_dynamic = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._packed_dynamic

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out) fp32
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        if self._fused_dynamic():  # range, quantization and matmul in one call (fbgemm)
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._pack_dynamic(), not _has_vnni())
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        scale, zp = self._input_qparams(x2)
        qx = self._quantize_input(x2, scale, zp)  # (M, in) uint8
        y = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zp, self._pack(), self.weight_scale, self._w_zp, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def candidates(unet: UNetModel) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer an int8 scheme could quantize: each Conv2d but the first and last,
    each Linear inside a SpatialTransformer but the cross-attention keys/values (they read the context)."""
    first, last = unet.input_blocks[0][0], unet.out[-1]
    in_transformer: set[int] = set()
    for m in unet.modules():
        if isinstance(m, SpatialTransformer):
            in_transformer.update(id(c) for c in m.modules())
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d) and m is not first and m is not last:
            yield name, m
        elif isinstance(m, nn.Linear) and id(m) in in_transformer:
            if not name.endswith(("attn2.to_k", "attn2.to_v")):
                yield name, m


def quantizable(unet: UNetModel) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer the int8 path quantizes, in `named_modules` order."""
    for name, m in candidates(unet):
        if not name.endswith("skip_connection"):
            yield name, m


LEVELS = (100.0, 99.999, 99.99, 99.9)  # the per-call percentiles a Calibrator always records
CallStats = dict[float, tuple[float, float]]  # percentile -> (low, high) of one call's input


def combine(
    calls: list[CallStats], percentile: float = 99.99, over_calls: str = "max"
) -> tuple[float, float]:
    """One (low, high) input range from a layer's per-call statistics.

    `over_calls` "max" keeps the widest range of any call; "mean" averages the calls' ranges (the range
    then fits the typical timestep, and the rare wide call saturates instead of coarsening every call).
    """
    if over_calls not in ("max", "mean"):
        raise AccelError(f"over_calls must be 'max' or 'mean', got {over_calls!r}")
    if not calls or percentile not in calls[0]:
        raise AccelError(f"no calibration statistics at percentile {percentile}")
    lows = [c[percentile][0] for c in calls]
    highs = [c[percentile][1] for c in calls]
    if over_calls == "max":
        return min(lows), max(highs)
    return sum(lows) / len(lows), sum(highs) / len(highs)


class Calibrator:
    """Observes the input range of every quantizable layer while the fp32 U-Net runs; a context manager.

    Per layer and call it records the LEVELS percentiles (and `percentile`) of the input's values, both
    sides (estimated on at most `sample` values spread through the tensor: outliers of a single pixel would
    otherwise set the scale for all); `ranges` combines the calls (`combine`). `layers` defaults to
    `quantizable(unet)`; pass `candidates(unet)` to observe every layer that could be quantized.
    """

    def __init__(
        self,
        unet: UNetModel,
        percentile: float = 99.99,
        over_calls: str = "max",
        sample: int = 1 << 18,
        layers: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise AccelError(f"calibration percentile must be in (50, 100], got {percentile}")
        if over_calls not in ("max", "mean"):
            raise AccelError(f"over_calls must be 'max' or 'mean', got {over_calls!r}")
        self.unet = unet
        self.percentile = percentile
        self.over_calls = over_calls
        self.sample = sample
        self.layers = list(quantizable(unet)) if layers is None else layers
        self.levels = tuple(sorted(set(LEVELS) | {percentile}, reverse=True))
        self.calls: dict[str, list[CallStats]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """(low, high) input range per observed layer."""
        return {n: combine(c, self.percentile, self.over_calls) for n, c in self.calls.items()}

    def _observe(self, name: str, x: Tensor) -> None:
        full = x.detach().reshape(-1).float()
        flat = full
        if flat.numel() > self.sample:
            flat = flat[:: math.ceil(flat.numel() / self.sample)]
        n = flat.numel()
        # the p-th percentile from above is the k-th largest value, k = (1 - p/100) n: the tails come from
        # one topk per side (linear time), not a sort of the sample
        ks = {p: min(n, max(1, round((1.0 - p / 100.0) * n) + 1)) for p in self.levels}
        k = max(ks.values())
        top = torch.topk(flat, k).values
        bottom = torch.topk(flat, k, largest=False).values
        stats = {p: (float(bottom[ks[p] - 1]), float(top[ks[p] - 1])) for p in self.levels}
        lo, hi = torch.aminmax(full)
        stats[100.0] = (float(lo), float(hi))  # the whole tensor's ends, not the sample's
        self.calls.setdefault(name, []).append(stats)

    def __enter__(self) -> Calibrator:
        for name, m in self.layers:
            hook = m.register_forward_pre_hook(lambda _m, args, n=name: self._observe(n, args[0]))
            self._hooks.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantize_unet(
    unet: UNetModel, ranges: dict[str, tuple[float, float]] | None = None, *, dynamic: bool = False
) -> int:
    """Replace every quantizable layer of `unet` by its int8 version.

    Static (`dynamic` False): each layer's input is quantized with its calibrated range from `ranges`.
    Dynamic: with the range of each call's own input (one min/max pass per layer and call, no
    calibration; the layer's `input_scale` is stored as 0). Returns how many layers were replaced; the
    U-Net must be fp32 (quantize before any bf16 cast).
    """
    reason = int8_unavailable()
    if reason is not None:
        raise AccelError(f"int8 is unavailable: {reason}")
    targets = list(quantizable(unet))
    if not targets:
        raise AccelError("int8: this U-Net has no float Conv2d/Linear layers to quantize (already int8?)")
    ranges = ranges or {}
    missing = [n for n, _ in targets if n not in ranges]
    if missing and not dynamic:
        raise AccelError(
            f"int8: no calibrated range for {missing[0]} ({len(missing)} layers); calibrate first"
        )
    for name, m in targets:
        scale, zp = (0.0, 0) if dynamic else _activation_qparams(*ranges[name])
        _set(unet, name, Int8Conv2d(m, scale, zp) if isinstance(m, nn.Conv2d) else Int8Linear(m, scale, zp))
    return len(targets)


def restore_int8_unet(unet: UNetModel, state: dict[str, Tensor]) -> int:
    """Swap the layers of a freshly built `unet` for int8 ones from a quantized file's U-Net `state`.

    `state` holds U-Net keys (prefix stripped): for each quantized layer its int8 `weight`, `bias` and the
    QUANT_SUFFIXES entries. The file decides which layers are int8 (whatever rule made it). Returns how
    many layers were restored.
    """
    reason = int8_unavailable()
    if reason is not None:
        raise AccelError(f"this checkpoint is int8-quantized, but int8 is unavailable: {reason}")
    count = 0
    names = [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]
    for name in names:
        try:
            m = unet.get_submodule(name)
        except AttributeError:
            raise AccelError(f"int8 checkpoint: quantized layer {name} is not part of this U-Net") from None
        if not isinstance(m, nn.Conv2d | nn.Linear):
            raise AccelError(f"int8 checkpoint: {name} is a {type(m).__name__}, not a Conv2d/Linear")
        kw = dict(
            weight=state[f"{name}.weight"], weight_scale=state[f"{name}.weight_scale"],
            bias=state.get(f"{name}.bias"),
        )  # fmt: skip
        scale, zp = float(state[f"{name}.input_scale"]), int(state[f"{name}.input_zero_point"])
        if isinstance(m, nn.Conv2d):
            layout = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            _set(unet, name, Int8Conv2d(None, scale, zp, **kw, **layout))
        else:
            _set(unet, name, Int8Linear(None, scale, zp, **kw))
        count += 1
    return count


def dequantized_weight(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """fp32 `weight` * per-output-channel scale: what an int8 layer's weight stands for."""
    return weight.float() * weight_scale.float().view((-1,) + (1,) * (weight.ndim - 1))
