"""Content-addressed blobs: tensors in a canonical safetensors form, or raw bytes, named by their sha256.

A tensor blob is a safetensors file we write ourselves so that its bytes depend only on the tensors:
keys sorted, compact JSON, no metadata, header padded with spaces to 8 bytes, data in key order. Its
sha256 is therefore the hash of the canonical tensor data (names, dtypes, shapes, bytes), and the same
component found in two checkpoints is one blob. Every write is temp file + fsync + rename + dir fsync.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoints.single_file import SAFETENSORS_DTYPES
from ..durable import fsync_dir

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
HASH_BLOCK = 1 << 20
TMP_SUFFIX = ".tmp"


class StoreError(ValueError):
    """A store operation that cannot proceed; the message says what is wrong and what is valid."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (row-major, no copy when already contiguous on CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _header(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical safetensors header (8-byte length + padded JSON) of tensors in sorted key order."""
    entries, offset = {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in DTYPE_CODES:
            raise StoreError(f"tensor {key!r} has dtype {t.dtype}, which a safetensors blob cannot hold")
        n = t.numel() * t.element_size()
        entries[key] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _chunks(tensors: Mapping[str, torch.Tensor]) -> Iterator[memoryview | bytes]:
    yield _header(tensors)
    for key in sorted(tensors):
        yield tensor_bytes(tensors[key])


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(sha256, size) of the canonical blob of `tensors`, without writing anything."""
    digest, size = hashlib.sha256(), 0
    for chunk in _chunks(tensors):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class BlobStore:
    """Blobs under `root/ab/abcdef...` (two-hex fan-out); immutable once written."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def _write(self, digest: str, chunks: Iterator[memoryview | bytes] | list[bytes]) -> Path:
        """Write `chunks` as blob `digest` atomically; checks the bytes hash to `digest` before the rename."""
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{digest}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        check = hashlib.sha256()
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    check.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if check.hexdigest() != digest:  # the tensors changed under us: never store a misnamed blob
                raise StoreError(f"blob {digest[:12]} changed while it was written; nothing was stored")
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return target

    def _present(self, digest: str, recheck: bool) -> bool:
        """Whether blob `digest` is there (and, with `recheck`, still hashes to its name)."""
        return self.exists(digest) and (not recheck or self.rehash(digest) == digest)

    def put_tensors(
        self, tensors: Mapping[str, torch.Tensor], *, recheck: bool = False
    ) -> tuple[str, int, bool]:
        """Store tensors as a canonical blob: (sha256, bytes, whether it was written).

        `recheck`: re-hash an existing blob and rewrite it when its bytes changed (repair)."""
        digest, size = tensors_digest(tensors)
        if self._present(digest, recheck):
            return digest, size, False
        self._write(digest, _chunks(tensors))
        return digest, size, True

    def put_bytes(self, data: bytes, *, recheck: bool = False) -> tuple[str, int, bool]:
        """Store raw bytes (a checkpoint header, a golden PNG): (sha256, bytes, whether it was written)."""
        digest = hashlib.sha256(data).hexdigest()
        if self._present(digest, recheck):
            return digest, len(data), False
        self._write(digest, [data])
        return digest, len(data), True

    def read_bytes(self, digest: str) -> bytes:
        return self._existing(digest).read_bytes()

    def read_tensors(self, digest: str) -> dict[str, torch.Tensor]:
        """The tensors of a blob, memory-mapped (read on first touch)."""
        path = self._existing(digest)
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except Exception as e:
            raise StoreError(
                f"blob {digest[:12]} is not a readable tensor blob ({e}); run 'models verify'"
            ) from e

    def _existing(self, digest: str) -> Path:
        path = self.path(digest)
        if not path.is_file():
            raise StoreError(
                f"blob {digest[:12]} is missing from {self.root}; run 'diffusekit models verify'"
            )
        return path

    def rehash(self, digest: str) -> str:
        """The sha256 of the blob's bytes as they are on disk now."""
        h = hashlib.sha256()
        with open(self._existing(digest), "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
        return h.hexdigest()

    def all(self) -> dict[str, int]:
        """Every stored blob: {sha256: bytes}."""
        out = {}
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if not f.name.endswith(TMP_SUFFIX) and len(f.name) == 64:
                        out[f.name] = f.stat().st_size
        return out

    def temp_files(self) -> list[Path]:
        """Partial writes a crash left behind (only safe to delete while holding the store lock)."""
        if not self.root.is_dir():
            return []
        return [
            f
            for sub in self.root.iterdir()
            if sub.is_dir()
            for f in sub.iterdir()
            if f.name.endswith(TMP_SUFFIX)
        ]

    def remove(self, digest: str) -> None:
        path = self.path(digest)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
