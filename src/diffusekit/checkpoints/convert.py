"""Convert between formats, prune training state, cast dtypes; report bytes before and after."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.sd import StableDiffusion
from .detect import detect_config
from .diffusers import read_diffusers_folder, write_diffusers_folder
from .inspect import dtype_name
from .load import checkpoint_metadata, load_vae_state_dict, replace_vae, validate_state_dict
from .single_file import CheckpointError, cast_floats, load_state_dict, save_state_dict
from .single_file import prune as prune_training_state

FORMATS = ("single-file", "diffusers")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    fmt: str = "single-file",
    dtype: torch.dtype | None = None,
    prune: bool = False,
    keep_ema: bool = False,
    prediction: str | None = None,
    vae: str | Path | None = None,
) -> dict:
    """Read `src` (file or diffusers folder), write `dst` in `fmt`; returns a summary dict.

    Without pruning, a single file keeps every entry it had (EMA included); a diffusers folder can only
    hold the network weights, so EMA/training entries are left out there (and said so in the notes).
    """
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; valid: {', '.join(FORMATS)}")
    if keep_ema and not prune:
        raise CheckpointError("--keep-ema chooses which U-Net weights survive pruning; use it with --prune")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: destination is the source; write to a new path")
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    notes: list[str] = []
    vae_sd = load_vae_state_dict(vae) if vae is not None else {}
    if vae is not None:
        notes.append(f"VAE replaced by {Path(vae).name}")
    if src.is_dir():
        sd, cfg, tokenizer, metadata = read_diffusers_folder(src, prediction=prediction)
        sd = replace_vae(sd, vae_sd)
    else:
        sd, metadata = load_state_dict(src)
        if prune:
            before = len(sd)
            sd = prune_training_state(sd, keep_ema=keep_ema)
            kept = " (EMA weights kept)" if keep_ema else ""
            notes.append(f"pruned {before - len(sd)} EMA/training entries{kept}")
        sd = replace_vae(sd, vae_sd)
        cfg = detect_config(sd, metadata, prediction=prediction, name=src.name)
        tokenizer = None
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    network, load_notes = validate_state_dict(sd, model, src.name)
    notes += load_notes
    if dtype is not None:
        sd = cast_floats(sd, dtype)
        network = cast_floats(network, dtype)
    if fmt == "single-file":
        # pruned: the network weights alone; otherwise every entry the source had
        save_state_dict(network if prune else dict(sd), dst, metadata=checkpoint_metadata(cfg))
    else:
        if len(sd) > len(network):
            notes.append(f"{len(sd) - len(network)} non-network entries are not stored in a diffusers folder")
        write_diffusers_folder(network, cfg, dst, tokenizer=tokenizer)
    dtypes = sorted({dtype_name(t.dtype) for t in network.values() if t.is_floating_point()})
    return {
        "src": str(src),
        "dst": str(dst),
        "format": fmt,
        "family": cfg.family,
        "dtype": "/".join(dtypes),
        "bytes_before": _size(src),
        "bytes_after": _size(dst),
        "notes": notes,
    }
