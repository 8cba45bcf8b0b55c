"""Making renames durable: fsync of the folder that holds a renamed, created or removed entry."""

from __future__ import annotations

import os


def fsync_dir(folder: str | os.PathLike[str], *, best_effort: bool = False) -> None:
    """Make a rename, creation or unlink inside `folder` durable. `best_effort`: where the system cannot
    open or sync a folder (Windows, some network file systems) carry on instead of raising OSError."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)
