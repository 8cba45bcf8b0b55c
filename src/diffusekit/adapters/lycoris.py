"""LyCORIS-family adapters (LoHa, LoKr, full diff, IA3) and DoRA weight decomposition, as weight updates.

Each module of a file becomes a dense update ΔW of the layer it adapts, computed the way AUTOMATIC1111's
built-in Lora extension does (v1.10.1, ``extensions-builtin/Lora``: ``network_hada.py``, ``network_lokr.py``,
``network_full.py``, ``network_ia3.py``; ``network.py`` ``finalize_updown``):

    ΔW = scale * (raw + bias)        then, with a DoRA magnitude,  ΔW = m * (W + ΔW) / ||W + ΔW|| - W

and the layer becomes ``W + multiplier * ΔW`` (bias ``b + multiplier * diff_b``). ``scale`` is the file's
``scale`` tensor if present, else ``alpha / dim`` where the algorithm has a rank ``dim`` (LoHa: rows of
``hada_w1_b``; LoKr: rows of ``lokr_w2_b``, else of ``lokr_w1_b``), else 1: a LoKr whose two factors are
both full, a full diff and IA3 ignore ``alpha`` (LyCORIS writes ``alpha = dim`` for the full-factor LoKr,
``lycoris/modules/lokr.py``). An ``alpha`` of 0 means ``alpha = dim``, as in kohya and LyCORIS.

* **LoHa** (Hyeon-Woo et al. 2022, FedPara): ``raw = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; conv layers keep the
  kernel in ``w*_b`` (``(dim, in*kh*kw)``) or, with Tucker factors ``hada_t1``/``hada_t2`` (dim, dim, kh, kw),
  ``raw_i[p, q, k, l] = Σ t_i[a, b, k, l] w_i_a[a, p] w_i_b[b, q]`` with ``w_i_a`` (dim, out) and ``w_i_b``
  (dim, in).
* **LoKr** (Yeh et al. 2023, LyCORIS): ``raw = w1 ⊗ w2`` (Kronecker product), each factor full
  (``lokr_w1``/``lokr_w2``) or low-rank (``lokr_w*_a @ lokr_w*_b``); conv layers keep the kernel in ``w2``
  (4-D ``lokr_w2``, the flattened ``lokr_w2_b``, or Tucker ``lokr_t2`` as for LoHa).
* **full** (LyCORIS "full"/"diff"): ``raw = diff``; ``diff_b`` is added to the layer's bias (not scaled).
* **IA3** (Liu et al. 2022): ``raw = W`` scaled per output row, or per input column when ``on_input``.
* **DoRA** (Liu et al. 2024): a ``dora_scale`` magnitude next to any of them (and next to plain LoRA keys,
  ``lora.py``). Its shape says which norm is meant: ``(out, 1, ...)`` is the per-output-row norm (LyCORIS
  ``wd_on_out=True``, its default since Dec 2024, and PEFT's ``lora_magnitude_vector``), ``(1, in, ...)``
  the per-input-column norm (older LyCORIS files; the only form A1111 v1.10.1 handles). A small epsilon
  guards the division, as LyCORIS does. The multiplier scales the decomposed update (A1111, ComfyUI);
  PEFT instead folds an adapter weight into the LoRA scale inside the norm, so the two agree at weight 1.

Algorithms diffusekit cannot apply (OFT/BOFT, GLoRA, norm layers) are an error naming the algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LoraError

__all__ = [
    "LycorisModule",
    "LohaModule",
    "LokrModule",
    "FullModule",
    "Ia3Module",
    "build_module",
    "fit_update",
    "weight_decompose",
    "SUPPORTED",
]

SUPPORTED = "LoRA, LoCon, LyCORIS CP, LoHa, LoKr, full diff, IA3, DoRA"
_COMMON = {"alpha", "scale", "dora_scale", "bias"}
# Leaf names of algorithms that are recognised but not applied (A1111 networks.py module_types, LyCORIS).
_REFUSED = {
    "OFT/BOFT": ("oft_blocks", "oft_diag", "rescale", "oft_r", "oft_s"),
    "GLoRA": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
    "norm (LyCORIS train_norm)": ("w_norm", "b_norm"),
}


def _f32(t: Tensor, device: torch.device | None = None) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Σ_ab t[a, b, k, l] wa[a, p] wb[b, q] -> (p, q, kh, kw): the LyCORIS/A1111 ``make_weight_cp``."""
    return torch.einsum("abkl,ap,bq->pqkl", t, wa, wb)


@dataclass(kw_only=True)
class LycorisModule:
    """What every LyCORIS module has beside its own tensors (A1111 ``NetworkModule``)."""

    algorithm: ClassVar[str] = ""
    alpha: float | None = None
    scale_override: float | None = None  # an explicit `scale` tensor (A1111 prefers it to alpha / dim)
    dora_scale: Tensor | None = None  # DoRA magnitude, (out, 1, ...) or (1, in, ...)
    weight_bias: Tensor | None = None  # A1111's `bias` key: added to the raw update, weight-shaped
    bias_diff: Tensor | None = None  # `diff_b`: added to the layer's bias

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """`scale` if given, else alpha / rank where both exist, else 1 (A1111 ``calc_scale``)."""
        if self.scale_override is not None:
            return self.scale_override
        if self.rank is not None and self.alpha is not None:
            return self.alpha / self.rank
        return 1.0

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def raw(self, weight: Tensor) -> Tensor:
        """The unscaled update in float32 on `weight`'s device, (out, ...) in the weight's element order."""
        raise NotImplementedError

    def leaves(self) -> dict[str, Tensor]:
        """The tensors under their file names (kohya/LyCORIS), without the common ones."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of this module under its file leaf name, as LyCORIS writes them."""
        out = self.leaves()
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        if self.scale_override is not None:
            out["scale"] = torch.tensor(float(self.scale_override))
        extra = {"dora_scale": self.dora_scale, "bias": self.weight_bias, "diff_b": self.bias_diff}
        out.update({leaf: t for leaf, t in extra.items() if t is not None})
        return out

    def needs_weight(self) -> bool:
        """Whether the update depends on the base weight's values (IA3, DoRA), not only its shape."""
        return self.dora_scale is not None

    def update(self, weight: Tensor, what: str) -> tuple[Tensor, Tensor | None]:
        """(ΔW shaped like `weight`, Δbias or None) before the multiplier: A1111's ``finalize_updown``.

        `weight` is the layer's weight (for a packed q/k/v projection, its third); `what` names the layer
        in errors."""
        w = _f32(weight)
        raw = self.raw(w)
        if self.weight_bias is not None:
            if self.weight_bias.numel() != raw.numel():
                raise LoraError(f"{what}: `bias` {tuple(self.weight_bias.shape)} does not fit the update")
            raw = raw.reshape(-1) + _f32(self.weight_bias, w.device).reshape(-1)
        delta = fit_update(raw, weight.shape)
        if delta is None:
            raise LoraError(
                f"{what}: the {self.algorithm} update ({raw.numel()} values) does not fit the layer's weight "
                f"{tuple(weight.shape)}: the LoRA was made for a different model family or size"
            )
        delta = delta * self.scale
        if self.dora_scale is not None:
            delta = weight_decompose(delta, w, self.dora_scale, what)
        bias = None
        if self.bias_diff is not None:
            n = self.bias_diff.numel()
            if n != weight.shape[0]:
                raise LoraError(f"{what}: diff_b has {n} values, the layer {weight.shape[0]} outputs")
            bias = _f32(self.bias_diff, w.device).reshape(-1)
        return delta, bias


def fit_update(delta: Tensor, shape: Sequence[int]) -> Tensor | None:
    """`delta` reshaped to the weight `shape`; a 4-input-channel update on a 9-channel inpainting conv is
    zero-padded (A1111 ``networks.py``); None when it does not fit."""
    if delta.numel() == math.prod(shape):
        return delta.reshape(shape)
    if len(shape) == 4 and shape[1] == 9 and delta.numel() == shape[0] * 4 * math.prod(shape[2:]):
        return F.pad(delta.reshape(shape[0], 4, *shape[2:]), (0, 0, 0, 0, 0, 5))
    return None


def weight_decompose(delta: Tensor, weight: Tensor, magnitude: Tensor, what: str = "layer") -> Tensor:
    """DoRA: the update that turns `weight` into ``magnitude * (W + ΔW) / ||W + ΔW||``.

    The norm runs over every axis but the one `magnitude` spans: output rows for ``(out, 1, ...)``, input
    columns for ``(1, in, ...)`` (LyCORIS ``apply_weight_decompose``, both orientations)."""
    w = _f32(weight)
    merged = w + delta.to(w.device)  # (out, in[, kh, kw])
    m = _f32(magnitude, w.device)
    out, fan_in = w.shape[0], (w.shape[1] if w.ndim > 1 else 1)
    rest_is_one = m.ndim == w.ndim >= 2 and all(s == 1 for s in m.shape[2:])
    if rest_is_one and m.shape[0] == out and m.shape[1] == 1:  # per output row
        norm = merged.reshape(out, -1).norm(dim=1).reshape(m.shape)
    elif rest_is_one and m.shape[0] == 1 and m.shape[1] == fan_in:  # per input column
        norm = merged.transpose(0, 1).reshape(fan_in, -1).norm(dim=1).reshape(m.shape)
    else:
        raise LoraError(
            f"{what}: DoRA magnitude of shape {tuple(magnitude.shape)} fits neither the output rows "
            f"({out}, 1, ...) nor the input columns (1, {fan_in}, ...) of a weight {tuple(w.shape)}"
        )
    return merged * (m / (norm + torch.finfo(torch.float32).eps)) - w


@dataclass(kw_only=True)
class LohaModule(LycorisModule):
    """LoHa: Hadamard product of two low-rank products (FedPara), optional Tucker cores for convs."""

    algorithm: ClassVar[str] = "LoHa"
    w1a: Tensor  # (out, dim), or (dim, out) with t1
    w1b: Tensor  # (dim, in*kh*kw), or (dim, in) with t1
    w2a: Tensor
    w2b: Tensor
    t1: Tensor | None = None  # (dim, dim, kh, kw)
    t2: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    def _factor(self, wa: Tensor, wb: Tensor, t: Tensor | None, dev: torch.device) -> Tensor:
        if t is not None:
            return _tucker(_f32(t, dev), _f32(wa, dev), _f32(wb, dev)).flatten(1)  # (out, in*kh*kw)
        return _f32(wa, dev).reshape(wa.shape[0], -1) @ _f32(wb, dev).reshape(wb.shape[0], -1)

    def raw(self, weight: Tensor) -> Tensor:
        dev = weight.device
        one = self._factor(self.w1a, self.w1b, self.t1, dev)
        two = self._factor(self.w2a, self.w2b, self.t2, dev)
        if one.shape != two.shape:
            raise LoraError(f"LoHa factors disagree: {tuple(one.shape)} and {tuple(two.shape)}")
        return one * two

    def leaves(self) -> dict[str, Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        for leaf, t in (("hada_t1", self.t1), ("hada_t2", self.t2)):
            if t is not None:
                out[leaf] = t
        return out


@dataclass(kw_only=True)
class LokrModule(LycorisModule):
    """LoKr: Kronecker product of two factors, each full or low-rank (LyCORIS)."""

    algorithm: ClassVar[str] = "LoKr"
    w1: Tensor | None = None  # (a, c)
    w1a: Tensor | None = None  # (a, dim)
    w1b: Tensor | None = None  # (dim, c)
    w2: Tensor | None = None  # (b, d[, kh, kw])
    w2a: Tensor | None = None  # (b, dim), or (dim, b) with t2
    w2b: Tensor | None = None  # (dim, d[*kh*kw]), or (dim, d) with t2
    t2: Tensor | None = None  # (dim, dim, kh, kw)

    @property
    def rank(self) -> int | None:
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return int(self.w1b.shape[0]) if self.w1b is not None else None

    @property
    def out_features(self) -> int:
        a = self.w1.shape[0] if self.w1 is not None else self.w1a.shape[0]
        if self.w2 is not None:
            b = self.w2.shape[0]
        else:
            b = self.w2a.shape[1] if self.t2 is not None else self.w2a.shape[0]
        return int(a * b)

    def raw(self, weight: Tensor) -> Tensor:
        dev = weight.device
        w1 = _f32(self.w1, dev) if self.w1 is not None else _f32(self.w1a, dev) @ _f32(self.w1b, dev)
        if self.w2 is not None:
            w2 = _f32(self.w2, dev)
        elif self.t2 is not None:
            w2 = _tucker(_f32(self.t2, dev), _f32(self.w2a, dev), _f32(self.w2b, dev))  # (b, d, kh, kw)
        else:
            w2 = _f32(self.w2a, dev) @ _f32(self.w2b, dev)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).flatten(1)  # (a*b, c*d[*kh*kw])

    def leaves(self) -> dict[str, Tensor]:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        values = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        return {n: t for n, t in zip(names, values, strict=True) if t is not None}


@dataclass(kw_only=True)
class FullModule(LycorisModule):
    """A stored full weight difference (LyCORIS "full")."""

    algorithm: ClassVar[str] = "full diff"
    diff: Tensor  # shaped like the weight

    @property
    def out_features(self) -> int:
        return int(self.diff.shape[0])

    def raw(self, weight: Tensor) -> Tensor:
        return _f32(self.diff, weight.device).reshape(self.diff.shape[0], -1)

    def leaves(self) -> dict[str, Tensor]:
        return {"diff": self.diff}


@dataclass(kw_only=True)
class Ia3Module(LycorisModule):
    """IA3: the weight rescaled per output row or per input column (the update is W * w)."""

    algorithm: ClassVar[str] = "IA3"
    w: Tensor  # (out,) / (in,) for Linear, (1, out|in, 1, 1) for Conv2d
    on_input: bool

    @property
    def out_features(self) -> int:
        return -1  # known only from the layer

    def needs_weight(self) -> bool:
        return True

    def raw(self, weight: Tensor) -> Tensor:
        w = _f32(self.w, weight.device).reshape(-1)
        axis = 1 if self.on_input else 0
        if weight.ndim < 2 or w.numel() != weight.shape[axis]:
            raise LoraError(
                f"IA3 vector of {w.numel()} values does not fit axis {axis} of a weight {tuple(weight.shape)}"
            )
        shape = [1] * weight.ndim
        shape[axis] = -1
        return weight * w.reshape(shape)

    def leaves(self) -> dict[str, Tensor]:
        return {"weight": self.w, "on_input": torch.tensor(int(self.on_input))}


def _refused(leaves: Mapping[str, Tensor]) -> str | None:
    for algorithm, marks in _REFUSED.items():
        if any(leaf in leaves for leaf in marks):
            return algorithm
    return None


def build_module(leaves: Mapping[str, Tensor], what: str) -> tuple[LycorisModule | None, list[str]]:
    """(the LyCORIS module of one layer's `leaves` {leaf name: tensor}, leaves not used).

    None with every leaf listed when the leaves make no complete module; an error for an algorithm that
    is recognised but not applied. `what` names the layer and file in errors."""
    refused = _refused(leaves)
    if refused is not None:
        raise LoraError(
            f"{what} uses {refused} ({', '.join(sorted(leaves))}), which diffusekit does not apply; "
            f"supported: {SUPPORTED}"
        )
    get = leaves.get
    common = {
        "alpha": _scalar(get("alpha")),
        "scale_override": _scalar(get("scale")),
        "dora_scale": get("dora_scale"),
        "weight_bias": get("bias"),
        "bias_diff": get("diff_b"),
    }
    if common["alpha"] == 0:
        common["alpha"] = None  # kohya / LyCORIS: alpha 0 means alpha = rank
    module: LycorisModule | None = None
    used: set[str] = set(_COMMON) | {"diff_b"}
    if all(k in leaves for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        w1a, w1b, w2a, w2b = (leaves[f"hada_w{i}_{ab}"] for i in (1, 2) for ab in "ab")
        t1, t2 = get("hada_t1"), get("hada_t2")
        module = LohaModule(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=t1, t2=t2, **common)
        used |= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
    elif ("lokr_w1" in leaves or {"lokr_w1_a", "lokr_w1_b"} <= set(leaves)) and (
        "lokr_w2" in leaves or {"lokr_w2_a", "lokr_w2_b"} <= set(leaves)
    ):
        names = ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")
        keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        parts = {n: get(k) for n, k in zip(names, keys, strict=True)}
        if parts["w1"] is not None:
            parts["w1a"] = parts["w1b"] = None
        if parts["w2"] is not None:
            parts["w2a"] = parts["w2b"] = parts["t2"] = None
        module = LokrModule(**parts, **common)
        used |= set(keys)
    elif "diff" in leaves:
        module = FullModule(diff=leaves["diff"], **common)
        used.add("diff")
    elif "weight" in leaves and "on_input" in leaves:
        module = Ia3Module(w=leaves["weight"], on_input=bool(_scalar(leaves["on_input"])), **common)
        used |= {"weight", "on_input"}
    if module is None:
        return None, sorted(leaves)
    return module, sorted(set(leaves) - used)


def _scalar(t: Tensor | None) -> float | None:
    return None if t is None else float(t.float().reshape(-1)[0])
