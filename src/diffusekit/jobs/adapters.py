"""The server's LoRA and textual-inversion folders: names resolve only inside them, listings in A1111's
shapes, and a per-pipeline lock so a job that swaps LoRA weights into a model never runs beside another
job on that model (the weights are put back bit for bit when it ends, see adapters.lora.apply_loras)."""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.embeddings import (
    EMBEDDING_SUFFIXES,
    Embedding,
    EmbeddingLibrary,
    load_embedding,
    used_embeddings,
)
from ..adapters.extra_networks import (
    LORA_KINDS,
    LORA_SUFFIXES,
    LoraLibrary,
    lora_weights,
    parse_extra_networks,
    prompt_loras,
)
from ..adapters.lora import LoraError, LoraNetwork
from ..checkpoints.single_file import read_safetensors_header
from ..params import GenerationParams

MAX_CACHED_LORAS = 16  # loaded LoRA networks kept in memory (A1111's lora_in_memory_limit)


class AdapterNameError(LoraError):
    """A prompt names a LoRA (or extra network) the server does not have; the message lists valid names."""


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` is a plain, non-hidden entry of `root` whose real location is inside `root`."""
    rel = path.relative_to(root)
    if any(part.startswith(".") for part in rel.parts):
        return False
    return path.resolve().is_relative_to(root)


def _files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files under `root` with these suffixes, sorted; symlinks that lead out of `root` are left out."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file() and _inside(root, p)
    )


class ServerLoras(LoraLibrary):
    """A LoRA folder as the server offers it: no hidden files, no symlinks out, a bounded load cache."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        self._lock = threading.Lock()
        self._meta: dict[Path, tuple[tuple[int, int], dict[str, str]]] = {}

    def files(self) -> dict[str, Path]:
        paths = _files(self.folder, LORA_SUFFIXES)
        names = {p.stem: p for p in paths}
        for p in paths:
            alias = self.metadata(p).get("ss_output_name")
            if alias and alias not in names:
                names[alias] = p
        return names

    def metadata(self, path: Path) -> dict[str, str]:
        """A .safetensors file's metadata ({} for other formats or an unreadable header); cached per file
        version, so a folder of many LoRAs costs one stat per file per lookup."""
        if path.suffix.lower() != ".safetensors":
            return {}
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        cached = self._meta.get(path)
        if cached is None or cached[0] != key:
            try:
                meta = read_safetensors_header(path)[1]
            except ValueError:
                meta = {}
            cached = (key, meta)
            self._meta[path] = cached
        return cached[1]

    def get(self, name: str) -> LoraNetwork:
        files = self.files()
        if name not in files:
            raise AdapterNameError(f"no LoRA named {name!r}; valid: {', '.join(sorted(files)) or '(none)'}")
        with self._lock:
            net = super().get(name)
            while len(self._cache) > MAX_CACHED_LORAS:  # oldest loaded first
                self._cache.pop(next(iter(self._cache)))
        return net

    def check(self, prompt: str) -> None:
        """Raise AdapterNameError / LoraError for a prompt tag that would fail: unknown name, bad weight."""
        _, calls = parse_extra_networks(prompt)
        if not calls:
            return
        for call in calls:
            if call.kind not in LORA_KINDS:
                raise AdapterNameError(
                    f"<{call.kind}:{call.name}>: unsupported extra network; valid: <lora:NAME:WEIGHT>"
                )
            lora_weights(call)
        files = self.files()
        missing = [c.name for c in calls if c.name not in files]
        if missing:
            valid = ", ".join(sorted(files)) or "(none)"
            raise AdapterNameError(f"no LoRA named {', '.join(map(repr, missing))}; valid: {valid}")

    def listing(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras items: name (file stem), alias (ss_output_name), path, metadata."""
        out = []
        for p in _files(self.folder, LORA_SUFFIXES):
            meta = _parsed(self.metadata(p))
            rel = p.relative_to(self.folder).as_posix()
            out.append({"name": p.stem, "alias": meta.get("ss_output_name") or p.stem, "path": rel,
                        "metadata": meta})  # fmt: skip
        return out


def _parsed(meta: dict[str, str]) -> dict[str, Any]:
    """Metadata values that hold JSON objects decoded (A1111's read_metadata_from_safetensors)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
                continue
            except ValueError:
                pass
        out[k] = v
    return out


class ServerEmbeddings(EmbeddingLibrary):
    """An embeddings folder as the server offers it: unreadable files are skipped (and listed), not fatal."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        self.errors: dict[str, str] = {}
        self._info: dict[Path, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def all(self) -> dict[str, Embedding]:
        out: dict[str, Embedding] = {}
        errors: dict[str, str] = {}
        with self._lock:
            for path in _files(self.folder, EMBEDDING_SUFFIXES):
                mtime = path.stat().st_mtime
                cached = self._cache.get(path)
                if cached is None or cached[0] != mtime:
                    try:
                        cached = (mtime, load_embedding(path))
                    except (ValueError, OSError, RuntimeError) as e:
                        errors[path.stem] = str(e).splitlines()[0] if str(e) else type(e).__name__
                        continue
                    self._cache[path] = cached
                out.setdefault(path.stem, cached[1])
            self.errors = errors
        return out

    def details(self, emb: Embedding) -> dict[str, Any]:
        """A1111's embedding fields: step, sd_checkpoint, sd_checkpoint_name, shape, vectors."""
        extra: dict[str, Any] = {}
        path = emb.path
        if path is not None and path.suffix.lower() in (".pt", ".bin"):
            mtime = path.stat().st_mtime
            cached = self._info.get(path)
            if cached is None or cached[0] != mtime:
                try:
                    data = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - the vectors loaded; these fields are informational
                    data = {}
                info = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
                cached = (mtime, {k: v if isinstance(v, int | str) else None for k, v in info.items()})
                self._info[path] = cached
            extra = cached[1]
        shape = sum(v.shape[-1] for v in emb.vectors.values())  # SDXL: 768 + 1280, as A1111 records it
        return {
            "step": extra.get("step"),
            "sd_checkpoint": extra.get("sd_checkpoint"),
            "sd_checkpoint_name": extra.get("sd_checkpoint_name"),
            "shape": int(shape),
            "vectors": int(emb.n_vectors),
        }

    def listing(self, widths: Sequence[int]) -> dict[str, dict[str, Any]]:
        """A1111's /sdapi/v1/embeddings: {"loaded": {...}, "skipped": {...}} for encoders of `widths`."""
        loaded, skipped = {}, {}
        for name, emb in self.all().items():
            (loaded if emb.for_encoders(widths) is not None else skipped)[name] = self.details(emb)
        return {"loaded": loaded, "skipped": skipped}


class _SharedExclusive:
    """Many shared holders or one exclusive holder; a waiting exclusive request blocks new shared ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        with self._cond:
            if exclusive:
                self._waiting += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class Adapters:
    """The server's LoRA and embedding libraries, attached to every pipeline the workers use."""

    def __init__(self, loras_dir: str | Path, embeddings_dir: str | Path) -> None:
        self.loras = ServerLoras(loras_dir)
        self.embeddings = ServerEmbeddings(embeddings_dir)
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._locks_lock = threading.Lock()

    def attach(self, pipe) -> None:
        """Make the pipeline look up <lora:...> tags and embedding names in the server's folders."""
        pipe.loras, pipe.embeddings = self.loras, self.embeddings

    def uses_loras(self, params: GenerationParams) -> bool:
        return bool(parse_extra_networks(params.prompt)[1])

    def uses_adapters(self, pipe, params: GenerationParams) -> bool:
        """Whether a job needs the solo path: `needs_solo` with the server's embeddings."""
        return needs_solo(pipe, params, self.embeddings)

    def check_fits(self, pipe, params: GenerationParams) -> None:
        """Refuse a LoRA that matches no layer of the model (made for another family): it would change
        nothing, silently; one that matches some layers runs, as in the CLI."""
        for net, _, _ in prompt_loras(params.prompt, self.loras):
            found, unmatched = net.resolve(pipe.cfg)
            if not found and unmatched:
                family = net.metadata.get("ss_base_model_version") or "another model"
                raise AdapterNameError(
                    f"LoRA {net.name!r} matches no layer of this {pipe.cfg.family} model "
                    f"({len(unmatched)} keys, e.g. {unmatched[0]}); it was made for {family}"
                )

    @contextlib.contextmanager
    def session(self, pipe, params: Sequence[GenerationParams]) -> Iterator[None]:
        """Hold `pipe` for these jobs: exclusively when one applies LoRAs (its weights are swapped)."""
        if not _takes_loras(pipe):
            yield
            return
        self.attach(pipe)
        for p in params:
            self.check_fits(pipe, p)
        with self._locks_lock:
            lock = self._locks.setdefault(pipe, _SharedExclusive())
        with lock.hold(exclusive=any(self.uses_loras(p) for p in params)):
            yield


def needs_solo(pipe, params: GenerationParams, embeddings: EmbeddingLibrary | None) -> bool:
    """Whether a job must run alone, not in a batched run (jobs.batch): its prompt or negative prompt has a
    `<kind:...>` tag or names one of `embeddings` (`Pipeline.generate` applies the LoRAs for the call and
    records LoRA / TI hashes in the infotext; a batched run does neither). SD3 pipelines take LoRAs only."""
    if not _takes_loras(pipe):
        return False
    texts = [params.prompt, params.negative_prompt]
    if any(parse_extra_networks(t)[1] for t in texts):
        return True
    if not _takes_adapters(pipe):
        return False
    widths = [e.cfg.width for e in pipe.model.text_encoders]
    return bool(used_embeddings(texts, pipe.loaded.tokenizer, embeddings, widths))


def _takes_adapters(pipe) -> bool:
    """Whether a pipeline applies <lora:...> tags and embeddings (the U-Net pipeline does, SD3's not)."""
    from ..pipeline import Pipeline

    return isinstance(pipe, Pipeline)


def _takes_loras(pipe) -> bool:
    """Whether a pipeline applies <lora:...> tags: the U-Net and the SD3 pipelines do."""
    from ..pipeline_sd3 import SD3Pipeline

    return _takes_adapters(pipe) or isinstance(pipe, SD3Pipeline)


def session(adapters: Adapters | None, pipe, params: Sequence[GenerationParams]):
    """`adapters.session(...)`, or nothing to hold when the runner has no adapter folders."""
    return adapters.session(pipe, params) if adapters is not None else contextlib.nullcontext()
