"""Who is calling: Bearer keys everywhere, HTTP Basic (key as password) on /sdapi/v1, rate limits."""

from __future__ import annotations

import base64
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from fastapi import Request

from .errors import ApiError
from .keys import ApiKey


@dataclass(frozen=True)
class Principal:
    """The caller: a key id (None when auth is off) and whether it may administer."""

    key_id: str | None
    name: str
    admin: bool
    key: ApiKey | None = None

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict job and image lookups to (None: sees all)."""
        return None if self.key is None else self.key_id

    @property
    def owner(self) -> str | None:
        return self.key_id


ANONYMOUS = Principal(None, "local", admin=True)


class RateLimiter:
    """Requests per minute per key, a sliding window in memory."""

    def __init__(self):
        self._hits: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, key: ApiKey) -> None:
        if key.rate_per_min is None:
            return
        now = time.monotonic()
        with self._lock:
            q = self._hits[key.id]
            while q and q[0] <= now - 60:
                q.popleft()
            if len(q) >= key.rate_per_min:
                retry = max(1, int(60 - (now - q[0])) + 1)
                raise ApiError(
                    429,
                    f"rate limit of key {key.name!r} reached: {key.rate_per_min} requests per minute",
                    {"Retry-After": str(retry)},
                )
            q.append(now)


def _credential(request: Request, basic_ok: bool) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if basic_ok and scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        _, _, password = decoded.partition(":")
        return password or None
    return None


def authenticate(request: Request) -> Principal:
    """The caller of this request, or a 401 (with the challenge A1111 clients expect)."""
    state = request.app.state
    if not state.config.auth:
        return ANONYMOUS
    basic_ok = request.url.path.startswith("/sdapi/")
    challenge = {"WWW-Authenticate": "Basic" if basic_ok else "Bearer"}
    raw = _credential(request, basic_ok)
    if raw is None:
        how = "Authorization: Bearer KEY" + (" or HTTP Basic with the key as password" if basic_ok else "")
        raise ApiError(401, f"an API key is required ({how})", challenge)
    key: ApiKey | None = state.keys.lookup(raw)
    if key is None:
        raise ApiError(401, "unknown or revoked API key", challenge)
    state.rate.hit(key)
    request.state.key_id = key.id
    return Principal(key.id, key.name, key.admin, key)


def require_admin(p: Principal) -> None:
    if not p.admin:
        raise ApiError(403, f"key {p.name!r} has role 'user'; this route needs an admin key")


def check_quota(request: Request, p: Principal, jobs: int = 1) -> None:
    """429 when a key's daily job quota would be exceeded."""
    if p.key is None or p.key.quota_per_day is None:
        return
    used = request.app.state.runner.queue.submitted_since(p.key_id, time.time() - 86400)
    if used + jobs > p.key.quota_per_day:
        raise ApiError(
            429,
            f"daily quota of key {p.name!r} reached: {p.key.quota_per_day} jobs per day"
            f" ({used} in the last 24 h)",
            {"Retry-After": "3600"},
        )
