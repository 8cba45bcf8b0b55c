"""Image files in and out: the one reader (limits, every Pillow mode, EXIF orientation, clear errors for
what is not an image file) and the one writer (format from the extension, infotext, atomic, umask).

Every image the CLI or a server reads goes through ``load_image``: a path, raw bytes (a base64 upload)
or a binary file object. The size is read from the header and checked against a pixel limit before
anything is decoded, so a 20 KB "decompression bomb" costs nothing. Every image written goes through
``save_image``: a temporary file in the target folder, fsync, rename, so a failed write never destroys
what was there.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .durable import fsync_dir

# 64 Mi pixels, e.g. 8192x8192: twice the largest side we generate, and large camera photos. Decoded RGB
# at the limit is 192 MiB. Pillow's own bomb limit (89 M warns, 179 M fails) is only a warning below.
MAX_PIXELS = 64 * 2**20
LOAD_MODES = ("RGB", "RGBA", "L", "mask")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95
WEBP_QUALITY = 95
# A JPEG APP1 (EXIF) segment holds at most 65,533 bytes; UserComment is UTF-16 (2 bytes a character).
JPEG_EXIF_MAX_CHARS = 30_000
PNG_KEY = "parameters"
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageError(ValueError):
    """An image or mask that cannot be used, with what is wrong and what is expected."""


ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


# ---------------------------------------------------------------------------------------------
# Reading


def load_image(source: ImageSource, *, mode: str = "RGB", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image (path, bytes or binary file) into a fully loaded 8-bit `mode` image.

    mode: "RGB", "RGBA", "L", or "mask" (L; A1111's rule: an image whose alpha is not fully opaque is
    masked by its alpha, so white strokes on a transparent layer repaint under the strokes). Transparent
    pixels become white in "RGB" and "L" (A1111's img2img background). 16-bit, 32-bit integer and float
    images are scaled to 0..255 (see ``to_8bit``); the EXIF orientation is applied.
    """
    if mode not in LOAD_MODES:
        raise ValueError(f"unknown image mode {mode!r}; valid: {', '.join(LOAD_MODES)}")
    name, fp = open_source(source)
    try:
        img = _decode(fp, name, max_pixels)
    finally:
        if fp is not source:
            fp.close()
    return _to_mode(to_8bit(img), mode)


def open_source(source: ImageSource) -> tuple[str, BinaryIO]:
    """(a name for messages, a readable binary file) for a path, bytes or file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image data", io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "image data"))
        if not (hasattr(source, "seekable") and source.seekable()):
            return name, io.BytesIO(source.read())
        return name, source  # type: ignore[return-value]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"image source must be a path, bytes or a binary file, got {type(source).__name__}")
    path = os.fspath(source)
    if path == "":
        raise ImageError("the image path is empty; give a PNG, JPEG or WebP file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ImageError(f"{path}: {_why_unopenable(path, e)}") from None
    kind = _file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise ImageError(f"{path}: is {kind}, not an image file; give a PNG, JPEG or WebP file")
    return path, os.fdopen(fd, "rb")


def _why_unopenable(path: str, err: OSError) -> str:
    import errno

    if err.errno == errno.ENOENT:
        if os.path.islink(path):
            return "is a symbolic link to a missing file"
        return "no such file"
    if err.errno == errno.ELOOP:
        return "symbolic link loop (the link points back to itself); give a regular image file"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; the image file is not readable"
    if err.errno == errno.EISDIR:
        return "is a directory, not an image file"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is not a directory"
    if err.errno == errno.ENXIO:
        return "is a socket or device with nothing behind it, not an image file"
    return f"cannot open it ({err.strerror})"


def _file_kind(st_mode: int) -> str | None:
    """What a non-regular file is ("a directory", "a FIFO", ...), or None for a regular file."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(st_mode):
            return kind
    return None


def _decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    limit = f"at most {max_pixels:,} pixels (e.g. {_side(max_pixels)}x{_side(max_pixels)}) are read"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is below Pillow's
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        found = _BOMB_PIXELS.search(str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageError(f"{name}: the image is {size}; {limit}") from None
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: not a readable image ({_short(e)}); expected PNG, JPEG or WebP") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is {width}x{height} pixels; it has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"{name}: the image is {width}x{height} ({width * height:,} pixels); {limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{name}: the image data is truncated or corrupt ({_short(e)})") from None
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block: keep the pixels as stored rather than refuse the image
        return img


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


def _side(pixels: int) -> int:
    return int(pixels**0.5)


def to_8bit(img: Image.Image) -> Image.Image:
    """An image in one of L, LA, RGB, RGBA with the same picture.

    16-bit ("I;16*") is divided by 257. 32-bit integers ("I") are taken as 8-bit when all values lie in
    0..255, as 16-bit when in 0..65535, and are stretched from their min..max otherwise (clipped when all
    equal). Floats ("F") in
    0..1 are scaled by 255, other floats are clipped to 0..255; NaN becomes 0.
    """
    m = img.mode
    if m in ("L", "LA", "RGB", "RGBA"):
        return img
    if m == "1":
        return img.convert("L")
    if m.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 257.0
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    if m == "I":
        arr = np.asarray(img).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            arr = arr / 257.0
        elif hi > lo:
            arr = (arr - lo) * (255.0 / (hi - lo))
        else:  # one value outside 0..65535: nothing to stretch
            arr = np.clip(arr, 0, 255)
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L")
    if m == "F":
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8), "L")
    if m in ("P", "PA"):
        has_alpha = m == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if m in ("RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"):
        try:
            return img.convert("RGBA" if m == "RGBa" else "RGB")
        except ValueError:
            pass
    try:
        return img.convert("RGBA")
    except ValueError:
        raise ImageError(f"image mode {m!r} is not supported; save it as 8-bit RGB or grayscale") from None


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """An L/LA/RGB/RGBA image in `mode` (see load_image)."""
    alpha = img.mode in ("LA", "RGBA")
    if mode == "mask":
        if alpha and img.getchannel("A").getextrema() != (255, 255):
            return img.getchannel("A").point(lambda v: 255 if v > 128 else 0)  # A1111 create_binary_mask
        return img.convert("L")
    if mode == "RGBA":
        return img.convert("RGBA")
    if alpha:  # flatten onto white, as A1111 does with img2img_background_color
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)


# ---------------------------------------------------------------------------------------------
# Writing


def output_format(path: str | os.PathLike[str]) -> str:
    """The Pillow format for an output file name, from its extension (PNG, JPEG or WEBP)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        valid = ", ".join(OUTPUT_FORMATS)
        given = f"extension {suffix!r}" if suffix else "no extension"
        raise ImageError(f"output file {os.fspath(path)!r} has {given}; valid: {valid}")
    return OUTPUT_FORMATS[suffix]


def check_output_path(path: str | os.PathLike[str], *, prompt_chars: int = 0, probe: bool = True) -> Path:
    """Refuse an output path that cannot be written, before any work: empty, a directory, a missing or
    unwritable folder (probed by creating a temporary file unless `probe` is False), an unknown
    extension. `prompt_chars` (prompt + negative) bounds what a JPEG's EXIF block can hold."""
    text = os.fspath(path)
    if not text.strip():
        raise ImageError("the output path is empty; give a file name such as out.png")
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        raise ImageError(f"output {text!r} is a directory; give a file name such as {out / 'out.png'}")
    fmt = output_format(out)
    if fmt == "JPEG" and prompt_chars > JPEG_EXIF_MAX_CHARS:
        raise ImageError(
            f"the prompts ({prompt_chars:,} characters) do not fit a JPEG's EXIF block (at most "
            f"{JPEG_EXIF_MAX_CHARS:,}); write a .png or .webp file"
        )
    folder = out.parent
    if not folder.exists():
        raise ImageError(f"output folder {str(folder)!r} does not exist; create it first")
    if not folder.is_dir():
        raise ImageError(f"output folder {str(folder)!r} is not a directory")
    if out.exists() and _file_kind(out.stat().st_mode) is not None:
        raise ImageError(f"output {text!r} is {_file_kind(out.stat().st_mode)}; give a regular file name")
    if not probe:
        return out
    try:  # the honest test of writability (os.access is wrong for root and on some mounts)
        fd, tmp = _create_temp(folder, out.name)
    except OSError as e:
        raise ImageError(f"output folder {str(folder)!r} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(tmp)
    return out


def encode_image(image: Image.Image, fmt: str, infotext: str | None) -> bytes:
    """The file bytes of `image` in `fmt` with the infotext where A1111 puts it."""
    buf = io.BytesIO()
    if fmt == "PNG":
        pnginfo = PngImagePlugin.PngInfo()
        if infotext:
            try:
                infotext.encode("latin-1")
            except UnicodeEncodeError:
                pnginfo.add_itxt(PNG_KEY, infotext)
            else:
                pnginfo.add_text(PNG_KEY, infotext)
        image.save(buf, format="PNG", pnginfo=pnginfo)
        return buf.getvalue()
    kwargs: dict = {"quality": JPEG_QUALITY if fmt == "JPEG" else WEBP_QUALITY}
    if infotext:
        exif = Image.Exif()
        # piexif.helper.UserComment.dump(text, encoding="unicode"): a charset header, then UTF-16-BE
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf-16-be")
        kwargs["exif"] = exif.tobytes()
    img = image.convert("RGB") if fmt == "JPEG" and image.mode not in ("RGB", "L") else image
    try:
        img.save(buf, format=fmt, **kwargs)
    except ValueError as e:
        raise ImageError(f"cannot encode the image as {fmt}: {e}; write a .png file") from None
    return buf.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike[str], infotext: str | None = None) -> Path:
    """Write `image` atomically, the format from the extension (PNG: `parameters` chunk; JPEG/WebP: EXIF
    UserComment): a temporary file in the same folder, fsync, rename. A failed write leaves any existing
    file untouched and no temporary file behind. The new file's mode follows the umask."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    out = Path(path)
    data = encode_image(image, output_format(out), infotext)
    write_atomic(out, data)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temporary sibling, fsync, rename, fsync the folder)."""
    folder = path.parent
    try:
        fd, tmp = _create_temp(folder, path.name)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}; the existing file is unchanged") from None
        raise
    fsync_dir(folder, best_effort=True)


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden file beside `name`, created with mode 0666 so that the umask applies (not 0600)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            ), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")
