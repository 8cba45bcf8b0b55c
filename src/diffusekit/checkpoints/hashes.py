"""File hashes used to identify checkpoints: full sha256 and the AUTOMATIC1111-style short hashes.

Definitions (checked against AUTOMATIC1111's ``modules/hashes.py`` and ``modules/sd_models.py``):

- ``sha256_file``: sha256 of the whole file, hex.
- ``autov2``: first 10 hex digits of ``sha256_file`` (the "Model hash" A1111 writes into image infotext).
- ``autov1``: A1111's old ``model_hash``: sha256 of the 0x10000 bytes read at offset 0x100000, first 8
  hex digits. A file shorter than that is hashed over whatever the read returns (possibly nothing), as
  A1111 does, so any file under 1 MiB hashes to ``e3b0c442`` (the sha256 of no bytes).
- ``addnet_hash``: sha256 of a .safetensors file's tensor data, from offset ``8 + header_len`` to the end
  (kohya-ss / A1111 LoRA hash; it ignores metadata edits). UIs show its first 12 hex digits.
"""

from __future__ import annotations

import hashlib
import os
import struct

from diffusekit.checkpoints.single_file import CheckpointError

BLOCK_SIZE = 1 << 20
AUTOV1_OFFSET = 0x100000
AUTOV1_SIZE = 0x10000
AUTOV1_LEN = 8
AUTOV2_LEN = 10
ADDNET_SHORT_LEN = 12


def _sha256_stream(f, start: int = 0) -> str:
    """Hash an open binary file from ``start`` to its end in 1 MiB blocks."""
    digest = hashlib.sha256()
    f.seek(start)
    while block := f.read(BLOCK_SIZE):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Full sha256 of a file as 64 hex digits, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return _sha256_stream(f)


def autov2(path: str | os.PathLike[str]) -> str:
    """A1111 "Model hash": the first 10 hex digits of the file's sha256."""
    return sha256_file(path)[:AUTOV2_LEN]


def autov1(path: str | os.PathLike[str]) -> str:
    """A1111's legacy 8-hex model hash of the 64 KiB at offset 1 MiB (short files hash what is there)."""
    with open(path, "rb") as f:
        f.seek(AUTOV1_OFFSET)
        chunk = f.read(AUTOV1_SIZE)
    return hashlib.sha256(chunk).hexdigest()[:AUTOV1_LEN]


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """sha256 (64 hex) of a .safetensors file's data section; UIs show the first 12 digits."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise CheckpointError(
                f"{os.path.basename(path)}: cannot compute the addnet hash: file has {size} bytes, "
                "a .safetensors file needs an 8-byte header length and a JSON header"
            )
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{" or header_len > size - 8:
            raise CheckpointError(
                f"{os.path.basename(path)}: cannot compute the addnet hash: not a .safetensors file "
                f"(header length field says {header_len} bytes, file has {size}; expected it to be "
                "followed by a JSON object)"
            )
        return _sha256_stream(f, 8 + header_len)
