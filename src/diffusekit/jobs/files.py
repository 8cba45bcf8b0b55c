"""Image files on disk, written so that a crash never leaves a half-written PNG under its final name."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from PIL import Image

from ..metadata import save_png
from .model import ImageRecord


class ImageStore:
    """PNGs under `root/images/<id[:2]>/<id>.png`, written by metadata.save_png (atomic and durable)."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "images"
        self.root.mkdir(parents=True, exist_ok=True)

    def path_of(self, image_id: str) -> Path:
        return self.root / image_id[:2] / f"{image_id}.png"

    def write(
        self,
        image: Image.Image,
        infotext: str,
        *,
        owner: str | None,
        seed: int | None = None,
        role: str = "output",
        step: int | None = None,
    ) -> ImageRecord:
        """Store one image durably and return its record (not yet in the database)."""
        image_id = uuid.uuid4().hex
        path = self.path_of(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, infotext)  # atomic: temporary sibling, fsync, rename, fsync of the folder
        rel = str(path.relative_to(self.root.parent))
        return ImageRecord(
            id=image_id,
            job_id=None,
            owner=owner,
            path=rel,
            seed=seed,
            infotext=infotext,
            role=role,
            created_at=time.time(),
            step=step,
        )

    def read(self, rec: ImageRecord) -> bytes:
        return (self.root.parent / rec.path).read_bytes()

    def open(self, rec: ImageRecord) -> Image.Image:
        with Image.open(self.root.parent / rec.path) as img:
            img.load()
            return img.copy()

    def sweep(self, known: set[str]) -> int:
        """Remove temp files and PNGs no database row names (left by a crash before the commit)."""
        removed = 0
        for p in self.root.glob("*/*"):
            rel = str(p.relative_to(self.root.parent))
            if p.name.endswith(".tmp") or (p.suffix == ".png" and rel not in known):
                p.unlink(missing_ok=True)
                removed += 1
        return removed
