"""The server's settings: where data and models live, how many workers, auth and input bounds."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..params import MAX_SIDE

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """A server setting that cannot work, with what would."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `diffusekit serve` decides before the app starts."""

    data_dir: Path
    models_dir: Path | None = None
    default_model: Path | None = None  # the bundled model, offered as "default"
    store_dir: Path | None = None  # a model store: its models offered as NAME and NAME@V (None: no store)
    seed_store: bool = False  # add the bundled model as default@1 the first time the store is used
    host: str = "127.0.0.1"
    port: int = 7860
    workers: int = 1
    auth: bool = True
    device: str = "auto"
    precision: str = "auto"
    max_queued: int = 1000
    batch_max: int = 8  # > 1: up to this many compatible queued txt2img jobs share one sampler run
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = MAX_SIDE * MAX_SIDE
    max_prompt_chars: int = 10_000
    a1111_timeout_s: float = 3600.0
    loras_dir: Path | None = None  # <lora:NAME:W> files (default: DATA/loras); train_lora jobs write here
    embeddings_dir: Path | None = None  # textual-inversion files used by name (default: DATA/embeddings)
    datasets_dir: Path | None = None  # folders train_lora jobs may name (default: DATA/datasets)
    motion_modules_dir: Path | None = None  # AnimateDiff modules by name (default: <data_dir>/motion_modules)
    max_frames: int = 240  # frames of one animate job (and frames x width x height <= max_frames x 512^2)
    model_memory_mb: int | None = None  # memory the loaded models may take together (None: what is available)
    model_wait_s: float = 3600.0  # how long a job waits for models other jobs use to free memory

    def __post_init__(self):
        if not self.auth and not is_loopback(self.host):
            raise ConfigError(
                "--no-auth is only allowed on a loopback address (127.0.0.1, ::1, localhost), "
                f"not {self.host!r};"
                " create a key with `diffusekit keys create NAME` instead"
            )
        if not 1 <= self.batch_max <= 64:
            raise ConfigError(f"batch={self.batch_max} is out of range; valid: 1..64 (1 = no batching)")
        if not 1 <= self.max_frames <= 10_000:
            raise ConfigError(f"max-frames={self.max_frames} is out of range; valid: 1..10000")
        if self.model_memory_mb is not None and self.model_memory_mb < 1:
            raise ConfigError(f"model-memory={self.model_memory_mb} is out of range; valid: a whole number "
                              "of MiB above 0")  # fmt: skip
        if not 0 < self.model_wait_s <= 86_400:
            raise ConfigError(f"model-wait={self.model_wait_s:g} is out of range; valid: 0 < S <= 86400")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers={self.workers} is out of range; valid: 1..64")
