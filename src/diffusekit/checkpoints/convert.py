"""Convert between formats, prune training state, cast dtypes; report bytes before and after."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.sd import StableDiffusion
from ..params import ModelDefaults
from .diffusers import check_folder_target, write_diffusers_folder
from .inspect import disk_bytes, dtype_name
from .load import checkpoint_metadata, read_checkpoint, validate_state_dict
from .single_file import CheckpointError, cast_floats, save_state_dict

FORMATS = ("single-file", "diffusers")


def _check_paths(src: Path, dst: Path, vae: str | Path | None) -> None:
    """The destination must not be, contain or lie inside the source (or the --vae file or folder)."""
    target = dst.resolve()
    for option, given in (("the source", src), ("the --vae", vae)):
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise CheckpointError(f"{dst}: destination is {option}; write to a new path")
        if source in target.parents:
            raise CheckpointError(f"{dst}: destination is inside {option} {given}; write outside it")
        if target in source.parents:
            raise CheckpointError(f"{dst}: destination contains {option} {given}; write somewhere else")


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
    _check_paths(src, dst, vae)
    if fmt == "diffusers":
        check_folder_target(dst)  # before any reading
    elif dst.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{dst}: a single-file checkpoint is written as .safetensors; name it {dst.name}.safetensors, "
            "or pass --format diffusers to write a folder"
        )
    from .sd3 import is_sd3_file  # SD3/SD3.5 (MMDiT) models convert with their own key maps

    if is_sd3_file(src):
        from .sd3_tools import convert_sd3

        return convert_sd3(src, dst, fmt=fmt, dtype=dtype)
    sd, cfg, tokenizer, metadata, notes = read_checkpoint(
        src, prediction=prediction, vae=vae, prune_training=prune, keep_ema=keep_ema
    )
    recommended = ModelDefaults.from_metadata(metadata, src.name)
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    network, load_notes = validate_state_dict(sd, model, src.name)
    notes += load_notes
    if dtype is not None:
        sd = cast_floats(sd, dtype)
        network = cast_floats(network, dtype)
    if fmt == "single-file":
        # pruned: the network weights alone; otherwise every entry the source had
        meta = checkpoint_metadata(cfg, recommended.to_metadata())  # the settings travel with the weights
        save_state_dict(network if prune else dict(sd), dst, metadata=meta)
    else:
        if recommended.overrides():
            notes.append(
                f"a diffusers folder has no place for the recommended {recommended.overrides()}; "
                "pass them when generating"
            )
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
        "bytes_before": disk_bytes(src),
        "bytes_after": disk_bytes(dst),
        "notes": notes,
    }
