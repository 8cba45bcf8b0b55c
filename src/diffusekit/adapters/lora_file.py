"""LoRA files: kohya/A1111, LoCon, LyCORIS and diffusers/PEFT layouts read into a ``LoraNetwork``; writing.

A file becomes a ``LoraNetwork``: per adapted layer a ``LoraModule`` (down, optional LyCORIS-CP mid, up,
alpha) or a LyCORIS module (``adapters/lycoris.py``), keyed by the name the file gives the layer; names
are resolved against a model by ``adapters/keys.py``. Applying and merging live in ``adapters/lora.py``.

Scale: kohya/A1111 ``alpha / rank`` (1 without alpha); diffusers/PEFT ``lora_alpha / r`` from the file's
``lora_adapter_metadata`` (1 without it), ``lora_alpha / sqrt(r)`` for rsLoRA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.hashes import addnet_hash, sha256_file
from ..checkpoints.single_file import load_state_dict, save_state_dict
from ..models.configs import ModelConfig
from .errors import LoraError
from .keys import Target, adapter_names, preferred_names
from .lycoris import LycorisModule, build_module

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")  # te3: SD3 T5
_KOHYA_LEAVES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora",
    "bias": "weight_bias",
}
_PEFT_LEAVES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "alpha": "alpha",
    "lora_magnitude_vector": "magnitude",  # PEFT DoRA: per output row, (out,) or (1, out, 1, 1)
    "lora_magnitude_vector.weight": "magnitude",
}
_BUNDLE = "bundle_emb."
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraModule:
    """One adapted layer: down (r, in[, kh, kw]), up (out, r[, 1, 1]), optional CP mid (r, r, kh, kw)."""

    down: Tensor
    up: Tensor
    mid: Tensor | None = None
    alpha: float | None = None
    scale_override: float | None = None  # an explicit `scale` tensor in the file (A1111 honours it)
    rslora: bool = False
    dora_scale: Tensor | None = None  # DoRA magnitude, (out, 1[, 1, 1]) or (1, in[, 1, 1]) (lycoris.py)
    weight_bias: Tensor | None = None  # A1111's `bias` key: weight-shaped, added to up @ down

    @property
    def dense(self) -> bool:
        """Whether the update needs the whole ΔW (DoRA, `bias`), not the low-rank path."""
        return self.dora_scale is not None or self.weight_bias is not None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor on up @ down: `scale` if given, else alpha / rank (alpha / sqrt(rank) for rsLoRA)."""
        if self.scale_override is not None:
            return self.scale_override
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


AdapterModule = LoraModule | LycorisModule  # what one layer of a file holds


def _halves_swapped(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _swap_output_halves(m: AdapterModule) -> LoraModule | None:
    """`m` with the two halves of its output rows exchanged (diffusers' (scale, shift) order -> ours), or
    None for a module type whose rows cannot be exchanged that way (LyCORIS, DoRA)."""
    if not isinstance(m, LoraModule) or m.dora_scale is not None:
        return None
    bias = None if m.weight_bias is None else _halves_swapped(m.weight_bias)
    return dataclasses.replace(m, up=_halves_swapped(m.up), weight_bias=bias)


@dataclass
class LoraNetwork:
    """The layers of one LoRA file, keyed by the file's names, plus what could not be used."""

    name: str
    modules: dict[str, AdapterModule]
    unsupported: list[str] = field(default_factory=list)  # keys of module types we cannot apply
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, Tensor] = field(default_factory=dict)  # bundle_emb.* tensors, by key
    path: Path | None = None
    _hash: str | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """A1111's hash: the addnet sha256 of a .safetensors file, the full-file sha256 otherwise."""
        if self._hash is None:
            if self.path is None:
                raise LoraError(f"LoRA {self.name!r} has no file to hash; save it first")
            if self.metadata.get("sshs_model_hash"):
                self._hash = self.metadata["sshs_model_hash"]
            elif self.path.suffix.lower() == ".safetensors":
                self._hash = addnet_hash(self.path)
            else:
                self._hash = sha256_file(self.path)
        return self._hash

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def resolve(self, cfg: ModelConfig) -> tuple[dict[Target, AdapterModule], list[str]]:
        """({our layer: module}, names that match no layer of `cfg`) for a model of config `cfg`."""
        names = adapter_names(cfg)
        found: dict[Target, AdapterModule] = {}
        unmatched: list[str] = []
        for name, module in self.modules.items():
            target = names.get(name)
            if target is None:
                unmatched.append(name)
            elif target in found:
                raise LoraError(f"LoRA {self.name!r}: two entries address the same layer ({name})")
            elif target.swap_halves:
                swapped = _swap_output_halves(module)
                if swapped is None:
                    unmatched.append(f"{name} ({type(module).__name__} on a (scale, shift) layer)")
                else:
                    found[target] = swapped
            else:
                found[target] = module
        return found, unmatched

    def state_dict(self, cfg: ModelConfig, style: str = "kohya") -> dict[str, Tensor]:
        """The tensors of a file in `style` ("kohya" or "diffusers") for a model of config `cfg`."""
        resolved, unmatched = self.resolve(cfg)
        if unmatched:
            raise LoraError(
                f"LoRA {self.name!r}: {len(unmatched)} layer(s) not in this model, e.g. {unmatched[0]}"
            )
        names = preferred_names(cfg, style)
        out: dict[str, Tensor] = {}
        for target, m in resolved.items():
            name = names[target]
            if isinstance(m, LycorisModule):
                if style != "kohya":
                    raise LoraError(f"the diffusers format has no place for {m.algorithm} layers; use kohya")
                out.update({f"{name}.{leaf}": t.detach() for leaf, t in m.tensors().items()})
            elif style == "kohya":
                if m.dora_scale is not None:
                    out[f"{name}.dora_scale"] = m.dora_scale.detach()
                if m.weight_bias is not None:
                    out[f"{name}.bias"] = m.weight_bias.detach()
                out[f"{name}.lora_down.weight"] = m.down.detach()
                out[f"{name}.lora_up.weight"] = m.up.detach()
                if m.mid is not None:
                    out[f"{name}.lora_mid.weight"] = m.mid.detach()
                out[f"{name}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
            else:
                if m.mid is not None or m.dense:
                    raise LoraError("the diffusers format has no place for lora_mid, DoRA, bias; use kohya")
                out[f"{name}.lora_A.weight"] = m.down.detach()
                out[f"{name}.lora_B.weight"] = m.up.detach() * m.scale  # the scale folded in: alpha = r
        return out

    def save(
        self, path: str | Path, cfg: ModelConfig, *, style: str = "kohya", metadata: Mapping[str, str] = ()
    ) -> Path:
        """Write a .safetensors file in `style` (diffusers: the scale folded into lora_B, scale 1 on read)."""
        path = Path(path)
        save_state_dict(self.state_dict(cfg, style), path, metadata={"format": "pt", **dict(metadata)})
        self.path, self._hash = path, None
        return path


# ---------------------------------------------------------------------------------------------
# Reading files


def _float(t: Tensor) -> float:
    return float(t.float().reshape(-1)[0])


def _peft_alpha(config: Mapping[str, object], comp: str, path: str) -> tuple[float | None, bool]:
    """(lora_alpha, rslora) for layer `path` of component `comp` from diffusers' adapter metadata."""
    alpha = config.get(f"{comp}.lora_alpha")
    patterns = config.get(f"{comp}.alpha_pattern") or {}
    if isinstance(patterns, Mapping):
        for pattern, value in patterns.items():  # PEFT's own rule: the pattern matches a name suffix
            if re.fullmatch(rf"(.*\.)?({pattern})", path):
                alpha = value
                break
    return (float(alpha) if alpha is not None else None), bool(config.get(f"{comp}.use_rslora", False))


def _peft_magnitude(m: Tensor) -> Tensor:
    """PEFT's DoRA magnitude ((out,) for Linear, (1, out, 1, 1) for Conv2d) as a per-output-row
    ``dora_scale`` ((out, 1) / (out, 1, 1, 1)), the orientation lycoris.weight_decompose reads."""
    return m.reshape(-1, 1) if m.ndim == 1 else m.reshape(-1, *([1] * (m.ndim - 1)))


def network_from_state_dict(
    sd: Mapping[str, Tensor], name: str, metadata: Mapping[str, str] | None = None
) -> LoraNetwork:
    """Group a LoRA state dict (kohya/A1111/LyCORIS or diffusers/PEFT keys) into a LoraNetwork."""
    metadata = dict(metadata or {})
    parts: dict[str, dict[str, Tensor]] = {}
    kohya_leaves: dict[str, dict[str, Tensor]] = {}  # {module: {leaf: tensor}} of kohya-named keys
    unsupported: list[str] = []
    embeddings: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_BUNDLE):  # kept, but not used yet: reported like any key not applied
            embeddings[key] = value
            unsupported.append(key)
        elif key.startswith(_KOHYA_PREFIXES) and "." in key:
            module, _, leaf = key.partition(".")
            kohya_leaves.setdefault(module, {})[leaf] = value
        else:
            leaf = next((lf for lf in _PEFT_LEAVES if key.endswith("." + lf)), None)
            if leaf is None:
                unsupported.append(key)
            else:
                parts.setdefault(key[: -len(leaf) - 1], {})[_PEFT_LEAVES[leaf]] = value
    modules: dict[str, AdapterModule] = {}
    for module, leaves in kohya_leaves.items():
        if any(leaf.startswith("lora_") for leaf in leaves):  # LoRA / LoCon / CP (+ DoRA, bias)
            for leaf, value in leaves.items():
                role = _KOHYA_LEAVES.get(leaf)
                if role is None:
                    unsupported.append(f"{module}.{leaf}")
                else:
                    parts.setdefault(module, {})[role] = value
            continue
        lyco, unused = build_module(leaves, f"LoRA {name!r}: layer {module}")
        unsupported += [f"{module}.{leaf}" for leaf in unused]
        if lyco is not None:
            modules[module] = lyco
    peft_config: dict[str, object] = {}
    if PEFT_METADATA_KEY in metadata:
        try:
            peft_config = json.loads(metadata[PEFT_METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraError(f"LoRA {name!r}: {PEFT_METADATA_KEY} metadata is not valid JSON") from None
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            unsupported += [f"{module} (has {', '.join(sorted(p))} but no {'up' if 'down' in p else 'down'})"]
            continue
        alpha = _float(p["alpha"]) if "alpha" in p else None
        rslora = False
        if not module.startswith(_KOHYA_PREFIXES) and alpha is None and peft_config:
            comp, _, path = module.partition(".")
            alpha, rslora = _peft_alpha(peft_config, comp, path)
        if alpha == 0:
            alpha = None  # kohya: alpha 0 means alpha = rank
        dora = p.get("dora")
        if "magnitude" in p:
            dora = _peft_magnitude(p["magnitude"])
        modules[module] = LoraModule(
            down=p["down"],
            up=p["up"],
            mid=p.get("mid"),
            alpha=alpha,
            scale_override=_float(p["scale"]) if "scale" in p else None,
            rslora=rslora,
            dora_scale=dora,
            weight_bias=p.get("weight_bias"),
        )
    if not modules:
        raise LoraError(
            f"LoRA {name!r} holds no LoRA layers (expected keys like lora_unet_*.lora_down.weight, "
            f"lora_unet_*.hada_w1_a or unet.*.lora_A.weight; found e.g. {next(iter(sd), 'nothing')!r})"
        )
    return LoraNetwork(name, modules, unsupported, metadata, embeddings)


def load_lora(path: str | Path, name: str | None = None) -> LoraNetwork:
    """Read a LoRA file (.safetensors, or .pt/.ckpt/.bin through the weights-only loader)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    sd, metadata = load_state_dict(path)
    try:
        net = network_from_state_dict(sd, name or path.stem, metadata)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from None
    net.path = path
    return net
