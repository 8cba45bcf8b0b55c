"""AnimateDiff: load motion modules, insert them into a loaded SD1.x or SDXL U-Net for one render, and run
the U-Net over sliding, overlapping frame windows when a video is longer than the module's context.

The base U-Net is not changed: ``inflate`` inserts the modules into its stages and removes them again on
exit, so the same Pipeline keeps making still images bit for bit as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.single_file import CheckpointError, load_state_dict
from ..models.configs import UNET_PREFIX
from ..models.unet import Upsample
from .motion_module import MotionAdapter, MotionConfig, MotionModule

_DIFFUSERS_RENAMES = (
    (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
    (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
)  # fmt: skip
_MM = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.")


def _config_from_keys(sd: dict[str, Tensor], path: Path) -> MotionConfig:
    """Shape of an original-layout file from its key names and tensor shapes (heads are always 8)."""
    levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
    if not levels:
        raise CheckpointError(
            f"{path}: no motion-module weights (down_blocks.N.motion_modules.*); expected an AnimateDiff "
            "motion module (mm_sd_v15*.ckpt/.safetensors or a diffusers MotionAdapter folder)"
        )
    channels = tuple(
        sd[f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[0] for i in levels
    )
    per_block = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.motion_modules.")})
    depth = len(
        {
            k.split(".")[6]
            for k in sd
            if k.startswith("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.")
        }
    )  # noqa: E501
    pe = [v for k, v in sd.items() if k.endswith("pos_encoder.pe")]
    return MotionConfig(
        channels=channels, layers_per_block=per_block, transformer_depth=depth,
        max_frames=pe[0].shape[1] if pe else 32, mid_block=any(k.startswith("mid_block.") for k in sd),
    )  # fmt: skip


def _read_diffusers_folder(folder: Path) -> tuple[dict[str, Tensor], MotionConfig]:
    cfg_path = folder / "config.json"
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read the MotionAdapter config ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")

    def one(name: str, default):
        value = d.get(name, default)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise CheckpointError(f"{cfg_path}: per-level {name} {value} is not supported (one value)")
            value = value[0]
        return value

    cfg = MotionConfig(
        channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=one("motion_layers_per_block", 2), heads=one("motion_num_attention_heads", 8),
        norm_groups=d.get("motion_norm_num_groups", 32), max_frames=d.get("motion_max_seq_length", 32),
        transformer_depth=one("motion_transformer_layers_per_block", 1),
        mid_block=d.get("use_motion_mid_block", True),
    )  # fmt: skip
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    found = [w for w in weights if w.is_file()]
    if not found:
        raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors beside config.json")
    raw, _ = load_state_dict(found[0])
    sd = {}
    for key, value in raw.items():
        if key.endswith(".pos_embed.pe"):  # the fixed sinusoid table; ours is computed at the same length
            continue
        for old, new in _DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        sd[_MM.sub(r"\1.motion_modules.\2.temporal_transformer.", key)] = value
    return sd, cfg


def load_motion_adapter(path: str | Path) -> MotionAdapter:
    """An AnimateDiff motion module from an original file (.ckpt/.safetensors) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        sd, cfg = _read_diffusers_folder(path)
    elif path.is_file():
        sd, _ = load_state_dict(path)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        cfg = _config_from_keys(sd, path)
    else:
        raise CheckpointError(
            f"no motion module at {path}: expected a file or a diffusers MotionAdapter folder"
        )
    adapter = MotionAdapter(cfg)
    own = adapter.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.endswith("pos_encoder.pe"))
    unknown = sorted(k for k in sd if k not in own)
    if missing or unknown:
        raise CheckpointError(
            f"{path}: not an AnimateDiff motion module (SD1.x or SDXL) of the expected layout "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unknown)} unknown, e.g. {unknown[:2]})"
        )
    for key, value in sd.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    adapter.load_state_dict(sd, strict=False)
    return adapter


def _places(unet: nn.Module, adapter: MotionAdapter) -> list[tuple[nn.Sequential, int, MotionModule]]:
    """Where each motion module goes: (U-Net stage, index to insert at, module)."""
    cfg, ucfg = adapter.cfg, unet.cfg
    levels, n = len(ucfg.channel_mult), ucfg.num_res_blocks
    widths = tuple(m * ucfg.model_channels for m in ucfg.channel_mult)
    if widths != cfg.channels or n != cfg.layers_per_block:
        raise ValueError(
            f"the motion module fits a U-Net with level widths {cfg.channels} and {cfg.layers_per_block} "
            f"res blocks per level; this model has {widths} and {n} (AnimateDiff modules are for SD1.x: "
            "mm_sd_v14/v15*, or SDXL: mm_sdxl*)"
        )
    places = []
    for i in range(levels):
        for j in range(n):
            stage = unet.input_blocks[1 + i * (n + 1) + j]
            places.append((stage, len(stage), adapter.down_blocks[i].motion_modules[j]))
    if adapter.mid_block is not None:
        places.append((unet.middle_block, len(unet.middle_block) - 1, adapter.mid_block.motion_modules[0]))
    for i in range(levels):
        for j in range(n + 1):
            stage = unet.output_blocks[i * (n + 1) + j]
            at = next((k for k, m in enumerate(stage) if isinstance(m, Upsample)), len(stage))
            places.append((stage, at, adapter.up_blocks[i].motion_modules[j]))
    return places


def context_windows(frames: int, length: int, overlap: int) -> list[list[int]]:
    """Frame windows of `length` covering 0..frames-1, consecutive ones sharing `overlap` frames."""
    if frames <= length:
        return [list(range(frames))]
    stride = max(1, length - overlap)
    starts = list(range(0, frames - length + 1, stride))
    if starts[-1] != frames - length:
        starts.append(frames - length)
    return [list(range(s, s + length)) for s in starts]


class WindowedUNet(nn.Module):
    """The inflated U-Net run over frame windows; overlapping frames average their predictions."""

    def __init__(self, unet: nn.Module, adapter: MotionAdapter, frames: int, length: int, overlap: int):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.frames, self.windows = frames, context_windows(frames, length, overlap)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        f = self.frames
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        groups = x.shape[0] // f  # (uncond, cond) under CFG; each group's frames are consecutive
        if len(self.windows) == 1:
            self.adapter.set_frames(f)
            return self.unet(x, timesteps, context, y)
        out, count = None, torch.zeros(x.shape[0], 1, 1, 1)
        for window in self.windows:
            idx = torch.tensor([g * f + w for g in range(groups) for w in window])
            self.adapter.set_frames(len(window))
            part = self.unet(x[idx], timesteps[idx], context[idx], None if y is None else y[idx])
            out = torch.zeros(x.shape[0], *part.shape[1:], dtype=part.dtype) if out is None else out
            out[idx] += part
            count[idx] += 1
        return out / count.to(out)


@contextmanager
def inflate(
    pipe, adapter: MotionAdapter, frames: int, *, context: int = 16, overlap: int = 4
) -> Iterator[None]:
    """Insert `adapter` into `pipe`'s U-Net for a `frames`-frame render; restore it exactly on exit."""
    if getattr(pipe, "ov_unet", None) is not None:  # motion modules go into the PyTorch U-Net
        from ..accel.openvino_backend import torch_unet

        with torch_unet(pipe, "AnimateDiff (motion modules inside the U-Net)", "use --precision auto"):
            with inflate(pipe, adapter, frames, context=context, overlap=overlap):
                yield
        return
    unet = pipe.model.unet
    if context > adapter.cfg.max_frames:
        raise ValueError(f"context {context} exceeds the motion module's {adapter.cfg.max_frames} frames")
    adapter.to(device=pipe.device, dtype=pipe.dtype)
    places = _places(unet, adapter)
    for stage, at, module in sorted(places, key=lambda p: -p[1]):  # later indices first per stage
        stage.insert(at, module)
    parent_name, _, leaf = UNET_PREFIX.rstrip(".").rpartition(".")
    parent = pipe.model.get_submodule(parent_name)  # the U-Net sits at its checkpoint key path
    setattr(parent, leaf, WindowedUNet(unet, adapter, frames, context, overlap))
    try:
        yield
    finally:
        setattr(parent, leaf, unet)
        for stage, _, module in places:
            for k, m in enumerate(stage):
                if m is module:
                    del stage[k]
                    break
