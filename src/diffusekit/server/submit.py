"""What both APIs share: checking generation parameters before a job is queued, storing uploaded images,
waiting for a job without tying up a thread, and the 4xx/5xx split of a failed job."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ..diffusion.samplers import resolve_sampler
from ..jobs.catalog import UnknownModel
from ..jobs.model import Job
from ..params import GenerationParams, ParamError
from .errors import FieldError

# Failures a job reports that were caused by what the client asked for (answered 422, not 500).
CLIENT_ERRORS = (
    "ParamError", "MemoryBudgetError", "ImageError", "UnknownModel", "ValueError", "LoraError",
    "AdapterNameError", "EmbeddingError",
)  # fmt: skip


def check_generation(params: dict[str, Any], names: dict[str, str] | None = None) -> None:
    """Raise FieldError (with the client's field name via `names`) for what the pipeline would refuse."""
    names = names or {}
    try:
        gp = GenerationParams(**params)
        gp.validate(native=gp.width or 512)
    except ParamError as e:
        m = re.match(r"^(?:default )?(\w+)=", str(e))
        field = m.group(1) if m else "params"
        raise FieldError(names.get(field, field), str(e)) from None
    except TypeError as e:
        raise FieldError("params", str(e)) from None
    try:
        resolve_sampler(gp.sampler or "DPM++ 2M", gp.schedule)
    except ValueError as e:
        field = (
            "scheduler" if "schedule" in str(e).split(";")[0] and "sampler name" not in str(e) else "sampler"
        )
        raise FieldError(names.get(field, field), str(e)) from None


def resolve_model(catalog, name: str, field: str) -> str:
    try:
        return catalog.get(name).name
    except UnknownModel as e:
        raise FieldError(field, str(e)) from None


async def wait_done(runner, job_id: str, timeout: float) -> Job | None:
    """Await a job's end by polling the runner's finish counter (no thread is held while waiting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = -1
    while loop.time() < deadline:
        version = runner.done_version
        if version != seen:
            seen = version
            job = runner.queue.get(job_id)
            if job is None or job.state.done:
                return job
        await asyncio.sleep(0.02)
    return runner.queue.get(job_id)


def failure_status(job: Job) -> int:
    kind = (job.error or "").split(":", 1)[0]
    return 422 if kind in CLIENT_ERRORS else 500
