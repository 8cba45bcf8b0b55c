"""Shared test fixtures-as-functions: tiny random checkpoints written the way users have them."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.checkpoints.load import checkpoint_metadata
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.models.configs import ModelConfig, preset
from diffusekit.models.init import randomize_
from diffusekit.models.sd import StableDiffusion


def make_checkpoint(
    name: str,
    tmp_path: Path,
    *,
    seed: int = 0,
    metadata: bool = True,
    dtype: torch.dtype | None = None,
    cfg: ModelConfig | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """A single-file checkpoint of preset `name` (or of `cfg`, filed under `name`) with seeded random
    weights: (config, state dict, path)."""
    cfg = cfg or preset(name)
    sd = randomize_(StableDiffusion(cfg), seed).state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    path = tmp_path / f"{name}.safetensors"
    save_state_dict(sd, path, metadata=checkpoint_metadata(cfg) if metadata else None)
    return cfg, sd, path
