"""Loaded pipelines, kept across jobs: each model loads once and the least recently used one is evicted
when the next would not fit in memory. Pipelines are keyed by content (a store version by its blobs, a
file by its path and modification time), so a promote, a rollback or a replaced file never reuses the
pipeline of other weights; the weights' memory is estimated from the tensor headers (jobs/loading.py)."""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..memory import available_bytes
from .catalog import ModelCatalog, ModelEntry
from .loading import load_pipeline, loaded_bytes, weight_bytes

# Loading needs the weights plus some working room (a cast copies tensors one at a time).
LOAD_HEADROOM = 1.25


class ModelCache:
    """entry key -> Pipeline, LRU; `on_load(label, seconds)` is told about every load (for metrics)."""

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
        self._labels: dict[str, str] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def loaded(self) -> list[str]:
        """Labels of the loaded pipelines: model names, NAME@V for store versions."""
        with self._lock:
            return [self._labels[k] for k in self._pipes]

    def estimate(self, entry: ModelEntry) -> int:
        """Bytes loading `entry` needs: its weights at the compute dtype plus working room."""
        return int(weight_bytes(entry, precision=self.precision, device=self.device) * LOAD_HEADROOM)

    def get(self, entry: ModelEntry):
        """The Pipeline for a catalog entry, loading it (once, even with concurrent callers) if needed."""
        key = entry.key
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._pipes:
                    return self._pipes[key]
            self._make_room(self.estimate(entry))
            t0 = time.perf_counter()
            pipe = load_pipeline(entry, self.catalog, device=self.device, precision=self.precision)
            seconds = time.perf_counter() - t0
            with self._lock:
                self._pipes[key] = pipe
                self._sizes[key] = loaded_bytes(pipe)
                self._labels[key] = entry.label
            if self.on_load is not None:
                self.on_load(entry.label, seconds)
            return pipe

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
                key, _ = self._pipes.popitem(last=False)
                self._sizes.pop(key, None)
                self._labels.pop(key, None)
            gc.collect()

    def evict(self, label: str) -> bool:
        """Drop every loaded pipeline known as `label` (a model name or NAME@V)."""
        with self._lock:
            keys = [k for k, lab in self._labels.items() if lab == label]
            for k in keys:
                self._pipes.pop(k, None)
                self._sizes.pop(k, None)
                self._labels.pop(k, None)
        gc.collect()
        return bool(keys)
