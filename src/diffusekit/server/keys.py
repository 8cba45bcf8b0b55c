"""API keys: made once and shown once, stored only as a sha256 hash, with a role, a rate and a quota."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..jobs.queue import connect

ROLES = ("admin", "user")
KEY_PREFIX = "dk_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    rate_per_min INTEGER,
    quota_per_day INTEGER,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class KeyError_(ValueError):
    """A bad key command (unknown role or key, bad limit)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    rate_per_min: int | None
    quota_per_day: int | None
    created_at: float
    revoked_at: float | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def hash_key(raw: str) -> str:
    """Keys are 256-bit random strings, so one sha256 is enough (no salt or stretching needed)."""
    return hashlib.sha256(raw.encode()).hexdigest()


class KeyStore:
    """The `api_keys` table in the server's database."""

    def __init__(self, db_path: str | Path):
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(db_path)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def create(
        self, name: str, role: str = "user", rate_per_min: int | None = None, quota_per_day: int | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its raw value (the only time it exists outside the caller's hands)."""
        if role not in ROLES:
            raise KeyError_(f"role={role!r} is not valid; valid: {', '.join(ROLES)}")
        if not name or not name.strip():
            raise KeyError_("a key needs a non-empty NAME")
        for label, value in (("rate", rate_per_min), ("quota", quota_per_day)):
            if value is not None and value < 1:
                raise KeyError_(
                    f"--{label} {value} is out of range; valid: a positive number (or leave it out)"
                )
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(secrets.token_hex(6), name.strip(), role, rate_per_min, quota_per_day, time.time())
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, name, role, key_hash, rate_per_min, quota_per_day, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.id, key.name, key.role, hash_key(raw), rate_per_min, quota_per_day, key.created_at),
            )
        return key, raw

    def lookup(self, raw: str) -> ApiKey | None:
        """The live key with this raw value, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (hash_key(raw),)
            ).fetchone()
        return None if row is None else _key(row)

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [_key(r) for r in rows]

    def revoke(self, key_id_or_name: str) -> ApiKey:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                (key_id_or_name, key_id_or_name),
            ).fetchall()
            if not rows:
                raise KeyError_(f"no live key with id or name {key_id_or_name!r}; see `diffusekit keys list`")
            if len(rows) > 1:
                ids = ", ".join(r["id"] for r in rows)
                raise KeyError_(f"{len(rows)} keys are named {key_id_or_name!r} ({ids}); revoke one by id")
            self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), rows[0]["id"])
            )
            return _key(rows[0])

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]


def _key(row) -> ApiKey:
    return ApiKey(
        row["id"],
        row["name"],
        row["role"],
        row["rate_per_min"],
        row["quota_per_day"],
        row["created_at"],
        row["revoked_at"],
    )
