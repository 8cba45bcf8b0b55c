"""`inspect` and `convert` for SD3/SD3.5 files and diffusers folders (the U-Net families' tools hand over
to these when the source is an SD3 model)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from ..models.sd3 import COMPONENTS, PREFIXES
from ..models.sd3_configs import SD3_PRESETS, SD3Config
from ..params import ModelDefaults
from .hashes import AUTOV2_LEN, autov1, sha256_file
from .inspect import ComponentReport, InspectReport, disk_bytes, dtype_name
from .scaled_fp8 import has_scaled_weights, is_quant_key
from .sd3 import build_sd3, is_sd3_file, read_sd3, sd3_metadata
from .single_file import CheckpointError, cast_floats, detect_format, save_state_dict


def matching_sd3_preset(cfg: SD3Config) -> str | None:
    """The SD3 preset equal to `cfg` in structure (names and the position-table init grid ignored)."""
    from dataclasses import replace

    def norm(c: SD3Config) -> SD3Config:
        return replace(c, name="", mmdit=replace(c.mmdit, pos_embed_base=0))

    return next((n for n, p in SD3_PRESETS.items() if norm(p) == norm(cfg)), None)


def _t5_tokenizer_of(path: Path) -> Path | None:
    from ..pipeline_sd3 import find_t5_tokenizer

    return find_t5_tokenizer(path)


def inspect_sd3(path: str | Path, *, hashes: bool = True) -> InspectReport:
    """Components, parameters, bytes and memory of an SD3 file or folder, without building the model."""
    path = Path(path)
    sd, cfg, metadata = read_sd3(path, dequantize=False)  # the file as stored (fp8 + scales)
    components = []
    for name in COMPONENTS:
        prefix = PREFIXES[name]
        params = nbytes = 0
        dtypes: Counter[str] = Counter()
        for key, t in sd.items():
            if key.startswith(prefix) and not is_quant_key(key):
                params += t.numel()
                nbytes += t.numel() * t.element_size()
                dtypes[dtype_name(t.dtype)] += t.numel()
        if params:
            components.append(ComponentReport(name, prefix, params, nbytes, dict(dtypes)))
    total = sum(c.parameters for c in components)
    notes = [f"flow matching, shift {cfg.shift}"]
    if has_scaled_weights(sd):
        notes.append("scaled fp8 weights (ComfyUI layout): dequantized to the compute dtype at load")
    if not any(c.name == "t5" for c in components):
        notes.append("no T5-XXL weights: runs with --no-t5, or add it with --text-encoder")
    elif _t5_tokenizer_of(path) is None:
        notes.append("no T5 tokenizer (spiece.model) beside the file: pass --t5-tokenizer to generate")
    fmt = (
        "diffusers folder"
        if path.is_dir()
        else ("safetensors" if detect_format(path) == "safetensors" else "pickle")
    )
    report = InspectReport(
        path=str(path),
        format=fmt,
        family="sd3",
        preset=matching_sd3_preset(cfg),
        prediction="flow (velocity)",
        components=components,
        parameters=total,
        weight_bytes=sum(c.bytes for c in components),
        file_bytes=disk_bytes(path),
        memory_estimate={
            "fp32": total * 4,
            "bf16": total * 2,
            "bf16 without T5": (total - sum(c.parameters for c in components if c.name == "t5")) * 2,
        },  # fmt: skip
        notes=notes,
        recommended=ModelDefaults.from_metadata(metadata, path.name).overrides(),
    )
    if hashes and path.is_file():
        sha = sha256_file(path)
        report.hashes = {"sha256": sha, "autov2": sha[:AUTOV2_LEN], "autov1": autov1(path)}
    return report


def convert_sd3(
    src: str | Path, dst: str | Path, *, fmt: str = "single-file", dtype: torch.dtype | None = None
) -> dict:
    """SD3 file or folder -> single file (with our metadata) or diffusers folder; the T5 tokenizer travels
    along (beside a single file as <stem>.spiece.model, in tokenizer_3/ of a folder)."""
    src, dst = Path(src), Path(dst)
    if fmt not in ("single-file", "diffusers"):
        raise CheckpointError(f"unknown output format {fmt!r}; valid: single-file, diffusers")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: destination is the source; write to a new path")
    sd, cfg, metadata = read_sd3(src, dtype=dtype)  # scaled fp8: dequantized, to dtype if given
    _, notes = build_sd3({k: v.to("meta") for k, v in sd.items()}, cfg, name=src.name, device="meta")
    if dtype is not None:
        sd = cast_floats(sd, dtype)
    spiece = _t5_tokenizer_of(src)
    if fmt == "single-file":
        recommended = ModelDefaults.from_metadata(metadata, src.name).to_metadata()
        save_state_dict(sd, dst, metadata=sd3_metadata(cfg, recommended))
        if spiece is not None:
            shutil.copyfile(spiece, dst.with_suffix(".spiece.model"))
    else:
        from .sd3_diffusers import write_sd3_diffusers_folder

        write_sd3_diffusers_folder(sd, cfg, dst, t5_tokenizer=spiece)
        if spiece is None and any(k.startswith(PREFIXES["t5"]) for k in sd):
            notes.append("T5 weights left out of the folder: no T5 tokenizer found to go with them")
    dtypes = sorted({dtype_name(t.dtype) for t in sd.values() if t.is_floating_point()})
    return {"src": str(src), "dst": str(dst), "format": fmt, "family": "sd3", "dtype": "/".join(dtypes),
            "bytes_before": disk_bytes(src), "bytes_after": disk_bytes(dst), "notes": notes}  # fmt: skip


__all__ = ["convert_sd3", "inspect_sd3", "is_sd3_file", "matching_sd3_preset"]
