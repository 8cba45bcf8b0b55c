"""The FastAPI app factory: wires the job runner, keys, metrics and the routers; serves the web UI."""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..jobs.adapters import Adapters
from ..jobs.animate_job import AnimateLimits
from ..jobs.catalog import ModelCatalog
from ..jobs.worker import JobRunner
from . import a1111, adapters_routes, animate_api, errors, jobs_api, model_info, presets, store_api
from .auth import Principal, RateLimiter, authenticate
from .config import ServerConfig
from .keys import KeyStore
from .metrics import Metrics, log_event, setup_logging
from .store_api import open_store

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
MAX_BODY_BYTES = 64 * 2**20  # a 20 MiB image and a mask, base64-encoded, fit


def create_app(config: ServerConfig) -> FastAPI:
    """A ready app: the runner starts with the app (lifespan) and re-queues what a crash left running."""
    setup_logging()
    metrics = Metrics()
    catalog = ModelCatalog(config.models_dir, config.default_model, store=open_store(config))
    runner = JobRunner(
        config.data_dir,
        catalog,
        workers=config.workers,
        device=config.device,
        precision=config.precision,
        max_queued=config.max_queued,
        batch_max=config.batch_max,
        observer=metrics,
        model_memory_bytes=None if config.model_memory_mb is None else config.model_memory_mb * 2**20,
        model_wait_s=config.model_wait_s,
    )
    metrics.attach(runner)
    data = Path(config.data_dir)
    runner.adapters = Adapters(
        config.loras_dir or data / "loras", config.embeddings_dir or data / "embeddings"
    )
    runner.datasets_dir = Path(config.datasets_dir or data / "datasets")
    runner.datasets_dir.mkdir(parents=True, exist_ok=True)
    runner.animate_limits = AnimateLimits(
        config.motion_modules_dir or Path(config.data_dir) / "motion_modules", config.max_frames,
        config.max_frames * 512 * 512,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        keys = app.state.keys.count()
        log_event(
            "start",
            version=__version__,
            host=config.host,
            port=config.port,
            auth=config.auth,
            workers=config.workers,
            models=[e.name for e in catalog.entries()],
            recovered_jobs=runner.recovered,
            keys=keys,
        )
        if config.auth and keys == 0:
            log_event("no API keys exist: create one with `diffusekit keys create NAME --role admin`")
        yield
        runner.stop()

    app = FastAPI(
        title="diffusekit",
        version=__version__,
        lifespan=lifespan,
        description="Stable Diffusion server: A1111-compatible /sdapi/v1 and a durable job API /v1.",
    )
    app.state.config = config
    app.state.runner = runner
    app.state.keys = KeyStore(Path(config.data_dir) / "diffusekit.db")
    app.state.rate = RateLimiter()
    app.state.metrics = metrics
    errors.install(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            response = JSONResponse(
                status_code=413,
                content={
                    "error": f"body: request body over {MAX_BODY_BYTES // 2**20} MiB",
                    "detail": "body too large",
                },
            )
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # noqa: BLE001 - a bug answers 500 and is logged; the server keeps serving
                log_event("unhandled", request_id=request_id, error=f"{type(e).__name__}: {e}")
                response = JSONResponse(
                    status_code=500, content={"error": "internal error", "request_id": request_id}
                )
        seconds = time.perf_counter() - t0
        route = request.scope.get("route")
        route_path = getattr(route, "path", "unmatched")
        metrics.request(request.method, route_path, response.status_code, seconds)
        response.headers["X-Request-ID"] = request_id
        log_event(
            "request",
            request_id=request_id,
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            ms=round(seconds * 1000, 1),
            key=getattr(request.state, "key_id", None),
            job_id=getattr(request.state, "job_id", None),
        )
        return response

    @app.get("/health", tags=["ops"])
    def health():
        """Alive (no key needed)."""
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["ops"])
    def ready():
        """Ready: the workers run and a model is loaded (no key needed)."""
        loaded = runner.cache.loaded()
        ok = runner.running and bool(loaded)
        body = {"ready": ok, "workers_running": runner.running, "models_loaded": loaded}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics", tags=["ops"])
    def prometheus(p: Principal = Depends(authenticate)):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(a1111.router)
    app.include_router(adapters_routes.router)
    app.include_router(jobs_api.router)
    app.include_router(animate_api.router)
    app.include_router(presets.router)
    app.include_router(model_info.router)
    app.include_router(store_api.router)
    if WEBUI_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=WEBUI_DIR, html=True), name="webui")
    return app
