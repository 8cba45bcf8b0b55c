"""The models a server offers: the bundled default as `default`, plus files and diffusers folders found
under a models folder, each by name. Names are looked up, never turned into paths (no traversal)."""

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
    name: str  # unique: file stem or folder name ("default" for the bundled model)
    path: Path
    kind: str  # "file" or "diffusers"

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


class ModelCatalog:
    """Name -> model file; `refresh()` rescans the models folder; hashes are computed once, lazily."""

    def __init__(self, models_dir: str | Path | None, default_path: Path | None):
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.default_path = default_path
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._sha256: dict[Path, str] = {}
        self.refresh()

    def refresh(self) -> list[ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        if self.default_path is not None and self.default_path.exists():
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
                    name = _unique(p.stem, entries)
                    entries[name] = ModelEntry(name, p, "file")
                elif p.is_dir() and (p / "model_index.json").is_file():
                    name = _unique(p.name, entries)
                    entries[name] = ModelEntry(name, p, "diffusers")
        with self._lock:
            self._entries = entries
        return list(entries.values())

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        """The entry for a name, A1111 title ("file.safetensors [hash]") or filename, case-insensitive."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownModel(f"model name must be a non-empty string; valid: {self.names()}")
        key = name.strip()
        if key.endswith("]") and " [" in key:
            key = key[: key.rindex(" [")]
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
        if entry.kind != "file":
            return None
        if entry.path not in self._sha256 and compute:
            from ..checkpoints.hashes import sha256_file

            self._sha256[entry.path] = sha256_file(entry.path)
        return self._sha256.get(entry.path)

    def title(self, entry: ModelEntry) -> str:
        """A1111's title: "filename [short hash]" once the hash is known, else the filename."""
        sha = self.sha256(entry, compute=False)
        return f"{entry.filename} [{sha[:10]}]" if sha else entry.filename


def _unique(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def _inside_diffusers(p: Path, root: Path) -> bool:
    return any((parent / "model_index.json").is_file() for parent in p.parents if parent.is_relative_to(root))
