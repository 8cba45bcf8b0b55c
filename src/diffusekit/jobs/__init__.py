"""The job layer: the job model, a durable queue (SQLite by default), image files and the worker that runs
jobs through the one generation path (GenerationParams + Pipeline). Knows nothing of HTTP."""

from .model import KINDS, Job, JobState
from .queue import JobQueue, QueueFull, SQLiteQueue

__all__ = ["KINDS", "Job", "JobQueue", "JobState", "QueueFull", "SQLiteQueue"]
