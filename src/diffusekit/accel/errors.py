"""The one error type of the accelerators (a ValueError, so the CLI prints it as a one-line message)."""

from __future__ import annotations


class AccelError(ValueError):
    """An accelerator setting out of range, or one this model or machine cannot run."""
