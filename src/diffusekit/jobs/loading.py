"""Catalog entry -> loaded pipeline: which family a model is (from headers, without loading it), how much
memory its weights take once loaded (every tensor, the MMDiT and T5 of SD3 included, in the dtype the
pipeline will compute in), and the load itself (U-Net pipeline, SD3 pipeline, or a store version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .catalog import ModelCatalog, ModelEntry

DENOISER_PREFIX = "model.diffusion_model."  # the U-Net's and the MMDiT's keys in single files
_PRECISION_BYTES = {"fp32": 4, "fp32-fast": 4, "bf16": 2, "fp16": 2}
_PIPELINES = {  # diffusers model_index.json _class_name -> family
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
}


def file_family(path: Path) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' | 'sd3' from a .safetensors header or a diffusers folder's configs;
    None where that needs the whole file (.ckpt pickles) or the file is not a model."""
    from ..checkpoints.detect import detect_family
    from ..checkpoints.sd3 import is_sd3
    from ..checkpoints.single_file import read_safetensors_header

    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text())
            family = _PIPELINES.get(index.get("_class_name"))
            if family is None:  # SD1 and SD2 share a pipeline class; their text width tells them apart
                unet = json.loads((path / "unet" / "config.json").read_text())
                family = {768: "sd1", 1024: "sd2"}.get(unet.get("cross_attention_dim"))
            return family
        if path.suffix.lower() != ".safetensors":
            return None
        entries, _ = read_safetensors_header(path)
        return "sd3" if is_sd3(entries) else detect_family(entries, path.name)
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _tensor_headers(path: Path) -> list[tuple[str, torch.dtype, int]]:
    """(key, dtype, element count) of every tensor in a file or a folder's files."""
    from ..checkpoints.single_file import read_safetensors_header

    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    out = []
    for f in files:
        entries, _ = read_safetensors_header(f)
        for key, info in entries.items():
            n = 1
            for d in info.shape:
                n *= d
            out.append((key, info.dtype, n))
    return out


def _compute_bytes(precision: str, device: str, denoiser_params: int) -> int:
    """Bytes per float weight once loaded: the precision asked for, or what 'auto' picks on `device`."""
    if precision in _PRECISION_BYTES:
        return _PRECISION_BYTES[precision]
    from ..runtime import resolve_device, resolve_precision

    dtype = resolve_precision(precision, resolve_device(device), denoiser_params)
    return torch.finfo(dtype).bits // 8


def weight_bytes(entry: ModelEntry, *, precision: str = "auto", device: str = "auto") -> int:
    """Memory the entry's weights take once loaded: every float tensor (U-Net or MMDiT, VAE, each text
    encoder, T5) at the compute dtype, other tensors as stored. Falls back to the file size for .ckpt."""
    if entry.kind == "store":
        floats = entry.parameters or 0
        return floats * _compute_bytes(precision, device, entry.denoiser_parameters or floats)
    try:
        tensors = _tensor_headers(entry.path)
    except (OSError, ValueError):
        return entry.size_bytes  # a pickle: its size on disk (read whole to know more)
    if not tensors:
        return entry.size_bytes
    denoiser = sum(n for key, _, n in tensors if key.startswith(DENOISER_PREFIX))
    per = _compute_bytes(precision, device, denoiser or sum(n for _, _, n in tensors))
    total = 0
    for _, dtype, n in tensors:
        total += n * (per if dtype.is_floating_point else dtype.itemsize)
    return total


def loaded_bytes(pipe) -> int:
    """Bytes of a loaded pipeline's parameters and buffers (what it holds in memory)."""
    model = pipe.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_pipeline(entry: ModelEntry, catalog: ModelCatalog, *, device: str, precision: str):
    """The pipeline of a catalog entry: a store version, an SD3/SD3.5 model, or a U-Net family model.

    `pipe.model_hash` is the AutoV2 of the file (for store versions: of the file that was added)."""
    from ..runtime import resolve_device

    dev = resolve_device(device)
    if entry.kind == "store":
        return catalog.store.pipeline(entry.version, precision=precision, device=dev)
    if catalog.family(entry) == "sd3":
        from ..pipeline_sd3 import SD3Pipeline

        pipe = SD3Pipeline.from_file(entry.path, precision=precision, device=dev)
        sha = catalog.sha256(entry)
        pipe.model_hash = sha[:10] if sha else None  # the job records it (SD3 infotexts carry none)
        return pipe
    from ..pipeline import Pipeline

    pipe = Pipeline.from_file(entry.path, precision=precision, device=dev)
    sha = catalog.sha256(entry)  # the A1111 title carries the hash once a model was loaded
    if sha is not None:
        pipe._hash = sha[:10]
    return pipe
