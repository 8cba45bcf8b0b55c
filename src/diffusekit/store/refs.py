"""Model references: NAME (the current version) or NAME@VERSION (one immutable version)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .blobs import StoreError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters: letters, digits, '.', '_', '-', starting with a letter or digit"


def check_name(name: str) -> str:
    """`name` if it is a valid model name, else a StoreError saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise StoreError(f"invalid model name {name!r}: a name has {NAME_RULE}")
    return name


@dataclass(frozen=True)
class Ref:
    """A parsed NAME[@VERSION]; version None means "the current version"."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        if not isinstance(text, str) or not text:
            raise StoreError("empty model reference; use NAME or NAME@VERSION (e.g. mymodel@2)")
        name, sep, version = text.partition("@")
        check_name(name)
        if not sep:
            return cls(name)
        if not version.isdigit() or int(version) < 1:
            raise StoreError(
                f"invalid version {version!r} in {text!r}: versions are whole numbers from 1 (e.g. {name}@1)"
            )
        return cls(name, int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def looks_like_ref(text: str) -> bool:
    """True for strings that parse as NAME or NAME@VERSION (used to tell store names from paths)."""
    try:
        Ref.parse(text)
    except StoreError:
        return False
    return True
