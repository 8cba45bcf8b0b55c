"""Crash-safe, deterministic writing of checkpoint files and diffusers folders.

Files: a deterministic safetensors byte stream (tensors ordered by alignment then name, metadata keys
sorted, compact JSON), written to a visible ``NAME.diffusekit-partial-PID.tmp`` beside the target with
the umask honoured, fsynced, then renamed over the target. A kill -9 leaves at most that partial file,
which the next write to the same folder removes once its process is gone. Folders: built complete in a
``NAME.diffusekit-partial-PID`` sibling, then swapped in by rename (the old folder is moved aside first
and deleted after), so a reader sees the old model or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..durable import fsync_dir

PARTIAL_TAG = ".diffusekit-partial-"
_OLD_TAG = ".diffusekit-old-"
_STALE = re.compile(r"^(?P<name>.+)\.diffusekit-(?:partial|old)-(?P<pid>\d+)(?:\.tmp)?$")
# The hidden temporary files of diffusekit versions before these names: .NAME.PID.RANDOM.tmp
_LEGACY = re.compile(r"^\.(?P<name>.+\.safetensors)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class WriteError(OSError):
    """A checkpoint could not be written; the message names the destination, never a temporary path."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def partial_path(target: Path) -> Path:
    """The temporary sibling a write to `target` goes through (visible, and named after it)."""
    suffix = ".tmp" if target.suffix else ""
    return target.with_name(f"{target.name}{PARTIAL_TAG}{os.getpid()}{suffix}")


def clean_stale(folder: Path) -> list[Path]:
    """Remove partial files/folders in `folder` left by diffusekit writes whose process has died."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name) or _LEGACY.match(entry.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        try:
            original = folder / m.group("name")
            if _OLD_TAG in entry.name and not original.exists():  # died mid-swap: put the old model back
                os.replace(entry, original)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def safetensors_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, dtype_names: Mapping
) -> tuple[bytes, list[str]]:
    """(header bytes incl. the length prefix and padding, tensor names in data order); deterministic."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # keeps every tensor aligned
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        span = [offset, offset + size]
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": span}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    target: Path,
    metadata: Mapping[str, str] | None,
    dtype_names: Mapping,
) -> None:
    """Write CPU-contiguous `tensors` to `target` atomically and deterministically (see the module doc)."""
    head, order = safetensors_header(tensors, metadata, dtype_names)
    data = (tensors[name] for name in order)
    chunks = (memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in data if t.numel())
    write_stream(target, itertools.chain([head], chunks))


def write_stream(target: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write `chunks` to `target` atomically: a visible partial sibling (umask honoured), fsync, rename,
    fsync the folder; partial files of dead writers in the folder are removed first."""
    folder = target.parent
    clean_stale(folder)
    tmp = partial_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # mode honours the umask
    except OSError as e:
        raise WriteError(f"{target}: cannot write it ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"{target}: cannot write it ({e.strerror or e})") from None
        raise
    fsync_dir(folder, best_effort=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace_folder(built: Path, target: Path) -> None:
    """Swap the complete folder `built` in at `target`; the old `target` is removed after.

    With an existing target the two are exchanged in one atomic rename where the kernel can (then a
    crash leaves the old model in the partial folder, which the next write removes); otherwise the old
    folder is moved aside first, and a crash between the two renames is undone by `clean_stale`.
    """
    if not target.exists():
        os.replace(built, target)
    elif _exchange(built, target):
        shutil.rmtree(built, ignore_errors=True)
    else:
        old = target.with_name(f"{target.name}{_OLD_TAG}{os.getpid()}")
        os.replace(target, old)
        os.replace(built, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent, best_effort=True)
