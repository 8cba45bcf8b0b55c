"""The error every adapter reader raises (re-exported as ``adapters.lora.LoraError``)."""

from __future__ import annotations

__all__ = ["LoraError"]


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""
