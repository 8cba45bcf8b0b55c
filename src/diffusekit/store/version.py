"""A stored version's record and model card, and who is acting (for history and provenance)."""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..models.configs import ModelConfig, config_from_dict
from ..models.sd3_configs import SD3Config, sd3_config_from_dict
from ..params import ModelDefaults
from . import golden as gold
from .sd3 import card as sd3_card


def default_root() -> Path:
    """The store folder used when none is given: `diffusekit.paths.data_dir() / "models"`."""
    from ..paths import data_dir

    return data_dir() / "models"


def who() -> str:
    """user@host of this process, recorded as the actor of CLI actions."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Version:
    """One immutable version of a model and its provenance."""

    name: str
    version: int
    created_at: float
    created_by: str
    command: str
    source: str | None
    license: str | None
    note: str | None
    parent: str | None
    manifest: dict
    current: bool = False
    golden: gold.GoldenRecord | None = field(default=None, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def config(self) -> ModelConfig | SD3Config:
        if self.manifest["family"] == "sd3":
            return sd3_config_from_dict(self.manifest["config"])
        return config_from_dict(self.manifest["config"])

    @property
    def autov2(self) -> str | None:
        return self.manifest["source_file"].get("autov2")

    def card(self) -> dict:
        """The model card: provenance, hashes, components, recipe (JSON-ready)."""
        m = self.manifest
        meta = m.get("metadata", {})
        recipe = meta.get("diffusekit.recipe")

        return {
            "ref": self.ref,
            "current": self.current,
            "family": m["family"],
            "prediction": m["prediction"],
            "zero_terminal_snr": m["config"].get("zero_terminal_snr", False),
            "resolution": m["config"]["resolution"],
            "created_at": self.created_at,
            "created_by": self.created_by,
            "command": self.command,
            "source": self.source,
            "license": self.license,
            "note": self.note,
            "parent": self.parent,
            "original": m["source_file"],
            "stored": m["stored"],
            "components": m["components"],
            "parameters": sum(c["parameters"] for c in m["components"] if c["name"] != "extra"),
            "recommended": ModelDefaults.from_metadata(meta, self.ref).overrides(),
            "recipe": json.loads(recipe) if recipe else None,
            "golden": self.golden.to_dict() if self.golden else None,
            "sd3": sd3_card(m) if m["family"] == "sd3" else None,
        }
