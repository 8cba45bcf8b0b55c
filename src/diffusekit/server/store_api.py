"""The model store through the server: a model's versions and history, and promote / rollback (admin keys)
that switch NAME atomically in the store. Jobs resolve NAME when they run, so the next job that asks for
NAME uses the new version with no restart; history records the key that made each switch."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ..store import ModelStore, Ref, StoreError
from ..store.refs import check_name
from .auth import Principal, authenticate, require_admin
from .config import ServerConfig
from .errors import ApiError, FieldError
from .metrics import log_event

router = APIRouter(prefix="/v1", tags=["models"])
Caller = Annotated[Principal, Depends(authenticate)]


def open_store(config: ServerConfig) -> ModelStore | None:
    """The server's model store (seeded with default@1 when it is the per-user one), or None."""
    if config.store_dir is None:
        return None
    return ModelStore(config.store_dir, seed_default=config.seed_store)


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, description="the version NAME is to resolve to")
    reason: str | None = Field(None, max_length=1000, description="recorded in the model's history")
    force: bool = Field(False, description="promote even when the version's golden check fails")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=1000, description="recorded in the model's history")


def actor(p: Principal) -> str:
    """Who a switch made through the server is recorded as: the API key (name and id)."""
    return f"server key {p.name} ({p.key_id})" if p.key_id else "server (auth off)"


def _store(request: Request) -> ModelStore:
    store = request.app.state.runner.catalog.store
    if store is None:
        raise ApiError(404, "this server runs without a model store (--no-store); start it with --store DIR")
    return store


def _known(store: ModelStore, ref: str) -> None:
    """404 naming what exists when NAME or NAME@V is not in the store; 422 for a malformed name."""
    try:
        check_name(Ref.parse(ref).name)
    except StoreError as e:
        raise FieldError("name", str(e)) from None
    try:
        store.get(ref)
    except StoreError as e:
        raise ApiError(404, str(e)) from None


def _version_row(v) -> dict[str, Any]:
    m = v.manifest
    return {
        "ref": v.ref,
        "version": v.version,
        "current": v.current,
        "family": m["family"],
        "autov2": v.autov2,
        "sha256": m["source_file"].get("sha256"),
        "created_at": v.created_at,
        "created_by": v.created_by,
        "note": v.note,
        "parent": v.parent,
        "golden": v.golden is not None,
    }


@router.get("/models/{name}/versions")
async def versions(name: str, request: Request, p: Caller) -> dict[str, Any]:
    """Every version of a store model and which one NAME resolves to now."""
    store = _store(request)
    await run_in_threadpool(_known, store, name)
    rows = [_version_row(v) for v in await run_in_threadpool(store.versions, name)]
    current = next((r["ref"] for r in rows if r["current"]), None)
    return {"name": name, "current": current, "versions": rows}


@router.get("/models/{name}/history")
async def history(name: str, request: Request, p: Caller) -> dict[str, Any]:
    """Every add, promote, rollback and removal of a store model, oldest first (with who did it)."""
    store = _store(request)
    await run_in_threadpool(_known, store, name)
    return {"name": name, "history": await run_in_threadpool(store.history, name)}


def _switched(request: Request, p: Principal, out: dict[str, Any]) -> dict[str, Any]:
    log_event("model_" + out["action"], model=out["name"], from_version=out["from"], to_version=out["to"],
              key=p.key_id)  # fmt: skip
    check = out.pop("check", None)
    return {**out, "current": f"{out['name']}@{out['to']}", "golden_check_passed": check and check["passed"]}


@router.post("/models/{name}/promote")
async def promote(name: str, body: PromoteBody, request: Request, p: Caller) -> dict[str, Any]:
    """Make NAME@VERSION what NAME resolves to (after its golden check passes, unless `force`)."""
    require_admin(p)
    store = _store(request)
    ref = f"{name}@{body.version}"
    await run_in_threadpool(_known, store, ref)
    try:
        out = await run_in_threadpool(
            lambda: store.promote(ref, reason=body.reason, force=body.force, actor=actor(p))
        )
    except StoreError as e:
        raise ApiError(409, str(e)) from None
    return _switched(request, p, out)


@router.post("/models/{name}/rollback")
async def rollback(
    name: str, request: Request, p: Caller, body: RollbackBody | None = None
) -> dict[str, Any]:
    """Return NAME to the version that was current before its last promote."""
    require_admin(p)
    store = _store(request)
    await run_in_threadpool(_known, store, name)
    reason = body.reason if body is not None else None
    try:
        out = await run_in_threadpool(lambda: store.rollback(name, reason=reason, actor=actor(p)))
    except StoreError as e:
        raise ApiError(409, str(e)) from None
    return _switched(request, p, out)
