"""Loaded pipelines, kept across jobs: each model loads once and the least recently used idle one is
evicted when the next would not fit in memory. Pipelines are keyed by content (a store version by its
blobs, a file by its path and modification time), so a promote, a rollback or a replaced file never reuses
the pipeline of other weights; the weights' memory is estimated from the tensor headers (jobs/loading.py).

A job holds a lease on its pipeline while it runs (`with cache.lease(entry) as pipe:`): a leased pipeline
is never evicted. A load that does not fit beside the leased ones waits (first come, first served) until
enough is released, or fails with ModelMemoryError naming what is loaded and what the load needs: at once
when it can never fit the limit, after `wait_s` otherwise. Nothing waits while holding a lease on another
model, so a wait always ends when the running jobs do (no deadlock)."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..memory import available_bytes
from .catalog import ModelCatalog, ModelEntry
from .loading import load_pipeline, loaded_bytes, weight_bytes

# Loading needs the weights plus some working room (a cast copies tensors one at a time).
LOAD_HEADROOM = 1.25
WAIT_POLL_S = 0.5  # a waiting load looks again at least this often (MemAvailable changes on its own)


class ModelMemoryError(ValueError):
    """A model that cannot be loaded within the memory limit; says what it needs and what holds memory."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class ModelCache:
    """entry key -> Pipeline, LRU, with leases; `on_load(label, seconds)` is told about every load.

    `limit_bytes`: memory the loaded models may take together (None: what the system has available);
    `wait_s`: how long a load waits for leased models to be released before it fails."""

    def __init__(
        self,
        catalog: ModelCatalog,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_models: int = 4,
        limit_bytes: int | None = None,
        wait_s: float = 3600.0,
        on_load: Callable[[str, float], None] | None = None,
    ):
        self.catalog = catalog
        self.device = device
        self.precision = precision
        self.max_models = max_models
        self.limit_bytes = limit_bytes
        self.wait_s = wait_s
        self.on_load = on_load
        self._pipes: OrderedDict[str, object] = OrderedDict()  # LRU first
        self._sizes: dict[str, int] = {}
        self._labels: dict[str, str] = {}
        self._users: dict[str, int] = {}  # key -> leases held now
        self._loading: dict[str, int] = {}  # key -> bytes reserved by a load in progress
        self._loading_labels: dict[str, str] = {}
        self._held: dict[str, int] = {}  # hold key -> bytes a job keeps outside the cache (see `hold`)
        self._held_labels: dict[str, str] = {}
        self._queue: deque[object] = deque()  # tickets of waiting acquisitions, first come first served
        self._cond = threading.Condition(threading.Lock())

    # --- what is loaded -------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Labels of the loaded pipelines: model names, NAME@V for store versions."""
        with self._cond:
            return [self._labels[k] for k in self._pipes]

    def status(self) -> list[dict]:
        """Each loaded (or loading) pipeline: label, bytes, leases held, whether it is still loading."""
        with self._cond:
            out = [
                {"model": self._labels[k], "bytes": self._sizes[k], "leases": self._users.get(k, 0),
                 "loading": False}
                for k in self._pipes
            ]  # fmt: skip
            out += [
                {"model": self._loading_labels[k], "bytes": b, "leases": 0, "loading": True}
                for k, b in self._loading.items()
            ]
            out += [
                {"model": self._held_labels[k], "bytes": b, "leases": 1, "loading": False, "held": True}
                for k, b in self._held.items()
            ]
            return out

    def estimate(self, entry: ModelEntry, precision: str | None = None) -> int:
        """Bytes loading `entry` needs: its weights at the compute dtype (or `precision`) plus room."""
        dtype = precision or self.precision
        return int(weight_bytes(entry, precision=dtype, device=self.device) * LOAD_HEADROOM)

    # --- leases ---------------------------------------------------------------------------------

    @contextmanager
    def lease(
        self,
        entry: ModelEntry,
        *,
        cancel: threading.Event | None = None,
        on_wait: Callable[[str | None], None] | None = None,
    ) -> Iterator[object]:
        """The entry's Pipeline, never evicted while the block runs (see `acquire`)."""
        pipe = self.acquire(entry, cancel=cancel, on_wait=on_wait)
        try:
            yield pipe
        finally:
            self.release(entry)

    def get(self, entry: ModelEntry):
        """The Pipeline for an entry, loaded if needed, without keeping a lease (for callers that only need
        it loaded or read its config; a job that runs on it takes a `lease`). A loaded one is returned at
        once, even while loads wait their turn."""
        with self._cond:
            if entry.key in self._pipes:
                self._pipes.move_to_end(entry.key)
                return self._pipes[entry.key]
        pipe = self.acquire(entry)
        self.release(entry)
        return pipe

    def acquire(
        self,
        entry: ModelEntry,
        *,
        cancel: threading.Event | None = None,
        on_wait: Callable[[str | None], None] | None = None,
    ):
        """Lease the entry's Pipeline, loading it (once, even with concurrent callers) if needed.

        A pipeline leased by someone else is shared at once; otherwise callers take turns in arrival
        order, and a load that must wait for leased models to be released calls `on_wait(reason)` (and
        `on_wait(None)` when it goes on). `cancel` set while waiting raises pipeline.Cancelled."""
        pipe = self._reserve(entry.key, entry.label, lambda: self.estimate(entry), cancel, on_wait)
        return pipe if pipe is not None else self._load(entry, entry.key)

    @contextmanager
    def hold(
        self,
        label: str,
        need: int,
        *,
        cancel: threading.Event | None = None,
        on_wait: Callable[[str | None], None] | None = None,
    ) -> Iterator[None]:
        """Count `need` bytes that a job keeps outside the cache (a training job's own copy of a model)
        against the memory limit while the block runs; waits for room, and evicts idle models, as a load
        does. With no --model-memory the system's available memory already shows it, so nobody waits on
        a hold then."""
        key = f"hold:{uuid.uuid4().hex}"
        self._reserve(key, label, lambda: need, cancel, on_wait)
        with self._cond:
            self._held[key] = self._loading.pop(key)
            self._held_labels[key] = self._loading_labels.pop(key)
        try:
            yield
        finally:
            with self._cond:
                self._held.pop(key, None)
                self._held_labels.pop(key, None)
                self._cond.notify_all()

    def _reserve(
        self,
        key: str,
        label: str,
        estimate: Callable[[], int],
        cancel: threading.Event | None,
        on_wait: Callable[[str | None], None] | None,
    ):
        """Wait for this caller's turn and room: a loaded pipeline (leased now), or None once `need` bytes
        are reserved under `key` in `_loading` (the caller loads, or holds, it)."""
        need: int | None = None
        ticket: object | None = None
        deadline = time.monotonic() + self.wait_s
        evicted = False
        try:
            with self._cond:
                while True:
                    turn = not self._queue or self._queue[0] is ticket
                    if key in self._pipes and (self._users.get(key, 0) > 0 or turn):
                        self._pipes.move_to_end(key)
                        self._users[key] = self._users.get(key, 0) + 1
                        return self._pipes[key]
                    reason = None
                    if key in self._loading:
                        reason = f"model {label!r} is being loaded by another job"
                    elif turn:
                        if need is None:
                            self._cond.release()  # reading the tensor headers is file I/O
                            try:
                                need = estimate()
                            finally:
                                self._cond.acquire()
                            continue  # the world may have changed meanwhile
                        plan = self._plan(label, need)
                        if isinstance(plan, list):
                            for k in plan:
                                self._drop(k)
                            evicted = bool(plan)
                            self._loading[key] = need
                            self._loading_labels[key] = label
                            break
                        reason = plan
                    else:
                        reason = "waiting for its turn to load a model"
                    if ticket is None:
                        ticket = object()
                        self._queue.append(ticket)
                    if on_wait is not None:
                        on_wait(reason)
                    if cancel is not None and cancel.is_set():
                        from ..pipeline import Cancelled

                        raise Cancelled("cancelled while waiting for model memory")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ModelMemoryError(
                            f"{reason}; gave up after waiting {self.wait_s:g} s (the server's --model-wait)"
                        )
                    self._cond.wait(min(WAIT_POLL_S, left))
        finally:
            if ticket is not None:
                with self._cond:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                if on_wait is not None:
                    on_wait(None)
        if evicted:
            gc.collect()  # evicted pipelines may sit in reference cycles
        return None

    def release(self, entry: ModelEntry) -> None:
        """End one lease of the entry's pipeline (it stays loaded, evictable once no lease is left)."""
        key = entry.key
        with self._cond:
            n = self._users.get(key, 0) - 1
            if n > 0:
                self._users[key] = n
            else:
                self._users.pop(key, None)
            self._cond.notify_all()

    def evict(self, label: str) -> bool:
        """Drop every loaded pipeline known as `label` (a model name or NAME@V) that no job holds."""
        with self._cond:
            keys = [k for k, lab in self._labels.items() if lab == label and not self._users.get(k)]
            for k in keys:
                self._drop(k)
            self._cond.notify_all()
        gc.collect()
        return bool(keys)

    # --- internals ------------------------------------------------------------------------------

    def _load(self, entry: ModelEntry, key: str):
        """Load what `acquire` reserved room for; the caller holds the first lease on it."""
        t0 = time.perf_counter()
        try:
            pipe = load_pipeline(entry, self.catalog, device=self.device, precision=self.precision)
        except BaseException:
            with self._cond:
                self._loading.pop(key, None)
                self._loading_labels.pop(key, None)
                self._cond.notify_all()
            raise
        seconds = time.perf_counter() - t0
        with self._cond:
            self._loading.pop(key, None)
            self._loading_labels.pop(key, None)
            self._pipes[key] = pipe
            self._sizes[key] = loaded_bytes(pipe)
            self._labels[key] = entry.label
            self._users[key] = self._users.get(key, 0) + 1
            self._cond.notify_all()
        if self.on_load is not None:
            self.on_load(entry.label, seconds)
        return pipe

    def _drop(self, key: str) -> None:
        self._pipes.pop(key, None)
        self._sizes.pop(key, None)
        self._labels.pop(key, None)

    def _plan(self, label: str, need: int) -> list[str] | str:
        """The idle pipelines (LRU first) to evict so that `need` bytes fit, or why it must wait now.

        Raises ModelMemoryError when the load could not fit even with nothing else loaded."""
        reserved = sum(self._loading.values())
        if self.limit_bytes is not None:
            if need > self.limit_bytes:
                raise ModelMemoryError(
                    f"model {label!r} needs about {_mib(need)} to load (weights and working room) but "
                    f"the model memory limit (--model-memory) is {_mib(self.limit_bytes)}; loaded now: "
                    f"{self._describe()}"
                )
            held = sum(self._held.values())
            free: int | None = self.limit_bytes - sum(self._sizes.values()) - reserved - held
        else:
            avail = available_bytes()
            free = None if avail is None else avail - reserved
        idle = [k for k in self._pipes if not self._users.get(k)]
        plan: list[str] = []

        def fits() -> bool:
            count = len(self._pipes) - len(plan) + len(self._loading)
            return (free is None or need <= free) and count < self.max_models

        for k in idle:
            if fits():
                break
            plan.append(k)
            if free is not None:
                free += self._sizes[k]
        if fits():
            return plan
        if self.limit_bytes is None and len(plan) == len(self._pipes) and not self._loading:
            return plan  # nothing else holds memory: try (MemAvailable is a guess; the OS decides)
        where = (
            f"the model memory limit (--model-memory) is {_mib(self.limit_bytes)}"
            if self.limit_bytes is not None
            else f"{_mib(max(0, (free or 0)))} of memory is available"
        )
        return (
            f"model {label!r} needs about {_mib(need)} to load but {where} and the loaded models "
            f"in use cannot be evicted: {self._describe()}"
        )

    def _describe(self) -> str:
        """The loaded pipelines for an error message: label, size, whether jobs hold them."""
        parts = []
        for k in self._pipes:
            n = self._users.get(k, 0)
            use = f"in use by {n} job{'s' if n > 1 else ''}" if n else "idle"
            parts.append(f"{self._labels[k]} ({_mib(self._sizes[k])}, {use})")
        parts += [f"{self._loading_labels[k]} ({_mib(b)}, loading)" for k, b in self._loading.items()]
        parts += [f"{self._held_labels[k]} ({_mib(b)}, in use)" for k, b in self._held.items()]
        return ", ".join(parts) if parts else "nothing"
