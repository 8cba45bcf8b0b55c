"""ModelStore: versioned models over content-addressed blobs, with aliases, history and golden checks.

Layout of a store folder: `store.db` (SQLite, WAL: models, versions with their JSON manifests, golden
records, history), `blobs/ab/<sha256>` (components, original headers, golden PNGs), `lock` (writers
hold an exclusive flock for the length of a command). Write order makes every crash point safe:
blobs are durable (fsync + rename + dir fsync) before the one SQLite transaction that names them, and
`gc` deletes only blobs no committed row names, while holding the lock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import torch

from ..checkpoints.detect import CONFIG_METADATA_KEY
from ..checkpoints.hashes import AUTOV2_LEN, autov1, sha256_file
from ..checkpoints.inspect import disk_bytes
from ..checkpoints.load import (
    LoadedModel,
    build_model,
    checkpoint_metadata,
    read_checkpoint,
    validate_state_dict,
)
from ..checkpoints.sd3 import is_sd3_file
from ..checkpoints.single_file import cast_floats, detect_format, read_safetensors_header
from ..models.configs import config_from_dict
from ..models.sd import StableDiffusion
from ..models.tokenizer import CLIPTokenizer
from ..params import ModelDefaults
from . import golden as gold
from . import maintenance, sd3
from .blobs import BlobStore, StoreError
from .db import connect, store_lock, transaction
from .manifest import (
    MANIFEST_FORMAT,
    assemble,
    check_manifest,
    read_raw_header,
    store_components,
)
from .refs import Ref, check_name
from .version import Version, default_root, who

_VERSION_COLUMNS = (
    "name", "version", "created_at", "created_by", "command", "source", "license", "note", "parent",
)  # fmt: skip
_NEW_MODEL = "INSERT INTO models (name, current, next_version, created_at) VALUES (?, NULL, 1, ?)"
_NEW_VERSION = (
    "INSERT INTO versions (name, version, created_at, created_by, command, source, license, note, parent, "
    "manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class ModelStore:
    """A model store folder; safe to use from several processes (writers serialize on a lock file)."""

    def __init__(self, root: str | Path | None = None, *, seed_default: bool = False):
        self.root = Path(root) if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a folder; --store takes a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.root}: cannot create the store folder ({e.strerror})") from None
        self.blobs = BlobStore(self.root / "blobs")
        self.db_path = self.root / "store.db"
        self.lock_path = self.root / "lock"
        with closing(self._conn()):
            pass
        if seed_default:
            self.ensure_default()

    def _conn(self) -> sqlite3.Connection:
        try:
            return connect(self.db_path)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path}: not a diffusekit store database ({e})") from None

    def _lock(self):
        return store_lock(self.lock_path)

    # --- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model names that have at least one version."""
        with closing(self._conn()) as c:
            return [r[0] for r in c.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def list(self) -> list[dict]:
        """[{name, current, versions: [..], autov2 of the current}] for every model with a version."""
        with closing(self._conn()) as c:
            rows = c.execute(
                "SELECT m.name, m.current, group_concat(v.version) AS vs FROM models m "
                "JOIN versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name"
            ).fetchall()
            out = []
            for r in rows:
                cur = self._version(c, r["name"], r["current"]) if r["current"] else None
                out.append({
                    "name": r["name"],
                    "current": r["current"],
                    "versions": sorted(int(v) for v in r["vs"].split(",")),
                    "family": cur.manifest["family"] if cur else None,
                    "autov2": cur.autov2 if cur else None,
                    "note": cur.note if cur else None,
                })  # fmt: skip
            return out

    def _version(self, c: sqlite3.Connection, name: str, version: int) -> Version | None:
        row = c.execute("SELECT * FROM versions WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            return None
        cur = c.execute("SELECT current FROM models WHERE name=?", (name,)).fetchone()
        g = c.execute("SELECT record FROM goldens WHERE name=? AND version=?", (name, version)).fetchone()
        manifest = json.loads(row["manifest"])
        check_manifest(manifest)
        return Version(
            **{k: row[k] for k in _VERSION_COLUMNS},
            manifest=manifest,
            current=bool(cur and cur[0] == version),
            golden=gold.GoldenRecord.from_dict(json.loads(g[0])) if g else None,
        )

    def _resolve(self, c: sqlite3.Connection, ref: str | Ref) -> Version:
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        model = c.execute("SELECT current FROM models WHERE name=?", (r.name,)).fetchone()
        known = [
            row[0]
            for row in c.execute("SELECT version FROM versions WHERE name=? ORDER BY version", (r.name,))
        ]
        if model is None or not known:
            names = [row[0] for row in c.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            hint = f"models in this store: {', '.join(names)}" if names else "the store is empty"
            raise StoreError(f"no model named {r.name!r} in {self.root} ({hint})")
        version = r.version if r.version is not None else model["current"]
        v = self._version(c, r.name, version) if version is not None else None
        if v is None:
            listed = ", ".join(f"{r.name}@{k}" for k in known)
            raise StoreError(f"{r} does not exist; versions of {r.name}: {listed}")
        return v

    def get(self, ref: str | Ref) -> Version:
        """The version NAME@VERSION names, or NAME's current version."""
        with closing(self._conn()) as c:
            return self._resolve(c, ref)

    def versions(self, name: str) -> list[Version]:
        check_name(name)
        with closing(self._conn()) as c:
            nums = [
                r[0] for r in c.execute("SELECT version FROM versions WHERE name=? ORDER BY version", (name,))
            ]
            if not nums:
                self._resolve(c, name)  # raises the clear error
            return [self._version(c, name, n) for n in nums]

    def history(self, name: str) -> list[dict]:
        """Every add, switch and removal of `name`, oldest first."""
        check_name(name)
        with closing(self._conn()) as c:
            rows = c.execute("SELECT * FROM history WHERE name=? ORDER BY id", (name,)).fetchall()
            if not rows:
                self._resolve(c, name)
            return [dict(r) for r in rows]

    # --- adding ----------------------------------------------------------------------------------

    def add(
        self,
        path: str | Path,
        name: str,
        *,
        note: str | None = None,
        source: str | None = None,
        license: str | None = None,
        fp16: bool = False,
        prune: bool = False,
        prediction: str | None = None,
        parent: str | None = None,
        golden: bool = True,
        command: str = "python: ModelStore.add",
        actor: str | None = None,
        text_encoders: tuple = (),
    ) -> Version:
        """Add a checkpoint file or diffusers folder (SD1/SD2/SDXL/SD3) as the next version of `name`."""
        check_name(name)
        path = Path(path)
        if not path.exists():
            raise StoreError(
                f"{path}: no such file or folder; add takes a .safetensors/.ckpt file or a diffusers folder"
            )
        parent_ref = Ref.parse(parent) if parent else None
        if parent_ref is not None:
            self.get(parent_ref)  # a clear error now rather than after hashing
        if is_sd3_file(path):
            return sd3.add_sd3(self, path, name, text_encoders=text_encoders, fp16=fp16, prune=prune,
                               prediction=prediction, golden=golden, parent_ref=parent_ref, note=note,
                               source=source, license=license, command=command, actor=actor)  # fmt: skip
        if text_encoders:
            raise StoreError(f"{path}: --text-encoder adds SD3 text encoders; this is not an SD3 model")
        sd, cfg, _, metadata, notes = read_checkpoint(path, prediction=prediction, prune_training=prune)
        with torch.device("meta"):
            validate_state_dict(sd, StableDiffusion(cfg), path.name)  # a broken file fails before any write
        original = self._describe_source(path)
        if fp16:
            sd = cast_floats(sd, torch.float16)
        exact = path.is_file() and original["format"] == "safetensors" and not fp16
        if exact:
            entries, _ = read_safetensors_header(path)
            exact = len(entries) == len(sd)  # --prune removed nothing
        components, _ = store_components(sd, cfg, self.blobs)
        layout = {}
        raw: dict[str, bytes] = {}
        if exact:
            header = read_raw_header(path)
            digest, _, _ = self.blobs.put_bytes(header)
            raw[digest] = header
            layout = {"header_blob": digest}
        meta = dict(metadata) if exact else {**metadata, **checkpoint_metadata(cfg)}
        manifest = {
            "format": MANIFEST_FORMAT,
            "family": cfg.family,
            "prediction": cfg.prediction,
            "config": json.loads(cfg.to_json()),
            "components": components,
            "metadata": meta,
            "layout": layout,
            "source_file": original,
            "stored": {
                "fp16": fp16,
                "pruned": prune,
                "exact_export": exact,
                "tensors": len(sd),
                "notes": notes,
            },
        }
        record = None
        if golden:
            loaded = self._load_manifest(manifest, f"{name}@new")
            specs = gold.default_specs(cfg, loaded.defaults)

            def put(data: bytes) -> str:
                digest = self.blobs.put_bytes(data)[0]
                raw[digest] = data
                return digest

            record = gold.record(self._pipeline(loaded), specs, put)
        return self._commit_add(name, manifest, record, raw, sd, cfg, source or str(path.resolve()),
                                license, note, parent_ref, command, actor)  # fmt: skip

    def _describe_source(self, path: Path) -> dict:
        info = {"name": path.name, "bytes": disk_bytes(path)}
        if path.is_dir():
            info["format"] = "diffusers folder"
            return info
        info["format"] = "safetensors" if detect_format(path) == "safetensors" else "pickle (.ckpt)"
        sha = sha256_file(path)
        info.update(sha256=sha, autov2=sha[:AUTOV2_LEN], autov1=autov1(path))
        return info

    def _commit_add(
        self, name, manifest, record, raw, sd, cfg, source, license, note, parent_ref, command, actor
    ):
        with self._lock():
            # gc may have run between the writes above and now: re-store anything it removed
            if any(not self.blobs.exists(c["blob"]) for c in manifest["components"]):
                store_components(sd, cfg, self.blobs)
            for digest, data in raw.items():
                if not self.blobs.exists(digest):
                    self.blobs.put_bytes(data)
            now = time.time()
            actor = actor or who()
            with closing(self._conn()) as c, transaction(c):
                row = c.execute("SELECT current, next_version FROM models WHERE name=?", (name,)).fetchone()
                if row is None:
                    c.execute(_NEW_MODEL, (name, now))
                    current, version = None, 1
                else:
                    current, version = row["current"], row["next_version"]
                parent = str(parent_ref) if parent_ref else (f"{name}@{current}" if current else None)
                c.execute(
                    _NEW_VERSION,
                    (name, version, now, actor, command, source, license, note, parent, json.dumps(manifest)),
                )
                if record is not None:
                    c.execute("INSERT INTO goldens (name, version, record) VALUES (?, ?, ?)",
                              (name, version, json.dumps(record.to_dict())))  # fmt: skip
                new_current = current if current is not None else version
                c.execute(
                    "UPDATE models SET current=?, next_version=? WHERE name=?",
                    (new_current, version + 1, name),
                )
                c.execute(
                    "INSERT INTO history (name, at, action, from_version, to_version, reason, actor) "
                    "VALUES (?, ?, 'add', ?, ?, ?, ?)",
                    (name, now, current, version, "current" if current is None else None, actor),
                )
                return self._version(c, name, version)

    def ensure_default(self) -> Version | None:
        """Add the bundled default model as `default@1` the first time a store is used (once only)."""
        seeded = "SELECT value FROM meta WHERE key='default_seeded'"
        with closing(self._conn()) as c:
            if c.execute(seeded).fetchone():
                return None
        with store_lock(self.root / "seed.lock"):  # two first uses at once seed it once
            with closing(self._conn()) as c:
                if c.execute(seeded).fetchone():
                    return None
            return self._seed_default()

    def _seed_default(self) -> Version | None:
        from importlib import resources

        from .. import __version__

        path = Path(str(resources.files("diffusekit") / "assets" / "default.safetensors"))
        v = None
        if path.is_file():
            with closing(self._conn()) as c:
                taken = c.execute("SELECT 1 FROM models WHERE name='default'").fetchone()
            if not taken:
                v = self.add(path, "default", source=f"bundled with diffusekit {__version__}",
                             note="the model diffusekit trains itself (train/recipe.py)",
                             command="first use of the store")  # fmt: skip
        with closing(self._conn()) as c, transaction(c):
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('default_seeded', ?)", (str(time.time()),)
            )
        return v

    # --- loading ---------------------------------------------------------------------------------

    def _load_manifest(
        self,
        manifest: dict,
        label: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LoadedModel | sd3.StoredSD3:
        if sd3.is_sd3_manifest(manifest):
            return sd3.load_manifest(self, manifest, label, device=device, dtype=dtype)
        sd = assemble(manifest, self.blobs)
        cfg = config_from_dict(manifest["config"])
        model, notes = build_model(sd, cfg, name=label, device=device, dtype=dtype)
        meta = dict(manifest.get("metadata", {}))
        meta.setdefault(CONFIG_METADATA_KEY, json.dumps(manifest["config"], sort_keys=True))
        return LoadedModel(
            model=model,
            tokenizer=CLIPTokenizer.bundled(),
            path=Path(label),
            metadata=meta,
            notes=notes,
            defaults=ModelDefaults.from_metadata(meta, label),
            model_hash=manifest["source_file"].get("autov2"),
        )

    def load(
        self, ref: str | Ref, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> LoadedModel | sd3.StoredSD3:
        """A version as a LoadedModel (named NAME@VERSION, hashed as its original file)."""
        v = self.get(ref)
        return self._load_manifest(v.manifest, v.ref, device=device, dtype=dtype)

    def pipeline(self, ref: str | Ref, **kw):
        """A Pipeline over a version (kw: device, dtype, accel as Pipeline; precision as from_file); an
        SD3Pipeline for SD3 versions (kw: device, dtype, precision, options: SD3Options)."""
        from ..pipeline import Pipeline
        from ..runtime import resolve_precision

        precision = kw.pop("precision", "auto")
        device = kw.get("device", "cpu")
        loaded = self.load(ref)
        if isinstance(loaded, sd3.StoredSD3):
            kw.pop("accel", None)  # the U-Net accelerators do not apply to the MMDiT
            return sd3.sd3_pipeline(loaded, precision=precision, **kw)
        if kw.get("dtype") is None:
            kw["dtype"] = resolve_precision(
                precision, device, sum(p.numel() for p in loaded.model.unet.parameters())
            )
        return Pipeline(loaded, **kw)

    @staticmethod
    def _pipeline(loaded: LoadedModel):
        """The golden renderer: fp32 on the CPU, no accelerators."""
        from ..pipeline import Pipeline

        if isinstance(loaded, sd3.StoredSD3):
            return sd3.golden_pipeline(loaded)

        return Pipeline(loaded, device="cpu", dtype=torch.float32)

    # --- golden checks -----------------------------------------------------------------------------

    def check(self, ref: str | Ref, *, min_psnr: float | None = None, max_diff: int | None = None) -> dict:
        """Re-render a version's golden images with the current code and compare them."""
        v = self.get(ref)
        if v.golden is None:
            raise StoreError(
                f"{v.ref} has no golden images; record them with 'diffusekit models check {v.ref} --record'"
            )
        pipe = self._pipeline(self._load_manifest(v.manifest, v.ref))
        results = gold.check(pipe, v.golden, self.blobs.read_bytes, min_psnr=min_psnr, max_diff=max_diff)
        return {
            "ref": v.ref,
            "passed": all(r.passed for r in results),
            "min_psnr": v.golden.min_psnr if min_psnr is None else min_psnr,
            "max_diff": v.golden.max_diff if max_diff is None else max_diff,
            "recorded_with": v.golden.environment,
            "now": gold.environment(),
            "images": [r.to_dict() for r in results],
        }

    def record_golden(
        self, ref: str | Ref, *, reason: str | None = None, actor: str | None = None
    ) -> gold.GoldenRecord:
        """Render and store (replacing any earlier set) a version's golden images with the current code."""
        v = self.get(ref)
        pipe = self._pipeline(self._load_manifest(v.manifest, v.ref))
        specs = [g.spec for g in v.golden.images] if v.golden else gold.default_specs(v.config, pipe.defaults)
        pngs: dict[str, bytes] = {}

        def put(data: bytes) -> str:
            digest = self.blobs.put_bytes(data)[0]
            pngs[digest] = data
            return digest

        record = gold.record(pipe, specs, put)
        with self._lock():
            for digest, data in pngs.items():
                if not self.blobs.exists(digest):
                    self.blobs.put_bytes(data)
            with closing(self._conn()) as c, transaction(c):
                self._resolve(c, v.ref)
                c.execute("INSERT OR REPLACE INTO goldens (name, version, record) VALUES (?, ?, ?)",
                          (v.name, v.version, json.dumps(record.to_dict())))  # fmt: skip
                c.execute(
                    "INSERT INTO history (name, at, action, from_version, to_version, reason, actor) "
                    "VALUES (?, ?, 'golden', ?, ?, ?, ?)",
                    (v.name, time.time(), v.version, v.version, reason, actor or who()),
                )
        return record

    # --- aliases -------------------------------------------------------------------------------------

    def _switch(
        self, c: sqlite3.Connection, name: str, to: int, action: str, reason: str | None, actor: str | None
    ) -> dict:
        cur = c.execute("SELECT current FROM models WHERE name=?", (name,)).fetchone()["current"]
        now = time.time()
        c.execute("UPDATE models SET current=? WHERE name=?", (to, name))
        c.execute(
            "INSERT INTO history (name, at, action, from_version, to_version, reason, actor) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, now, action, cur, to, reason, actor or who()),
        )
        return {"name": name, "from": cur, "to": to, "action": action, "at": now}

    def promote(
        self,
        ref: str | Ref,
        *,
        reason: str | None = None,
        force: bool = False,
        actor: str | None = None,
        min_psnr: float | None = None,
        max_diff: int | None = None,
    ) -> dict:
        """Make NAME@VERSION the current version; refused when its golden check fails, unless `force`."""
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        if r.version is None:
            raise StoreError(
                f"promote needs a version: {r.name}@VERSION (see 'diffusekit models history {r.name}')"
            )
        v = self.get(r)
        report = None
        if not force:
            if v.golden is None:
                raise StoreError(
                    f"{v.ref} has no golden images to check; "
                    f"run 'models check {v.ref} --record' or pass --force"
                )
            report = self.check(v.ref, min_psnr=min_psnr, max_diff=max_diff)
            if not report["passed"]:
                bad = next(i for i in report["images"] if not i["passed"])
                raise StoreError(
                    f"{v.ref} fails its golden check (image {bad['index']}: PSNR {bad['psnr']} dB, max diff "
                    f"{bad['max_diff']}); not promoted (pass --force to promote anyway)"
                )
        with self._lock(), closing(self._conn()) as c, transaction(c):
            if self._resolve(c, r).current:  # still there under the lock; already current: nothing to record
                out = {
                    "name": r.name,
                    "from": r.version,
                    "to": r.version,
                    "action": "none",
                    "at": time.time(),
                }
            else:
                out = self._switch(c, r.name, r.version, "promote", reason, actor)
        out["check"] = report
        return out

    def rollback_target(self, c: sqlite3.Connection, name: str) -> int | None:
        """The version current before the last promote not yet rolled back (skipping removed ones)."""
        stack: list[int] = []
        for row in c.execute("SELECT action, from_version FROM history WHERE name=? ORDER BY id", (name,)):
            if row["action"] == "promote" and row["from_version"] is not None:
                stack.append(row["from_version"])
            elif row["action"] == "rollback" and stack:
                stack.pop()
        current = c.execute("SELECT current FROM models WHERE name=?", (name,)).fetchone()["current"]
        while stack:
            v = stack[-1]
            if v != current and self._version(c, name, v) is not None:
                return v
            stack.pop()
        return None

    def rollback(self, name: str, *, reason: str | None = None, actor: str | None = None) -> dict:
        """Return NAME to the version that was current before its last promote."""
        check_name(name)
        with self._lock(), closing(self._conn()) as c, transaction(c):
            self._resolve(c, name)
            target = self.rollback_target(c, name)
            if target is None:
                raise StoreError(
                    f"{name} has no earlier current version to roll back to (see 'models history {name}')"
                )
            return self._switch(c, name, target, "rollback", reason, actor)

    def remove(self, ref: str | Ref, *, reason: str | None = None, actor: str | None = None) -> dict:
        """Delete one version (its blobs stay until `gc`); the current one only if it is the last."""
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        if r.version is None:
            raise StoreError(f"rm needs a version: {r.name}@VERSION (versions are removed one at a time)")
        with self._lock(), closing(self._conn()) as c, transaction(c):
            v = self._resolve(c, r)
            others = [
                row[0]
                for row in c.execute(
                    "SELECT version FROM versions WHERE name=? AND version<>?", (r.name, r.version)
                )
            ]
            if v.current and others:
                raise StoreError(
                    f"{v.ref} is the current version of {r.name}; "
                    "promote or roll back to another version first"
                )
            c.execute("DELETE FROM goldens WHERE name=? AND version=?", (r.name, r.version))
            c.execute("DELETE FROM versions WHERE name=? AND version=?", (r.name, r.version))
            if not others:
                c.execute("UPDATE models SET current=NULL WHERE name=?", (r.name,))
            c.execute(
                "INSERT INTO history (name, at, action, from_version, to_version, reason, actor) "
                "VALUES (?, ?, 'remove', ?, NULL, ?, ?)",
                (r.name, time.time(), r.version, reason, actor or who()),
            )
        return {"removed": v.ref}

    # --- blobs (store/maintenance.py) ---------------------------------------------------------------

    def referenced(self, c: sqlite3.Connection) -> dict[str, set[str]]:
        """{blob sha256: {NAME@VERSION, ...}} for every blob a committed version or golden record names."""
        return maintenance.referenced(c)

    def repair(
        self, path: str | Path, *, fp16: bool = False, prune: bool = False, prediction: str | None = None
    ) -> dict:
        """Rewrite the missing or changed blobs a copy of an added file holds (add's flags must match)."""
        return maintenance.repair(self, path, fp16=fp16, prune=prune, prediction=prediction)

    def gc(self, *, dry_run: bool = False) -> dict:
        """Delete blobs no version names and partial writes left by crashes."""
        return maintenance.gc(self, dry_run=dry_run)
