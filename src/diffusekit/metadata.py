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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


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

# A key (a word character, then word characters, spaces, dashes or slashes), a colon, then either a
# JSON string or everything up to the next comma.
_PARAM = re.compile(
    r"""
    \s*(\w[\w \-/]+):\s*
    ("(?:\\.|[^\\"])+"|[^,]*)
    (?:,|$)
    """,
    re.VERBOSE,
)
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """Fields of an infotext as strings, like A1111's ``parse_generation_parameters``.

    Always has "Prompt" and "Negative prompt". A ``WxH`` value under key K becomes "K-1" and "K-2".
    The last line is read as parameters only if it holds at least 3 ``Key: value`` pairs; otherwise it is
    part of the prompt. Unlike A1111, no UI defaults (e.g. "Clip skip": "1") are filled in.
    """
    if not isinstance(text, str):
        raise TypeError(f"infotext must be a str, got {type(text).__name__}")
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        # Joining this way drops blank lines before the first text line, as A1111 does.
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _PARAM.findall(last):
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
    """Write ``image`` as PNG with ``infotext`` in a ``parameters`` chunk (tEXt if latin-1, else iTXt)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    pnginfo = PngImagePlugin.PngInfo()
    if infotext:
        try:
            infotext.encode("latin-1")
        except UnicodeEncodeError:
            pnginfo.add_itxt(PNG_KEY, infotext)
        else:
            pnginfo.add_text(PNG_KEY, infotext)
    image.save(path, format="PNG", pnginfo=pnginfo)
    return path


def read_infotext(source: str | os.PathLike[str] | Image.Image) -> str | None:
    """The infotext stored in an image (PNG ``parameters`` chunk, else EXIF UserComment), or None."""
    if isinstance(source, Image.Image):
        return _infotext_of(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a PNG, JPEG or WebP image")
    try:
        with Image.open(path) as image:
            return _infotext_of(image)
    except (UnidentifiedImageError, SyntaxError, OSError) as err:
        raise ValueError(
            f"{path}: cannot read it as an image ({err}); expected a PNG, JPEG or WebP file"
        ) from err


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_KEY)
    if isinstance(text, str) and text:
        return str(text)  # PIL's iTXt is a str subclass; hand back a plain str
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
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
    elif head == b"\0" * 8:
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0") or None
