"""Single-file checkpoints: safe loading of .safetensors/.ckpt files, atomic saving, dtype casting.

Format policy: the file's content decides how it is read, not its name. A ``.ckpt`` that is really
safetensors loads as safetensors. The reverse is refused: a file named ``.safetensors`` that holds a
pickle is never unpickled, not even by the restricted loader, because the name promises "no pickle";
rename it to ``.ckpt`` to opt in. Pickles are read only by ``torch.load(weights_only=True)``, which runs
no code from the file; globals other than tensor machinery are refused and named in the error.

What ``load_state_dict`` returns: for safetensors, views of a memory map (pages are read on first touch,
so a 2 GB file costs 2 GB of reclaimable page cache, not 2x in private memory) and the header's
``__metadata__``. For pickles (mmap'd too when zip-based), the tensors under the ``state_dict`` wrapper;
non-tensor entries (``global_step``, ``epoch``, ``optimizer_states``, ``callbacks``...) are dropped and
their key paths listed, as a JSON list, under ``metadata[DROPPED_KEY]``. State-dict surgery (key
prefixes, EMA pruning) is in ``surgery.py``.
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .atomic import write_safetensors
from .mapped_pages import MADV_DONTNEED, MADV_POPULATE_READ, file_mappings, madvise, page_range

PathLike = str | os.PathLike[str]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# An SDXL training checkpoint with EMA has about 5,000 tensors; a header listing more than this is refused
# before it is parsed (parsing a million entries takes seconds and a gigabyte).
MAX_TENSORS = 100_000
DROPPED_KEY = "diffusekit.dropped"  # metadata key: JSON list of non-tensor entries dropped from a pickle
WRAPPER_KEYS = ("state_dict", "module", "model")
CHECKPOINT_KINDS = "safetensors, or a PyTorch checkpoint (.ckpt/.pt/.pth/.bin) written by torch.save"
# Non-tensor globals found in real LDM/Lightning checkpoints (the callback class used as a dict key,
# numpy scalars in callback state). They are mapped to an inert stand-in and later dropped.
STAND_IN_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
)


class CheckpointError(ValueError):
    """A checkpoint file or state dict is unreadable, unsafe or malformed; the message says why."""


class TensorInfo(NamedTuple):
    """One tensor entry of a safetensors header; offsets are relative to the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class _Inert:
    """Stand-in for a harmless non-tensor global: accepts any arguments or state and does nothing."""

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _label(path: PathLike) -> str:
    return Path(path).name or str(path)


def _error(path: PathLike, problem: str) -> CheckpointError:
    return CheckpointError(f"{_label(path)}: {problem}")


def _describe(head: bytes) -> str:
    """Name what a file that is not a checkpoint looks like, from its first bytes."""
    magics = (
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"GGUF", "a GGUF file (llama.cpp format)"),
        (b"\x93NUMPY", "a numpy .npy array"),
        (b"%PDF", "a PDF document"),
        (b"version https://git-lfs", "a Git LFS pointer, not the weights themselves (run `git lfs pull`)"),
    )
    for magic, what in magics:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    text = head.decode("utf-8", errors="ignore")
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\r\n\t" for c in text):
        stripped = text.lstrip().lower()
        if stripped.startswith(("<!doctype html", "<html")):
            return "an HTML page (a failed download?)"
        preview = " ".join(text.split())[:40]
        return f"a text file (starts with {preview!r})"
    return "unrecognized binary data (first bytes: " + head[:8].hex(" ") + ")"


def detect_format(path: PathLike) -> str:
    """Sniff a checkpoint's format from its bytes: 'safetensors', 'torch-zip' or 'pickle'."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _error(path, f"no such file (looked for {p.absolute()}); expected a checkpoint file") from None
    except OSError as e:
        raise _error(path, f"cannot access it ({e.strerror})") from e
    if p.is_dir():
        hint = " (it looks like a diffusers folder)" if (p / "model_index.json").is_file() else ""
        raise _error(path, f"is a directory{hint}; expected a single checkpoint file: {CHECKPOINT_KINDS}")
    if not p.is_file():
        raise _error(path, "is not a regular file; expected a checkpoint file")
    if st.st_size == 0:
        raise _error(path, f"empty file (0 bytes); expected {CHECKPOINT_KINDS}")
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise _error(path, f"cannot read it ({e.strerror})") from e
    # safetensors: u64 header length (always < 4 GiB, so its high bytes are zero), then a JSON object.
    if len(head) >= 9 and head[8:9] == b"{" and head[4:8] == b"\0\0\0\0":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    raise _error(path, f"not a checkpoint: found {_describe(head)}; expected {CHECKPOINT_KINDS}")


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise KeyError(key)
        out[key] = value
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: PathLike, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _error(path, f"tensor {name!r}: header entry is a {type(entry).__name__}, not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _error(path, f"tensor {name!r} has unknown dtype {dtype_name!r}; known: {known}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _error(path, f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _error(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES[dtype_name]
    numel = 1
    for d in shape:
        numel *= d
    needed = numel * dtype.itemsize
    if end < begin or end - begin != needed:
        raise _error(
            path,
            f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes, "
            f"but {dtype_name} {shape} needs {needed}",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_layout(path: PathLike, entries: dict[str, TensorInfo], data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing missing or extra."""
    expected = 0
    for name, info in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < expected:
            raise _error(
                path, f"tensor {name!r} overlaps another (starts at byte {info.begin}, not {expected})"
            )
        if info.begin > expected:
            raise _error(
                path,
                f"unused gap in the data section before tensor {name!r} (bytes {expected}..{info.begin})",
            )
        expected = info.end
    if expected > data_len:
        raise _error(path, f"truncated: header says {expected} bytes of tensor data, file has {data_len}")
    if expected < data_len:
        raise _error(
            path,
            f"{data_len - expected} unexpected bytes after the last tensor "
            f"(header says {expected} bytes of tensor data, file has {data_len})",
        )


def read_safetensors_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and fully validate a safetensors header without loading tensors: (entries, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _error(path, f"too short for safetensors: {size} bytes, need 8 for the header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise _error(
                    path,
                    f"truncated or not safetensors: header length field says {header_len} bytes, "
                    f"but only {size - 8} bytes follow it",
                )
            if header_len > MAX_HEADER_BYTES:
                raise _error(
                    path, f"header length {header_len} is over the safetensors limit {MAX_HEADER_BYTES}"
                )
            if header_len < 2:
                raise _error(path, f"header length {header_len} is too small for a JSON object")
            raw = f.read(header_len)
    except OSError as e:
        raise _error(path, f"cannot read it ({e.strerror or e})") from e
    entries_listed = raw.count(b'"data_offsets"')
    if entries_listed > MAX_TENSORS:
        raise _error(
            path,
            f"header lists {entries_listed:,} tensors, over the limit of {MAX_TENSORS:,} "
            "(a Stable Diffusion checkpoint has a few thousand)",
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError as e:
        raise _error(path, f"header is not UTF-8 text (bad byte at header offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise _error(path, f"header is not valid JSON: {e.msg} at character {e.pos}") from None
    except KeyError as e:
        raise _error(path, f"header repeats the key {e.args[0]!r}") from None
    if not isinstance(header, dict):
        raise _error(path, f"header is a JSON {type(header).__name__}, expected an object of tensor entries")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, "__metadata__ must be an object mapping strings to strings")
    entries = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    _check_layout(path, entries, size - 8 - header_len)
    return entries, metadata


HeaderCheck = Callable[[dict[str, TensorInfo], dict[str, str]], None]


def _load_safetensors(
    path: PathLike, device: torch.device, check: HeaderCheck | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    entries, metadata = read_safetensors_header(path)
    if check is not None:  # refuse from key names and shapes before any tensor is opened
        check(entries, metadata)
    try:
        # safe_open memory-maps the file: CPU tensors are views of the mapping, read in on first touch.
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in entries}
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(path, f"the safetensors library could not read it: {first_line}") from e
    return tensors, dict(metadata)


def _pickle_globals(stream) -> list[str]:
    """List the globals a pickle references, by parsing opcodes only (nothing is executed)."""
    found: list[str] = []
    pushed: list[str | None] = []  # what each pushing opcode left on the stack, when it is a string
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL":
                found.append(".".join(str(arg).split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                found.append(f"{pushed[-2]}.{pushed[-1]}")
            if op.name == "STOP":
                break
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            elif op.stack_after:
                pushed.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
    except Exception:  # a damaged pickle: report what was seen before the damage
        pass
    return list(dict.fromkeys(found))


def _scan_globals(path: PathLike, fmt: str) -> list[str]:
    """Globals referenced by a checkpoint's pickle that are not torch/collections machinery."""
    try:
        if fmt == "torch-zip":
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(member) as stream:
                    names = _pickle_globals(stream)
        else:
            with open(path, "rb") as stream:
                names = _pickle_globals(stream)
    except Exception:
        return []
    harmless = ("torch.", "collections.", "_codecs.")
    return [n for n in names if not n.startswith(harmless) and n not in STAND_IN_GLOBALS]


def _refusal(path: PathLike, names: list[str]) -> CheckpointError:
    quoted = ", ".join(repr(n) for n in names)
    what = "which is not a tensor type" if len(names) == 1 else "which are not tensor types"
    return _error(path, f"refused to unpickle: it references {quoted}, {what}; only weights can be loaded")


def _explain_load_failure(path: PathLike, fmt: str, exc: Exception) -> CheckpointError:
    message = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:
        name = named.group(1) if "." in named.group(1) else f"builtins.{named.group(1)}"
        if not name.startswith("torch."):
            return _refusal(path, [name])
        return _error(
            path,
            f"refused to unpickle: it references {name!r}, which the weights-only loader does not allow "
            "(a truncated file, or a pickle not written by torch.save)",
        )
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand:
        names = _scan_globals(path, fmt)
        if names:
            return _refusal(path, names)
        op = {ord(o.code): o.name for o in pickletools.opcodes}.get(int(operand.group(1)))
        if op is None:
            return _error(path, f"corrupt pickle data (invalid opcode {int(operand.group(1)):#04x})")
        return _error(
            path, f"refused to unpickle: pickle opcode {op} is not allowed (not written by torch.save?)"
        )
    if "Invalid magic number" in message:
        return _error(path, "is a plain pickle, not a file written by torch.save (no torch magic number)")
    if isinstance(exc, EOFError) or "truncated" in message:
        return _error(path, "truncated: the pickle ends before its STOP opcode")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = (
        lines[-1] if "Weights only load failed" in message and lines else (lines or [type(exc).__name__])[0]
    )
    return _error(path, f"could not read this PyTorch checkpoint: {detail}")


def _check_torch_zip(path: PathLike) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise _error(path, f"corrupt or truncated zip archive ({e}); expected a torch.save checkpoint") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        sample = ", ".join(repr(n) for n in names[:3]) or "nothing"
        raise _error(path, f"is a zip archive but not a PyTorch checkpoint (no data.pkl; found {sample})")


def _unwrap(path: PathLike, obj: object) -> tuple[Mapping[object, object], str, list[str]]:
    """Descend through wrapper keys ('state_dict', ...) to the mapping that holds the tensors."""
    if not isinstance(obj, Mapping):
        raise _error(path, f"holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    dropped: list[str] = []
    prefix = ""
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        dropped += [prefix + str(k) for k in obj if k != inner]
        prefix += inner + "."
        obj = obj[inner]
    return obj, prefix, dropped


def _load_pickle(
    path: PathLike, fmt: str, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if fmt == "torch-zip":
        _check_torch_zip(path)
    # safe_globals edits torch's process-wide allowlist for the duration of the block only.
    stand_ins = [(_Inert, name) for name in STAND_IN_GLOBALS]
    with torch.serialization.safe_globals(stand_ins):
        if fmt == "torch-zip":
            try:  # opcode scan by torch itself; executes nothing
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
            except Exception:
                unsafe = []  # torch.load below reports the real problem
            if unsafe:
                raise _refusal(path, sorted(unsafe))
        try:
            loaded = torch.load(
                os.fspath(path), map_location=device, weights_only=True, mmap=fmt == "torch-zip"
            )
        except Exception as e:
            raise _explain_load_failure(path, fmt, e) from e
    state, prefix, dropped = _unwrap(path, loaded)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key] = (
                value.detach() if value.requires_grad or isinstance(value, torch.nn.Parameter) else value
            )
        else:
            dropped.append(prefix + str(key))
    if not tensors:
        found = ", ".join(repr(str(k)) for k in list(state)[:6]) or "nothing"
        raise _error(path, f"contains no tensors (found {found}); expected a state dict of weights")
    metadata = {DROPPED_KEY: json.dumps(sorted(dropped))} if dropped else {}
    return tensors, metadata


def load_state_dict(
    path: PathLike, *, device: str | torch.device = "cpu", check_header: HeaderCheck | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint file lazily (mmap) as (tensors, metadata); never runs code from the file.

    `check_header(entries, metadata)` runs on a safetensors header before any tensor is opened (to
    refuse a file from its key names and shapes alone); it may raise."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    fmt = detect_format(path)
    if fmt == "safetensors":
        return _load_safetensors(path, target, check_header)
    if Path(path).suffix.lower() == ".safetensors":
        kind = "a PyTorch zip checkpoint" if fmt == "torch-zip" else "a pickle"
        raise _error(
            path,
            f"is {kind}, not safetensors, despite its name; a .safetensors file is never unpickled "
            "(rename it to .ckpt to load it with the restricted weights-only loader)",
        )
    return _load_pickle(path, fmt, target)


def _prepare_for_save(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, supported dtypes; tensors whose memory overlaps an earlier one are cloned."""
    supported = set(SAFETENSORS_DTYPES.values())
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state dict keys must be non-empty strings, got {key!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"value for {key!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise ValueError(f"tensor {key!r} has no dense data to save ({tensor.layout}, {tensor.device})")
        if tensor.dtype not in supported:
            names = ", ".join(str(d) for d in SAFETENSORS_DTYPES.values())
            raise ValueError(
                f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store; use one of {names}"
            )
        t = tensor.detach().cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        out[key] = t
        if t.nbytes:
            spans.append((t.data_ptr(), t.data_ptr() + t.nbytes, key))
    reach = 0
    for start, end, key in sorted(spans):
        if start < reach:  # overlaps memory that another tensor is saved from: give it its own copy
            out[key] = out[key].clone()
        else:
            reach = end
    return out


def save_state_dict(
    tensors: Mapping[str, torch.Tensor], path: PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as .safetensors atomically and deterministically (same tensors and metadata, same
    bytes): a visible partial file beside the target, fsync, rename; the umask sets the mode."""
    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{target.name}: checkpoints are written as safetensors; give a name ending in .safetensors"
        )
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError("metadata must map strings to strings (convert numbers with str() or json.dumps())")
    prepared = _prepare_for_save(tensors)
    write_safetensors(prepared, target, metadata, _DTYPE_NAMES)


def cast_floats(
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    release_mapped: bool = False,
    memory_format: torch.memory_format | None = None,
) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype``; integer/bool tensors (and already-cast ones) pass through.

    `release_mapped`: for a tensor that is a view of a memory-mapped file, map its pages in with one
    call before casting (3x faster than faulting them in 4 KiB at a time) and drop them from this
    process afterwards (they stay in the page cache), so casting a mapped checkpoint never holds both
    copies. `memory_format`: lay 4-D tensors out in it (e.g. channels-last) within the same pass.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"cast_floats needs a floating-point torch.dtype (e.g. torch.float16), got {dtype!r}"
        )
    mapped = file_mappings() if release_mapped else []
    out = {}
    for key, t in sd.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[key] = t
            continue
        in_file = page_range(t, mapped, outer=True) if mapped else None
        if in_file:
            madvise(in_file, MADV_POPULATE_READ)
        if memory_format is not None and t.ndim == 4:
            out[key] = torch.empty(t.shape, dtype=dtype, device=t.device, memory_format=memory_format)
            out[key].copy_(t)
        else:
            out[key] = t.to(dtype)
        if in_file:
            madvise(page_range(t, mapped, outer=False), MADV_DONTNEED)
    return out
