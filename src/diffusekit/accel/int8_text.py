"""Int8 text encoders: the attention and MLP linears of CLIP (transformers layout) and OpenCLIP in int8.

The same scheme as the U-Net's int8 layers (accel/int8_static.py): int8 weights, symmetric per output
channel, and uint8 activations quantized per call with the call's own range (dynamic; a text encoder runs
once per prompt, so there is nothing to calibrate on), oneDNN's `qlinear_pointwise` with the bias and the
dequantization fused, fp32 out. Per transformer block, quantized:

- CLIP (SD1, SDXL's first encoder, transformers keys): `self_attn.q_proj/k_proj/v_proj/out_proj`,
  `mlp.fc1`, `mlp.fc2`;
- OpenCLIP (SD2's ViT-H, SDXL's bigG, open_clip keys): the packed `attn.in_proj` (q, k and v in one
  (3W, W) matrix), `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`.

Embeddings, LayerNorms, the attention itself and the pooled projection stay fp32.

Keys: an int8 linear keeps its module path's `weight` (int8) and `bias` plus the QUANT_SUFFIXES entries,
as in the U-Net. OpenCLIP's packed in-projection has no module of its own in the original checkpoint
(its tensors are the attention's `in_proj_weight` / `in_proj_bias`); quantized, it is stored under the
`attn.in_proj` call's path (`attn.in_proj.weight`, `attn.in_proj.bias`, ...), and `packed_float_keys`
maps those back to the original names when a model is built from the file.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from diffusekit.models.clip import CLIPTextModel, OpenCLIPTextModel

from .errors import AccelError
from .int8_static import Int8Linear, int8_unavailable

__all__ = [
    "Int8InProjection",
    "PACKED_SUFFIX",
    "packed_float_keys",
    "quantize_text_encoder",
    "restore_int8_text_encoder",
    "text_quantizable",
]

PACKED_SUFFIX = "attn.in_proj"  # OpenCLIP's packed q/k/v in-projection call (no module in the checkpoint)
_HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2")  # fmt: skip
_OPENCLIP_LINEARS = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class Int8InProjection(Int8Linear):
    """OpenCLIP's packed q/k/v in-projection in int8: called as `in_proj(x, weight, bias)`, the float
    `weight` and `bias` arguments (None once quantized) are ignored."""

    def forward(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        return super().forward(x)  # (B, T, W) -> (B, T, 3W)


def text_quantizable(encoder: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every layer the int8 path quantizes in a CLIP/OpenCLIP text encoder. For the
    packed in-projection the module is the `attn.in_proj` call (its tensors live on the attention)."""
    if isinstance(encoder, CLIPTextModel):
        for i in range(len(encoder.text_model.encoder.layers)):
            for leaf in _HF_LINEARS:
                name = f"text_model.encoder.layers.{i}.{leaf}"
                m = encoder.get_submodule(name)
                if isinstance(m, nn.Linear):
                    yield name, m
    elif isinstance(encoder, OpenCLIPTextModel):
        for i in range(len(encoder.transformer.resblocks)):
            block = f"transformer.resblocks.{i}"
            attn = encoder.get_submodule(f"{block}.attn")
            if isinstance(attn.in_proj_weight, Tensor):
                yield f"{block}.{PACKED_SUFFIX}", attn.in_proj
            for leaf in _OPENCLIP_LINEARS:
                m = encoder.get_submodule(f"{block}.{leaf}")
                if isinstance(m, nn.Linear):
                    yield f"{block}.{leaf}", m
    else:
        raise AccelError(f"int8: no text encoder int8 scheme for {type(encoder).__name__}")


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _drop_packed_floats(encoder: nn.Module, name: str) -> None:
    """Unregister the attention's float in_proj_weight/in_proj_bias (the int8 call holds them now)."""
    attn = encoder.get_submodule(name.rpartition(".")[0])
    attn.register_parameter("in_proj_weight", None)
    attn.register_parameter("in_proj_bias", None)


def quantize_text_encoder(encoder: nn.Module) -> int:
    """Replace the attention/MLP linears of `encoder` (fp32) by dynamic int8 ones in place; how many."""
    reason = int8_unavailable()
    if reason is not None:
        raise AccelError(f"int8 is unavailable: {reason}")
    targets = list(text_quantizable(encoder))
    if not targets:
        raise AccelError("int8: this text encoder has no float linears to quantize (already int8?)")
    for name, m in targets:
        if name.endswith(PACKED_SUFFIX):
            attn = encoder.get_submodule(name.rpartition(".")[0])
            packed = nn.Linear(attn.in_proj_weight.shape[1], attn.in_proj_weight.shape[0], device="meta")
            packed.weight, packed.bias = attn.in_proj_weight, attn.in_proj_bias
            _set(encoder, name, Int8InProjection(packed, 0.0, 0))
            _drop_packed_floats(encoder, name)
        else:
            _set(encoder, name, Int8Linear(m, 0.0, 0))
    return len(targets)


def restore_int8_text_encoder(encoder: nn.Module, state: dict[str, Tensor]) -> int:
    """Swap the layers of a freshly built `encoder` for int8 ones from a quantized file's `state`
    (this encoder's keys, prefix stripped: each int8 layer's weight, bias and QUANT_SUFFIXES entries)."""
    reason = int8_unavailable()
    if reason is not None:
        raise AccelError(f"this checkpoint's text encoder is int8, but int8 is unavailable: {reason}")
    names = [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]
    allowed = {n for n, _ in text_quantizable(encoder)}
    for name in names:
        if name not in allowed:
            raise AccelError(f"int8 checkpoint: text encoder layer {name} is not an int8-capable linear here")
        kw = dict(
            weight=state[f"{name}.weight"], weight_scale=state[f"{name}.weight_scale"],
            bias=state.get(f"{name}.bias"),
        )  # fmt: skip
        scale, zp = float(state[f"{name}.input_scale"]), int(state[f"{name}.input_zero_point"])
        if name.endswith(PACKED_SUFFIX):
            _set(encoder, name, Int8InProjection(None, scale, zp, **kw))
            _drop_packed_floats(encoder, name)
        else:
            _set(encoder, name, Int8Linear(None, scale, zp, **kw))
    return len(names)


def packed_float_keys(key: str) -> str | None:
    """The original checkpoint key of a packed in-projection's int8-file key (`...attn.in_proj.weight` ->
    `...attn.in_proj_weight`, `.bias` -> `_bias`), or None for any other key."""
    for leaf in ("weight", "bias"):
        if key.endswith(f".{PACKED_SUFFIX}.{leaf}"):
            return key[: -len(f".{leaf}")] + f"_{leaf}"
    return None
