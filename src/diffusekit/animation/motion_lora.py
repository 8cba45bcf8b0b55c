"""MotionLoRA (AnimateDiff v2 camera motions: zoom, pan, tilt, rolling): low-rank deltas of the temporal
attention projections, merged into a loaded motion module as W + weight * up @ down.

Three key layouts are read and mapped onto the motion module's own keys
(``<block>.motion_modules.<j>.temporal_transformer.transformer_blocks.<k>.attention_blocks.<a>.to_q``):
  original ``v2_lora_*.ckpt``:   ``...attention_blocks.0.processor.to_q_lora.down.weight`` (and ``.up.``)
  diffusers hub folders:         ``unet.<block>.motion_modules.<j>.transformer_blocks.<k>.attn1.processor.
                                 to_q_lora.down.weight`` (what ``pipe.load_lora_weights`` reads)
  diffusers/PEFT saves:          ``unet.<...>.attn1.to_q.lora_A.weight`` / ``lora_B``
The files carry no alpha: the delta is scaled by the user's weight alone (PEFT's alpha = rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.single_file import CheckpointError, load_state_dict
from .motion_module import MotionAdapter

LORA_FILES = ("diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors")
MAX_WEIGHT = 4.0
_PROJ = re.compile(
    r"^(?P<base>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)"
    r"(?:_lora\.(?P<ud>up|down)|(?:\.0)?\.lora_(?P<ab>A|B)|(?:\.0)?\.lora\.(?P<ud2>up|down))\.weight$"
)
_MM = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(?!temporal_transformer)"
)
_ATTN = ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."))


class MotionLoraError(ValueError):
    """A MotionLoRA file or argument that cannot be used."""


@dataclass(frozen=True)
class MotionLora:
    """One MotionLoRA: {motion-module weight key: (up (out, r), down (r, in))}."""

    path: Path
    pairs: dict[str, tuple[Tensor, Tensor]]

    @property
    def rank(self) -> int:
        return max(down.shape[0] for _, down in self.pairs.values())


def parse_motion_lora(text: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (path, weight); the weight defaults to 1.0."""
    path, sep, tail = text.rpartition(":")
    weight = 1.0
    if sep and path and "/" not in tail and "\\" not in tail:
        try:
            weight = float(tail)
        except ValueError:
            if Path(text).exists():  # a ':' inside the file name
                return text, 1.0
            raise MotionLoraError(
                f"--motion-lora {text!r}: the weight after ':' must be a number, e.g. zoom_in.ckpt:0.8"
            ) from None
    else:
        path = text
    if not path:
        raise MotionLoraError("--motion-lora needs a path: PATH[:WEIGHT]")
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT or weight != weight:
        raise MotionLoraError(f"--motion-lora {text!r}: weight {weight} is out of range; valid: -4..4")
    return path, weight


def _model_key(key: str) -> tuple[str, str] | None:
    """(motion-module weight key, 'up'|'down') of a LoRA key, or None when it is not one."""
    key = key.removeprefix("module.").removeprefix("unet.")
    m = _PROJ.match(key)
    if m is None:
        return None
    base = m["base"]
    for old, new in _ATTN:
        base = (base + ".").replace(old, new).rstrip(".")
    base = _MM.sub(r"\1.motion_modules.\2.temporal_transformer.", base + ".").rstrip(".")
    proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
    side = m["ud"] or m["ud2"] or ("down" if m["ab"] == "A" else "up")
    return f"{base}.{proj}.weight", side


def load_motion_lora(path: str | Path) -> MotionLora:
    """A MotionLoRA from an original file (.ckpt/.safetensors) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in LORA_FILES if (path / n).is_file()]
        if not found:
            raise MotionLoraError(f"{path}: no {' or '.join(LORA_FILES)} in this MotionLoRA folder")
        path = found[0]
    elif not path.is_file():
        raise MotionLoraError(f"no MotionLoRA at {path}: expected a .ckpt/.safetensors file or a folder")
    try:
        sd, _ = load_state_dict(path)
    except CheckpointError as e:
        raise MotionLoraError(str(e)) from None
    halves: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        mk = _model_key(key)
        if mk is None or value.ndim != 2:
            unknown.append(key)
            continue
        halves.setdefault(mk[0], {})[mk[1]] = value
    if unknown or not halves:
        raise MotionLoraError(
            f"{path}: not an AnimateDiff MotionLoRA ({len(unknown)} keys that are not LoRA weights of the "
            f"motion modules' attention, e.g. {unknown[:2]}; expected keys like "
            "'down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
            "processor.to_q_lora.down.weight')"
        )
    pairs = {}
    for key, h in sorted(halves.items()):
        if set(h) != {"up", "down"}:
            raise MotionLoraError(f"{path}: {key} has only its LoRA {'/'.join(h)} half")
        up, down = h["up"], h["down"]  # (out, r), (r, in)
        if up.shape[1] != down.shape[0]:
            raise MotionLoraError(f"{path}: {key} has up {tuple(up.shape)} and down {tuple(down.shape)}")
        pairs[key] = (up, down)
    return MotionLora(path, pairs)


def apply_motion_loras(adapter: MotionAdapter, loras: list[tuple[MotionLora, float]]) -> None:
    """Merge each LoRA into `adapter` in place: W += weight * up @ down (computed in float32)."""
    params = dict(adapter.named_parameters())
    for lora, _ in loras:  # every LoRA fits before any weight changes
        for key, (up, down) in lora.pairs.items():
            if key not in params:
                raise MotionLoraError(
                    f"{lora.path}: {key} is not in the motion module (a MotionLoRA for another motion "
                    f"module, e.g. SD1.5 v2 vs SDXL?)"
                )
            if params[key].shape != (up.shape[0], down.shape[1]):
                raise MotionLoraError(
                    f"{lora.path}: {key} changes a {tuple(params[key].shape)} weight but its LoRA makes "
                    f"{(up.shape[0], down.shape[1])} (a MotionLoRA for another motion module?)"
                )
    with torch.no_grad():
        for lora, weight in loras:
            for key, (up, down) in lora.pairs.items():
                w = params[key]
                delta = up.to(device=w.device, dtype=torch.float32) @ down.to(w.device, torch.float32)
                w.copy_((w.float() + weight * delta).to(w.dtype))
