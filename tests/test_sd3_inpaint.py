"""SD3 inpainting, outpainting and hires fix: diffusers parity, untouched pixels, sizes, infotext, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffusekit.checkpoints.sd3 import create_sd3
from diffusekit.checkpoints.single_file import load_state_dict
from diffusekit.cli import main
from diffusekit.inpainting import upscale_images, upscale_latents
from diffusekit.metadata import format_infotext, parse_infotext, read_infotext, to_generation_info
from diffusekit.models.sd3_configs import TINY_SD35
from diffusekit.params import GenerationParams
from diffusekit.pipeline import BatchNoise
from diffusekit.pipeline_sd3 import SD3Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def tiny35(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd35i") / "tiny35.safetensors"
    create_sd3(TINY_SD35, path, seed=5)
    return path


@pytest.fixture(scope="module")
def pipe(tiny35: Path) -> SD3Pipeline:
    return SD3Pipeline.from_file(tiny35, precision="fp32")


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _box_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def ref_inpaint(tiny35: Path, tmp_path_factory):
    """diffusers' StableDiffusion3InpaintPipeline on the same tiny weights (a folder written by us)."""
    from diffusekit.checkpoints.sd3_diffusers import write_sd3_diffusers_folder

    sd, _ = load_state_dict(tiny35)
    folder = write_sd3_diffusers_folder(
        sd,
        TINY_SD35,
        tmp_path_factory.mktemp("ref") / "folder",
        t5_tokenizer=tiny35.with_suffix(".spiece.model"),
    )
    ref = diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint_matches_diffusers(pipe: SD3Pipeline, ref_inpaint, strength: float) -> None:
    """Binary mask, no blur, diffusers' step count: the same final latents as StableDiffusion3InpaintPipeline
    with a 16-channel transformer (known region re-noised before each step, exact at the end)."""
    init, mask = _image(80, 64), _box_mask(80, 64, (16, 16, 64, 48))
    params = GenerationParams(prompt="a red barn", negative_prompt="fog", steps=8, cfg_scale=3.0, seed=9,
                              width=80, height=64, prompt_mode="plain", denoising_strength=strength,
                              img2img_steps="diffusers", mask_blur=0)  # fmt: skip
    result = pipe.generate(params, init_image=init, mask=mask)
    with torch.no_grad():
        lat = ref_inpaint(prompt="a red barn", negative_prompt="fog", image=init, mask_image=mask,
                          strength=strength, num_inference_steps=8, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(9), output_type="latent", width=80,
                          height=64, max_sequence_length=TINY_SD35.t5_max_length).images  # fmt: skip
    rel = ((result.latents - lat).abs().max() / lat.abs().max()).item()
    assert rel < 1e-5, rel
    # the pasted-back original: with no blur, every pixel outside the mask is the init image's
    out, src = np.asarray(result.images[0]), np.asarray(init)
    outside = np.asarray(mask) == 0
    assert out.shape == src.shape and np.array_equal(out[outside], src[outside])
    assert np.abs(out[~outside].astype(int) - src[~outside]).mean() > 5  # the masked area was repainted


def test_inpaint_blur_keeps_unmasked_pixels_and_infotext_round_trips(pipe: SD3Pipeline) -> None:
    init, mask = _image(64, 64, seed=1), _box_mask(64, 64, (24, 24, 40, 40))
    params = GenerationParams(prompt="a cat", steps=3, seed=4, width=64, height=64, denoising_strength=0.8,
                              mask_blur=4, batch_size=2)  # fmt: skip
    result = pipe.inpaint(params, init, mask)
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(4)))
    untouched = blurred == 0
    for img in result.images:
        out = np.asarray(img)
        assert out.shape == (64, 64, 3)
        assert np.array_equal(out[untouched], np.asarray(init)[untouched])
        assert not np.array_equal(out[24:40, 24:40], np.asarray(init)[24:40, 24:40])
    assert result.seeds == [4, 5]
    info = result.infos[0]
    text = format_infotext(info)
    assert "Mask blur: 4" in text and "Denoising strength: 0.8" in text and "Shift: 3" in text
    back = to_generation_info(parse_infotext(text))
    assert format_infotext(back) == text
    assert (back.seed, back.steps, back.width, back.height, back.denoising_strength) == (4, 3, 64, 64, 0.8)
    assert back.extras["Mask blur"] == "4"


def test_only_masked_changes_nothing_outside_the_padded_region(pipe: SD3Pipeline) -> None:
    init, mask = _image(96, 96, seed=2), _box_mask(96, 96, (40, 40, 56, 56))
    params = GenerationParams(prompt="a hat", steps=2, seed=1, width=64, height=64, mask_blur=0,
                              inpaint_full_res=True, inpaint_full_res_padding=8)  # fmt: skip
    result = pipe.inpaint(params, init, mask)
    out, src = np.asarray(result.images[0]), np.asarray(init)
    assert out.shape == src.shape  # "only masked" returns the whole picture
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], src[outside])
    assert "Inpaint area: Only masked" in result.infotexts[0]


def test_outpaint_extends_the_canvas_and_keeps_the_original(pipe: SD3Pipeline) -> None:
    img = _image(48, 64, seed=3)
    params = GenerationParams(prompt="a wide landscape", steps=2, seed=2, mask_blur=2, denoising_strength=1.0)
    result = pipe.outpaint(params, img, left=16, right=16)
    out = np.asarray(result.images[0])
    assert out.shape == (64, 80, 3)
    # the mask edge is blurred by 2 px; the original's interior further from it is untouched
    assert np.array_equal(out[:, 24:56], np.asarray(img)[:, 8:40])
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.outpaint(params, img, left=8)
    with pytest.raises(ValueError, match="conflicts with outpainting"):
        pipe.outpaint(params.replace(width=64), img, left=16, right=16)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix(pipe: SD3Pipeline, upscaler: str) -> None:
    params = GenerationParams(prompt="a castle", steps=3, seed=6, width=80, height=64, enable_hr=True,
                              hr_scale=2.0, hr_upscaler=upscaler, hr_second_pass_steps=2,
                              hr_denoising_strength=0.6)  # fmt: skip
    seen = []
    result = pipe.generate(params, callback=seen.append)
    assert result.images[0].size == (160, 128) and pipe.output_size(params) == (160, 128)
    assert result.latents.shape == (1, 16, 16, 20)
    assert [(p.pass_index, p.passes) for p in seen][0] == (1, 2) and seen[-1].pass_index == 2
    text = result.infotexts[0]
    assert "Size: 80x64" in text and "Hires upscale: 2" in text and "Hires steps: 2" in text
    assert "Denoising strength: 0.6" in text
    assert ("Hires upscaler: Latent" in text) == (upscaler == "latent")
    # the second pass starts from the upscaled first pass (latents, or the image through Lanczos and the
    # VAE encoder with the seed's first draw): the lower its strength, the nearer the result to that start
    base = pipe.generate(params.replace(enable_hr=False))
    if upscaler == "latent":
        start = upscale_latents(base.latents, (16, 20), "latent")
    else:
        start = pipe.encode_image(upscale_images(base.images, 160, 128), BatchNoise([6], torch.device("cpu")))
    up = np.asarray(pipe.decode(start)[0], dtype=np.float64)
    low = pipe.generate(params.replace(hr_denoising_strength=0.05)).images[0]
    d_low = np.abs(np.asarray(low, dtype=np.float64) - up).mean()
    d_high = np.abs(np.asarray(result.images[0], dtype=np.float64) - up).mean()
    assert d_low < 0.5 * d_high and d_low < 0.25 * np.abs(up - up.mean()).mean(), (d_low, d_high)
    again = pipe.generate(params).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(result.images[0]))  # same seed, same image
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate(params.replace(hr_scale=1.1))  # 88x64: 88 is not a multiple of 16


def test_cli_inpaint_outpaint_hires_with_an_sd3_file(tiny35: Path, tmp_path: Path) -> None:
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    _image(64, 64, seed=4).save(src)
    _box_mask(64, 64, (16, 16, 48, 48)).save(mask)
    common = ["--model", str(tiny35), "--steps", "2", "--seed", "3"]
    out = tmp_path / "inp.png"
    assert main(["inpaint", "a dog", *common, "--image", str(src), "--mask", str(mask), "--mask-blur", "2",
                 "-o", str(out)]) == 0  # fmt: skip
    assert "Mask blur: 2" in read_infotext(out) and Image.open(out).size == (64, 64)
    out2 = tmp_path / "out.png"
    assert main(["outpaint", "a dog", *common, "--image", str(src), "--right", "16", "-o", str(out2)]) == 0
    assert Image.open(out2).size == (80, 64)
    out3 = tmp_path / "hr.png"
    assert main(["generate", "a dog", *common, "--hires", "1.5", "--width", "64", "--height", "64",
                 "-o", str(out3)]) == 0  # fmt: skip
    assert Image.open(out3).size == (96, 96) and "Hires upscale: 1.5" in read_infotext(out3)
