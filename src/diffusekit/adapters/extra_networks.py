"""A1111's extra-network prompt syntax (``<lora:NAME:TE[:UNET]>``) and the folders the names are found in.

``<kind:arg:arg...>`` tags are taken out of the prompt before it is encoded (A1111 ``extra_networks.py``:
``<(\\w+):([^>]+)>``, arguments split on ``:``, ``key=value`` arguments named). For ``lora`` (alias
``lyco``): te multiplier (default 1), unet multiplier (default: te), or ``te=`` / ``unet=``. A NAME is a
file stem in the LoRA folder (searched recursively) or the ``ss_output_name`` alias a kohya file records.
The infotext records each LoRA as ``Lora hashes: "name: <12 hex of the addnet hash>, ..."``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.single_file import read_safetensors_header
from .lora import LoraError, LoraNetwork, load_lora

__all__ = [
    "ExtraNetworkCall",
    "parse_extra_networks",
    "strip_extra_networks",
    "LoraLibrary",
    "lora_hashes",
    "parse_hashes",
]

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One ``<kind:name:...>`` tag: positional and named arguments after the name."""

    kind: str
    name: str
    positional: tuple[str, ...] = ()
    named: tuple[tuple[str, str], ...] = ()


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """(prompt without the tags, the tags in order)."""
    calls: list[ExtraNetworkCall] = []

    def take(m: re.Match) -> str:
        name, *args = m.group(2).split(":")
        pos = tuple(a for a in args if "=" not in a)
        named = tuple(tuple(a.split("=", 1)) for a in args if "=" in a)
        calls.append(ExtraNetworkCall(m.group(1).lower(), name.strip(), pos, named))  # type: ignore[arg-type]
        return ""

    return _TAG.sub(take, prompt), calls


def strip_extra_networks(prompt: str) -> str:
    """The prompt as the text encoder sees it: every ``<kind:...>`` tag removed."""
    return _TAG.sub("", prompt)


def _number(text: str, what: str, tag: ExtraNetworkCall) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoraError(f"<{tag.kind}:{tag.name}:...>: {what} {text!r} is not a number") from None


def lora_weights(tag: ExtraNetworkCall) -> tuple[float, float]:
    """(te multiplier, unet multiplier) of a ``<lora:...>`` tag, A1111's defaults: te 1, unet = te."""
    named = dict(tag.named)
    unknown = set(named) - {"te", "unet"}
    if unknown or len(tag.positional) > 2:
        extra = ", ".join(sorted(unknown)) or "a third positional argument (dyn)"
        raise LoraError(
            f"<{tag.kind}:{tag.name}:...>: {extra} is not supported; "
            "use <lora:NAME:TE> or <lora:NAME:TE:UNET>"
        )
    te = _number(named.get("te", tag.positional[0] if tag.positional else "1"), "te weight", tag)
    unet_text = named.get("unet", tag.positional[1] if len(tag.positional) > 1 else None)
    unet = te if unet_text is None else _number(unet_text, "unet weight", tag)
    return te, unet


class LoraLibrary:
    """The LoRA files of a folder (recursive), by file stem and by ``ss_output_name``; loaded once each."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LoraError(f"LoRA folder {self.folder} does not exist or is not a folder")
        self._cache: dict[Path, tuple[float, LoraNetwork]] = {}

    def files(self) -> dict[str, Path]:
        """{name: path}: file stems first, then aliases that do not clash with a stem."""
        paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
        names = {p.stem: p for p in paths}
        for p in paths:
            if p.suffix.lower() == ".safetensors":
                try:
                    alias = read_safetensors_header(p)[1].get("ss_output_name")
                except ValueError:
                    continue
                if alias and alias not in names:
                    names[alias] = p
        return names

    def get(self, name: str) -> LoraNetwork:
        """The network called `name`; a clear error listing what the folder holds otherwise."""
        files = self.files()
        if name not in files:
            have = ", ".join(sorted(files)[:10]) or "no LoRA files"
            raise LoraError(f"no LoRA named {name!r} in {self.folder} (it has: {have})")
        path = files[name]
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, load_lora(path, name=name))
            self._cache[path] = cached
        return cached[1]

    def resolve(self, calls: Iterable[ExtraNetworkCall]) -> list[tuple[LoraNetwork, float, float]]:
        """(network, te, unet) for each ``<lora:...>`` tag; other kinds are an error naming the valid one."""
        out = []
        for call in calls:
            if call.kind not in LORA_KINDS:
                raise LoraError(
                    f"<{call.kind}:{call.name}>: unsupported extra network; valid: <lora:NAME:WEIGHT>"
                )
            out.append((self.get(call.name), *lora_weights(call)))
        return out


def _alias(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def lora_hashes(loras: Sequence[tuple[LoraNetwork, float, float]]) -> str:
    """A1111's "Lora hashes" value: ``name: shorthash`` joined by ", " (names without ':' and ',').

    Networks that are not files yet (one being trained) have no hash and are left out."""
    seen: dict[str, str] = {}
    for net, _, _ in loras:
        if net.path is not None:
            seen.setdefault(_alias(net.name), net.shorthash)
    return ", ".join(f"{name}: {h}" for name, h in seen.items())


def parse_hashes(value: str) -> dict[str, str]:
    """{name: hash} from a "Lora hashes" / "TI hashes" infotext value."""
    out = {}
    for item in value.split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def prompt_loras(prompt: str, library: LoraLibrary | None) -> list[tuple[LoraNetwork, float, float]]:
    """The LoRAs a prompt's ``<lora:...>`` tags ask for, looked up in `library`."""
    _, calls = parse_extra_networks(prompt)
    if not calls:
        return []
    if library is None:
        raise LoraError(
            f"the prompt uses <{calls[0].kind}:{calls[0].name}:...> but no LoRA folder is set (--loras DIR)"
        )
    return library.resolve(calls)
