"""Checkpoint merging with A1111's semantics (``modules/extras.py run_modelmerger``).

* weighted sum (A, B, M): ``(1 - M) * A + M * B``
* add difference (A, B, C, M): ``A + M * (B - C)``; a key C lacks contributes nothing (B - C := 0)

Only keys containing "model" and present in both A and B merge (A1111's rule; transformers'
``position_ids`` buffer is skipped); A's other keys are kept, and keys only B has are copied. An
inpainting (9-channel) or instruct-pix2pix (8-channel) A with an ordinary (4-channel) B merges the first
4 input channels of the U-Net's first conv and keeps the rest of A; the reverse order is an error, as in
A1111. The output records the recipe in ``sd_merge_recipe`` and the inputs in ``sd_merge_models``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .hashes import sha256_file
from .load import checkpoint_metadata, read_checkpoint
from .single_file import CheckpointError, read_safetensors_header, save_state_dict

__all__ = ["METHODS", "merge_state_dicts", "merge_checkpoints"]

METHODS = ("weighted-sum", "add-difference")
_SKIP = "cond_stage_model.transformer.text_model.embeddings.position_ids"
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def _mergeable(key: str, b: Mapping[str, Tensor]) -> bool:
    return "model" in key and key in b and key != _SKIP


def merge_state_dicts(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    c: Mapping[str, Tensor] | None,
    multiplier: float,
    method: str = "weighted-sum",
) -> dict[str, Tensor]:
    """The merged state dict (float math, stored in A's dtypes)."""
    if method not in METHODS:
        raise CheckpointError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if (method == "add-difference") != (c is not None):
        raise CheckpointError("add-difference needs a third model C; weighted-sum takes exactly two")
    out = dict(a)
    for key, wa in a.items():
        if not _mergeable(key, b) or not wa.is_floating_point():
            continue
        wb = b[key].float()
        if method == "add-difference":
            wb = wb - c[key].float() if key in c else torch.zeros_like(wb)  # type: ignore[index]
        wa32 = wa.float()
        if wa.shape != wb.shape:
            if key == _CONV_IN and wa.ndim == 4 and wb.shape[1] == 4 and wa.shape[1] in (8, 9):
                merged = wa32.clone()  # inpaint / pix2pix A: only the 4 latent channels merge
                merged[:, :4] = _combine(wa32[:, :4], wb, multiplier, method)
                out[key] = merged.to(wa.dtype)
                continue
            raise CheckpointError(
                f"{key}: shape {tuple(wa.shape)} in A but {tuple(wb.shape)} in B; the models are of "
                "different kinds (an inpainting model must be A, not B)"
            )
        out[key] = _combine(wa32, wb, multiplier, method).to(wa.dtype)
    for key, wb in b.items():
        if "model" in key and key not in a:
            out[key] = wb
    return out


def _combine(a: Tensor, b: Tensor, m: float, method: str) -> Tensor:
    return (1 - m) * a + m * b if method == "weighted-sum" else a + m * b


def _provenance(path: Path) -> tuple[str, dict]:
    """(sha256, sd_merge_models entry merged with the input's own merge history)."""
    digest = sha256_file(path) if path.is_file() else ""
    models: dict = {}
    if path.is_file() and path.suffix.lower() == ".safetensors":
        meta = read_safetensors_header(path)[1]
        try:
            models = json.loads(meta.get("sd_merge_models", "{}"))
        except json.JSONDecodeError:
            models = {}
        recipe = meta.get("sd_merge_recipe")
    else:
        recipe = None
    models[digest] = {"name": path.name, "sd_merge_recipe": json.loads(recipe) if recipe else None}
    return digest, models


def merge_checkpoints(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    c: str | Path | None = None,
    multiplier: float = 0.5,
    method: str = "weighted-sum",
    dtype: torch.dtype | None = None,
) -> dict:
    """Merge checkpoint files or diffusers folders into a .safetensors file; returns a summary."""
    paths = [Path(p) for p in (a, b, c) if p is not None]
    loaded = [read_checkpoint(p, prune_training=True) for p in paths]
    sd_a, cfg_a = loaded[0][0], loaded[0][1]
    if loaded[1][1].family != cfg_a.family:
        raise CheckpointError(
            f"A is {cfg_a.family} but B is {loaded[1][1].family}; merge models of one family"
        )
    merged = merge_state_dicts(
        sd_a, loaded[1][0], loaded[2][0] if c is not None else None, multiplier, method
    )
    if dtype is not None:
        merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    hashes, models = [], {}
    for p in paths:
        digest, entry = _provenance(p)
        hashes.append(digest)
        models.update(entry)
    recipe = {
        "type": "webui",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2] if c is not None else None,
        "interp_method": "Weighted sum" if method == "weighted-sum" else "Add difference",
        "multiplier": multiplier,
        "save_as_half": dtype == torch.float16,
        "merged_by": "diffusekit merge",
    }
    meta = checkpoint_metadata(
        cfg_a, {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}
    )
    save_state_dict(merged, out, metadata=meta)
    return {"out": str(out), "method": method, "multiplier": multiplier, "keys": len(merged)}
