"""End to end: diffusekit's pipelines against diffusers' on the same tiny random weights, seeds, bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.metadata import parse_infotext
from diffusekit.params import GenerationParams, ParamError
from diffusekit.pipeline import Cancelled, Pipeline
from helpers import make_checkpoint

STEPS = 6
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry, gray"


def _pair(name, tmp_path, pipeline_cls):
    """(our Pipeline, diffusers pipeline with an Euler 'linspace' scheduler) over the same weights."""
    from diffusers import EulerDiscreteScheduler

    cfg, sd, path = make_checkpoint(name, tmp_path)
    folder = write_diffusers_folder(sd, cfg, tmp_path / "folder")
    ref = pipeline_cls.from_pretrained(folder, local_files_only=True)
    # k-diffusion's "normal" schedule is diffusers' Euler with timesteps linspace(999, 0, steps)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="linspace")
    ref.set_progress_bar_config(disable=True)
    return Pipeline.from_file(path, precision="fp32"), ref  # fp32: the bit-for-bit parity path


def _params(**kw) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=6.0, sampler="euler",
                schedule="normal", seed=1234, width=64, height=64, prompt_mode="plain")  # fmt: skip
    return GenerationParams(**(base | kw))


def _ref(pipe, **kw) -> np.ndarray:
    """The diffusers pipeline's images for the same prompt, steps, guidance and seed as _params()."""
    base = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(1234))  # fmt: skip
    return pipe(PROMPT, **(base | kw)).images


def _ours(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255 for im in result.images])  # (B, H, W, 3)


def _check_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert ref.std() > 0.05, "reference image is flat: the comparison would prove nothing"
    mad = np.abs(ours - ref).mean()
    worst = np.abs(ours - ref).max()
    print(f"pixel difference vs diffusers: mean {mad * 255:.4f}/255, max {worst * 255:.2f}/255")
    assert mad < 1 / 255, f"mean absolute pixel difference {mad * 255:.3f}/255"


def _image(seed: int, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(base[None], size=(size, size), mode="bilinear")[0]
    return Image.fromarray((up.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _mask(size: int = 64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


def test_txt2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    ours, ref = _pair("tiny_sd1", tmp_path, StableDiffusionPipeline)
    got = ours.generate(_params())
    want = _ref(ref, height=64, width=64)
    _check_close(_ours(got), want)


def test_v_prediction_txt2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    ours, ref = _pair("tiny_sd2_v", tmp_path, StableDiffusionPipeline)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    got = ours.generate(_params())
    want = _ref(ref, height=64, width=64)
    _check_close(_ours(got), want)


def test_zero_terminal_snr_txt2img_matches_diffusers(tmp_path):
    """A zero-SNR v model: our automatic schedule (trailing) against diffusers' Euler with the folder's
    rescale_betas_zero_snr and trailing spacing, from the pure-noise step down."""
    from diffusers import StableDiffusionPipeline

    from diffusekit.models.configs import preset

    cfg = replace(preset("tiny_sd2_v"), zero_terminal_snr=True)
    cfg, sd, path = make_checkpoint("tiny_sd2_v_zero_snr", tmp_path, cfg=cfg)
    ref = StableDiffusionPipeline.from_pretrained(write_diffusers_folder(sd, cfg, tmp_path / "folder"))
    ref.set_progress_bar_config(disable=True)
    assert ref.scheduler.config.rescale_betas_zero_snr and ref.scheduler.config.timestep_spacing == "trailing"
    ours = Pipeline.from_file(path, precision="fp32")
    assert ours.schedule.sigma_max == float(torch.tensor(2.0**24 - 1).sqrt())  # sqrt((1 - 2^-24) / 2^-24)
    got = ours.generate(_params(schedule="automatic", steps=5))  # "simple" is exact when steps divide 1000
    assert got.infos[0].schedule_type == "Simple"
    _check_close(_ours(got), _ref(ref, height=64, width=64, num_inference_steps=5))


def test_img2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, ref = _pair("tiny_sd1", tmp_path, StableDiffusionImg2ImgPipeline)
    init = _image(5)
    got = ours.img2img(_params(denoising_strength=0.6, img2img_steps="diffusers"), init)
    want = _ref(ref, image=init, strength=0.6)
    _check_close(_ours(got), want)


@pytest.mark.parametrize("name,strength", [("tiny_sd1_inpaint", 1.0), ("tiny_sd1", 0.75)])
def test_inpaint_matches_diffusers(tmp_path, name, strength):
    from diffusers import StableDiffusionInpaintPipeline

    ours, ref = _pair(name, tmp_path, StableDiffusionInpaintPipeline)
    init, mask = _image(6), _mask()
    params = _params(denoising_strength=strength, img2img_steps="diffusers", mask_blur=0)
    got = ours.inpaint(params, init, mask)
    raw = _ref(ref, image=init, mask_image=mask, strength=strength, height=64, width=64)
    # A1111 pastes the original back outside the mask; diffusers does it only when asked (apply_overlay)
    overlaid = ref.image_processor.apply_overlay(mask, init, ref.image_processor.numpy_to_pil(raw)[0])
    want = np.asarray(overlaid, dtype=np.float64)[None] / 255
    _check_close(_ours(got), want)
    keep = np.asarray(mask) == 0  # unmasked pixels are the original's exactly, not a VAE round trip
    assert np.array_equal(np.asarray(got.images[0])[keep], np.asarray(init)[keep])


def test_sdxl_txt2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours, ref = _pair("tiny_sdxl", tmp_path, StableDiffusionXLPipeline)
    got = ours.generate(_params())
    want = _ref(ref, height=64, width=64)
    _check_close(_ours(got), want)


# --- seeds, batches, metadata ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path_factory.mktemp("tiny"))
    return Pipeline.from_file(path)


def test_same_seed_same_image_and_batch_equals_singles(tiny):
    params = _params(sampler="Euler a", prompt_mode="a1111", batch_size=3, seed=77)
    batch = tiny.generate(params)
    again = tiny.generate(params)
    assert np.array_equal(_ours(batch), _ours(again))  # bit for bit
    singles = [tiny.generate(params.replace(batch_size=1, seed=77 + i)) for i in range(3)]
    # Image i of a batch is image seed+i made alone. Not bit for bit: CPU kernels sum in another
    # order at another batch size, so latents agree to float rounding and pixels within one level.
    single_latents = torch.cat([s.latents for s in singles])
    torch.testing.assert_close(
        batch.latents, single_latents, rtol=1e-5, atol=1e-5 * batch.latents.abs().max().item()
    )
    assert np.abs(_ours(batch) - np.concatenate([_ours(s) for s in singles])).max() <= 1 / 255 + 1e-9
    assert not np.array_equal(_ours(batch)[0], _ours(batch)[1])


def test_n_iter_continues_seeds_and_infotext_is_a1111(tiny):
    result = tiny.generate(
        _params(n_iter=2, batch_size=2, seed=10, sampler="DPM++ 2M Karras", schedule="automatic")
    )
    assert result.seeds == [10, 11, 12, 13]
    parsed = parse_infotext(result.infotexts[1])
    assert parsed["Seed"] == "11" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert (
        (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")
        and parsed["Model"] == "tiny_sd1"
        and len(parsed["Model hash"]) == 10
    )
    assert parsed["Negative prompt"] == NEGATIVE


def test_variation_seed_moves_the_image_smoothly(tiny):
    base = _ours(tiny.generate(_params(seed=3)))
    small = _ours(tiny.generate(_params(seed=3, subseed=9, subseed_strength=0.05)))
    large = _ours(tiny.generate(_params(seed=3, subseed=9, subseed_strength=0.9)))
    assert 0 < np.abs(base - small).mean() < np.abs(base - large).mean()


def test_hires_fix_outputs_the_upscaled_size(tiny):
    result = tiny.generate(_params(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2))
    assert result.images[0].size == (96, 96)
    assert parse_infotext(result.infotexts[0])["Hires upscale"] == "1.5"


def test_progress_and_cancel(tiny):
    seen = []
    tiny.generate(_params(), callback=seen.append)
    assert [p.step for p in seen] == list(range(1, STEPS + 1))
    import threading

    cancel = threading.Event()

    def stop_after_two(p):
        if p.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        tiny.generate(_params(), callback=stop_after_two, cancel=cancel)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(width=65), r"width=65 is out of range; valid: a multiple of 8 in 64\.\.4096"),
        (dict(height=8192), r"height=8192 is out of range"),
        (dict(steps=0), r"steps=0 is out of range; valid: 1\.\.150"),
        (dict(cfg_scale=-1.0), r"cfg_scale=-1\.0 is out of range; valid: 0\.0\.\.30\.0"),
        (dict(denoising_strength=1.5), r"denoising_strength=1\.5 is out of range"),
        (dict(sampler="Euler b"), r"unknown sampler 'Euler b'; valid: euler \('Euler'\)"),
        (dict(schedule="wobbly"), r"unknown schedule type 'wobbly'; valid: "),
    ],
)
def test_bad_params_name_field_and_valid_range(tiny, change, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(_params(**change))


def test_mask_size_mismatch_and_bad_prompt_weight(tiny):
    with pytest.raises(ValueError, match=r"mask size 32x32 differs from image size 64x64"):
        tiny.inpaint(_params(), _image(1), _mask(32))
    with pytest.raises(ParamError, match="prompt_mode"):
        tiny.generate(_params(prompt_mode="fancy"))


# --- inpainting variants, memory guard, CLI ------------------------------------------------------


def test_only_masked_changes_nothing_outside_the_padded_mask(tiny):
    init = _image(3, size=128)
    mask = np.zeros((128, 128), np.uint8)
    mask[80:100, 90:110] = 255
    params = _params(width=64, height=64, inpaint_full_res=True, inpaint_full_res_padding=8, mask_blur=2)
    out = np.asarray(tiny.inpaint(params, init, Image.fromarray(mask)).images[0])
    assert out.shape == (128, 128, 3)
    changed = np.abs(out.astype(int) - np.asarray(init).astype(int)).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and ys.min() >= 80 - 8 and xs.min() >= 90 - 8  # only near the mask (blur + pad)
    assert ys.max() < 100 + 8 and xs.max() < 110 + 8


def test_outpaint_extends_canvas_and_keeps_the_original(tiny):
    init = _image(4)
    # the size comes from the image and the pads (a different width/height would be an error)
    result = tiny.outpaint(_params(mask_blur=0, width=None, height=None), init, right=32, bottom=16)
    out = np.asarray(result.images[0])
    assert out.shape == (80, 96, 3)
    # the old area is pasted back from the original (A1111's overlay), while the new area is generated
    assert np.array_equal(out[:64, :64], np.asarray(init))


def test_memory_estimate_refuses_instead_of_dying(tiny, monkeypatch):
    from diffusekit.memory import MemoryBudgetError

    monkeypatch.setenv("DIFFUSEKIT_MEMORY_LIMIT_MB", "1")
    with pytest.raises(MemoryBudgetError, match=r"needs about .* GiB .* lower width/height or batch_size"):
        tiny.generate(_params(width=512, height=512))


def test_cli_generate_writes_png_with_infotext_and_info_reads_it(tmp_path, capsys):
    from diffusekit.cli import main

    _, _, model = make_checkpoint("tiny_sd1", tmp_path)
    out = tmp_path / "img.png"
    args = ["generate", "a red circle", "--model", str(model), "--steps", "3", "--seed", "5", "-o", str(out)]
    assert main([*args, "--batch", "2"]) == 0
    assert (tmp_path / "img-1.png").is_file() and (tmp_path / "img-2.png").is_file()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "img-2.png"), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["Seed"] == "6" and info["Steps"] == "3" and info["Model"] == "tiny_sd1"
    assert main([*args, "--sampler", "Euler b"]) == 2
    assert "unknown sampler 'Euler b'" in capsys.readouterr().err


def test_enum_params_equal_their_string_ids(tiny):
    from diffusekit.params import Sampler, Schedule

    by_enum = tiny.generate(_params(sampler=Sampler.DPMPP_2M, schedule=Schedule.KARRAS, steps=3))
    by_name = tiny.generate(_params(sampler="DPM++ 2M Karras", schedule="automatic", steps=3))
    assert np.array_equal(_ours(by_enum), _ours(by_name))
    assert by_enum.infotexts == by_name.infotexts


def test_variation_seeds_advance_with_the_image_index(tiny):
    result = tiny.generate(_params(seed=3, subseed=9, subseed_strength=0.5, n_iter=2, batch_size=2, steps=2))
    assert [i.variation_seed for i in result.infos] == [9, 10, 11, 12]
    assert [i.seed for i in result.infos] == [3, 4, 5, 6]


def test_outpaint_canvas_keeps_the_original_and_masks_only_the_new_area():
    from diffusekit.images import outpaint_canvas

    init = _image(4)
    canvas, mask = outpaint_canvas(init, left=8, right=16, top=0, bottom=24)
    assert canvas.size == mask.size == (88, 88)
    assert np.array_equal(np.asarray(canvas)[0:64, 8:72], np.asarray(init))
    m = np.asarray(mask)
    assert (m[0:64, 8:72] == 0).all() and (m[:, :8] == 255).all() and (m[64:] == 255).all()
    assert np.array_equal(np.asarray(canvas)[70, 8:72], np.asarray(init)[63])  # edges stretched outward
