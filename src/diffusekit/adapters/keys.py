"""Adapter module names -> our modules: the names kohya, A1111 and diffusers/PEFT files give a layer.

Our modules mirror the original LDM/SGM checkpoint layout. Adapter files name the same layers in other
spellings:

* kohya / A1111, SD1 and SD2: the diffusers U-Net path with dots turned into underscores
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); text encoder
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (transformers' CLIP names, also for SD2's
  OpenCLIP encoder, whose packed q/k/v projection then receives three separate adapters).
* kohya SDXL: the SGM U-Net path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), which
  is ours; ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP bigG, transformers names).
* diffusers / PEFT: ``unet.<diffusers path>``, ``text_encoder[_2].<transformers path>`` with or without
  the ``text_model.`` part that transformers 5 leaves out.

Every spelling of every layer is generated from the model config (forward), so the reverse lookup is
exact: no underscore guessing, and a name that matches nothing is reported by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from ..checkpoints.convert_unet import _key_map as unet_key_map
from ..models.clip import build_text_encoder
from ..models.configs import ModelConfig, TextEncoderConfig
from ..models.unet import UNetModel

__all__ = ["Target", "adapter_names", "COMPONENTS"]

# Our component names (StableDiffusion.components()) and the kohya prefixes that address each.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_TE_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


@dataclass(frozen=True)
class Target:
    """One adapted layer: component, our module path, kind ("linear", "conv", "packed", "fused") and, for
    the packed q/k/v in-projection of an OpenCLIP encoder or a third of an MMDiT's fused ``qkv`` Linear
    ("fused"), which third (0 = q, 1 = k, 2 = v). `swap_halves`: the file's update has the two halves of
    its outputs the other way round (a diffusers name of an SD3 (shift, scale) modulation layer)."""

    component: str
    path: str
    kind: str
    part: int | None = None
    swap_halves: bool = field(default=False, compare=False)

    @property
    def is_text(self) -> bool:
        return self.component not in ("unet", "mmdit")

    @property
    def is_split(self) -> bool:
        """Whether the target adapts a third (q, k or v) of its layer's output."""
        return self.kind in ("packed", "fused")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


def _add(names: dict[str, Target], name: str, target: Target) -> None:
    old = names.setdefault(name, target)
    if old != target:
        raise RuntimeError(f"internal error: adapter name {name!r} addresses two layers")


def _unet_names(model_cfg: ModelConfig) -> dict[str, Target]:
    cfg = model_cfg.unet
    ours_to_diffusers, _ = unet_key_map(cfg)
    names: dict[str, Target] = {}
    for path, module in UNetModel(cfg, device="meta").named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        target = Target("unet", path, kind)
        theirs = ours_to_diffusers[f"{path}.weight"].removesuffix(".weight")
        _add(names, "lora_unet_" + path.replace(".", "_"), target)  # SGM spelling (kohya SDXL)
        _add(names, "lora_unet_" + theirs.replace(".", "_"), target)  # diffusers spelling (kohya SD1/2)
        _add(names, "unet." + theirs, target)  # diffusers / PEFT
    return names


def _hf_text_paths(cfg: TextEncoderConfig, component: str) -> dict[str, Target]:
    """{transformers module path: target} for every Linear layer of the text encoder."""
    if cfg.layout == "hf":
        model = build_text_encoder(cfg, device="meta")
        return {
            path: Target(component, path, "linear")
            for path, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
    out: dict[str, Target] = {}
    for n in range(cfg.layers):
        theirs, ours = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for i, proj in enumerate("qkv"):
            out[f"{theirs}self_attn.{proj}_proj"] = Target(component, f"{ours}attn.in_proj", "packed", i)
        out[f"{theirs}self_attn.out_proj"] = Target(component, f"{ours}attn.out_proj", "linear")
        out[f"{theirs}mlp.fc1"] = Target(component, f"{ours}mlp.c_fc", "linear")
        out[f"{theirs}mlp.fc2"] = Target(component, f"{ours}mlp.c_proj", "linear")
    return out


def _text_names(cfg: TextEncoderConfig, component: str) -> dict[str, Target]:
    names: dict[str, Target] = {}
    for path, target in _hf_text_paths(cfg, component).items():
        for prefix in _KOHYA_TE_PREFIXES[component]:
            _add(names, prefix + path.replace(".", "_"), target)
        _add(names, f"{component}.{path}", target)
        if path.startswith("text_model."):  # transformers 5 saves CLIPTextModel without it
            _add(names, f"{component}.{path.removeprefix('text_model.')}", target)
    return names


@lru_cache(maxsize=8)
def adapter_names(cfg: ModelConfig) -> dict[str, Target]:
    """{adapter module name in any supported spelling: Target} for the model described by `cfg`."""
    if cfg.family == "sd3":
        from .keys_sd3 import sd3_adapter_names

        return sd3_adapter_names(cfg)
    names = _unet_names(cfg)
    for component, tcfg in zip(COMPONENTS[1:], cfg.text_encoders, strict=False):
        for name, target in _text_names(tcfg, component).items():
            _add(names, name, target)
    return names


@lru_cache(maxsize=8)
def preferred_names(cfg: ModelConfig, style: str = "kohya") -> dict[Target, str]:
    """{Target: the name a file in `style` ("kohya" or "diffusers") gives it} for the model `cfg`.

    kohya: diffusers spelling for SD1/SD2 U-Nets, SGM spelling for SDXL (as sd-scripts writes them);
    ``lora_te_`` or, for SDXL, ``lora_te1_``/``lora_te2_``. diffusers: ``unet.<diffusers path>``,
    ``text_encoder[_2].text_model.<...>``.
    """
    if style not in ("kohya", "diffusers"):
        raise ValueError(f"unknown LoRA file style {style!r}; valid: kohya, diffusers")
    sdxl = cfg.family == "sdxl"
    out: dict[Target, str] = {}
    for name, target in adapter_names(cfg).items():
        if style == "diffusers":
            keep = name.startswith(f"{target.component}.") and (
                not target.is_text or name.startswith(f"{target.component}.text_model.")
            )
        elif target.component == "unet":
            sgm = name == "lora_unet_" + target.path.replace(".", "_")
            keep = name.startswith("lora_unet_") and sgm == sdxl
        else:
            keep = name.startswith(
                ("lora_te1_" if target.component == "text_encoder" else "lora_te2_") if sdxl else "lora_te_"
            )
        if keep:
            out.setdefault(target, name)
    return out
