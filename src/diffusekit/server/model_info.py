"""The model lists of both APIs (/v1/models, /sdapi/v1/sd-models: files, folders and store versions with
their family) and GET /v1/models/{name}/inspect: a model's family, format, sizes and parameter counts
(checkpoints.inspect, read without building the model, cached per file; a store version's model card),
for the web UI's Models page."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from ..checkpoints.inspect import inspect_checkpoint
from ..jobs.catalog import UnknownModel
from .auth import Principal, authenticate
from .errors import ApiError

router = APIRouter(prefix="/v1", tags=["models"])
Caller = Annotated[Principal, Depends(authenticate)]

_cache: dict[tuple[Path, float], dict[str, Any]] = {}
_lock = threading.Lock()


def _report(path: Path) -> dict[str, Any]:
    """The inspect report of a file or folder as JSON, computed once per (path, mtime)."""
    key = (path, path.stat().st_mtime)
    with _lock:
        if key in _cache:
            return _cache[key]
    r = inspect_checkpoint(path, hashes=False)  # the catalog hashes files itself
    out = {
        "format": r.format,
        "family": r.family,
        "preset": r.preset,
        "prediction": r.prediction,
        "parameters": r.parameters,
        "components": {c.name: c.parameters for c in r.components},
        "weight_bytes": r.weight_bytes,
        "file_bytes": r.file_bytes,
        "recommended": r.recommended,
    }
    with _lock:
        _cache[key] = out
    return out


def model_rows(runner) -> list[dict[str, Any]]:
    """/v1/models: each model's name, A1111 title, kind, family, whether it is loaded and in use by a job,
    its sha256 when known; store models also their exact version (`NAME`: the current one) and whether it
    is current."""
    cat, status = runner.catalog, runner.cache.status()
    loaded = {s["model"] for s in status if not s["loading"]}
    in_use = {s["model"] for s in status if s["leases"]}
    entries = cat.entries()
    current = {e.version for e in entries if e.kind == "store" and e.name != e.version}
    return [
        {
            "name": e.name,
            "title": cat.title(e),
            "kind": e.kind,
            "family": cat.family(e),
            "loaded": e.label in loaded,
            "in_use": e.label in in_use,  # a running job holds it: it is not evicted until that ends
            "sha256": cat.sha256(e, compute=False),
            "version": e.version,
            "current": e.version in current if e.kind == "store" else None,
        }
        for e in entries
    ]


def sd_model_rows(runner) -> list[dict[str, Any]]:
    """/sdapi/v1/sd-models: A1111's fields (title, model_name, hash, sha256, filename, config) + family."""
    cat = runner.catalog
    out = []
    for e in cat.entries():
        sha = cat.sha256(e, compute=False)
        out.append({"title": cat.title(e), "model_name": e.name, "hash": sha[:10] if sha else None,
                    "sha256": sha, "filename": e.filename, "config": None, "family": cat.family(e),
                    "version": e.version})  # fmt: skip
    return out


def _card_report(card: dict[str, Any]) -> dict[str, Any]:
    """The inspect fields of a store version, from its model card (nothing but the database is read)."""
    comps = [c for c in card["components"] if c["name"] != "extra"]
    return {
        "format": "store version",
        "family": card["family"],
        "preset": None,
        "prediction": card["prediction"],
        "parameters": card["parameters"],
        "components": {c["name"]: c["parameters"] for c in comps},
        "weight_bytes": sum(c["tensor_bytes"] for c in card["components"]),
        "file_bytes": card["original"].get("bytes"),
        "recommended": card["recommended"],
        "version": card["ref"],
        "current": card["current"],
        "note": card["note"],
    }


@router.get("/models/{name}/inspect")
async def inspect_model(name: str, request: Request, p: Caller) -> dict[str, Any]:
    """What `diffusekit inspect` reports for a model of the catalog (hashes: the catalog's sha256)."""
    catalog = request.app.state.runner.catalog
    try:
        entry = catalog.get(name)
    except UnknownModel as e:
        raise ApiError(404, str(e)) from None
    if entry.kind == "store":
        card = await run_in_threadpool(lambda: catalog.store.get(entry.version).card())
        return {"name": entry.name, "title": catalog.title(entry), "kind": "store", **_card_report(card),
                "sha256": entry.sha256, "autov2": entry.autov2}  # fmt: skip
    try:
        report = await run_in_threadpool(_report, entry.path)
    except (OSError, ValueError) as e:
        raise ApiError(422, f"model {entry.name!r} cannot be inspected: {e}") from None
    sha = await run_in_threadpool(catalog.sha256, entry)  # computed once per file, kept by the catalog
    return {"name": entry.name, "title": catalog.title(entry), "kind": entry.kind, **report,
            "sha256": sha, "autov2": sha[:10] if sha else None}  # fmt: skip
