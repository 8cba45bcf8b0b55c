"""SD3/SD3.5 versions in the model store: add, load, pipeline, export and the model card's SD3 fields.

An SD3 version is split by the single file's key prefixes into `mmdit` (``model.diffusion_model.``),
`vae` (``first_stage_model.``), `clip_l`, `clip_g`, `t5xxl` (``text_encoders.*``; each only when the
file has it) and `extra`, each a content-addressed blob, so fine-tunes of one base share the VAE and the
text encoders (T5-XXL alone is ~9.5 GB in bf16). The T5 tokenizer found beside the added file
(``<stem>.spiece.model``, or ``tokenizer_3/`` of a folder) is kept as a blob named in the manifest's
layout, so a store version generates exactly as the file it was added from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoints.sd3 import LoadedSD3, build_sd3, has_component, read_sd3, sd3_metadata
from ..checkpoints.single_file import cast_floats, read_safetensors_header
from ..models.sd3_configs import SD3Config, sd3_config_from_dict
from . import golden as gold
from .blobs import StoreError
from .manifest import MANIFEST_FORMAT, assemble, export_single_file, read_raw_header, store_components
from .refs import Ref

if TYPE_CHECKING:
    from ..pipeline_sd3 import SD3Options, SD3Pipeline
    from .store import ModelStore
    from .version import Version

FAMILY = "sd3"
T5_TOKENIZER_BLOB = "t5_tokenizer_blob"  # manifest["layout"] key of the kept spiece.model
GOLDEN_FP32_BYTES = 16 * 2**30  # golden renders of bigger models run in bf16 (see golden_dtype)


def is_sd3_manifest(manifest: dict) -> bool:
    return manifest.get("family") == FAMILY


def manifest_config(manifest: dict) -> SD3Config:
    return sd3_config_from_dict(manifest["config"])


@dataclass
class StoredSD3(LoadedSD3):
    """An SD3 version loaded from the store, with the path of its kept T5 tokenizer blob (if any)."""

    t5_tokenizer: Path | None = None
    model_hash: str | None = None


def add_sd3(
    store: ModelStore,
    path: Path,
    name: str,
    *,
    text_encoders: tuple = (),
    fp16: bool = False,
    prune: bool = False,
    prediction: str | None = None,
    golden: bool = True,
    parent_ref: Ref | None = None,
    **record,
) -> Version:
    """Add an SD3/SD3.5 file or diffusers folder (plus separate text encoder files) as the next version."""
    if prune or prediction:
        flag = "--prune" if prune else "--prediction"
        raise StoreError(f"{path}: {flag} applies to U-Net checkpoints; an SD3 model has no EMA copy and "
                         "always predicts flow velocity")  # fmt: skip
    from ..pipeline_sd3 import find_t5_tokenizer

    sd, cfg, metadata = read_sd3(path, text_encoders=list(text_encoders))
    _, notes = build_sd3({k: v.to("meta") for k, v in sd.items()}, cfg, name=path.name, device="meta")
    original = store._describe_source(path)
    if fp16:
        sd = cast_floats(sd, torch.float16)
    exact = path.is_file() and original["format"] == "safetensors" and not fp16 and not text_encoders
    if exact:
        entries, _ = read_safetensors_header(path)
        exact = len(entries) == len(sd)
    components, _ = store_components(sd, cfg, store.blobs)
    raw: dict[str, bytes] = {}
    layout: dict[str, str] = {}

    def put(data: bytes) -> str:
        digest = store.blobs.put_bytes(data)[0]
        raw[digest] = data
        return digest

    if exact:
        layout["header_blob"] = put(read_raw_header(path))
    spiece = find_t5_tokenizer(path)
    if spiece is not None and has_component(sd, "t5"):
        layout[T5_TOKENIZER_BLOB] = put(spiece.read_bytes())
        original["t5_tokenizer"] = str(spiece.name if path.is_file() else spiece.relative_to(path))
    elif has_component(sd, "t5"):
        notes.append("T5 weights but no T5 tokenizer beside the file (<stem>.spiece.model): generate needs "
                     "--t5-tokenizer PATH or --no-t5; golden images are rendered without T5")  # fmt: skip
    meta = dict(metadata) if exact else {**metadata, **sd3_metadata(cfg)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": FAMILY,
        "prediction": "flow",
        "config": json.loads(cfg.to_json()),
        "components": components,
        "metadata": meta,
        "layout": layout,
        "source_file": original,
        "stored": {"fp16": fp16, "pruned": False, "exact_export": exact, "tensors": len(sd), "notes": notes},
    }
    rec = None
    if golden and not (has_component(sd, "clip_l") and has_component(sd, "clip_g")):
        notes.append("no golden images: the model has no CLIP-L/CLIP-G encoders to render with")
    elif golden:
        loaded = load_manifest(store, manifest, f"{name}@new")
        pipe = golden_pipeline(loaded)
        rec = gold.record(pipe, gold.default_specs(cfg, pipe.defaults), put)
    return store._commit_add(name, manifest, rec, raw, sd, cfg, record.pop("source") or str(path.resolve()),
                             record.pop("license"), record.pop("note"), parent_ref, record.pop("command"),
                             record.pop("actor"))  # fmt: skip


def load_manifest(
    store: ModelStore,
    manifest: dict,
    label: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> StoredSD3:
    """The SD3 model of a manifest, built from its blobs (memory-mapped until cast or moved)."""
    cfg = manifest_config(manifest)
    model, notes = build_sd3(assemble(manifest, store.blobs), cfg, name=label, device=device, dtype=dtype)
    digest = manifest.get("layout", {}).get(T5_TOKENIZER_BLOB)
    return StoredSD3(
        model=model,
        path=Path(label),
        metadata=dict(manifest.get("metadata", {})),
        notes=notes,
        t5_tokenizer=store.blobs.path(digest) if digest else None,
        model_hash=manifest["source_file"].get("autov2"),
    )


def sd3_pipeline(
    loaded: StoredSD3,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    precision: str = "auto",
    options: SD3Options | None = None,
) -> SD3Pipeline:
    """An SD3Pipeline over a stored version, with its kept T5 tokenizer unless `options` names one."""
    from ..pipeline_sd3 import SD3Options, SD3Pipeline
    from ..runtime import resolve_precision

    options = options or SD3Options()
    if options.t5_tokenizer is None and loaded.t5_tokenizer is not None:
        options = dataclasses.replace(options, t5_tokenizer=loaded.t5_tokenizer)
    if dtype is None:
        dtype = resolve_precision(precision, device, sum(p.numel() for p in loaded.model.mmdit.parameters()))
    pipe = SD3Pipeline(loaded, device=device, dtype=dtype, options=options)
    pipe.model_hash = loaded.model_hash  # the AutoV2 of the added file, as jobs record for SD3 files
    return pipe


def golden_dtype(parameters: int) -> torch.dtype:
    """fp32 while the whole model fits GOLDEN_FP32_BYTES in fp32, else bf16 (SD3.5 Large with T5-XXL is
    ~45 GB in fp32); either is deterministic on one machine with one thread count."""
    return torch.float32 if parameters * 4 <= GOLDEN_FP32_BYTES else torch.bfloat16


def golden_pipeline(loaded: StoredSD3) -> SD3Pipeline:
    """The golden renderer: on the CPU, fp32 unless too big, T5 on when the version has its tokenizer."""
    from ..pipeline_sd3 import SD3Options

    options = SD3Options(use_t5=loaded.t5_tokenizer is not None)
    dtype = golden_dtype(sum(p.numel() for p in loaded.model.parameters()))
    return sd3_pipeline(loaded, device="cpu", dtype=dtype, options=options)


def export_sd3(store: ModelStore, v: Version, out: Path, fmt: str) -> dict:
    """Write an SD3 version as one .safetensors file (plus <stem>.spiece.model) or a diffusers folder."""
    from ..checkpoints.sd3_diffusers import write_sd3_diffusers_folder

    digest = v.manifest.get("layout", {}).get(T5_TOKENIZER_BLOB)
    spiece = store.blobs.path(digest) if digest else None
    if fmt == "single-file":
        sha = export_single_file(v.manifest, store.blobs, out)
        if spiece is not None:
            shutil.copyfile(spiece, out.with_suffix(".spiece.model"))
        return {"sha256": sha, "t5_tokenizer": str(out.with_suffix(".spiece.model")) if spiece else None}
    cfg = manifest_config(v.manifest)
    sd = assemble(v.manifest, store.blobs)
    build_sd3({k: t.to("meta") for k, t in sd.items()}, cfg, name=v.ref, device="meta")
    try:
        write_sd3_diffusers_folder(sd, cfg, out, t5_tokenizer=spiece)
    except ValueError as e:  # e.g. a version without CLIP encoders: no diffusers folder can hold it
        shutil.rmtree(out, ignore_errors=True)
        raise StoreError(f"{v.ref}: cannot be written as a diffusers folder ({e})") from None
    return {"sha256": None, "t5_tokenizer": str(out / "tokenizer_3" / "spiece.model") if spiece else None}


def card(manifest: dict) -> dict:
    """The SD3 fields of a model card: shift, T5 length, which text encoders, whether T5 can run."""
    cfg = manifest["config"]
    names = {c["name"] for c in manifest["components"]}
    return {
        "shift": cfg["shift"],
        "t5_max_length": cfg["t5_max_length"],
        "text_encoders": [n for n in ("clip_l", "clip_g", "t5xxl") if n in names],
        "t5_tokenizer": bool(manifest.get("layout", {}).get(T5_TOKENIZER_BLOB)),
        "qk_norm": cfg["mmdit"]["qk_norm"],
        "mmdit_depth": cfg["mmdit"]["depth"],
        "mmdit_x_layers": len(cfg["mmdit"]["x_block_self_attn_layers"]),
    }
