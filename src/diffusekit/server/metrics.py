"""Prometheus metrics and JSON log lines: one per request and one per job state change."""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..jobs.model import Job, JobState
from ..jobs.worker import Observer
from ..memory import proc_bytes

log = logging.getLogger("diffusekit.server")

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        data.update(getattr(record, "fields", {}))
        return json.dumps(data, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the server's logger (idempotent)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def log_event(msg: str, **fields) -> None:
    log.info(msg, extra={"fields": fields})


class _Live:
    """Gauges read at scrape time: queue depth, jobs by state, process RSS."""

    def __init__(self, runner_ref):
        self.runner_ref = runner_ref

    def collect(self):
        runner = self.runner_ref()
        if runner is None:
            return
        counts = runner.queue.counts()
        depth = GaugeMetricFamily("diffusekit_queue_depth", "jobs waiting to run")
        depth.add_metric([], counts.get("queued", 0))
        yield depth
        states = GaugeMetricFamily("diffusekit_jobs", "jobs by state", labels=["state"])
        for s in JobState:
            states.add_metric([s.value], counts.get(s.value, 0))
        yield states
        rss = GaugeMetricFamily("diffusekit_process_rss_bytes", "resident memory of the server process")
        rss.add_metric([], proc_bytes("VmRSS") or 0)
        yield rss
        loaded = GaugeMetricFamily("diffusekit_models_loaded", "models held in memory")
        loaded.add_metric([], len(runner.cache.loaded()))
        yield loaded
        store = runner.catalog.store
        if store is not None:
            current = GaugeMetricFamily(
                "diffusekit_model_current_version",
                "the version NAME resolves to in the model store",
                labels=["model"],
            )
            for m in store.list():
                if m["current"] is not None:
                    current.add_metric([m["name"]], m["current"])
            yield current


class Metrics(Observer):
    """The runner's observer: counters, histograms and job log lines; its own registry per app."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.job_latency = Histogram(
            "diffusekit_job_latency_seconds",
            "submit to finish",
            ["kind", "state"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "diffusekit_queue_wait_seconds", "submit to start", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "diffusekit_sampler_step_seconds", "time between sampler steps", buckets=_STEP_BUCKETS, registry=r
        )
        self.images = Counter("diffusekit_images_generated", "images written", registry=r)
        self.errors = Counter(
            "diffusekit_errors", "failed jobs and 5xx answers by kind", ["kind"], registry=r
        )
        self.model_loads = Counter("diffusekit_model_loads", "models loaded", ["model"], registry=r)
        self.model_load_time = Histogram(
            "diffusekit_model_load_seconds", "time to load a model", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.requests = Counter(
            "diffusekit_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.request_time = Histogram(
            "diffusekit_http_request_seconds",
            "HTTP request time",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def attach(self, runner) -> None:
        import weakref

        self.registry.register(_Live(weakref.ref(runner)))

    def job_state(self, job: Job) -> None:
        log_event(
            "job",
            job_id=job.id,
            state=job.state.value,
            kind=job.kind,
            model=job.model,
            owner=job.owner,
            priority=job.priority,
            attempts=job.attempts,
            error=job.error,
        )
        if job.state == JobState.RUNNING and job.queue_wait_s is not None:
            self.queue_wait.observe(job.queue_wait_s)
        if job.state.done and job.finished_at is not None:
            self.job_latency.labels(job.kind, job.state.value).observe(job.finished_at - job.created_at)
        if job.state == JobState.SUCCEEDED:
            self.images.inc(len(job.images))
        if job.state == JobState.FAILED:
            self.errors.labels((job.error or "unknown").split(":", 1)[0]).inc()

    def step(self, job_id: str, seconds: float) -> None:
        self.step_time.observe(seconds)

    def model_load(self, name: str, seconds: float) -> None:
        self.model_loads.labels(name).inc()
        self.model_load_time.observe(seconds)
        log_event("model_load", model=name, seconds=round(seconds, 3))

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_time.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels(f"http_{status}").inc()


def now() -> float:
    return time.perf_counter()
