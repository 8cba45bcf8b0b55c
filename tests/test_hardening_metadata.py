"""Infotext hardening: a linear-time parser (property-tested against A1111's regex), text chunks anywhere
in a PNG, bounded sizes, invalid UTF-8 named as such, no terminal escapes from untrusted metadata."""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusekit.metadata import (
    MAX_INFOTEXT_CHARS,
    GenerationInfo,
    MetadataError,
    format_infotext,
    param_pairs,
    parse_infotext,
    printable,
    read_infotext,
    to_generation_info,
)

# A1111's re_param (modules/infotext_utils.py), the reference the linear scanner must agree with
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(*extra_after_idat: bytes, before: bytes = b"") -> bytes:
    """A valid 1x1 gray PNG with `before` chunks ahead of IDAT and `extra_after_idat` after it."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0\x80"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + before + idat + b"".join(extra_after_idat) + chunk(b"IEND", b"")


LINE = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"


# --- bug 15: a parameters chunk after the image data ------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda t: chunk(b"tEXt", b"parameters\0" + t.encode("latin-1")),
        lambda t: chunk(b"zTXt", b"parameters\0\0" + zlib.compress(t.encode("latin-1"))),
        lambda t: chunk(b"iTXt", b"parameters\0\0\0\0\0" + t.encode()),
        lambda t: chunk(b"iTXt", b"parameters\0\1\0en\0\0" + zlib.compress(t.encode())),
    ],
    ids=["tEXt", "zTXt", "iTXt", "iTXt-compressed"],
)
def test_parameters_chunk_after_the_image_data_is_found(tmp_path, make):
    text = f"a cat\n{LINE}"
    path = tmp_path / "late.png"
    path.write_bytes(png(chunk(b"tEXt", b"Comment\0other"), make(text)))
    assert read_infotext(path) == text
    assert read_infotext(png(before=make(text))) == text  # and before it, from bytes
    with Image.open(io.BytesIO(png(make(text)))) as im:  # Pillow alone misses it without decoding
        assert "parameters" not in im.info


def test_invalid_utf8_is_reported_as_such(tmp_path, capsys):
    from diffusekit.cli import main

    path = tmp_path / "bad.png"
    path.write_bytes(png(before=chunk(b"iTXt", b"parameters\0\0\0\0\0caf\xe9 " + LINE.encode())))
    with pytest.raises(MetadataError, match=r"not valid UTF-8 \(bad byte at offset 3\)"):
        read_infotext(path)
    assert main(["info", str(path)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_sizes_are_bounded():
    bomb = zlib.compress(b"a" * (4 * MAX_INFOTEXT_CHARS + 10))
    with pytest.raises(MetadataError, match="inflates to more than"):
        read_infotext(png(chunk(b"zTXt", b"parameters\0\0" + bomb)))
    with pytest.raises(MetadataError, match="more than the limit"):
        parse_infotext("x" * (MAX_INFOTEXT_CHARS + 1))
    truncated = png(before=chunk(b"tEXt", b"parameters\0" + b"x" * 100))[:-60]
    with pytest.raises(MetadataError, match="truncated"):
        read_infotext(truncated)


# --- terminal escapes -----------------------------------------------------------------------------


def test_info_never_prints_terminal_escapes(tmp_path, capsys):
    from diffusekit.cli import main

    hostile = "\x1b]0;pwned\x07\x1b[2J red\rcat \x9b31m\u202e\n" + LINE
    path = tmp_path / "esc.png"
    path.write_bytes(png(chunk(b"iTXt", b"parameters\0\0\0\0\0" + hostile.encode())))
    for args in (["info", str(path)], ["info", str(path), "--json"]):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert not any(ord(c) < 0x20 and c not in "\n" for c in out)
        assert not any(0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in out)
    assert printable("a\x1b[31mb\tc\nd") == "a\\x1b[31mb\tc\nd"
    assert json.loads(json.dumps(parse_infotext(hostile)))["Prompt"].startswith("\x1b]0;")  # data intact


# --- bug 14: linear time -------------------------------------------------------------------------------


def _timed_info(tmp_path, capsys, size: int) -> float:
    from diffusekit.cli import main

    # the quadratic shape for A1111's regex: one long run of key characters with no colon
    text = "a prompt\n" + "word " * (size // 5) + ", " + LINE
    path = tmp_path / f"big{size}.png"
    path.write_bytes(png(chunk(b"tEXt", b"parameters\0" + text.encode())))
    t0 = time.process_time()  # CPU time: 8 engineers share 2 cores here, so wall time is mostly waiting
    assert main(["info", str(path), "--json"]) == 0
    elapsed = time.process_time() - t0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["Seed"] == "1" and parsed["Size-1"] == "64"
    return elapsed


def test_info_json_on_a_1_mb_parameters_chunk_is_fast(tmp_path, capsys):
    small = _timed_info(tmp_path, capsys, 100_000)
    big = _timed_info(tmp_path, capsys, 1_000_000)
    print(f"info --json CPU time: 100 KB {small:.3f} s, 1 MB {big:.3f} s")
    assert big < 1.0, f"1 MB took {big:.2f} s"  # was hours (over a minute at 100 KB)
    assert big < 10 * max(small, 0.01) * 3  # linear: 10x the text, not 100x the time


# --- Hypothesis: the scanner is A1111's regex, the parser round-trips, time is linear ------------------

LINE_CHARS = st.sampled_from(list('ab :,"\\-/\t é1_x'))


@FAST
@given(st.text(LINE_CHARS, max_size=30))
def test_scanner_equals_a1111_regex(line):
    assert param_pairs(line) == A1111_PARAM.findall(line)


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)
TYPED_KEYS = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
              "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength",
              "Clip skip", "Version"}  # fmt: skip
NAME = st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}[A-Za-z]", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    prompt=TEXT.filter(lambda t: t.strip() == t and not t.startswith("Negative prompt:")),
    negative=TEXT.filter(lambda t: t.strip() == t),
    steps=st.integers(1, 150),
    cfg=st.floats(0, 30, allow_nan=False).map(lambda v: round(v, 2)),
    seed=st.integers(0, 2**63 - 1),
    sampler=NAME,
    extra=st.dictionaries(NAME.filter(lambda k: k not in TYPED_KEYS),
                          TEXT.filter(lambda t: t.strip() == t and t and not t.startswith('"')), max_size=3),
)  # fmt: skip
def test_infotext_round_trip(prompt, negative, steps, cfg, seed, sampler, extra):
    info = GenerationInfo(prompt=prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed,
                          sampler=sampler, width=64, height=96, extras=dict(extra))  # fmt: skip
    back = to_generation_info(parse_infotext(format_infotext(info)))
    assert (back.prompt, back.negative_prompt) == (prompt, negative)
    assert (back.steps, back.cfg_scale, back.seed, back.sampler) == (steps, cfg, seed, sampler)
    assert (back.width, back.height) == (64, 96)
    assert back.extras == extra  # a WxH-looking value is split into K-1/K-2 and joined again


@settings(max_examples=10, deadline=None)
@given(unit=st.sampled_from(["word ", "a-b/c ", '"q\\"', ": ,", "x" * 7, "k: v, "]))
def test_parse_time_is_linear_in_size(unit):
    def cost(n: int) -> float:
        text = "p\n" + unit * (n // len(unit)) + ", " + LINE
        t0 = time.process_time()
        for _ in range(3):
            parse_infotext(text)
        return (time.process_time() - t0) / 3

    cost(1000)  # warm up
    small, big = min(cost(20_000) for _ in range(3)), min(cost(200_000) for _ in range(3))
    # 10x the size: about 10x the CPU time (quadratic would be 100x); a floor for timer resolution
    assert big < 30 * max(small, 1e-3), f"{unit!r}: 20k {small:.4f}s, 200k {big:.4f}s"
