"""The HTTP server: FastAPI app factory, A1111-compatible /sdapi/v1, the native /v1 job API, keys,
metrics. Translates HTTP <-> jobs; no generation logic of its own."""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
