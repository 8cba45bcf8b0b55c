"""What a job is: a kind, its parameters (JSON), a priority, a state and what it produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

KINDS = ("txt2img", "img2img", "inpaint", "animate")


class JobState(str, Enum):
    """A job's life: queued -> running -> succeeded | failed | cancelled (a crash re-queues running jobs)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class ImageRecord:
    """One stored PNG: an output of a job (with its seed and infotext), an uploaded input, or a sample."""

    id: str
    job_id: str | None
    owner: str | None
    path: str
    seed: int | None = None
    infotext: str = ""
    role: str = "output"  # "output", "input", or "sample" (a training job's image at `step`)
    created_at: float = 0.0
    step: int | None = None  # samples: the training step it shows


@dataclass(frozen=True)
class Job:
    """One generation request as the queue keeps it.

    `params` holds the GenerationParams fields plus `init_image` / `mask` (ids of stored input images);
    `model` is the catalog name it asked for (a store NAME follows promotes until the job runs).
    """

    id: str
    seq: int  # insertion order (never reused; FIFO within a priority)
    kind: str
    params: dict[str, Any]
    model: str
    priority: int = 0
    state: JobState = JobState.QUEUED
    owner: str | None = None  # the API key id that submitted it (None: auth off)
    idempotency_key: str | None = None
    step: int = 0
    total: int = 0
    error: str | None = None
    attempts: int = 0  # how many times a worker claimed it (> 1 after a crash re-queue)
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    model_hash: str | None = None
    model_version: str | None = None  # the store version (NAME@V) it ran on; None for a plain file
    images: list[ImageRecord] = field(default_factory=list)

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.created_at

    @property
    def run_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at
