"""Adapter module names -> our SD3/SD3.5 modules: the names diffusers/PEFT and kohya sd-scripts files give
a layer of the MMDiT and of the CLIP-L / CLIP-G text encoders.

* diffusers / PEFT (``StableDiffusion3Pipeline.save_lora_weights``): ``transformer.<SD3Transformer2DModel
  path>``, ``text_encoder.<...>``
  (CLIP-L) and ``text_encoder_2.<...>`` (CLIP-G), transformers paths with or without ``text_model.``.
  diffusers splits our fused ``attn.qkv`` into ``to_q``/``to_k``/``to_v`` (image stream) and
  ``add_q_proj``/``add_k_proj``/``add_v_proj`` (text stream): those adapt a third of the fused layer's
  output ("fused" targets). Two modulation layers hold (scale, shift) in diffusers where ours hold
  (shift, scale) (``convert_mmdit``): an update named the diffusers way gets its output halves swapped.
* kohya sd-scripts (``networks/lora_sd3.py``): ``lora_unet_`` + the original single-file module path with
  dots turned into underscores (``lora_unet_joint_blocks_0_x_block_attn_qkv``, one adapter on the fused
  qkv; ``split_qkv`` training saves it fused too), ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (CLIP-G) +
  the transformers path. ``lora_te3_`` (T5-XXL) layers are not applied: they are reported as unmatched.
"""

from __future__ import annotations

from functools import lru_cache

from torch import nn

from ..checkpoints.convert_mmdit import _BLOCK, _QKV, _TOP, _swapped
from ..models.mmdit import MMDiT
from ..models.sd3_configs import SD3Config
from .keys import Target, _add, _hf_text_paths

__all__ = ["sd3_adapter_names", "SD3_COMPONENTS"]

SD3_COMPONENTS = ("mmdit", "clip_l", "clip_g")
_DIFFUSERS_PREFIXES = ("transformer.",)
_CLIP = {"clip_l": ("lora_te1_", "text_encoder"), "clip_g": ("lora_te2_", "text_encoder_2")}


def _diffusers_paths(path: str) -> list[tuple[str, int | None]]:
    """[(diffusers module path, q/k/v part or None)] for our MMDiT module `path`; [] when it has none."""
    if path in _TOP:
        return [(_TOP[path], None)]
    if not path.startswith("joint_blocks."):
        return []
    _, i, rest = path.split(".", 2)
    if rest in _QKV:
        return [(f"transformer_blocks.{i}.{name}", part) for part, name in enumerate(_QKV[rest])]
    if rest in _BLOCK:
        return [(f"transformer_blocks.{i}.{_BLOCK[rest]}", None)]
    return []


def _mmdit_names(cfg: SD3Config) -> dict[str, Target]:
    names: dict[str, Target] = {}
    for path, module in MMDiT(cfg.mmdit, device="meta").named_modules():
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Conv2d):
            kind = "conv"
        else:
            continue
        _add(names, "lora_unet_" + path.replace(".", "_"), Target("mmdit", path, kind))
        swap = _swapped(f"{path}.weight", cfg.mmdit.depth)
        for theirs, part in _diffusers_paths(path):
            target = Target("mmdit", path, "fused", part) if part is not None else Target("mmdit", path, kind)
            if swap:
                target = Target("mmdit", path, kind, swap_halves=True)
            for prefix in _DIFFUSERS_PREFIXES:
                _add(names, prefix + theirs, target)
    return names


def _clip_names(cfg: SD3Config) -> dict[str, Target]:
    names: dict[str, Target] = {}
    for component, (kohya, theirs) in _CLIP.items():
        for path, target in _hf_text_paths(getattr(cfg, component), component).items():
            _add(names, kohya + path.replace(".", "_"), target)
            _add(names, f"{theirs}.{path}", target)
            if path.startswith("text_model."):  # transformers 5 saves CLIPTextModel without it
                _add(names, f"{theirs}.{path.removeprefix('text_model.')}", target)
    return names


@lru_cache(maxsize=8)
def sd3_adapter_names(cfg: SD3Config) -> dict[str, Target]:
    """{adapter module name in any supported spelling: Target} for the SD3 model described by `cfg`."""
    names = _mmdit_names(cfg)
    for name, target in _clip_names(cfg).items():
        _add(names, name, target)
    return names
