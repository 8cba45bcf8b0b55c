"""Client errors as 4xx answers that name the field and what is valid; never a 500 for bad input."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..jobs.queue import QueueFull
from .schemas import JOB_TAGS


class FieldError(ValueError):
    """A request field that cannot be used (422 unless `status` says otherwise)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class ApiError(Exception):
    """Any other 4xx with a message (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _loc(loc: tuple) -> str:
    if len(loc) > 1 and loc[0] == "body" and loc[1] in JOB_TAGS:  # the POST /v1/jobs union's tag
        loc = (loc[0], *loc[2:])
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        item = {
            "loc": list(e.get("loc", ())),
            "field": _loc(tuple(e.get("loc", ()))),
            "msg": e.get("msg", ""),
        }
        if "input" in e and isinstance(e["input"], int | float | str | bool | None):
            value = e["input"]
            item["input"] = value[:200] if isinstance(value, str) else value
        out.append(item)
    return out


def install(app) -> None:
    """Register the handlers that turn client errors into named 4xx answers."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = validation_errors(exc)
        text = "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
        return JSONResponse(status_code=422, content={"error": text, "detail": errors})

    @app.exception_handler(FieldError)
    async def _field(request: Request, exc: FieldError):
        detail = [{"loc": ["body", *exc.field.split(".")], "field": exc.field, "msg": exc.message}]
        return JSONResponse(status_code=exc.status, content={"error": str(exc), "detail": detail})

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        return JSONResponse(
            status_code=429,
            content={"error": str(exc), "detail": f"queue limit: {exc.limit} waiting jobs"},
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return JSONResponse(
            status_code=exc.status, content={"error": exc.message, "detail": exc.message}, headers=exc.headers
        )
