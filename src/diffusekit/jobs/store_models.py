"""Model store versions as catalog entries: `NAME` (whatever version is current at the moment of the
lookup) and `NAME@V` (one immutable version), keyed in the model cache by their content."""

from __future__ import annotations

import hashlib

from ..store import ModelStore, Ref, StoreError, Version, looks_like_ref
from .catalog import ModelEntry, UnknownModel


def version_entry(store: ModelStore, name: str, v: Version) -> ModelEntry:
    """The catalog entry `name` (NAME or NAME@V) for the stored version `v`."""
    comps = v.manifest["components"]
    content = hashlib.sha256(",".join(c["blob"] for c in comps).encode()).hexdigest()[:16]
    return ModelEntry(
        name=name,
        path=store.root,
        kind="store",
        version=v.ref,
        family=v.manifest["family"],
        autov2=v.autov2,
        sha256=v.manifest["source_file"].get("sha256"),
        content=content,
        parameters=sum(c["parameters"] for c in comps),
        denoiser_parameters=sum(c["parameters"] for c in comps if c["name"] in ("unet", "mmdit")),
        stored_bytes=sum(c["tensor_bytes"] for c in comps),
    )


def store_entry(store: ModelStore, text: str) -> ModelEntry | None:
    """The entry for NAME or NAME@V, resolved in the store now; None when NAME is no store model.

    A version that does not exist is an UnknownModel naming the versions that do."""
    if not looks_like_ref(text):
        return None
    ref = Ref.parse(text)
    try:
        v = store.get(ref)
    except StoreError as e:
        if ref.version is None:
            return None  # maybe a file of the models folder
        raise UnknownModel(str(e)) from None
    return version_entry(store, str(ref), v)


def store_entries(store: ModelStore) -> list[ModelEntry]:
    """Every store model as NAME (its current version) followed by each NAME@V, oldest first."""
    out = []
    for model in store.list():
        try:
            versions = store.versions(model["name"])
        except StoreError:
            continue  # removed between the two reads
        for v in versions:
            if v.current:
                out.append(version_entry(store, v.name, v))
        out += [version_entry(store, v.ref, v) for v in versions]
    return out
