"""The queue interface (submit, claim, heartbeat, finish, cancel) and its embedded default on SQLite (WAL).

Durability rules: every change is committed before the call returns (so before a client is told), a
job's images are recorded in the same transaction that marks it succeeded, jobs a crash left `running`
are re-queued by `recover()`, and ids are random (uuid4) with an AUTOINCREMENT sequence, so neither is
ever reused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .model import ImageRecord, Job, JobState


class QueueFull(RuntimeError):
    """The queue holds its maximum of waiting jobs; retry later."""

    def __init__(self, limit: int, retry_after: int = 5):
        super().__init__(f"the queue is full ({limit} jobs waiting); retry after {retry_after} s")
        self.limit, self.retry_after = limit, retry_after


class JobQueue(ABC):
    """Where jobs wait and are claimed; SQLite embedded, replaceable by a shared store for scale-out."""

    @abstractmethod
    def submit(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        model: str,
        priority: int = 0,
        owner: str | None = None,
        idempotency_key: str | None = None,
        inputs: Sequence[ImageRecord] = (),
    ) -> tuple[Job, bool]:
        """Store a queued job (and its input image records); (job, False) when the key was seen before."""

    @abstractmethod
    def claim(self) -> Job | None:
        """The next queued job (highest priority, then oldest), now `running`; None when there is none."""

    @abstractmethod
    def heartbeat(self, job_id: str, step: int, total: int) -> bool:
        """Record progress; True when a cancel was requested for the job."""

    @abstractmethod
    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        images: Sequence[ImageRecord] = (),
        model_hash: str | None = None,
        model_version: str | None = None,
    ) -> Job:
        """Mark a running job done (with its stored images when it succeeded, and the exact model)."""

    @abstractmethod
    def cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        """Cancel a queued job (it never runs) or ask a running one to stop; None if not found."""

    @abstractmethod
    def get(self, job_id: str, owner: str | None = None) -> Job | None: ...

    @abstractmethod
    def list(
        self,
        owner: str | None = None,
        state: JobState | None = None,
        limit: int = 50,
        cursor: int | None = None,
    ) -> list[Job]: ...

    @abstractmethod
    def recover(self) -> int:
        """Re-queue the jobs a crash left running; how many."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    model TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    owner TEXT,
    idempotency_key TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    model_hash TEXT,
    model_version TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    owner TEXT,
    path TEXT NOT NULL,
    seed INTEGER,
    infotext TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT 'output',
    idx INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    step INTEGER
);
CREATE INDEX IF NOT EXISTS images_job ON images(job_id, idx);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """An autocommit connection in WAL mode with full fsync on commit (safe against power loss)."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteQueue(JobQueue):
    """The embedded queue: one SQLite file in WAL mode, one connection guarded by a lock."""

    def __init__(self, path: str | Path, *, max_queued: int = 1000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_queued = max_queued
        self._lock = threading.RLock()
        self._conn = connect(self.path)
        with self._lock:
            self._conn.executescript(_SCHEMA)
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}
            if "model_version" not in columns:  # a database from before store versions were recorded
                self._conn.execute("ALTER TABLE jobs ADD COLUMN model_version TEXT")
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(images)")}
            if "step" not in columns:  # from before training jobs stored sample images
                self._conn.execute("ALTER TABLE images ADD COLUMN step INTEGER")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction, committed (durably) before the block's result is used."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, kind, params, *, model, priority=0, owner=None, idempotency_key=None, inputs=()):
        now = time.time()
        with self._tx() as c:
            if idempotency_key is not None:
                row = c.execute(
                    "SELECT * FROM jobs WHERE owner IS ? AND idempotency_key = ?", (owner, idempotency_key)
                ).fetchone()
                if row is not None:
                    return self._job(c, row), False
            queued = c.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= self.max_queued:
                raise QueueFull(self.max_queued)
            job_id = uuid.uuid4().hex
            c.execute(
                "INSERT INTO jobs (id, kind, params, model, priority, state, owner, idempotency_key,"
                " created_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, kind, json.dumps(params), model, priority, owner, idempotency_key, now),
            )
            for i, rec in enumerate(inputs):
                self._insert_image(c, rec, job_id, i)
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(c, row), True

    def claim(self, exclude_models: Sequence[str] = ()) -> Job | None:
        """The next queued job (see JobQueue.claim), skipping jobs on `exclude_models` (busy elsewhere)."""
        skip = " AND model NOT IN (" + ", ".join("?" * len(exclude_models)) + ")" if exclude_models else ""
        with self._tx() as c:
            row = c.execute(
                f"SELECT * FROM jobs WHERE state = 'queued'{skip} ORDER BY priority DESC, seq LIMIT 1",
                tuple(exclude_models),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            c.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ?,"
                " attempts = attempts + 1, step = 0, total = 0 WHERE id = ?",
                (now, now, row["id"]),
            )
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def claim_compatible(self, job: Job, limit: int) -> list[Job]:
        """Claim up to `limit` more queued jobs that can share `job`'s sampler run (see batching)."""
        key = batch_key(job)
        if key is None or limit <= 0:
            return []
        out = []
        with self._tx() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND model = ? AND kind = ?"
                " ORDER BY priority DESC, seq LIMIT 200",
                (job.model, job.kind),
            ).fetchall()
            now = time.time()
            for row in rows:
                other = self._job(c, row, with_images=False)
                if batch_key(other) != key:
                    continue
                c.execute(
                    "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ?,"
                    " attempts = attempts + 1, step = 0, total = 0 WHERE id = ?",
                    (now, now, other.id),
                )
                out.append(self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (other.id,)).fetchone()))
                if len(out) >= limit:
                    break
        return out

    def heartbeat(self, job_id, step, total):
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET step = ?, total = ?, heartbeat_at = ? WHERE id = ? AND state = 'running'",
                (step, total, time.time(), job_id),
            )
            row = c.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return bool(row and row[0])

    def finish(self, job_id, state, *, error=None, images=(), model_hash=None, model_version=None):
        state = JobState(state)
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, model_hash = COALESCE(?, model_hash),"
                " model_version = COALESCE(?, model_version) WHERE id = ? AND state = 'running'",
                (state.value, error, time.time(), model_hash, model_version, job_id),
            )
            for i, rec in enumerate(images):
                self._insert_image(c, rec, job_id, i)
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def cancel(self, job_id, owner=None):
        with self._tx() as c:
            row = self._owned(c, job_id, owner)
            if row is None:
                return None
            if row["state"] == "queued":
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled before it ran'"
                    " WHERE id = ?",
                    (time.time(), job_id),
                )
            elif row["state"] == "running":
                c.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_by_key(self, owner: str | None, idempotency_key: str) -> Job | None:
        """The job an owner submitted with this idempotency key, if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM jobs WHERE owner IS ? AND idempotency_key = ?", (owner, idempotency_key)
            ).fetchone()
            return None if row is None else self._job(self._conn, row)

    def get(self, job_id, owner=None):
        with self._lock:
            row = self._owned(self._conn, job_id, owner)
            return None if row is None else self._job(self._conn, row)

    def list(self, owner=None, state=None, limit=50, cursor=None):
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            sql, args = sql + " AND owner = ?", [*args, owner]
        if state is not None:
            sql, args = sql + " AND state = ?", [*args, JobState(state).value]
        if cursor is not None:
            sql, args = sql + " AND seq < ?", [*args, cursor]
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, [*args, limit]).fetchall()
            return [self._job(self._conn, r) for r in rows]

    def recover(self) -> int:
        with self._tx() as c:
            n = c.execute(
                "UPDATE jobs SET state = 'queued', step = 0, total = 0, started_at = NULL"
                " WHERE state = 'running' AND cancel_requested = 0"
            ).rowcount
            # a running job whose cancel was asked for before the crash ends cancelled, not re-run
            c.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled'"
                " WHERE state = 'running'",
                (time.time(),),
            )
            return n

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = {s.value: 0 for s in JobState}
        out.update({r[0]: r[1] for r in rows})
        return out

    def submitted_since(self, owner: str | None, since: float) -> int:
        """Jobs this owner submitted since `since` (for daily quotas)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND created_at >= ?", (owner, since)
            ).fetchone()
            return row[0]

    def position(self, job: Job) -> int:
        """How many queued jobs run before this one."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued'"
                " AND (priority > ? OR (priority = ? AND seq < ?))",
                (job.priority, job.priority, job.seq),
            ).fetchone()
            return row[0]

    # --- images and settings -------------------------------------------------------------------

    def add_images(self, job_id: str, images: Sequence[ImageRecord]) -> bool:
        """Record images a running job made on the way (a training job's samples), durably now; False
        (nothing recorded) when the job is no longer running."""
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "running":
                return False
            for i, rec in enumerate(images):
                self._insert_image(c, rec, job_id, i)
            return True

    def job_images(self, job_id: str, role: str) -> list[ImageRecord]:
        """A job's images of one role ("output", "input", "sample"), samples by step."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM images WHERE job_id = ? AND role = ? ORDER BY step, idx", (job_id, role)
            ).fetchall()
        return [_image(r) for r in rows]

    def image(self, image_id: str, owner: str | None = None) -> ImageRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return _image(row)

    def image_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT path FROM images").fetchall()}

    def setting(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    # --- rows -> objects -----------------------------------------------------------------------

    @staticmethod
    def _owned(conn, job_id: str, owner: str | None):
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None  # another key's job is indistinguishable from a missing one
        return row

    @staticmethod
    def _insert_image(c, rec: ImageRecord, job_id: str, idx: int) -> None:
        c.execute(
            "INSERT INTO images (id, job_id, owner, path, seed, infotext, role, idx, created_at, step)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id,
                job_id,
                rec.owner,
                rec.path,
                rec.seed,
                rec.infotext,
                rec.role,
                idx,
                rec.created_at or time.time(),
                rec.step,
            ),
        )

    @staticmethod
    def _job(conn, row, with_images: bool = True) -> Job:
        images = []
        if with_images:
            rows = conn.execute(
                "SELECT * FROM images WHERE job_id = ? AND role = 'output' ORDER BY idx", (row["id"],)
            ).fetchall()
            images = [_image(r) for r in rows]
        return Job(
            id=row["id"],
            seq=row["seq"],
            kind=row["kind"],
            params=json.loads(row["params"]),
            model=row["model"],
            priority=row["priority"],
            state=JobState(row["state"]),
            owner=row["owner"],
            idempotency_key=row["idempotency_key"],
            step=row["step"],
            total=row["total"],
            error=row["error"],
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            model_hash=row["model_hash"],
            model_version=row["model_version"],
            images=images,
        )


def _image(row) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        job_id=row["job_id"],
        owner=row["owner"],
        path=row["path"],
        seed=row["seed"],
        infotext=row["infotext"],
        role=row["role"],
        created_at=row["created_at"],
        step=row["step"],
    )


# Fields that must agree for jobs to share one sampler run; the prompt, seed and the rest may differ.
BATCH_FIELDS = (
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler",
    "schedule",
    "clip_skip",
    "cfg_rescale",
    "eta",
    "prompt_mode",
    "subseed_strength",
)


def batch_key(job: Job) -> tuple | None:
    """What a txt2img job must share with others to run in one batch; None when it cannot be batched."""
    p = job.params
    if job.kind != "txt2img" or p.get("enable_hr") or p.get("n_iter", 1) != 1 or p.get("batch_size", 1) != 1:
        return None
    if p.get("seed", -1) < 0 or p.get("subseed_strength", 0):
        return None
    return (job.model, *(json.dumps(p.get(f)) for f in BATCH_FIELDS))
