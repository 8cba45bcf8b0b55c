"""Where diffusekit keeps its per-user data: the server's database and images, the model store."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The per-user data folder: $DIFFUSEKIT_HOME, else $XDG_DATA_HOME/diffusekit, else
    ~/.local/share/diffusekit.

    Not created here: the caller that writes makes it.
    """
    home = os.environ.get("DIFFUSEKIT_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "diffusekit"
