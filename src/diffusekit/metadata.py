"""A1111 "infotext": the generation parameters text that webui writes into every image it saves.

Layout (what ``format_infotext`` writes and ``parse_infotext`` reads)::

    prompt, possibly over
    several lines
    Negative prompt: negative prompt text
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

Values containing ``,`` ``:`` or a newline are written as JSON strings. In a PNG the text is stored in
a ``parameters`` text chunk (tEXt when it is latin-1, iTXt otherwise); JPEG and WebP files from A1111
carry it in the EXIF UserComment, which ``read_infotext`` also understands.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from .image_files import EXIF_IFD, PNG_KEY, USER_COMMENT, encode_image, open_source, write_atomic

NEGATIVE_PREFIX = "Negative prompt:"


@dataclass
class GenerationInfo:
    """Everything a generation records; None fields are left out of the infotext."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule_type: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model: str | None = None
    vae_hash: str | None = None
    vae: str | None = None
    variation_seed: int | None = None
    variation_seed_strength: float | None = None  # the variation pair is written only when this is non-zero
    denoising_strength: float | None = None
    clip_skip: int = 1  # written only when > 1, as A1111 does
    version: str | None = None  # always the last field
    extras: dict[str, Any] = field(default_factory=dict)  # "Hires upscale", "Lora hashes", ... in order


# (infotext key, GenerationInfo attribute, type) for the typed fields, in A1111's order; Size sits after Seed.
_TYPED_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Steps", "steps", int),
    ("Sampler", "sampler", str),
    ("Schedule type", "schedule_type", str),
    ("CFG scale", "cfg_scale", float),
    ("Seed", "seed", int),
    ("Model hash", "model_hash", str),
    ("Model", "model", str),
    ("VAE hash", "vae_hash", str),
    ("VAE", "vae", str),
    ("Variation seed", "variation_seed", int),
    ("Variation seed strength", "variation_seed_strength", float),
    ("Denoising strength", "denoising_strength", float),
    ("Clip skip", "clip_skip", int),
    ("Version", "version", str),
)

# ---------------------------------------------------------------------------------------------
# Writing


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it contains a comma, a colon or a newline."""
    text = _format_value(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_value(value: Any) -> str:
    # Whole floats print without ".0" ("CFG scale: 7"), as in infotexts made from the webui.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def generation_params(info: GenerationInfo) -> dict[str, Any]:
    """The ``Key: value`` fields of ``info`` in infotext order, without the None ones."""
    has_variation = bool(info.variation_seed_strength)
    size = f"{info.width}x{info.height}" if info.width is not None and info.height is not None else None
    params: dict[str, Any] = {
        "Steps": info.steps,
        "Sampler": info.sampler,
        "Schedule type": info.schedule_type,
        "CFG scale": info.cfg_scale,
        "Seed": info.seed,
        "Size": size,
        "Model hash": info.model_hash,
        "Model": info.model,
        "VAE hash": info.vae_hash,
        "VAE": info.vae,
        "Variation seed": info.variation_seed if has_variation else None,
        "Variation seed strength": info.variation_seed_strength if has_variation else None,
        "Denoising strength": info.denoising_strength,
        "Clip skip": info.clip_skip if info.clip_skip is not None and info.clip_skip > 1 else None,
    }
    # An extra with a standard key replaces that field in place, as the dict update in A1111 does.
    params.update(info.extras)
    if info.version is not None:
        params["Version"] = info.version
    return {k: v for k, v in params.items() if v is not None}


def format_infotext(info: GenerationInfo) -> str:
    """The A1111 infotext for ``info``: prompt, optional negative prompt line, parameters line."""
    # A key whose value equals the key itself is written alone (A1111 uses that for flags).
    line = ", ".join(k if v == k else f"{k}: {quote(v)}" for k, v in generation_params(info).items())
    negative = f"\n{NEGATIVE_PREFIX} {info.negative_prompt}" if info.negative_prompt else ""
    return f"{info.prompt}{negative}\n{line}".strip()


# ---------------------------------------------------------------------------------------------
# Reading

MAX_INFOTEXT_CHARS = 4 * 2**20  # an A1111 infotext is a few KB; larger text is refused, not parsed
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
# A key starts a maximal run of key characters (the lookbehind), skips spaces, "-" and "/" to its first
# word character, and must reach a colon: one attempt per run, so the search is linear.
_KEY = re.compile(r"(?<![\w \-/])[ \-/]*(\w[\w \-/]+):")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
_SPACE = re.compile(r"\s*")


class MetadataError(ValueError):
    """Image metadata that cannot be read as an infotext (too large, not valid text)."""


def param_pairs(line: str) -> list[tuple[str, str]]:
    r"""The ``Key: value`` pairs of a parameters line as A1111's ``re_param.findall`` gives, in linear time.

    A1111's pattern ``\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`` is tried at every start inside
    a long run of key characters that ends without a colon, each try scanning to the run's end
    (quadratic: 100 KB took a minute). A key can only begin a run (the character before a match is
    always a comma), so ``_KEY`` tries each run once and finds the same pairs.
    """
    pairs: list[tuple[str, str]] = []
    n, pos = len(line), 0
    while pos < n:
        key = _KEY.search(line, pos)
        if key is None:
            break
        value_start = _SPACE.match(line, key.end()).end()
        quoted = _QUOTED.match(line, value_start)
        if quoted is not None and (quoted.end() == n or line[quoted.end()] == ","):
            end = quoted.end()
        else:
            comma = line.find(",", value_start)
            end = n if comma == -1 else comma
        pairs.append((key.group(1), line[value_start:end]))
        pos = end + 1
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Fields of an infotext as strings, like A1111's ``parse_generation_parameters``, in linear time.

    Always has "Prompt" and "Negative prompt". A ``WxH`` value under key K becomes "K-1" and "K-2".
    The last line is read as parameters only if it holds at least 3 ``Key: value`` pairs; otherwise it is
    part of the prompt. Unlike A1111, no UI defaults (e.g. "Clip skip": "1") are filled in. Text longer
    than ``MAX_INFOTEXT_CHARS`` is refused with a MetadataError.
    """
    if not isinstance(text, str):
        raise TypeError(f"infotext must be a str, got {type(text).__name__}")
    if len(text) > MAX_INFOTEXT_CHARS:
        raise MetadataError(
            f"the infotext has {len(text):,} characters, more than the limit of {MAX_INFOTEXT_CHARS:,}"
        )
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []

    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        # Joining this way drops blank lines before the first text line, as A1111 does.
        target = negative if in_negative else prompt
        if target or line:
            target.append(line)

    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        if not value:
            continue  # A1111 skips empty values
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = _unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def _unquote(value: str) -> str:
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def to_generation_info(parsed: dict[str, str]) -> GenerationInfo:
    """Typed GenerationInfo from ``parse_infotext``'s dict; unknown keys go to ``extras`` in order."""
    info = GenerationInfo(prompt=parsed.get("Prompt", ""), negative_prompt=parsed.get("Negative prompt", ""))
    typed = {key: (attr, kind) for key, attr, kind in _TYPED_FIELDS}
    for key, value in parsed.items():
        if key in ("Prompt", "Negative prompt"):
            continue
        if key in typed:
            attr, kind = typed[key]
            setattr(info, attr, _convert(key, value, kind))
            continue
        pair = _size_pair(parsed, key)
        if pair is None:
            info.extras[key] = value
        elif pair:
            base, width, height = pair
            if base == "Size":
                info.width = _convert(f"{base}-1", width, int)
                info.height = _convert(f"{base}-2", height, int)
            else:
                info.extras[base] = f"{width}x{height}"
    return info


def _size_pair(parsed: dict[str, str], key: str) -> tuple[str, str, str] | tuple[()] | None:
    """For "K-1": (K, w, h); for "K-2" of a pair: () (already handled); otherwise None."""
    base, suffix = key[:-2], key[-2:]
    if suffix not in ("-1", "-2") or not base:
        return None
    first, second = parsed.get(f"{base}-1"), parsed.get(f"{base}-2")
    if first is None or second is None or not (str(first).isdigit() and str(second).isdigit()):
        return None
    return (base, first, second) if suffix == "-1" else ()


def _convert(key: str, value: Any, kind: type) -> Any:
    if kind is str:
        return str(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"infotext field {key!r} has value {value!r}; expected {expected}") from None


# ---------------------------------------------------------------------------------------------
# Image files


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str | None) -> Path:
    """Write ``image`` as PNG with ``infotext`` in a ``parameters`` chunk (tEXt if latin-1, else iTXt),
    atomically (see ``image_files.save_image``, which picks the format from the extension)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    write_atomic(path, encode_image(image, "PNG", infotext))
    return path


def read_infotext(source: str | os.PathLike[str] | bytes | Image.Image) -> str | None:
    """The infotext stored in an image (PNG ``parameters`` chunk anywhere in the file, else EXIF
    UserComment), or None. A path or bytes is read without decoding pixels; a PNG text chunk is found
    before or after the image data."""
    if isinstance(source, Image.Image):
        return _infotext_of(source)
    name, fp = open_source(source)
    try:
        return _read_infotext(fp, name)
    finally:
        if fp is not source:
            fp.close()


def _read_infotext(fp: BinaryIO, name: str) -> str | None:
    """The infotext of an open image file (see read_infotext)."""
    if fp.read(8) == PNG_SIGNATURE:
        return png_parameters(fp, name)
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:  # JPEG/WebP: the EXIF block is read with the header
                return _infotext_of(image)
    except MetadataError:
        raise
    except Image.DecompressionBombError as err:
        raise MetadataError(f"{name}: too many pixels to open safely ({_short(err)})") from None
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError, EOFError) as err:
        raise MetadataError(
            f"{name}: cannot read it as an image ({_short(err)}); expected a PNG, JPEG or WebP file"
        ) from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_KEYWORD_MAX = 80  # PNG keywords are 1-79 bytes, then a NUL


def png_parameters(fp: BinaryIO, name: str = "image") -> str | None:
    """The first ``parameters`` text chunk (tEXt, zTXt or iTXt, anywhere) of a PNG after its signature.

    Other chunks are skipped by seeking, so the pixels are never decoded; a compressed chunk is
    inflated only up to ``MAX_INFOTEXT_CHARS`` bytes. A truncated file ends the search.
    """
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return None
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"IEND":
            return None
        if kind not in _TEXT_CHUNKS:
            fp.seek(length + 4, os.SEEK_CUR)  # the data and the CRC
            continue
        keyword = fp.read(min(length, _KEYWORD_MAX))
        if not keyword.startswith(PNG_KEY.encode() + b"\0"):
            fp.seek(length - len(keyword) + 4, os.SEEK_CUR)
            continue
        if length > 4 * MAX_INFOTEXT_CHARS + _KEYWORD_MAX:
            raise MetadataError(
                f"{name}: the parameters chunk is {length:,} bytes, more than the limit of "
                f"{4 * MAX_INFOTEXT_CHARS:,}"
            )
        data = keyword + fp.read(length - len(keyword))
        if len(data) < length:
            raise MetadataError(
                f"{name}: the parameters chunk is truncated ({len(data):,} of {length:,} bytes)"
            )
        return _chunk_text(kind, data[len(PNG_KEY) + 1 :], name)


def _chunk_text(kind: bytes, body: bytes, name: str) -> str:
    """The text of a tEXt (latin-1), zTXt (method byte, zlib latin-1) or iTXt (UTF-8) chunk body."""
    if kind == b"tEXt":
        return _checked_size(body.decode("latin-1"), name)
    if kind == b"zTXt":
        return _checked_size(_inflate(body[1:], name).decode("latin-1"), name)
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, text
    if len(body) < 2:
        raise MetadataError(f"{name}: the parameters iTXt chunk is malformed (too short)")
    flag, rest = body[0], body[2:]
    parts = rest.split(b"\0", 2)
    if len(parts) < 3:
        raise MetadataError(f"{name}: the parameters iTXt chunk is malformed (missing separators)")
    raw = _inflate(parts[2], name) if flag else parts[2]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(
            f"{name}: the parameters chunk is not valid UTF-8 (bad byte at offset {e.start})"
        ) from None
    return _checked_size(text, name)


def _inflate(data: bytes, name: str) -> bytes:
    limit = 4 * MAX_INFOTEXT_CHARS
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise MetadataError(f"{name}: the compressed parameters chunk is corrupt ({e})") from None
    if len(out) > limit:
        raise MetadataError(f"{name}: the parameters chunk inflates to more than {limit:,} bytes")
    return out


def _checked_size(text: str, name: str) -> str:
    if len(text) > MAX_INFOTEXT_CHARS:
        raise MetadataError(
            f"{name}: the infotext has {len(text):,} characters; the limit is {MAX_INFOTEXT_CHARS:,}"
        )
    return text


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_KEY)
    if isinstance(text, str) and text:
        return str(text)  # PIL's iTXt is a str subclass; hand back a plain str
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    return _decode_user_comment(comment) if comment else None


def _decode_user_comment(raw: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte charset header, then the text (A1111 writes "UNICODE" + UTF-16-BE)."""
    if isinstance(raw, str):
        return raw.rstrip("\0") or None
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        # Big-endian per the EXIF spec; some writers use little-endian, which shows as "X\0" up front.
        little = len(body) >= 2 and body[0] != 0 and body[1] == 0
        text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif head == b"ASCII\0\0\0":
        text = body.decode("ascii", errors="replace")
    elif head == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="replace")
    else:
        utf8 = body if head == b"\0" * 8 else raw
        try:
            text = utf8.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MetadataError(f"the EXIF UserComment is not valid UTF-8 (byte {e.start})") from None
    return _checked_size(text.rstrip("\0"), "EXIF UserComment") or None


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (ESC, CSI, BEL, CR, ...) except newline and tab are
    shown as escapes like ``\\x1b``, so untrusted metadata cannot move the cursor or recolour output."""
    return _CONTROL.sub(_escape_control, text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
