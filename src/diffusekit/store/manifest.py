"""A checkpoint <-> its manifest: components split by key prefix, stored as blobs, reassembled on export.

The manifest of a version names each component (U-Net, VAE, each text encoder, and "extra": every
other tensor such as schedule buffers or EMA copies) by the sha256 of its canonical blob, with the
key prefix that was stripped. When the stored tensors are exactly the added .safetensors file's, the
file's own header is stored too, so export writes the original bytes back (same sha256 and AutoV2).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoints.atomic import write_stream
from ..checkpoints.inspect import dtype_name
from ..checkpoints.single_file import save_state_dict
from ..checkpoints.surgery import split_by_prefixes
from ..models.configs import UNET_PREFIX, VAE_PREFIX, ModelConfig
from ..models.sd3_configs import CLIP_G_PREFIX, CLIP_L_PREFIX, MMDIT_PREFIX, SD3_VAE_PREFIX, T5_PREFIX
from .blobs import BlobStore, StoreError, tensor_bytes

MANIFEST_FORMAT = 1
EXTRA = "extra"  # the component holding every tensor outside the networks
SD3_COMPONENTS = {"mmdit": MMDIT_PREFIX, "vae": SD3_VAE_PREFIX, "clip_l": CLIP_L_PREFIX,
                  "clip_g": CLIP_G_PREFIX, "t5xxl": T5_PREFIX}  # fmt: skip
LAYOUT_BLOBS = ("header_blob", "t5_tokenizer_blob")  # manifest["layout"] keys that name (non-tensor) blobs


def layout_blobs(manifest: Mapping) -> list[str]:
    """Digests of a version's non-tensor blobs: the original header, the kept T5 tokenizer."""
    layout = manifest.get("layout", {})
    return [layout[k] for k in LAYOUT_BLOBS if layout.get(k)]


def component_prefixes(cfg: ModelConfig) -> dict[str, str]:
    """{'unet': 'model.diffusion_model.', 'vae': ..., 'text_encoder': ..., 'text_encoder_2': ...}
    (SD3: {'mmdit', 'vae', 'clip_l', 'clip_g', 't5xxl'})."""
    if cfg.family == "sd3":
        return dict(SD3_COMPONENTS)
    out = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    for i, p in enumerate(cfg.text_prefixes):
        out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = p
    return out


def split_components(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, tuple[str, dict]]:
    """{component: (prefix, {stripped key: tensor})}; tensors no prefix claims go to 'extra' (prefix '')."""
    prefixes = component_prefixes(cfg)
    parts, leftover = split_by_prefixes(sd, prefixes)
    out = {name: (prefixes[name], parts[name]) for name in prefixes}
    if cfg.family == "sd3":  # SD3 files come with or without each text encoder
        out = {name: part for name, part in out.items() if part[1]}
    if leftover:
        out[EXTRA] = ("", leftover)
    return out


def describe(tensors: Mapping[str, torch.Tensor]) -> dict:
    """Parameter count, tensor bytes and parameters per dtype of one component."""
    dtypes: Counter[str] = Counter()
    for t in tensors.values():
        dtypes[dtype_name(t.dtype)] += t.numel()
    return {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "dtypes": dict(dtypes),
    }


def store_components(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, blobs: BlobStore, *, recheck: bool = False
) -> tuple[list[dict], list[str]]:
    """Write each component as a blob (deduplicated): (manifest component entries, digests written).

    `recheck`: also rewrite existing blobs whose bytes no longer match their name."""
    entries, new = [], []
    for name, (prefix, tensors) in split_components(sd, cfg).items():
        digest, size, fresh = blobs.put_tensors(tensors, recheck=recheck)
        if fresh:
            new.append(digest)
        entries.append({"name": name, "prefix": prefix, "blob": digest, "bytes": size, **describe(tensors)})
    return entries, new


def read_raw_header(path: Path) -> bytes:
    """The first 8 + header_len bytes of a .safetensors file, verbatim."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        return head + f.read(n)


def assemble(manifest: Mapping, blobs: BlobStore) -> dict[str, torch.Tensor]:
    """The full single-file state dict of a version (memory-mapped from its blobs)."""
    sd: dict[str, torch.Tensor] = {}
    for comp in manifest["components"]:
        for key, t in blobs.read_tensors(comp["blob"]).items():
            sd[comp["prefix"] + key] = t
    return sd


def export_single_file(manifest: Mapping, blobs: BlobStore, out: Path) -> str:
    """Write the version as one .safetensors file; returns its sha256.

    With a stored original header the output is the added file byte for byte; otherwise it is a fresh
    safetensors file of the same tensors and the version's metadata.
    """
    if out.suffix.lower() != ".safetensors":
        raise StoreError(f"{out}: a single-file export is written as .safetensors; name it *.safetensors")
    sd = assemble(manifest, blobs)
    header_blob = manifest.get("layout", {}).get("header_blob")
    if header_blob is None:
        save_state_dict(sd, out, metadata=dict(manifest.get("metadata", {})))
        h = hashlib.sha256()
        with open(out, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    header = blobs.read_bytes(header_blob)
    entries = json.loads(header[8:].decode())
    entries.pop("__metadata__", None)
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    if set(order) != set(sd):
        raise StoreError(
            "the stored header and the version's tensors name different keys; run 'models verify'"
        )

    digest = hashlib.sha256()

    def chunks():
        for chunk in (header, *(tensor_bytes(sd[k]) for k in order)):
            digest.update(chunk)
            yield chunk

    out.parent.mkdir(parents=True, exist_ok=True)
    write_stream(out, chunks())
    return digest.hexdigest()


def relative_change(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict:
    """||B - A|| / ||A|| over the keys both hold (float64), plus the keys only one side has."""
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    num = den = 0.0
    changed = 0
    for k in shared:
        x, y = a[k].double(), b[k].double()
        d = float((y - x).pow(2).sum())
        num += d
        den += float(x.pow(2).sum())
        changed += d > 0
    return {
        "relative_change": (num**0.5) / (den**0.5) if den > 0 else float(num > 0),
        "tensors_changed": changed,
        "tensors_compared": len(shared),
        "only_in_a": sorted(k for k in a if k not in b),
        "only_in_b": sorted(k for k in b if k not in a),
        "shape_changed": sorted(k for k in a if k in b and a[k].shape != b[k].shape),
    }


MANIFEST_KEYS = (
    "format",
    "family",
    "prediction",
    "config",
    "components",
    "metadata",
    "layout",
    "source_file",
)


def check_manifest(manifest: Mapping) -> None:
    """Refuse a manifest this code cannot read."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise StoreError(
            f"manifest format {manifest.get('format')!r} is not one this diffusekit reads ({MANIFEST_FORMAT})"
        )
