"""Images arriving as base64: bounded in bytes and pixels (checked from the header before decoding)."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FieldError

_DATA_URI = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)


def decode_b64_image(
    data: str, field: str, *, max_bytes: int, max_pixels: int, mode: str | None = "RGB"
) -> Image.Image:
    """A base64 (optionally data-URI) image string -> PIL image in `mode`, or a FieldError naming `field`."""
    if not isinstance(data, str) or not data.strip():
        raise FieldError(field, "expected a base64-encoded PNG, JPEG or WebP image")
    text = _DATA_URI.sub("", data.strip(), count=1)
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise FieldError(
            field, f"image is larger than {max_bytes // 2**20} MiB; valid: at most {max_bytes} bytes"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(
            field, "not valid base64; expected a base64-encoded PNG, JPEG or WebP image"
        ) from None
    if len(raw) > max_bytes:
        raise FieldError(field, f"image is {len(raw)} bytes; valid: at most {max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size  # from the header: nothing is decoded yet
            if w * h > max_pixels:
                raise FieldError(field, f"image is {w}x{h} pixels; valid: at most {max_pixels} pixels")
            img.load()
            if mode is None:  # as sent, with its text chunks (png-info)
                return img.copy()
            img = ImageOps.exif_transpose(img)
            return img.convert(mode)
    except FieldError:
        raise
    except Image.DecompressionBombError:
        raise FieldError(field, f"image has too many pixels; valid: at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FieldError(field, f"not a readable image ({e}); expected PNG, JPEG or WebP") from None


def encode_png_b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")
