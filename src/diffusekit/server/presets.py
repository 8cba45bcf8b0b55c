"""Named parameter presets per API key (the web UI's presets follow the user to another browser).

GET /v1/presets lists the caller's presets, PUT /v1/presets/{name} saves one (replacing a preset of
that name), DELETE /v1/presets/{name} removes it. Stored in the server's SQLite database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict

from .auth import Principal, authenticate
from .errors import ApiError
from .schemas import JobParams

router = APIRouter(prefix="/v1", tags=["presets"])
MAX_PRESETS = 200  # per key
Name = Annotated[str, PathParam(min_length=1, max_length=100, pattern=r"^[^/\x00-\x1f]+$")]
Caller = Annotated[Principal, Depends(authenticate)]
_EXCLUDED = {"init_image", "mask", "prompt", "negative_prompt"}  # a preset is settings, not content


class PresetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: JobParams  # prompts and images are dropped: a preset is settings, not content


class PresetOut(BaseModel):
    name: str
    params: dict[str, Any]
    updated_at: float


class PresetStore:
    """(owner, name) -> params JSON in a table of the server's database; thread-safe."""

    def __init__(self, db: Path):
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS presets (owner TEXT NOT NULL, name TEXT NOT NULL,"
            " params TEXT NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (owner, name))"
        )

    def list(self, owner: str) -> list[PresetOut]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, params, updated_at FROM presets WHERE owner = ? ORDER BY name", (owner,)
            ).fetchall()
        return [PresetOut(name=n, params=json.loads(p), updated_at=t) for n, p, t in rows]

    def put(self, owner: str, name: str, params: dict[str, Any]) -> PresetOut:
        now = time.time()
        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM presets WHERE owner = ? AND name = ?", (owner, name)
            ).fetchone()
            count = self._conn.execute("SELECT COUNT(*) FROM presets WHERE owner = ?", (owner,)).fetchone()[0]
            if not exists and count >= MAX_PRESETS:
                raise ApiError(409, f"at most {MAX_PRESETS} presets per key; delete one first")
            self._conn.execute(
                "INSERT OR REPLACE INTO presets (owner, name, params, updated_at) VALUES (?, ?, ?, ?)",
                (owner, name, json.dumps(params), now),
            )
        return PresetOut(name=name, params=params, updated_at=now)

    def delete(self, owner: str, name: str) -> bool:
        with self._lock:
            cur = self._conn.execute("DELETE FROM presets WHERE owner = ? AND name = ?", (owner, name))
        return cur.rowcount > 0


def _store(request: Request) -> PresetStore:
    state = request.app.state
    store = getattr(state, "presets", None)
    if store is None:
        store = state.presets = PresetStore(Path(state.config.data_dir) / "diffusekit.db")
    return store


def _owner(p: Principal) -> str:
    return p.key_id or ""  # "" when auth is off: one shared set


@router.get("/presets", response_model=list[PresetOut])
def list_presets(request: Request, p: Caller):
    return _store(request).list(_owner(p))


@router.put("/presets/{name}", response_model=PresetOut)
def put_preset(body: PresetIn, request: Request, name: Name, p: Caller):
    params = body.params.model_dump(exclude_unset=True, exclude=_EXCLUDED)
    return _store(request).put(_owner(p), name.strip(), params)


@router.delete("/presets/{name}", status_code=204)
def delete_preset(request: Request, name: Name, p: Caller):
    if not _store(request).delete(_owner(p), name):
        raise ApiError(404, f"preset {name!r} not found")
