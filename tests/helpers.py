"""Shared test fixtures-as-functions: tiny random checkpoints written the way users have them."""

from __future__ import annotations

from functools import lru_cache
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
    try:
        cached = _random_state_dict(cfg, seed)
    except TypeError:  # a config with an unhashable field: built afresh
        cached = randomize_(StableDiffusion(cfg), seed).state_dict()
    sd = {k: v.clone() for k, v in cached.items()}  # the caller's to change
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    path = tmp_path / f"{name}.safetensors"
    save_state_dict(sd, path, metadata=checkpoint_metadata(cfg) if metadata else None)
    return cfg, sd, path


@lru_cache(maxsize=8)
def _random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """randomize_(StableDiffusion(cfg), seed)'s weights, built once per run (the same seeded values every
    time: randomize_ draws from its own generator), since many tests ask for the same tiny checkpoint."""
    return randomize_(StableDiffusion(cfg), seed).state_dict()
