"""GET /v1/models/{name}/inspect: a catalog model's family, format, sizes and parameter counts
(checkpoints.inspect, read without building the model; cached per file), for the web UI's Models page."""

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


@router.get("/models/{name}/inspect")
async def inspect_model(name: str, request: Request, p: Caller) -> dict[str, Any]:
    """What `diffusekit inspect` reports for a model of the catalog (hashes: the catalog's sha256)."""
    catalog = request.app.state.runner.catalog
    try:
        entry = catalog.get(name)
    except UnknownModel as e:
        raise ApiError(404, str(e)) from None
    try:
        report = await run_in_threadpool(_report, entry.path)
    except (OSError, ValueError) as e:
        raise ApiError(422, f"model {entry.name!r} cannot be inspected: {e}") from None
    sha = await run_in_threadpool(catalog.sha256, entry)  # computed once per file, kept by the catalog
    return {"name": entry.name, "title": catalog.title(entry), "kind": entry.kind, **report,
            "sha256": sha, "autov2": sha[:10] if sha else None}  # fmt: skip
