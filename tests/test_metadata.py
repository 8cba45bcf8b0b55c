from __future__ import annotations

import io

import pytest
from PIL import Image

from diffusekit.metadata import (
    GenerationInfo,
    format_infotext,
    parse_infotext,
    quote,
    read_infotext,
    save_png,
    to_generation_info,
)

# An infotext in A1111's layout, written by hand: multi-line prompt, multi-line negative prompt,
# a split size value, and a JSON-quoted value that contains a comma and colons.
A1111_TEXT = """masterpiece, best quality, 1girl, (red scarf:1.2), snowy street
at night, <lora:filmgrain:0.6>
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, \
Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: R-ESRGAN 4x+, \
Hires resize: 1248x1824, Lora hashes: "filmgrain: 8a9c2e1f0b3d, grain2: 0123456789ab", Version: v1.10.1"""


def full_info() -> GenerationInfo:
    return GenerationInfo(
        prompt="a cat, (sitting:1.2)\non a mat",
        negative_prompt="blurry, lowres",
        steps=20,
        sampler="DPM++ 2M",
        schedule_type="Karras",
        cfg_scale=7.0,
        seed=1234,
        width=512,
        height=768,
        model_hash="6ce0161689",
        model="v1-5-pruned-emaonly",
        vae_hash="735e4c3a44",
        vae="vae-ft-mse-840000",
        variation_seed=99,
        variation_seed_strength=0.3,
        denoising_strength=0.7,
        clip_skip=2,
        version="diffusekit 0.1.0",
        extras={"Hires upscale": 2, "Hires upscaler": "Latent", "Lora hashes": "add_detail: 7c6bad76eb54"},
    )


def test_format_infotext_exact_layout():
    assert format_infotext(full_info()) == (
        "a cat, (sitting:1.2)\non a mat\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000, "
        "Variation seed: 99, Variation seed strength: 0.3, Denoising strength: 0.7, Clip skip: 2, "
        'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
        "Version: diffusekit 0.1.0"
    )


def test_format_leaves_out_defaults_and_empty_fields():
    info = GenerationInfo(
        prompt="a cat", steps=20, sampler="Euler a", cfg_scale=7.5, seed=1, width=512, height=512
    )
    info.variation_seed = 5  # no strength: A1111 leaves the variation pair out
    assert (
        format_infotext(info) == "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512"
    )


def test_flag_extras_are_written_alone():
    info = GenerationInfo(
        prompt="p", steps=1, seed=2, cfg_scale=3.0, extras={"Tiling": "Tiling", "Skip": None}
    )
    assert format_infotext(info).splitlines()[-1] == "Steps: 1, CFG scale: 3, Seed: 2, Tiling"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("Euler a", "Euler a"),
        ("a, b", '"a, b"'),
        ("key: value", '"key: value"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", then', '"say \\"hi\\", then"'),
        ("日本, 語", '"日本, 語"'),  # JSON without ASCII escapes
        (0.25, "0.25"),
        (3.0, "3"),
        (True, "True"),
    ],
)
def test_quote(value, written):
    assert quote(value) == written


def test_parse_handwritten_a1111_infotext():
    parsed = parse_infotext(A1111_TEXT)
    assert parsed == {
        "Prompt": (
            "masterpiece, best quality, 1girl, (red scarf:1.2), snowy street\nat night, <lora:filmgrain:0.6>"
        ),
        "Negative prompt": "lowres, bad anatomy, (worst quality:1.4)\nwatermark",
        "Steps": "28",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "3141592653",
        "Size-1": "832",
        "Size-2": "1216",
        "Model hash": "31e35c80fc",
        "Model": "sd_xl_base_1.0",
        "VAE hash": "235745af8d",
        "VAE": "sdxl_vae.safetensors",
        "Denoising strength": "0.45",
        "Clip skip": "2",
        "Hires upscale": "1.5",
        "Hires steps": "12",
        "Hires upscaler": "R-ESRGAN 4x+",
        "Hires resize-1": "1248",
        "Hires resize-2": "1824",
        "Lora hashes": "filmgrain: 8a9c2e1f0b3d, grain2: 0123456789ab",
        "Version": "v1.10.1",
    }


def test_handwritten_infotext_to_generation_info():
    info = to_generation_info(parse_infotext(A1111_TEXT))
    assert (info.steps, info.sampler, info.schedule_type, info.cfg_scale, info.seed) == (
        28,
        "DPM++ 2M",
        "Karras",
        6.5,
        3141592653,
    )
    assert (info.width, info.height, info.clip_skip, info.denoising_strength) == (832, 1216, 2, 0.45)
    assert (info.model, info.vae, info.version) == ("sd_xl_base_1.0", "sdxl_vae.safetensors", "v1.10.1")
    assert info.extras == {
        "Hires upscale": "1.5",
        "Hires steps": "12",
        "Hires upscaler": "R-ESRGAN 4x+",
        "Hires resize": "1248x1824",
        "Lora hashes": "filmgrain: 8a9c2e1f0b3d, grain2: 0123456789ab",
    }
    # writing it back gives the original text
    assert format_infotext(info) == A1111_TEXT


def test_parse_without_negative_prompt_or_parameters():
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
    # fewer than 3 "Key: value" pairs on the last line: it is part of the prompt
    parsed = parse_infotext("a cat\nstyle: oil, light: soft")
    assert parsed == {"Prompt": "a cat\nstyle: oil, light: soft", "Negative prompt": ""}
    parsed = parse_infotext("a dog\nSteps: 5, Seed: 7, CFG scale: 4")
    assert parsed == {"Prompt": "a dog", "Negative prompt": "", "Steps": "5", "Seed": "7", "CFG scale": "4"}


def test_round_trip_format_parse():
    info = full_info()
    info.extras = {k: str(v) for k, v in info.extras.items()}  # parsed values come back as text
    back = to_generation_info(parse_infotext(format_infotext(info)))
    assert back == info


def test_to_generation_info_reports_bad_numbers():
    with pytest.raises(ValueError, match="'Steps' has value 'many'; expected an integer"):
        to_generation_info({"Prompt": "p", "Steps": "many"})
    with pytest.raises(ValueError, match="'CFG scale' has value 'high'; expected a number"):
        to_generation_info({"CFG scale": "high"})


# ---------------------------------------------------------------------------------------------
# Files


def png_chunk_types(path) -> list[bytes]:
    data = path.read_bytes()
    pos, types = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def test_png_round_trip_latin1_uses_text_chunk(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "out.png", A1111_TEXT)
    assert b"tEXt" in png_chunk_types(path) and b"iTXt" not in png_chunk_types(path)
    assert read_infotext(path) == A1111_TEXT
    with Image.open(path) as image:
        assert read_infotext(image) == A1111_TEXT


def test_png_round_trip_non_latin1_uses_itxt(tmp_path):
    text = "桜の木, (夜:1.2)\nSteps: 20, Sampler: Euler, Seed: 1"
    path = save_png(Image.new("RGB", (8, 8)), str(tmp_path / "jp.png"), text)
    assert b"iTXt" in png_chunk_types(path)
    got = read_infotext(path)
    assert got == text and type(got) is str


def test_png_without_infotext(tmp_path):
    path = save_png(Image.new("L", (4, 4)), tmp_path / "plain.png", None)
    assert read_infotext(path) is None


def test_jpeg_exif_user_comment_as_a1111_writes_it(tmp_path):
    text = "a cat, 猫\nSteps: 20, Sampler: Euler a, Seed: 3"
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\0" + text.encode("utf-16-be")}
    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(path, format="JPEG", exif=exif)
    assert read_infotext(path) == text


def test_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="missing.png: no such file"):  # an ImageError, like the reader's
        read_infotext(missing)
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png: cannot read it as an image.*expected a PNG"):
        read_infotext(bogus)
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        save_png(io.BytesIO(), tmp_path / "x.png", "text")
