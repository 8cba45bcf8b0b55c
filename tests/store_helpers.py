"""Fixtures-as-functions for the model store tests: a tiny base model and fine-tunes of one component."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from diffusekit.checkpoints.single_file import load_state_dict, save_state_dict
from diffusekit.cli import main


def create_tiny(path: Path, seed: int = 0) -> Path:
    """`diffusekit create tiny_sd1 PATH --seed N`, as a user makes one."""
    assert main(["create", "tiny_sd1", str(path), "--seed", str(seed)]) == 0
    return path


def fine_tune(
    base: Path, out: Path, *, prefix: str = "model.diffusion_model.", scale: float = 0.01, seed: int = 1
) -> Path:
    """`base` with every tensor under `prefix` perturbed by scale * N(0, 1) (the rest byte-identical)."""
    sd, meta = load_state_dict(base)
    g = torch.Generator().manual_seed(seed)
    out_sd = {
        k: (v + scale * torch.randn(v.shape, generator=g) if k.startswith(prefix) else v.clone())
        for k, v in sd.items()
    }
    save_state_dict(out_sd, out, metadata=meta)
    return out


def flip_bit(blob: Path, key: str, index: int = 0, bit: int = 30) -> None:
    """Flip one bit of float32 element `index` of tensor `key` inside a canonical tensor blob, in place."""
    import json

    data = bytearray(blob.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + n])[key]
    assert entry["dtype"] == "F32"
    pos = 8 + n + entry["data_offsets"][0] + 4 * index
    (word,) = struct.unpack("<I", data[pos : pos + 4])
    data[pos : pos + 4] = struct.pack("<I", word ^ (1 << bit))
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: fast on a shared 2-core machine, and the golden renders are recorded alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
