"""Pages of memory-mapped files: find which pages a tensor lies on, map them in or drop them (Linux)."""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch

MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL and the pages fault in as usual


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private, non-executable file mappings (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        perms = fields[1] if len(fields) == 6 else ""
        if perms[:1] == "r" and perms[2:] == "-p" and fields[4] != "0" and fields[5].startswith("/"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def page_range(tensor: torch.Tensor, mapped: list[tuple[int, int]], *, outer: bool) -> tuple[int, int] | None:
    """The pages under a contiguous CPU `tensor` lying inside a file mapping, else None. `outer`: every
    page the tensor touches; otherwise only the pages wholly inside it (safe to drop: a neighbouring
    tensor may still be read from a shared edge page, which would then simply be re-read)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mapped):
        return None
    page = mmap.PAGESIZE
    if outer:
        return start // page * page, -(-end // page) * page
    first, last = -(-start // page) * page, end // page * page
    return (first, last) if last > first else None


def madvise(pages: tuple[int, int] | None, advice: int) -> None:
    """madvise over `pages` (start, end); a refusal (e.g. an older kernel) only loses the speed-up."""
    if pages is not None:
        _libc().madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]), advice)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
