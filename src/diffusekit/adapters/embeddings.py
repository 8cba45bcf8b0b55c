"""Textual-inversion embeddings (Gal et al. 2022): A1111 and diffusers files, used by name in prompts.

Formats (``load_embedding``): A1111 ``.pt`` with ``string_to_param = {"*": (n, dim)}``; kohya/A1111
``.safetensors`` with ``emb_params`` (n, dim); SDXL ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``; any
other single-tensor file (diffusers ``learned_embeds``: ``{token: (dim,) or (n, dim)}``).

Use: the prompt names an embedding by its file stem. ``EmbeddingTokenizer`` finds the name's tokens in
the tokenized prompt (longest name first, as A1111's ``find_embedding_at_position``) and puts n
placeholder ids there: negative numbers, so they can never be a real token and never win the EOS argmax.
``active_embeddings`` hooks each encoder's token embedding to map the placeholders to the vectors (the
CLIP-L or bigG half for SDXL), so nothing else of the prompt changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.hashes import sha256_file
from ..checkpoints.single_file import detect_format, load_state_dict

__all__ = [
    "EmbeddingError",
    "Embedding",
    "load_embedding",
    "EmbeddingLibrary",
    "EmbeddingTokenizer",
    "active_embeddings",
    "used_embeddings",
]

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or does not fit the model."""


@dataclass
class Embedding:
    """One embedding: vectors (n, dim) per encoder slot ("*" for single-encoder files, clip_l/clip_g)."""

    name: str
    vectors: dict[str, Tensor]
    path: Path | None = None
    _hash: str | None = field(default=None, repr=False)

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shorthash(self) -> str:
        """A1111's TI hash: the first 12 hex digits of the file's sha256."""
        if self._hash is None:
            if self.path is None:
                raise EmbeddingError(f"embedding {self.name!r} has no file to hash")
            self._hash = sha256_file(self.path)
        return self._hash[:12]

    def for_encoders(self, widths: Sequence[int]) -> list[Tensor] | None:
        """The vectors for encoders of these widths (one list entry each), or None if they do not fit."""
        if len(widths) == 2 and set(_SDXL_KEYS) <= set(self.vectors):
            vecs = [self.vectors["clip_l"], self.vectors["clip_g"]]
        elif len(widths) == 1 and "*" in self.vectors:
            vecs = [self.vectors["*"]]
        else:
            return None
        if any(v.shape[-1] != w for v, w in zip(vecs, widths, strict=True)):
            return None
        return vecs


def _as_matrix(t: Tensor) -> Tensor:
    t = t.detach().float()
    return t.unsqueeze(0) if t.ndim == 1 else t  # diffusers stores a single vector as (dim,)


def _load_pickled(path: Path) -> dict:
    try:
        data = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmbeddingError(f"{path.name}: cannot be read as an embedding ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: holds a {type(data).__name__}, expected a dict")
    return data


def embedding_from_dict(data: dict, name: str) -> Embedding:
    """An Embedding from a loaded file's dict, in any of the supported layouts."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{name}: string_to_param must hold exactly one tensor")
        return Embedding(name, {"*": _as_matrix(next(iter(params.values())))})
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if set(_SDXL_KEYS) <= set(tensors):
        vectors = {k: _as_matrix(tensors[k]) for k in _SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingError(f"{name}: clip_l and clip_g have different vector counts")
        return Embedding(name, vectors)
    if "emb_params" in tensors:
        return Embedding(name, {"*": _as_matrix(tensors["emb_params"])})
    if len(tensors) == 1:  # diffusers learned_embeds {token: tensor} and other single-tensor files
        return Embedding(name, {"*": _as_matrix(next(iter(tensors.values())))})
    raise EmbeddingError(
        f"{name}: not an embedding file (expected string_to_param, emb_params, clip_l + clip_g or a single "
        f"tensor; found keys {', '.join(list(data)[:6])})"
    )


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read an embedding file (.pt/.bin through the weights-only unpickler, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    if detect_format(path) == "safetensors":
        data: dict = load_state_dict(path)[0]
    else:
        data = _load_pickled(path)
    emb = embedding_from_dict(data, name or path.stem)
    emb.path = path
    return emb


class EmbeddingLibrary:
    """The embeddings of a folder (recursive), by file stem; those that do not fit the model are skipped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EmbeddingError(f"embeddings folder {self.folder} does not exist or is not a folder")
        self._cache: dict[Path, tuple[float, Embedding]] = {}

    def all(self) -> dict[str, Embedding]:
        """{name: embedding} for every readable file in the folder (re-read when a file changes)."""
        out: dict[str, Embedding] = {}
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
                continue
            mtime = path.stat().st_mtime
            cached = self._cache.get(path)
            if cached is None or cached[0] != mtime:
                cached = (mtime, load_embedding(path))
                self._cache[path] = cached
            out.setdefault(path.stem, cached[1])
        return out

    def usable(self, widths: Sequence[int]) -> tuple[dict[str, list[Tensor]], list[str]]:
        """({name: vectors per encoder} that fit encoders of `widths`, names of those skipped)."""
        fit, skipped = {}, []
        for name, emb in self.all().items():
            vecs = emb.for_encoders(widths)
            if vecs is None:
                skipped.append(name)
            else:
                fit[name] = vecs
        return fit, skipped


class EmbeddingTokenizer:
    """A tokenizer whose ``encode`` puts placeholder ids where an embedding's name stands."""

    def __init__(self, base, names: dict[str, tuple[int, ...]]) -> None:
        self.base = base
        self.bos_id, self.eos_id = base.bos_id, base.eos_id
        self.names = names  # name -> its placeholder ids
        patterns = []
        for name, placeholders in names.items():
            ids = tuple(base.encode(name))
            if ids:
                patterns.append((ids, name, placeholders))
        self._patterns = sorted(patterns, key=lambda p: -len(p[0]))  # longest name first
        self.used: list[str] = []  # names found by encode, in order

    def encode(self, text: str) -> list[int]:
        ids = self.base.encode(text)
        out: list[int] = []
        i = 0
        while i < len(ids):
            for pattern, name, placeholders in self._patterns:
                if tuple(ids[i : i + len(pattern)]) == pattern:
                    out += placeholders
                    i += len(pattern)
                    if name not in self.used:
                        self.used.append(name)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out


def _token_embedding(encoder: nn.Module) -> nn.Embedding:
    for name, module in encoder.named_modules():
        if name.endswith("token_embedding") and isinstance(module, nn.Embedding):
            return module
    raise EmbeddingError("text encoder has no token_embedding")


def _placeholders(fit: dict[str, list[Tensor]]) -> dict[str, tuple[int, ...]]:
    """{name: its placeholder ids}: -1, -2, ... in the library's order, n per embedding."""
    names, start = {}, 0
    for name, vecs in fit.items():
        names[name] = tuple(-(start + j + 1) for j in range(vecs[0].shape[0]))
        start += vecs[0].shape[0]
    return names


def used_embeddings(
    texts: Sequence[str], tokenizer, library: EmbeddingLibrary | None, widths: Sequence[int]
) -> list[Embedding]:
    """The library's embeddings (fitting encoders of `widths`) that `texts` name, in order of use."""
    fit = library.usable(widths)[0] if library is not None else {}
    if not fit:
        return []
    tok = EmbeddingTokenizer(tokenizer, _placeholders(fit))
    for text in texts:
        tok.encode(text)
    embeddings = library.all()
    return [embeddings[n] for n in tok.used]


@contextmanager
def active_embeddings(
    encoders: Sequence[nn.Module],
    tokenizers: Sequence,
    library: EmbeddingLibrary | Mapping[str, list[Tensor]] | None,
) -> Iterator[list]:
    """Yield tokenizers (one per encoder) that place the library's embeddings, with the encoders hooked.

    Without a library, or with no embedding that fits, the tokenizers are yielded unchanged.
    """
    if isinstance(library, EmbeddingLibrary):
        fit = library.usable([e.cfg.width for e in encoders])[0]
    else:  # {name: vectors per encoder}, e.g. an embedding being trained
        fit = dict(library or {})
    if not fit:
        yield list(tokenizers)
        return
    names = _placeholders(fit)
    handles = []
    for i, encoder in enumerate(encoders):
        emb = _token_embedding(encoder)
        table = torch.cat([vecs[i] for vecs in fit.values()])  # (n_placeholders, W) in placeholder order
        handles += _hook(emb, table.to(emb.weight.device, emb.weight.dtype))
    wrapped: dict[int, EmbeddingTokenizer] = {}
    for tok in tokenizers:
        wrapped.setdefault(id(tok), EmbeddingTokenizer(tok, names))
    try:
        yield [wrapped[id(t)] for t in tokenizers]
    finally:
        for h in handles:
            h.remove()


def _hook(emb: nn.Embedding, table: Tensor) -> list:
    state: dict[str, Tensor] = {}
    owner = threading.get_ident()  # another thread's forward through the same encoder is left alone

    def pre(module: nn.Module, args: tuple) -> tuple | None:
        if threading.get_ident() != owner:
            return None
        ids = args[0]
        state["ids"] = ids
        return (ids.clamp(min=0),)  # placeholders look up row 0, replaced below

    def post(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        if threading.get_ident() != owner:
            return None
        ids = state.pop("ids")
        mask = ids < 0  # (B, T)
        if not bool(mask.any()):
            return out
        out = out.clone()
        out[mask] = table[(-ids[mask] - 1)]
        return out

    return [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
