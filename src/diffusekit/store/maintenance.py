"""Keeping a store's blobs in order: which blobs committed rows name, repair from a copy of a file, gc.

`gc` runs under the store lock and deletes only blobs that no committed version or golden record names,
so it never takes a blob from a version, whatever point an earlier command crashed at.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoints.load import read_checkpoint
from ..checkpoints.single_file import cast_floats, detect_format
from .blobs import StoreError, tensors_digest
from .manifest import layout_blobs, read_raw_header, split_components

if TYPE_CHECKING:
    from .store import ModelStore


def referenced(c: sqlite3.Connection) -> dict[str, set[str]]:
    """{blob sha256: {NAME@VERSION, ...}} for every blob a committed version or golden record names."""
    refs: dict[str, set[str]] = {}
    for row in c.execute("SELECT name, version, manifest FROM versions"):
        m = json.loads(row["manifest"])
        ref = f"{row['name']}@{row['version']}"
        digests = [comp["blob"] for comp in m["components"]] + layout_blobs(m)
        for d in digests:
            refs.setdefault(d, set()).add(ref)
    for row in c.execute("SELECT name, version, record FROM goldens"):
        for img in json.loads(row["record"])["images"]:
            refs.setdefault(img["png_blob"], set()).add(f"{row['name']}@{row['version']}")
    return refs


def repair(
    store: ModelStore,
    path: str | Path,
    *,
    fp16: bool = False,
    prune: bool = False,
    prediction: str | None = None,
) -> dict:
    """Rewrite the missing or changed blobs that a copy of an added file holds (add's flags must match).

    Only blobs some version names are written; no version is created. Returns what was restored.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such file or folder; repair reads a copy of a file that was added")
    from ..checkpoints.sd3 import is_sd3_file, read_sd3
    from ..pipeline_sd3 import find_t5_tokenizer

    sd3 = is_sd3_file(path)
    if sd3:
        sd, cfg, _ = read_sd3(path)
    else:
        sd, cfg, _, _, _ = read_checkpoint(path, prediction=prediction, prune_training=prune)
    if fp16:
        sd = cast_floats(sd, torch.float16)
    with store._lock():
        with closing(store._conn()) as c:
            refs = referenced(c)
        restored: list[str] = []
        for _, (_, tensors) in split_components(sd, cfg).items():
            digest, _ = tensors_digest(tensors)
            if digest in refs and store.blobs.put_tensors(tensors, recheck=True)[2]:
                restored.append(digest)
        raw = [read_raw_header(path)] if path.is_file() and detect_format(path) == "safetensors" else []
        spiece = find_t5_tokenizer(path) if sd3 else None
        raw += [spiece.read_bytes()] if spiece is not None else []
        for data in raw:  # the original header, an SD3 model's T5 tokenizer
            digest = hashlib.sha256(data).hexdigest()
            if digest in refs and store.blobs.put_bytes(data, recheck=True)[2]:
                restored.append(digest)
    matched = sorted({v for d in restored for v in refs[d]})
    return {"restored_blobs": restored, "versions": matched}


def gc(store: ModelStore, *, dry_run: bool = False) -> dict:
    """Delete blobs no version names and partial writes left by crashes."""
    with store._lock():
        with closing(store._conn()) as c:
            keep = referenced(c)
        removed, freed = [], 0
        for digest, size in sorted(store.blobs.all().items()):
            if digest not in keep:
                removed.append(digest)
                freed += size
                if not dry_run:
                    store.blobs.remove(digest)
        temps = store.blobs.temp_files()
        for t in temps:
            freed += t.stat().st_size
            if not dry_run:
                t.unlink(missing_ok=True)
    return {
        "removed_blobs": removed,
        "removed_temp_files": len(temps),
        "freed_bytes": freed,
        "dry_run": dry_run,
    }
