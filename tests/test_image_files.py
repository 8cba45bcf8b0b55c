"""The one image reader and the one output writer: hostile files, every Pillow mode, atomic writes."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.image_files import (
    MAX_PIXELS,
    ImageError,
    check_output_path,
    load_image,
    save_image,
)
from diffusekit.metadata import read_infotext

TEXT = "a cat, 猫\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64"


def png_with_header(width: int, height: int, color_type: int = 3, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height; the pixel data is whatever `idat` holds (no decoding
    is needed to reach the size check, which is the point)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    plte = chunk(b"PLTE", b"\0\0\0") if color_type == 3 else b""
    idat = idat or zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- bug 3: decompression bombs are refused from the header, with our message, no Pillow warning -------


@pytest.mark.parametrize("side", [20000, 13000, 8193])
def test_oversized_images_are_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw DecompressionBombWarning would fail the test
        with pytest.raises(ImageError, match=r"bomb\.png: the image is .*pixels.*at most 67,108,864 pixels"):
            load_image(path)
        with pytest.raises(ImageError, match="at most 67,108,864"):
            load_image(path, mode="mask")
        assert read_infotext(path) is None  # `info` reads the chunks without decoding: no traceback


def test_the_pixel_limit_is_a_parameter():
    data = _png_bytes(Image.new("L", (64, 64), 128))
    assert load_image(data, mode="L").size == (64, 64)
    with pytest.raises(ImageError, match="64x64 \\(4,096 pixels\\); at most 4,095 pixels"):
        load_image(data, max_pixels=4095)
    assert MAX_PIXELS == 8192 * 8192


# --- bug 5: every Pillow mode maps to the right 8-bit picture ----------------------------------------


def _round_trip(img: Image.Image, fmt: str, mode: str = "L") -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return np.asarray(load_image(buf.getvalue(), mode=mode))


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    got = _round_trip(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(_png_bytes(Image.fromarray(ramp)))).mode == "I;16"
    np.testing.assert_allclose(got, ramp / 257.0, atol=0.5 + 1e-9)
    assert got.mean() < 140  # was all white (255) before


def test_float_tiff_in_0_1_is_scaled_to_0_255():
    rng = np.random.default_rng(0)
    values = rng.random((32, 32)).astype(np.float32)
    got = _round_trip(Image.fromarray(values), "TIFF")
    np.testing.assert_allclose(got, values * 255, atol=0.5 + 1e-4)
    nan = values.copy()
    nan[0, 0] = np.nan
    assert _round_trip(Image.fromarray(nan), "TIFF")[0, 0] == 0


def test_32_bit_integer_images():
    eight = np.arange(256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(_round_trip(Image.fromarray(eight), "TIFF"), eight)
    sixteen = eight * 257
    assert np.array_equal(_round_trip(Image.fromarray(sixteen), "TIFF"), eight)
    signed = eight - 128  # stretched from min..max
    assert _round_trip(Image.fromarray(signed), "TIFF").min() == 0
    assert _round_trip(Image.fromarray(signed), "TIFF").max() == 255


def test_transparency_is_flattened_onto_white_and_masks_use_alpha():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    rgb = _round_trip(rgba, "PNG", "RGB")
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[0, 7]) == (255, 255, 255)
    # A1111's mask rule: an image with real transparency is masked by its alpha
    mask = _round_trip(rgba, "PNG", "mask")
    assert mask[0, 0] == 255 and mask[0, 7] == 0
    # an opaque RGBA mask is read by its brightness
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert _round_trip(opaque, "PNG", "mask").min() == 255
    la = Image.new("LA", (4, 4), (0, 0))
    assert _round_trip(la, "PNG", "L").min() == 255


def test_palette_with_transparency_and_1_bit_and_cmyk():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    assert tuple(_round_trip(p, "PNG", "RGB")[0, 0]) == (10, 200, 30)
    p.putpixel((0, 0), 0)  # the transparent index becomes white
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    assert tuple(np.asarray(load_image(buf.getvalue()))[0, 0]) == (255, 255, 255)
    one = Image.new("1", (8, 8), 1)
    assert _round_trip(one, "PNG").min() == 255
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert tuple(_round_trip(cmyk, "TIFF", "RGB")[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --- what is not an image file ---------------------------------------------------------------------


def test_directories_devices_fifos_links_and_truncation_have_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="is a character device"):
        load_image("/dev/null")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ImageError, match="symbolic link loop"):
        load_image(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="symbolic link to a missing file"):
        load_image(dangling)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="path is empty"):
        load_image("")
    good = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="cut.png: the image data is truncated or corrupt"):
        load_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        load_image(text)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt():
        try:
            load_image(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the reader so the test run ends, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_image blocked on a FIFO")
    assert isinstance(outcome[0], ImageError) and "FIFO" in str(outcome[0])


def test_bytes_and_file_objects_are_accepted():
    data = _png_bytes(Image.new("RGB", (16, 8), "blue"))
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        assert load_image(source).size == (16, 8)
    f = io.BytesIO(data)
    load_image(f)
    assert not f.closed  # the caller's file stays the caller's
    with pytest.raises(ImageError, match="image data: not a readable image"):
        load_image(b"not an image")
    with pytest.raises(TypeError, match="path, bytes or a binary file"):
        load_image(42)


# --- bugs 6 and 7: the output writer -------------------------------------------------------------------


@pytest.mark.parametrize("name,magic", [("o.png", b"\x89PNG"), ("o.jpg", b"\xff\xd8"), ("o.jpeg", b"\xff\xd8"),  # noqa: E501
                                        ("o.webp", b"RIFF")])  # fmt: skip
def test_format_follows_the_extension_and_info_reads_it_back(tmp_path, name, magic):
    path = save_image(Image.new("RGB", (16, 16), "green"), tmp_path / name, TEXT)
    assert path.read_bytes().startswith(magic)
    assert read_infotext(path) == TEXT
    if magic != b"\x89PNG":  # A1111's EXIF UserComment: "UNICODE\0" then UTF-16-BE
        with Image.open(path) as im:
            raw = im.getexif().get_ifd(0x8769)[0x9286]
        assert raw == b"UNICODE\0" + TEXT.encode("utf-16-be")


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_image(Image.new("RGB", (4, 4)), tmp_path / "m.png", None)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_existing_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    script = (
        "import resource, sys, numpy as np\n"
        "from PIL import Image\n"
        "from diffusekit.image_files import save_image\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)\n"
        "try:\n"
        "    save_image(Image.fromarray(noise), sys.argv[1], 'x')\n"
        "except OSError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert "ERR cannot write" in out.stdout and "existing file is unchanged" in out.stdout, out
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_output_paths_are_checked_before_any_work(tmp_path):
    with pytest.raises(ImageError, match="output path is empty"):
        check_output_path("")
    with pytest.raises(ImageError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(ImageError, match="folder .*nope.* does not exist"):
        check_output_path(tmp_path / "nope" / "x.png")
    with pytest.raises(ImageError, match=r"extension '\.gif'; valid: \.png, \.jpg, \.jpeg, \.webp"):
        check_output_path(tmp_path / "x.gif")
    with pytest.raises(ImageError, match="has no extension"):
        check_output_path(tmp_path / "x")
    with pytest.raises(ImageError, match="not writable"):
        check_output_path("/proc/self/x.png")  # not writable even for root
    with pytest.raises(ImageError, match="do not fit a JPEG"):
        check_output_path(tmp_path / "x.jpg", prompt_chars=40_000)
    assert check_output_path(tmp_path / "x.png") == tmp_path / "x.png"
    assert list(tmp_path.iterdir()) == []  # the writability probe cleaned up


def test_cli_refuses_a_bad_output_before_loading_the_model(tmp_path, capsys):
    from diffusekit.cli import main

    missing_model = tmp_path / "no-model.safetensors"  # never reached: the output is checked first
    for out, message in ((tmp_path / "no" / "x.png", "does not exist"), (tmp_path, "is a directory"),
                         (tmp_path / "x.bmp", "valid: .png")):  # fmt: skip
        assert main(["generate", "x", "--model", str(missing_model), "-o", str(out)]) == 2
        assert message in capsys.readouterr().err


# --- Hypothesis: random modes, sizes and truncations never give anything but an image or an ImageError ---

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# mode -> formats that store it; every Pillow mode a file can carry
MODE_FORMATS = {
    "1": ("PNG", "TIFF", "BMP"), "L": ("PNG", "JPEG", "TIFF", "WEBP"), "LA": ("PNG", "TIFF"),
    "P": ("PNG", "GIF", "TIFF"), "RGB": ("PNG", "JPEG", "WEBP", "TIFF"), "RGBA": ("PNG", "WEBP", "TIFF"),
    "CMYK": ("JPEG", "TIFF"), "YCbCr": ("TIFF",), "I;16": ("PNG", "TIFF"), "I": ("TIFF",), "F": ("TIFF",),
}  # fmt: skip


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    probe = Image.new(mode, (1, 1))
    nbytes = len(Image.new(mode, size).tobytes()) or len(probe.tobytes())
    img = Image.frombytes(mode, size, rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    if mode == "P":
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return img


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(sorted(MODE_FORMATS)),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    seed=st.integers(0, 2**16),
    pick=st.integers(0, 3),
    out=st.sampled_from(["RGB", "RGBA", "L", "mask"]),
    cut=st.none() | st.floats(0, 1),
)
def test_reader_gives_an_image_or_an_image_error(mode, size, seed, pick, out, cut):
    fmt = MODE_FORMATS[mode][pick % len(MODE_FORMATS[mode])]
    img = _random_image(mode, size, seed)
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    if cut is not None:
        data = data[: int(len(data) * cut)]
    try:
        got = load_image(data, mode=out)
    except ImageError as e:
        assert cut is not None, f"{mode} {fmt} {size}: {e}"  # only a truncated file may be refused
        assert str(e).startswith("image data: ")
        return
    assert got.size == size and got.mode == ("L" if out == "mask" else out)
    arr = np.asarray(got)
    if cut is None and out == "L" and mode == "L" and fmt in ("PNG", "TIFF"):
        assert np.array_equal(arr, np.asarray(img))  # lossless gray stays exact
    if cut is None and out == "L" and mode == "I;16":
        np.testing.assert_allclose(arr, np.asarray(img) / 257.0, atol=0.5 + 1e-9)
