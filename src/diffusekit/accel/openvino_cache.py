"""The on-disk cache of OpenVINO IR converted from our modules: keys, atomic writes, checked reads.

An entry is a folder `<root>/<key>/` holding `model.xml`, `model.bin` and `meta.json`. The key is a hash of
everything the IR depends on (`IrKey`): the weights' content hash, the component, its input shapes
(static or dynamic), the precision (and an int8 calibration's settings), the OpenVINO version and this
cache's format. An entry is written under a temporary name, fsynced, then renamed into place, so a
reader sees a whole entry or none. `meta.json` records each file's size and CRC-32; a read that finds
them different (a truncated or corrupted file), or that OpenVINO cannot parse, deletes the entry and
reports a miss, so the caller converts again instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..paths import data_dir

__all__ = ["CACHE_FORMAT", "IrCache", "IrKey", "default_cache_root", "weights_digest"]

CACHE_FORMAT = 1  # bump when what an entry holds changes meaning
_FILES = ("model.xml", "model.bin")
_CHUNK = 64 << 20
log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """Where converted IR lives: <data_dir>/cache/openvino (DIFFUSEKIT_OPENVINO_CACHE overrides it)."""
    given = os.environ.get("DIFFUSEKIT_OPENVINO_CACHE")
    return Path(given).expanduser() if given else data_dir() / "cache" / "openvino"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return h.hexdigest()


@dataclass(frozen=True)
class IrKey:
    """What one IR depends on; `name` is the entry's folder name."""

    weights: str  # weights_digest of the converted module
    component: str  # "unet"
    shapes: str  # e.g. "dynamic" or "2x4x64x64,2,2x77x768"
    precision: str  # "fp32" or "int8"
    openvino: str  # openvino.__version__
    settings: str = ""  # anything else the IR depends on (the int8 calibration's settings), as JSON

    @property
    def name(self) -> str:
        """`<component>-<precision>-<24 hex digits>`."""
        blob = json.dumps({**asdict(self), "format": CACHE_FORMAT}, sort_keys=True).encode()
        return f"{self.component}-{self.precision}-{hashlib.sha256(blob).hexdigest()[:24]}"


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IrCache:
    """OpenVINO IR entries under `root` (default `default_cache_root()`)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def entry(self, key: IrKey) -> Path:
        return self.root / key.name

    def load(self, key: IrKey) -> Any | None:
        """The cached `openvino.Model` for `key`, or None (absent, or damaged and now deleted)."""
        import openvino as ov

        folder = self.entry(key)
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("key") != asdict(key) or meta.get("format") != CACHE_FORMAT:
                raise ValueError("meta.json describes another key")
            for name in _FILES:
                size, crc = meta["files"][name]
                path = folder / name
                if path.stat().st_size != size or _crc(path) != crc:
                    raise ValueError(f"{name} differs from its recorded size/CRC")
            return ov.Core().read_model(str(folder / "model.xml"))
        except Exception as e:  # noqa: BLE001 - any damage means: rebuild, never crash
            log.warning("OpenVINO cache entry %s is damaged (%s); converting again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def store(self, key: IrKey, model: Any, info: dict[str, Any] | None = None) -> Path:
        """Write `model` (an openvino.Model) as the entry for `key`, atomically; its folder."""
        import openvino as ov

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.entry(key)
        tmp = self.root / f".tmp-{key.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            files = {}
            for name in _FILES:
                _fsync(tmp / name)
                files[name] = [(tmp / name).stat().st_size, _crc(tmp / name)]
            meta = {"key": asdict(key), "format": CACHE_FORMAT, "files": files, "info": info or {}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _fsync(tmp / "meta.json")
            if final.exists():  # another process (or a damaged entry's leftovers): ours replaces it
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final
