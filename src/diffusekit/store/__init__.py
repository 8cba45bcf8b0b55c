"""The model store: versioned models over deduplicated blobs, with aliases, history and golden checks."""

from .blobs import StoreError
from .refs import Ref, looks_like_ref
from .store import ModelStore, Version, default_root

__all__ = ["ModelStore", "Ref", "StoreError", "Version", "default_root", "looks_like_ref"]
