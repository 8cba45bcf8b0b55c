"""The models a server offers: the bundled default as `default`, files and diffusers folders found under a
models folder, and the versions of a model store (`NAME`: its current version, `NAME@V`: one version).
Names are looked up, never turned into paths (no traversal). A store name is resolved anew on every
lookup, so a promote or rollback (from the server or the CLI) reaches the next job without a restart."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_NAME = "default"


class UnknownModel(ValueError):
    """A model name that is not in the catalog; the message lists the valid names."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # unique: file stem, folder name, store NAME or NAME@V ("default" for the bundled model)
    path: Path  # the file or folder; for a store entry the store folder
    kind: str  # "file", "diffusers" or "store"
    version: str | None = None  # store: the exact NAME@V this entry resolves to (now)
    family: str | None = None  # store: from the manifest (files: ModelCatalog.family)
    autov2: str | None = None  # store: AutoV2 of the file that was added
    sha256: str | None = None  # store: sha256 of the file that was added
    content: str | None = None  # store: the version's component blob digests, joined
    parameters: int | None = None  # store: parameters of the networks
    denoiser_parameters: int | None = None  # store: of the U-Net
    stored_bytes: int | None = None  # store: bytes of the version's tensors

    @property
    def filename(self) -> str:
        return self.version or self.name if self.kind == "store" else self.path.name

    @property
    def label(self) -> str:
        """What the loaded pipeline is known as: NAME@V for store entries, else the name."""
        return self.version or self.name

    @property
    def key(self) -> str:
        """The model cache key: a store version by its content, a file by its path and mtime."""
        if self.kind == "store":
            return f"store:{self.version}:{self.content}"
        try:
            mtime = (self.path / "model_index.json" if self.path.is_dir() else self.path).stat().st_mtime_ns
        except OSError:
            mtime = 0
        return f"{self.kind}:{self.path}:{mtime}"

    @property
    def size_bytes(self) -> int:
        if self.kind == "store":
            return self.stored_bytes or 0
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


class ModelCatalog:
    """Name -> model; `refresh()` rescans the models folder; hashes are computed once, lazily.

    `store` (a ModelStore or None): its models are offered as NAME and NAME@V, and its `default` (the
    bundled model as default@1 in a fresh per-user store) takes the place of the bundled file.
    """

    def __init__(self, models_dir: str | Path | None, default_path: Path | None, store=None):
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.default_path = default_path
        self.store = store
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._sha256: dict[Path, str] = {}
        self._family: dict[str, str | None] = {}
        self.refresh()

    def refresh(self) -> list[ModelEntry]:
        store_names = set(self._store_names())  # the store's `default` replaces the bundled file
        entries: dict[str, ModelEntry] = {}
        if self.default_path is not None and self.default_path.exists() and DEFAULT_NAME not in store_names:
            entries[DEFAULT_NAME] = ModelEntry(DEFAULT_NAME, self.default_path, "file")
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in sorted(self.models_dir.rglob("*")):
                if any(part.startswith(".") for part in p.relative_to(self.models_dir).parts):
                    continue
                if not p.resolve().is_relative_to(self.models_dir):
                    continue  # a symlink leading out of the models folder is not offered
                if (
                    p.is_file()
                    and p.suffix in CHECKPOINT_SUFFIXES
                    and not _inside_diffusers(p, self.models_dir)
                ):
                    name = _unique(p.stem, store_names | entries.keys())
                    entries[name] = ModelEntry(name, p, "file")
                elif p.is_dir() and (p / "model_index.json").is_file():
                    name = _unique(p.name, store_names | entries.keys())
                    entries[name] = ModelEntry(name, p, "diffusers")
        with self._lock:
            self._entries = entries
        return self.entries()

    def _store_names(self) -> list[str]:
        return [] if self.store is None else self.store.names()

    def entries(self) -> list[ModelEntry]:
        """Store models (each NAME, then its NAME@V), then files; store entries are read from it now."""
        from .store_models import store_entries

        store = store_entries(self.store) if self.store is not None else []
        taken = {e.name for e in store}
        with self._lock:
            files = [e for e in self._entries.values() if e.name not in taken]
        return store + files

    def get(self, name: str) -> ModelEntry:
        """The entry for a name, NAME@V, A1111 title ("file.safetensors [hash]") or filename (any case)."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownModel(f"model name must be a non-empty string; valid: {self.names()}")
        key = name.strip()
        if key.endswith("]") and " [" in key:
            key = key[: key.rindex(" [")]
        if self.store is not None:
            from .store_models import store_entry

            found = store_entry(self.store, key)  # None: not a store model; UnknownModel: bad version
            if found is not None:
                return found
        with self._lock:
            entries = dict(self._entries)
        for e in entries.values():
            if key in (e.name, e.filename):
                return e
        for e in entries.values():
            if key.casefold() in (e.name.casefold(), e.filename.casefold()):
                return e
        raise UnknownModel(f"model {name!r} not found; valid: {self.names()}")

    def names(self) -> str:
        return ", ".join(e.name for e in self.entries()) or "(none)"

    def sha256(self, entry: ModelEntry, compute: bool = True) -> str | None:
        """The file's full sha256 (None for folders, or when not yet computed and `compute` is False)."""
        if entry.kind == "store":
            return entry.sha256
        if entry.kind != "file":
            return None
        if entry.path not in self._sha256 and compute:
            from ..checkpoints.hashes import sha256_file

            self._sha256[entry.path] = sha256_file(entry.path)
        return self._sha256.get(entry.path)

    def title(self, entry: ModelEntry) -> str:
        """A1111's title: "filename [short hash]" once the hash is known, else the filename."""
        if entry.kind == "store":
            return f"{entry.name} [{entry.autov2}]" if entry.autov2 else entry.name
        sha = self.sha256(entry, compute=False)
        return f"{entry.filename} [{sha[:10]}]" if sha else entry.filename

    def family(self, entry: ModelEntry) -> str | None:
        """'sd1' | 'sd2' | 'sdxl' | 'sd3' (read from headers once per file version; None if unknown)."""
        if entry.kind == "store":
            return entry.family
        key = entry.key
        if key not in self._family:
            from .loading import file_family

            self._family[key] = file_family(entry.path)
        return self._family[key]


def _unique(name: str, taken) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def _inside_diffusers(p: Path, root: Path) -> bool:
    return any((parent / "model_index.json").is_file() for parent in p.parents if parent.is_relative_to(root))
