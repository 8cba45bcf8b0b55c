"""LoRA at run time (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): apply, merge; files are read by lora_file.

``apply_loras`` resolves a ``LoraNetwork``'s layer names against a model (``adapters/keys.py``) and adds
``multiplier * scale * up(mid(down(x)))`` to each layer's output through forward hooks: the base weights
are never written, so removing the hooks restores the model bit for bit, and switching LoRAs costs no more
than registering hooks. ``merge_loras`` bakes the same update into a state dict with A1111's formula
(``W + multiplier * scale * up @ down``).

LyCORIS modules (LoHa, LoKr, full diff, IA3) and DoRA magnitudes (kohya/LyCORIS ``dora_scale``, PEFT
``lora_magnitude_vector``) are read by ``adapters/lycoris.py`` and applied as dense updates ΔW of their
layers (hooks add ``x -> op(x, multiplier * ΔW)``, merge mode swaps in ``W + multiplier * ΔW``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.configs import ModelConfig
from .errors import LoraError
from .keys import Target
from .lora_file import (
    PEFT_METADATA_KEY,
    AdapterModule,
    LoraModule,
    LoraNetwork,
    load_lora,
    network_from_state_dict,
)
from .lycoris import LycorisModule, fit_update, weight_decompose

__all__ = [
    "LoraError",
    "LoraModule",
    "LoraNetwork",
    "AppliedLoras",
    "load_lora",
    "network_from_state_dict",
    "apply_loras",
    "merge_loras",
    "lora_delta",
    "PEFT_METADATA_KEY",
]

# ---------------------------------------------------------------------------------------------
# The update of one layer


def _as_conv(w: Tensor) -> Tensor:
    return w if w.ndim == 4 else w[:, :, None, None]


def _lora_product(m: LoraModule, device: torch.device | None = None) -> Tensor:
    """up @ [mid] @ down in float32: (out, in * kh * kw), or (out, in, kh, kw) with a CP mid."""
    out, r = m.up.shape[0], m.rank
    up, down = m.up.reshape(out, -1).float().to(device), m.down.reshape(r, -1).float().to(device)
    if m.mid is not None:  # LyCORIS CP: ΔW[i, j, k, l] = Σ up[i, n] mid[n, m, k, l] down[m, j]
        return torch.einsum("nmkl,in,mj->ijkl", m.mid.float().to(device), up, down)
    return up @ down  # (out, in * kh * kw)


def lora_delta(m: LoraModule, shape: Sequence[int]) -> Tensor:
    """ΔW = scale * up @ [mid] @ down, shaped like the layer's weight `shape` (A1111's calc_updown)."""
    delta = _lora_product(m)
    if delta.numel() != math.prod(shape):
        raise LoraError(f"LoRA update of {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}")
    return delta.reshape(shape) * m.scale


def _check_shape(name: str, target: Target, m: LoraModule, weight_shape: torch.Size) -> None:
    """A clear error when a LoRA layer was made for a different model (SD1 file on an SD2 model...)."""
    out = weight_shape[0] // 3 if target.is_split else weight_shape[0]
    fan_in = weight_shape[1] if len(weight_shape) > 1 else 1
    kernel = tuple(weight_shape[2:]) if target.kind == "conv" else ()
    ok = m.up.shape[0] == out and m.down.shape[1] in (fan_in, 4 if fan_in == 9 else fan_in)
    if m.mid is None and target.kind == "conv" and m.down.ndim == 4:
        ok = ok and tuple(m.down.shape[2:]) == kernel
    if m.mid is not None:
        ok = ok and target.kind == "conv" and tuple(m.mid.shape[2:]) == kernel
    if not ok:
        raise LoraError(
            f"LoRA layer {name} (down {tuple(m.down.shape)}, up {tuple(m.up.shape)}) does not fit "
            f"{target.component}.{target.path} (weight {tuple(weight_shape)}): the LoRA was made for "
            "a different model family or size"
        )


def layer_update(m: AdapterModule, weight: Tensor, what: str) -> tuple[Tensor, Tensor | None]:
    """(ΔW shaped like `weight`, Δbias or None) in float32 before the multiplier, for any module type.

    `weight` is the layer's weight (for a packed q/k/v projection, its third). LoRA with DoRA or a
    `bias` key follows A1111's ``finalize_updown`` like the LyCORIS types (lycoris.py)."""
    out = weight.shape[0]
    if isinstance(m, LycorisModule):
        if m.out_features not in (-1, out):
            raise LoraError(
                f"{what}: the {m.algorithm} update has {m.out_features} outputs, the layer's weight "
                f"{tuple(weight.shape)}: the LoRA was made for a different model family or size"
            )
        return m.update(weight, what)
    raw = _lora_product(m, weight.device)
    if m.weight_bias is not None:
        if m.weight_bias.numel() != raw.numel():
            raise LoraError(f"{what}: `bias` of shape {tuple(m.weight_bias.shape)} does not fit the update")
        raw = raw.reshape(-1) + m.weight_bias.float().to(weight.device).reshape(-1)
    delta = fit_update(raw, weight.shape)
    if delta is None:
        raise LoraError(f"{what}: LoRA update {tuple(raw.shape)} does not fit a weight {tuple(weight.shape)}")
    delta = delta * m.scale
    if m.dora_scale is not None:
        delta = weight_decompose(delta, weight, m.dora_scale, what)
    return delta, None


def _needs_weight(m: AdapterModule) -> bool:
    return m.needs_weight() if isinstance(m, LycorisModule) else m.dora_scale is not None


def _is_dense(m: AdapterModule) -> bool:
    return isinstance(m, LycorisModule) or m.dense


def _rows(target: Target, n: int) -> slice:
    """The rows of a weight (or bias) of `n` rows that `target` adapts: all, or its q/k/v third."""
    if not target.is_split:
        return slice(None)
    width = n // 3
    return slice(target.part * width, (target.part + 1) * width)


# ---------------------------------------------------------------------------------------------
# Run-time application


@dataclass
class _Term:
    """One LoRA's contribution to one layer, in the layer's dtype and device."""

    down: Tensor | None
    up: Tensor | None
    mid: Tensor | None
    factor: float  # multiplier * scale
    part: int | None
    dense: Tensor | None = None  # multiplier * ΔW for LyCORIS / DoRA modules (then down/up are None)
    bias: Tensor | None = None  # multiplier * Δbias


def _term(m: LoraModule, target: Target, factor: float, ref: Tensor, in_channels: int) -> _Term:
    device, dtype = (torch.device("cpu"), torch.float32) if ref.is_meta else (ref.device, ref.dtype)

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    down, up = m.down, m.up
    if target.kind == "conv":
        down, up = _as_conv(down), _as_conv(up)
        if down.shape[1] != in_channels:  # a 4-channel LoRA on a 9-channel inpainting conv_in: zero-pad
            down = F.pad(down, (0, 0, 0, 0, 0, in_channels - down.shape[1]))
    else:
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    return _Term(cast(down), cast(up), cast(m.mid), factor, target.part)


@torch.no_grad()
def _dense_term(
    m: AdapterModule, target: Target, mult: float, base: Tensor, ref: Tensor, what: str
) -> tuple[_Term, Tensor]:
    """(a term adding ``op(x, mult * ΔW) + mult * Δbias``, mult * ΔW in float32) for a LyCORIS / DoRA
    module whose layer weight (its rows of a packed q/k/v) is `base`; `ref` gives dtype and device."""
    delta, bias = layer_update(m, base, what)
    delta, bias = mult * delta, (None if bias is None else mult * bias)
    device, dtype = (torch.device("cpu"), torch.float32) if ref.is_meta else (ref.device, ref.dtype)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return _Term(None, None, None, 1.0, target.part, cast(delta), cast(bias)), delta


def _hook_terms(target: Target, items: list[tuple[AdapterModule, float, Tensor, str]]) -> list[_Term]:
    """The terms of one layer. LoRAs apply in order, each DoRA / IA3 update computed on the weight the
    ones before it left (A1111 ``network_apply_weights``, ComfyUI ``calculate_weight``)."""
    weight = items[0][2]
    rows = _rows(target, weight.shape[0])
    running = None if weight.is_meta else weight[rows].detach()  # the weight so far, when it is known
    in_ch = weight.shape[1] if weight.ndim > 1 else 1
    terms: list[_Term] = []
    for i, (m, mult, _, what) in enumerate(items):
        delta = None
        if _is_dense(m):
            if running is None and _needs_weight(m):
                raise LoraError(f"{what}: DoRA / IA3 need the weight, which an int8 layer does not keep")
            base = running if running is not None else torch.zeros(weight[rows].shape, device="cpu")
            term, delta = _dense_term(m, target, mult, base, weight, what)
        else:
            term = _term(m, target, mult * m.scale, weight, in_ch)
        terms.append(term)
        if running is not None and any(_needs_weight(n) for n, *_ in items[i + 1 :]):
            if delta is None:
                delta = mult * layer_update(m, running, what)[0]
            running = running.float() + delta.to(running.device)
    return terms


def _linear_update(x: Tensor, t: _Term) -> Tensor:
    if t.dense is not None:
        return F.linear(x.to(t.dense.dtype), t.dense, t.bias).to(x.dtype)  # (..., out)
    h = F.linear(x.to(t.down.dtype), t.down)  # (..., in) -> (..., r)
    return (F.linear(h, t.up) * t.factor).to(x.dtype)  # (..., out)


def _conv_update(module: nn.Conv2d, x: Tensor, t: _Term) -> Tensor:
    geometry = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    if t.dense is not None:
        return F.conv2d(x.to(t.dense.dtype), t.dense, t.bias, **geometry).to(x.dtype)  # (B, out, H', W')
    if t.mid is None:
        h = F.conv2d(x, t.down, **geometry)  # (B, r, H', W'): the kernel sits in down
    else:
        h = F.conv2d(F.conv2d(x, t.down), t.mid, **geometry)  # 1x1 down, then the kernel in mid
    return F.conv2d(h, t.up) * t.factor  # (B, out, H', W')


def _make_hook(kind: str, terms: list[_Term]):
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        if kind == "linear":
            for t in terms:
                out = out + _linear_update(x, t)
        elif kind == "conv":
            for t in terms:
                out = out + _conv_update(module, x, t)
        else:  # packed / fused q/k/v: each term adds to its third of the output
            pieces = list(out.chunk(3, dim=-1))
            for t in terms:
                pieces[t.part] = pieces[t.part] + _linear_update(x, t)
            out = torch.cat(pieces, dim=-1)
        return out

    return hook


def _weight_of(component: nn.Module, target: Target) -> Tensor:
    """The layer's float weight, or for a layer that keeps none (int8-quantized: no weight, or an int8
    one in other units) an fp32 stand-in of its shape on the meta device (hooks, computed in fp32)."""
    if target.kind == "packed":
        weight = component.get_submodule(target.path.rpartition(".")[0]).in_proj_weight
        layer = component.get_submodule(target.path)  # the in-projection call (int8 once quantized)
    else:
        layer = component.get_submodule(target.path)
        weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight
    if isinstance(weight, Tensor):
        return torch.empty(weight.shape, device="meta")
    if isinstance(getattr(layer, "weight", None), Tensor):
        return torch.empty(layer.weight.shape, device="meta")
    return torch.empty(layer.out_features, layer.in_features, device="meta")


def _bias_of(component: nn.Module, target: Target) -> Tensor | None:
    if target.kind == "packed":
        return component.get_submodule(target.path.rpartition(".")[0]).in_proj_bias
    bias = getattr(component.get_submodule(target.path), "bias", None)
    return bias if isinstance(bias, Tensor) else None


class AppliedLoras:
    """LoRAs hooked into a model; ``remove()`` (or leaving the ``with`` block) takes them out again."""

    def __init__(self, handles: list, unmatched: dict[str, list[str]]) -> None:
        self._handles = handles
        self._swapped: list[tuple[Tensor, Tensor]] = []  # (parameter, its original data) in merge mode
        self.unmatched = unmatched  # {lora name: its keys that match no layer or cannot be applied}

    def _swap(self, param: Tensor, merged: Tensor) -> None:
        self._swapped.append((param, param.data))
        param.data = merged

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for param, original in reversed(self._swapped):
            param.data = original  # the very tensor it had: bit-identical
        self._handles, self._swapped = [], []

    def __enter__(self) -> AppliedLoras:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def warnings(self) -> Iterator[str]:
        """One line per LoRA with keys that were not applied."""
        for name, keys in self.unmatched.items():
            if keys:
                more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
                yield f"LoRA {name}: {len(keys)} key(s) not applied: {', '.join(keys[:3])}{more}"


def _components(model: nn.Module) -> dict[str, nn.Module]:
    """The adaptable components of a model: U-Net and text encoders, or an SD3 model's MMDiT and CLIPs."""
    if model.cfg.family == "sd3":
        from .keys_sd3 import SD3_COMPONENTS

        found = {k: model.component(k) for k in SD3_COMPONENTS}
        return {k: m for k, m in found.items() if m is not None}
    return {k: m for k, (_, m) in model.components().items() if k != "vae"}


def apply_loras(
    model: nn.Module, loras: Sequence[tuple[LoraNetwork, float, float]], *, merge: bool = False
) -> AppliedLoras:
    """Apply `loras` ((network, te multiplier, unet multiplier), ...) to a StableDiffusion or
    StableDiffusion3 `model` (there the "unet" multiplier is the MMDiT's).

    Default: forward hooks (differentiable for plain LoRA; what training uses). ``merge=True``: each
    adapted weight (and bias, for a full diff) is swapped for a merged copy (W + ΔW, A1111's math) and the
    original tensor is put back on removal, so inference pays nothing per step and the base is still
    bit-identical afterwards; layers without a weight tensor (int8-quantized), or without the bias a
    ``diff_b`` adds to, get hooks either way.
    """
    comps = _components(model)
    per_layer: dict[Target, list[tuple[AdapterModule, float, Tensor, str]]] = {}
    unmatched: dict[str, list[str]] = {}
    for net, te_mult, unet_mult in loras:
        resolved, missing = net.resolve(model.cfg)
        unmatched[net.name] = missing + net.unsupported
        for target, m in resolved.items():
            if target.component not in comps:
                unmatched[net.name].append(f"{target.component}.{target.path}")
                continue
            weight = _weight_of(comps[target.component], target)
            if isinstance(m, LoraModule):
                _check_shape(net.name, target, m, weight.shape)
            mult = te_mult if target.is_text else unet_mult
            if mult != 0:
                what = f"LoRA {net.name!r}, {target.component}.{target.path}"
                per_layer.setdefault(target, []).append((m, mult, weight, what))
    applied = AppliedLoras([], unmatched)
    try:
        for target, items in per_layer.items():
            weight = items[0][2]
            comp = comps[target.component]
            bias = _bias_of(comp, target)
            adds_bias = any(getattr(m, "bias_diff", None) is not None for m, *_ in items)
            if merge and not weight.is_meta and (bias is not None or not adds_bias):
                new_weight, new_bias = _merged(target, items, weight, bias)
                applied._swap(weight, new_weight)
                if new_bias is not None:
                    applied._swap(bias, new_bias)
                continue
            terms = _hook_terms(target, items)
            layer = comp.get_submodule(target.path)
            applied._handles.append(layer.register_forward_hook(_make_hook(target.kind, terms)))
    except BaseException:
        applied.remove()  # a layer that does not fit: leave the model as it was
        raise
    return applied


@torch.no_grad()
def _merged(
    target: Target, items: list[tuple[AdapterModule, float, Tensor, str]], weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(weight + Σ mult * ΔW, bias + Σ mult * Δbias or None) in the tensors' dtype, device and layout; each
    LyCORIS / DoRA update is computed on the weight the updates before it left (A1111, ComfyUI)."""
    new = weight.detach().float().clone()
    new_bias = None
    rows = _rows(target, weight.shape[0])
    for m, mult, _, what in items:
        if _is_dense(m):
            delta, db = layer_update(m, new[rows], what)
            new[rows] += mult * delta
            if db is not None:
                if bias is None:
                    raise LoraError(f"{what}: the file has a bias difference (diff_b); the layer has no bias")
                new_bias = bias.detach().float().clone() if new_bias is None else new_bias
                new_bias[rows] += mult * db.to(bias.device)
            continue
        m_dev = LoraModule(*(t.to(weight.device) if t is not None else None for t in (m.down, m.up, m.mid)),
                           alpha=m.alpha, scale_override=m.scale_override, rslora=m.rslora)  # fmt: skip
        if target.is_split:
            new[rows] += mult * lora_delta(m_dev, (rows.stop - rows.start, weight.shape[1]))
        elif m.down.shape[1] != weight.shape[1]:  # 4-channel update on a 9-channel inpainting conv_in
            delta = lora_delta(m_dev, (weight.shape[0], m.down.shape[1], *weight.shape[2:]))
            new[:, : delta.shape[1]] += mult * delta
        else:
            new += mult * lora_delta(m_dev, weight.shape)
    return new.to(weight.dtype), (None if new_bias is None else new_bias.to(bias.dtype))


# ---------------------------------------------------------------------------------------------
# Merging into weights


def merge_loras(
    sd: Mapping[str, Tensor], cfg: ModelConfig, loras: Sequence[tuple[LoraNetwork, float, float]]
) -> dict[str, Tensor]:
    """A copy of single-file state dict `sd` with `loras` baked in (W += mult * ΔW); others shared."""
    if cfg.family == "sd3":
        raise LoraError("merging a LoRA into an SD3 file is not supported; apply it at run time (<lora:...>)")
    prefixes = {"unet": "model.diffusion_model."}
    for i, p in enumerate(cfg.text_prefixes):
        prefixes["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = p
    out = dict(sd)
    for net, te_mult, unet_mult in loras:
        resolved, missing = net.resolve(cfg)
        if missing:
            raise LoraError(f"LoRA {net.name!r}: {len(missing)} key(s) match no layer, e.g. {missing[0]}")
        for target, m in resolved.items():
            mult = te_mult if target.is_text else unet_mult
            base = prefixes[target.component] + target.path
            if target.kind == "packed":  # attn.in_proj -> attn.in_proj_weight / in_proj_bias
                key, bias_key = base + "_weight", base + "_bias"
            else:
                key, bias_key = base + ".weight", base + ".bias"
            w = out[key]
            if isinstance(m, LoraModule):
                _check_shape(net.name, target, m, w.shape)
            new_w, new_b = _merged(target, [(m, mult, w, f"LoRA {net.name!r}, {base}")], w, out.get(bias_key))
            out[key] = new_w
            if new_b is not None:
                out[bias_key] = new_b
    return out
