"""Reading a whole store: verify (re-hash every blob), du (logical vs physical bytes), diff, export."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

from ..checkpoints.diffusers import write_diffusers_folder
from ..checkpoints.hashes import AUTOV2_LEN
from ..checkpoints.inspect import disk_bytes
from ..checkpoints.load import validate_state_dict
from ..models.sd import StableDiffusion
from .blobs import StoreError
from .manifest import assemble, export_single_file, layout_blobs, relative_change
from .store import ModelStore

EXPORT_FORMATS = ("single-file", "diffusers")


def verify(store: ModelStore, *, rehash: bool = True) -> dict:
    """Check the database, every alias, and every blob a version names (re-hashed unless `rehash` is False).

    Problems name the blob and the versions it breaks; unreferenced blobs and leftover temp files are
    reported as reclaimable by gc, not as problems.
    """
    problems: list[dict] = []
    with closing(store._conn()) as c:
        integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append({"kind": "database", "detail": integrity, "versions": []})
        refs = store.referenced(c)
        for row in c.execute("SELECT name, current FROM models WHERE current IS NOT NULL"):
            if store._version(c, row["name"], row["current"]) is None:
                problems.append({"kind": "alias", "detail": f"{row['name']} points to missing version "
                                 f"{row['current']}", "versions": [row["name"]]})  # fmt: skip
        for row in c.execute("SELECT m.name FROM models m WHERE m.current IS NULL AND EXISTS "
                             "(SELECT 1 FROM versions v WHERE v.name = m.name)"):  # fmt: skip
            problems.append({"kind": "alias", "detail": f"{row['name']} has versions but no current one",
                             "versions": [row["name"]]})  # fmt: skip
        versions = [
            f"{r[0]}@{r[1]}" for r in c.execute("SELECT name, version FROM versions ORDER BY name, version")
        ]
    checked = 0
    for digest, users in sorted(refs.items()):
        who = sorted(users)
        if not store.blobs.exists(digest):
            problems.append({"kind": "missing", "blob": digest, "detail": f"blob {digest[:12]} is missing",
                             "versions": who})  # fmt: skip
            continue
        checked += 1
        if rehash:
            now = store.blobs.rehash(digest)
            if now != digest:
                detail = f"blob {digest[:12]} now hashes to {now[:12]} (its bytes changed)"
                problems.append({"kind": "corrupt", "blob": digest, "versions": who, "detail": detail})
    on_disk = store.blobs.all()
    broken = sorted({v for p in problems for v in p["versions"]})
    return {
        "ok": not problems,
        "versions": versions,
        "broken_versions": broken,
        "blobs_checked": checked,
        "rehashed": rehash,
        "problems": problems,
        "unreferenced_blobs": sorted(set(on_disk) - set(refs)),
        "temp_files": len(store.blobs.temp_files()),
    }


def du(store: ModelStore) -> dict:
    """Logical bytes (each version counted whole) against physical bytes (each blob once), per version.

    `adds`: bytes of the blobs a version was first to name (versions in the order they were added);
    `unique`: bytes only it names (what removing it and running gc frees). Tensor blobs are counted
    apart from the small rest (original headers, golden PNGs).
    """
    with closing(store._conn()) as c:
        rows = c.execute(
            "SELECT name, version, manifest FROM versions ORDER BY created_at, name, version"
        ).fetchall()
        goldens = {
            (r["name"], r["version"]): json.loads(r["record"]) for r in c.execute("SELECT * FROM goldens")
        }
        refs = store.referenced(c)
    sizes = store.blobs.all()
    seen: set[str] = set()
    per_version = []
    logical = logical_tensors = 0
    for row in rows:
        ref = f"{row['name']}@{row['version']}"
        m = json.loads(row["manifest"])
        tensor_blobs = {comp["blob"] for comp in m["components"]}
        other = set(layout_blobs(m))
        other |= {i["png_blob"] for i in goldens.get((row["name"], row["version"]), {"images": []})["images"]}
        blobs = tensor_blobs | other
        size = sum(sizes.get(b, 0) for b in blobs)
        tsize = sum(sizes.get(b, 0) for b in tensor_blobs)
        adds = sum(sizes.get(b, 0) for b in blobs - seen)
        seen |= blobs
        unique = sum(sizes.get(b, 0) for b in blobs if refs.get(b) == {ref})
        logical += size
        logical_tensors += tsize
        components = {
            comp["name"]: {"blob": comp["blob"][:12], "bytes": sizes.get(comp["blob"], 0),
                           "shared_with": sorted(refs.get(comp["blob"], set()) - {ref})}
            for comp in m["components"]
        }  # fmt: skip
        per_version.append({"ref": ref, "logical": size, "tensors": tsize, "adds": adds, "unique": unique,
                            "components": components})  # fmt: skip
    referenced = {b for b in sizes if b in refs}
    tensor_set = _full_blobs(rows)
    physical = sum(sizes[b] for b in referenced)
    physical_tensors = sum(sizes[b] for b in referenced if b in tensor_set)
    garbage = sum(s for b, s in sizes.items() if b not in refs)
    return {
        "store": str(store.root),
        "logical_bytes": logical,
        "physical_bytes": physical,
        "logical_tensor_bytes": logical_tensors,
        "physical_tensor_bytes": physical_tensors,
        "saved_bytes": logical - physical,
        "unreferenced_bytes": garbage,
        "database_bytes": sum(f.stat().st_size for f in store.root.glob("store.db*")),
        "versions": per_version,
    }


def _full_blobs(rows) -> set[str]:
    return {comp["blob"] for row in rows for comp in json.loads(row["manifest"])["components"]}


def diff(store: ModelStore, a: str, b: str) -> dict:
    """Which components of two versions differ and, for those, the relative change of their weights."""
    va, vb = store.get(a), store.get(b)
    ca = {c["name"]: c for c in va.manifest["components"]}
    cb = {c["name"]: c for c in vb.manifest["components"]}
    out = []
    for name in list(ca) + [n for n in cb if n not in ca]:
        x, y = ca.get(name), cb.get(name)
        entry = {"component": name}
        if x is None or y is None:
            entry["status"] = f"only in {va.ref if y is None else vb.ref}"
        elif x["blob"] == y["blob"]:
            entry["status"] = "identical"
            entry["blob"] = x["blob"][:12]
        else:
            entry["status"] = "differs"
            entry.update(
                relative_change(store.blobs.read_tensors(x["blob"]), store.blobs.read_tensors(y["blob"]))
            )
        out.append(entry)
    same_config = va.manifest["config"] == vb.manifest["config"]
    return {"a": va.ref, "b": vb.ref, "same_config": same_config, "components": out}


def export(store: ModelStore, ref: str, out: str | Path, *, fmt: str = "single-file") -> dict:
    """Write a version back out: one .safetensors file (the added file's bytes where the store kept its
    header) or a diffusers folder; reports the output's AutoV2 beside the original's."""
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    v = store.get(ref)
    out = Path(out)
    if out.exists() and (fmt == "diffusers" or out.is_dir()):
        raise StoreError(f"{out}: already exists; export writes a new file or folder")
    original = v.manifest["source_file"]
    result = {"ref": v.ref, "out": str(out), "format": fmt, "original_autov2": original.get("autov2"),
              "original_sha256": original.get("sha256")}  # fmt: skip
    if v.manifest["family"] == "sd3":
        from .sd3 import export_sd3

        result.update(export_sd3(store, v, out, fmt))
        sha = result["sha256"]
        same = sha is not None and sha == original.get("sha256")
        result.update(autov2=sha and sha[:AUTOV2_LEN], identical_file=same)
    elif fmt == "single-file":
        sha = export_single_file(v.manifest, store.blobs, out)
        result.update(sha256=sha, autov2=sha[:AUTOV2_LEN], identical_file=sha == original.get("sha256"))
    else:
        sd = assemble(v.manifest, store.blobs)
        import torch

        with torch.device("meta"):
            model = StableDiffusion(v.config)
        network, _ = validate_state_dict(sd, model, v.ref)
        write_diffusers_folder(network, v.config, out)
        result.update(sha256=None, autov2=None, identical_file=False)
    result["bytes"] = disk_bytes(out)
    return result
