"""Loaded pipelines, kept across jobs: each model loads once and the least recently used one is evicted
when the next would not fit in memory (weights estimated from the file size, see memory.py)."""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..memory import available_bytes
from .catalog import ModelCatalog, ModelEntry

# Loading needs the weights plus some working room (a cast copies tensors one at a time).
LOAD_HEADROOM = 1.25


class ModelCache:
    """name -> Pipeline, LRU; `on_load(name, seconds)` is told about every load (for metrics)."""

    def __init__(
        self,
        catalog: ModelCatalog,
        *,
        device: str = "auto",
        precision: str = "auto",
        max_models: int = 4,
        limit_bytes: int | None = None,
        on_load: Callable[[str, float], None] | None = None,
    ):
        self.catalog = catalog
        self.device = device
        self.precision = precision
        self.max_models = max_models
        self.limit_bytes = limit_bytes
        self.on_load = on_load
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._pipes)

    def get(self, entry: ModelEntry):
        """The Pipeline for a catalog entry, loading it (once, even with concurrent callers) if needed."""
        with self._lock:
            if entry.name in self._pipes:
                self._pipes.move_to_end(entry.name)
                return self._pipes[entry.name]
            load_lock = self._load_locks.setdefault(entry.name, threading.Lock())
        with load_lock:
            with self._lock:
                if entry.name in self._pipes:
                    return self._pipes[entry.name]
            need = int(entry.size_bytes * LOAD_HEADROOM)
            self._make_room(need)
            pipe, seconds = self._load(entry)
            with self._lock:
                self._pipes[entry.name] = pipe
                self._sizes[entry.name] = need
            if self.on_load is not None:
                self.on_load(entry.name, seconds)
            return pipe

    def _load(self, entry: ModelEntry):
        from ..pipeline import Pipeline
        from ..runtime import resolve_device

        t0 = time.perf_counter()
        pipe = Pipeline.from_file(entry.path, precision=self.precision, device=resolve_device(self.device))
        sha = self.catalog.sha256(entry)  # the A1111 title carries the hash once a model was loaded
        if sha is not None:
            pipe._hash = sha[:10]
        return pipe, time.perf_counter() - t0

    def _make_room(self, need: int) -> None:
        """Evict least recently used pipelines until `need` bytes fit (and the count limit holds)."""
        while True:
            with self._lock:
                if not self._pipes:
                    return
                free = (
                    available_bytes()
                    if self.limit_bytes is None
                    else self.limit_bytes - sum(self._sizes.values())
                )
                fits = free is None or need <= free
                if fits and len(self._pipes) < self.max_models:
                    return
                name, _ = self._pipes.popitem(last=False)
                self._sizes.pop(name, None)
            gc.collect()

    def evict(self, name: str) -> bool:
        with self._lock:
            gone = self._pipes.pop(name, None) is not None
            self._sizes.pop(name, None)
        gc.collect()
        return gone
