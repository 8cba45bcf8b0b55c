"""Animation outputs: MP4 (H.264 via PyAV), GIF, animated WebP, or a folder of PNG frames.

Every writer stores the generation parameters (a JSON string) in the container's own metadata: the MP4
``comment`` tag, the GIF comment extension, the WebP EXIF UserComment. Files are encoded in memory
and written with the project's atomic writer, so a failed write leaves no partial video.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from PIL import Image

from ..image_files import write_atomic
from ..metadata import save_png

FORMATS = {".mp4": "mp4", ".gif": "gif", ".webp": "webp"}
FRAME_NAME = "frame_{:06d}.png"


class VideoError(ValueError):
    """An output path or format that cannot be written; the message says what is valid."""


def output_kind(out: str | os.PathLike[str]) -> str:
    """ "mp4", "gif", "webp" from the extension, or "dir" for a path without one (a frames folder)."""
    path = Path(out)
    if path.suffix == "":
        return "dir"
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise VideoError(
            f"unknown animation output {path.name!r}; valid: a .mp4, .gif or .webp file, or a folder name "
            "without an extension for PNG frames"
        )
    return kind


def check_output(out: str | os.PathLike[str]) -> str:
    """Validate the output before any frame is made; return its kind."""
    kind = output_kind(out)
    path = Path(out)
    parent = path.parent  # a frames folder is created; its parent, like a file's, must exist
    probe = path if kind == "dir" and path.is_dir() else parent
    if kind != "dir" and path.is_dir():
        raise VideoError(f"output {path} is a folder; give a file name ending in .mp4, .gif or .webp")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise VideoError(f"output {path} exists and is not a folder")
    if not probe.is_dir():
        raise VideoError(f"the folder for {path} does not exist ({parent}); create it first")
    if not os.access(probe, os.W_OK):
        raise VideoError(f"cannot write into {probe}: permission denied")
    return kind


def frame_path(folder: Path, index: int) -> Path:
    return folder / FRAME_NAME.format(index)


def save_frame(image: Image.Image, folder: Path, index: int, infotext: str | None) -> Path:
    """Write frame `index` as PNG with its infotext, atomically: a frame file on disk is always whole."""
    return save_png(image, frame_path(folder, index), infotext)


def write_video(frames: Sequence[Image.Image], out: str | os.PathLike[str], fps: float, comment: str) -> Path:
    """Encode `frames` (all one size) to `out` (.mp4, .gif or .webp) at `fps`, with `comment` metadata."""
    kind = output_kind(out)
    if kind == "dir":
        raise VideoError("write_video needs a .mp4, .gif or .webp file name")
    if not frames:
        raise VideoError("no frames to write")
    if not 0 < fps <= 240:
        raise VideoError(f"fps {fps} is out of range; valid: above 0, at most 240")
    buf = io.BytesIO()  # encoded in memory, then written atomically like every other output
    {"mp4": _write_mp4, "gif": _write_gif, "webp": _write_webp}[kind](frames, buf, fps, comment)
    out = Path(out)
    write_atomic(out, buf.getvalue())
    return out


def _write_mp4(frames: Sequence[Image.Image], path: io.BytesIO, fps: float, comment: str) -> None:
    import av

    w, h = frames[0].size
    if w % 2 or h % 2:
        raise VideoError(f"H.264 (yuv420p) needs even sides; frames are {w}x{h}")
    with av.open(path, mode="w", format="mp4") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def _durations(n: int, fps: float, quantum: int) -> list[int]:
    """Per-frame durations in ms on a `quantum` grid whose running sum tracks n / fps (no drift)."""
    out, total = [], 0
    for i in range(1, n + 1):
        t = round(i * 1000 / fps / quantum) * quantum
        out.append(max(quantum, t - total))
        total += out[-1]
    return out


def _write_gif(frames: Sequence[Image.Image], path: io.BytesIO, fps: float, comment: str) -> None:
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(
        path, format="GIF", save_all=True, append_images=rest, loop=0,
        duration=_durations(len(frames), fps, 10), comment=comment.encode("utf-8"), optimize=False,
    )  # fmt: skip


def _write_webp(frames: Sequence[Image.Image], path: io.BytesIO, fps: float, comment: str) -> None:
    first, *rest = [f.convert("RGB") for f in frames]
    exif = Image.Exif()
    exif[0x9286] = b"UNICODE\0" + comment.encode("utf-16-be")  # UserComment, as A1111 writes JPEG/WebP
    first.save(
        path, format="WEBP", save_all=True, append_images=rest, loop=0,
        duration=_durations(len(frames), fps, 1), quality=90, exif=exif.tobytes(),
    )  # fmt: skip
