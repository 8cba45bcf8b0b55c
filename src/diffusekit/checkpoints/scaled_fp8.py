"""ComfyUI's "scaled fp8" files: fp8 (e4m3fn) weights with a per-tensor scale, dequantized at load.

Two spellings exist (ComfyUI ``comfy/utils.py convert_old_quants`` turns the first into the second):

- the original one (e.g. ``sd3.5_large_fp8_scaled.safetensors``, ``t5xxl_fp8_e4m3fn_scaled.safetensors``):
  a marker tensor ``<component prefix>scaled_fp8`` and, per quantized Linear, ``<layer>.scale_weight``
  (fp32, one value) and optionally ``<layer>.scale_input`` (the activation scale of fp8 matmuls);
- the newer one: ``<layer>.weight_scale`` and ``<layer>.input_scale``, with ``<layer>.comfy_quant`` (JSON
  as uint8 bytes, ``{"format": "float8_e4m3fn", ...}``) naming the format.

The weight's value is ``weight.float() * scale``. The input scale only rescales activations around an fp8
matmul (it cancels out in the product), so a model that computes in bf16/fp32 ignores it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .single_file import CheckpointError

WEIGHT_SCALES = (".scale_weight", ".weight_scale")
INPUT_SCALES = (".scale_input", ".input_scale")
FORMAT_KEY = ".comfy_quant"
MARKER = "scaled_fp8"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def is_quant_key(key: str) -> bool:
    """Whether `key` is a scale, format or marker entry of a scaled-fp8 file (not a model weight)."""
    return key.endswith(WEIGHT_SCALES + INPUT_SCALES + (FORMAT_KEY,)) or key.rsplit(".", 1)[-1] == MARKER


def has_scaled_weights(keys: Iterable[str]) -> bool:
    """Whether a state dict holds scaled-fp8 weights (a weight-scale entry)."""
    return any(k.endswith(WEIGHT_SCALES) for k in keys)


def without_quant_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights of `sd` (scales, formats and markers left out): what shape-based detection reads."""
    return {k: v for k, v in sd.items() if not is_quant_key(k)}


def carrier_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype the file keeps its unquantized floats in (most elements), float32 if all are fp8."""
    counts: Counter[torch.dtype] = Counter()
    for key, t in sd.items():
        if t.is_floating_point() and t.element_size() > 1 and not is_quant_key(key):
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _format(value: torch.Tensor, key: str, name: str) -> str:
    try:
        conf = json.loads(bytes(value.to(torch.uint8).tolist()).decode("utf-8"))
        fmt = conf.get("format") if isinstance(conf, dict) else None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{name}: {key} is not a JSON quantization record ({e})") from None
    if fmt not in FP8_FORMATS:
        raise CheckpointError(
            f"{name}: {key} uses the quantization format {fmt!r}, which diffusekit does not read; "
            f"readable: {', '.join(FP8_FORMATS)} (scaled fp8). Use a bf16/fp16 or scaled-fp8 file"
        )
    return fmt


def dequantize_scaled_fp8(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, *, name: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """`sd` with every scaled weight replaced by ``weight * scale`` in `dtype` (default: the file's carrier
    dtype) and the scale, format and marker entries removed; a file without scales comes back as is."""
    if not has_scaled_weights(sd):
        return dict(sd)
    dtype = dtype or carrier_dtype(sd)
    for key, value in sd.items():
        if key.endswith(FORMAT_KEY):
            _format(value, key, name)
    out = {k: v for k, v in sd.items() if not is_quant_key(k)}
    for key, scale in sd.items():
        if not key.endswith(WEIGHT_SCALES):
            continue
        layer = key[: key.rindex(".")]
        weight = out.get(layer + ".weight")
        if weight is None:
            raise CheckpointError(f"{name}: {key} scales a weight the file does not have ({layer}.weight)")
        scale = scale.float()
        if scale.numel() > 1:  # per output channel: (out,) or (out, 1, ...)
            if scale.numel() != weight.shape[0]:
                raise CheckpointError(
                    f"{name}: {key} has {scale.numel()} values for a weight of shape {tuple(weight.shape)}; "
                    "valid: one value, or one per output channel"
                )
            scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
        out[layer + ".weight"] = (weight.float() * scale).to(dtype)  # (out, in, ...)
    return out
