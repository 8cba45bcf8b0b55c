"""SD3/SD3.5 end to end: files, detection, diffusers folders, and images equal to StableDiffusion3Pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.sd3 import create_sd3, detect_sd3_config, is_sd3_file, load_sd3
from diffusekit.checkpoints.sd3_diffusers import read_sd3_diffusers_folder, write_sd3_diffusers_folder
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, save_state_dict
from diffusekit.checkpoints.surgery import strip_prefix
from diffusekit.cli import main
from diffusekit.metadata import read_infotext
from diffusekit.models.sd3 import StableDiffusion3
from diffusekit.models.sd3_configs import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    T5_PREFIX,
    TINY_SD3,
    TINY_SD35,
)
from diffusekit.params import GenerationParams
from diffusekit.pipeline_sd3 import SD3Options, SD3Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def tiny35(tmp_path_factory) -> Path:
    """A random-weight tiny SD3.5 file (MMDiT-X blocks, QK-norm) with its placeholder T5 tokenizer."""
    path = tmp_path_factory.mktemp("sd35") / "tiny35.safetensors"
    create_sd3(TINY_SD35, path, seed=3)
    return path


def _compare(ours: SD3Pipeline, ref, params: GenerationParams, t5_len: int) -> None:
    result = ours.generate(params)
    kw = dict(prompt=params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
              guidance_scale=params.cfg_scale, width=params.width, height=params.height,
              max_sequence_length=t5_len)  # fmt: skip
    seen = {}

    def keep_latents(pipe, i, t, tensors):  # the final latents, before diffusers decodes them
        seen["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        img = ref(**kw, generator=torch.Generator().manual_seed(params.seed), output_type="np",
                  callback_on_step_end=keep_latents).images[0]  # fmt: skip
    lat = seen["latents"]
    rel = ((result.latents - lat).abs().max() / lat.abs().max()).item()
    assert rel < 1e-5, rel
    ours_px = np.asarray(result.images[0]).astype(np.float64) / 255
    assert ours_px.shape == img.shape
    assert np.abs(ours_px - img).mean() < 1 / 255
    assert img.std() > 0.01  # not a degenerate image


def test_txt2img_matches_diffusers_with_t5(tiny35: Path, tmp_path: Path) -> None:
    sd, _ = load_state_dict(tiny35)
    folder = write_sd3_diffusers_folder(
        sd, TINY_SD35, tmp_path / "folder", t5_tokenizer=tiny35.with_suffix(".spiece.model")
    )
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = SD3Pipeline.from_file(tiny35, precision="fp32")
    assert ours.uses_t5
    params = GenerationParams(prompt="a photo of a cat", negative_prompt="blurry", steps=5, cfg_scale=4.0,
                              seed=7, width=80, height=64, prompt_mode="plain")  # fmt: skip
    _compare(ours, ref, params, TINY_SD35.t5_max_length)


def test_txt2img_without_t5_matches_diffusers(tmp_path: Path) -> None:
    path = tmp_path / "tiny3.safetensors"
    create_sd3(TINY_SD3, path, seed=4)
    sd, _ = load_state_dict(path)
    folder = write_sd3_diffusers_folder(sd, TINY_SD3, tmp_path / "folder")  # no T5 in the folder
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(
        folder, local_files_only=True, text_encoder_3=None, tokenizer_3=None
    )  # diffusers' way to run without T5
    ref.set_progress_bar_config(disable=True)
    ours = SD3Pipeline.from_file(path, precision="fp32", options=SD3Options(use_t5=False))
    params = GenerationParams(prompt="an astronaut riding a horse", steps=4, cfg_scale=3.0, seed=11, width=64,
                              height=64, prompt_mode="plain")  # fmt: skip
    _compare(ours, ref, params, TINY_SD3.t5_max_length)
    assert "T5: off" in ours.generate(params).infotexts[0]


def test_diffusers_folder_round_trip(tiny35: Path, tmp_path: Path) -> None:
    sd, _ = load_state_dict(tiny35)
    folder = write_sd3_diffusers_folder(
        sd, TINY_SD35, tmp_path / "f", t5_tokenizer=tiny35.with_suffix(".spiece.model")
    )
    back, cfg = read_sd3_diffusers_folder(folder)
    assert replace(cfg, name="x", resolution=64) == replace(TINY_SD35, name="x")  # keeps t5_max_length 16
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    # diffusers' own loaders: the folder, and its single-file converter reading our file
    ref = diffusers.SD3Transformer2DModel.from_pretrained(folder / "transformer")
    assert torch.equal(ref.pos_embed.pos_embed, sd["model.diffusion_model.pos_embed"])
    for cls, sub in ((diffusers.SD3Transformer2DModel, "transformer"), (diffusers.AutoencoderKL, "vae")):
        single = cls.from_single_file(tiny35, config=str(folder), subfolder=sub, local_files_only=True)
        pretrained = cls.from_pretrained(folder / sub).state_dict()
        got = single.state_dict()
        assert set(got) == set(pretrained) and all(torch.equal(got[k], pretrained[k]) for k in got), sub


@pytest.mark.parametrize("preset", [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE], ids=lambda c: c.name)
def test_detect_real_size_configs_from_shapes(preset) -> None:
    """Files without diffusekit metadata: the whole config comes from key names and shapes."""
    with torch.device("meta"):
        sd = StableDiffusion3(preset).state_dict()
    cfg = detect_sd3_config(sd, {}, "file")
    assert replace(cfg, name=preset.name, mmdit=replace(cfg.mmdit, pos_embed_base=64)) == replace(
        preset, mmdit=replace(preset.mmdit, pos_embed_base=64)
    )
    without_t5 = {k: v for k, v in sd.items() if not k.startswith(T5_PREFIX)}
    assert detect_sd3_config(without_t5, {}, "file").mmdit == cfg.mmdit
    # Stability's clip_l files may have no text_projection (its pooled output is used unprojected)
    unprojected = {k: v for k, v in sd.items() if k != CLIP_L_PREFIX + "text_projection.weight"}
    assert detect_sd3_config(unprojected, {}, "file").clip_l.projection_dim is None


def test_separate_text_encoder_files(tiny35: Path, tmp_path: Path) -> None:
    sd, meta = load_state_dict(tiny35)
    base = {k: v for k, v in sd.items() if not k.startswith("text_encoders.")}
    save_state_dict(base, tmp_path / "base.safetensors", metadata=meta)
    save_state_dict(
        strip_prefix(sd, CLIP_L_PREFIX), tmp_path / "clip_l.safetensors"
    )  # bare transformers keys
    save_state_dict(
        {k: v for k, v in sd.items() if k.startswith(CLIP_G_PREFIX)}, tmp_path / "clip_g.safetensors"
    )
    save_state_dict(strip_prefix(sd, T5_PREFIX), tmp_path / "t5.safetensors")
    # a bare CLIP file is placed by its width; the tiny encoders share one, so give CLIP-L prefixed here
    save_state_dict(
        {k: v for k, v in sd.items() if k.startswith(CLIP_L_PREFIX)}, tmp_path / "clip_l.safetensors"
    )
    files = [tmp_path / n for n in ("clip_l.safetensors", "clip_g.safetensors", "t5.safetensors")]
    loaded = load_sd3(tmp_path / "base.safetensors", text_encoders=files)
    got = loaded.model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    alone = load_sd3(tmp_path / "base.safetensors")
    assert alone.model.clip_l is None and "no t5 weights" in alone.notes
    with pytest.raises(ValueError, match="CLIP-L/CLIP-G"):
        SD3Pipeline(alone)


def test_file_errors(tiny35: Path, tmp_path: Path) -> None:
    from PIL import Image

    sd, meta = load_state_dict(tiny35)
    broken = dict(sd)
    broken.pop("model.diffusion_model.final_layer.linear.weight")
    with pytest.raises(CheckpointError, match="missing key"):
        from diffusekit.checkpoints.sd3 import build_sd3

        build_sd3(broken, TINY_SD35, name="broken")
    assert is_sd3_file(tiny35) and not is_sd3_file(tmp_path / "nothing.safetensors")
    pipe = SD3Pipeline.from_file(tiny35, precision="fp32")
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate(GenerationParams(prompt="x", steps=1, width=72, height=64))
    with pytest.raises(ValueError, match="not available for SD3"):
        pipe.generate(GenerationParams(prompt="x", steps=1, sampler="Euler a"))
    with pytest.raises(ValueError, match="mask needs an init image"):
        pipe.generate(GenerationParams(prompt="x", steps=1), mask=Image.new("L", (64, 64), 255))
    with pytest.raises(ValueError, match="flow-matching schedule"):
        pipe.generate(GenerationParams(prompt="x", steps=1, schedule="karras"))


def test_cli_create_generate_img2img(tmp_path: Path, capsys) -> None:
    model = tmp_path / "t.safetensors"
    assert main(["create", "tiny_sd35", str(model), "--seed", "1"]) == 0
    out = tmp_path / "a.png"
    args = [
        "generate",
        "a (red:1.2) cat BREAK on a mat",
        "--model",
        str(model),
        "--steps",
        "3",
        "--seed",
        "5",
    ]
    assert main([*args, "--slg", "2.5", "--sampler", "DPM++ 2M", "-o", str(out), "--json"]) == 0
    text = read_infotext(out)
    assert "Sampler: DPM++ 2M" in text and "Seed: 5" in text and "SLG scale: 2.5" in text
    out3 = tmp_path / "c.png"
    assert main([*args, "--t5-int8", "--t5-length", "8", "-o", str(out3)]) == 0
    assert "T5: int8" in read_infotext(out3)
    out2 = tmp_path / "b.png"
    assert main(["img2img", "a dog", "--model", str(model), "--image", str(out), "--steps", "4",
                 "--strength", "0.5", "--no-t5", "-o", str(out2)]) == 0  # fmt: skip
    assert "Denoising strength: 0.5" in read_infotext(out2)
    model.with_suffix(".spiece.model").unlink()
    assert main(["generate", "x", "--model", str(model), "--steps", "1", "-o", str(out2)]) == 2
    assert "no T5 tokenizer" in capsys.readouterr().err


def test_text_encoder_and_vae_parameter_counts() -> None:
    """Real-size CLIP-L, bigG (HF layout, with projections) and the 16-channel VAE against the references."""
    transformers = pytest.importorskip("transformers")
    from diffusekit.checkpoints.convert_clip import text_config_to_transformers
    from diffusekit.checkpoints.convert_vae import vae_config_to_diffusers
    from diffusekit.models.clip import CLIPTextModel
    from diffusekit.models.sd3_configs import SD3_CLIP_G, SD3_CLIP_L, SD3_VAE
    from diffusekit.models.vae import AutoencoderKL

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    for cfg, published in ((SD3_CLIP_L, 123_650_304), (SD3_CLIP_G, 694_659_840)):
        with torch.device("meta"):
            ref = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**text_config_to_transformers(cfg))
            )
        assert count(CLIPTextModel(cfg, device="meta")) == count(ref) == published
    with torch.device("meta"):
        ref_vae = diffusers.AutoencoderKL(**vae_config_to_diffusers(SD3_VAE))
    assert count(AutoencoderKL(SD3_VAE, device="meta")) == count(ref_vae) == 83_819_683


def test_cli_inspect_and_convert_round_trip(tiny35: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tiny35), "--no-hash"]) == 0
    report = capsys.readouterr().out
    assert "family      sd3 (preset tiny_sd35)" in report and "t5" in report and "mmdit" in report
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert main(["convert", str(tiny35), str(folder), "--format", "diffusers"]) == 0
    assert (folder / "tokenizer_3" / "spiece.model").is_file()
    assert main(["convert", str(folder), str(back)]) == 0
    assert back.with_suffix(".spiece.model").is_file()
    original, _ = load_state_dict(tiny35)
    again, _ = load_state_dict(back)
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert main(["convert", str(tiny35), str(tmp_path / "half.safetensors"), "--dtype", "bf16"]) == 0
    half, _ = load_state_dict(tmp_path / "half.safetensors")
    assert half["model.diffusion_model.context_embedder.weight"].dtype == torch.bfloat16


def test_memory_estimate_and_budget(tiny35: Path, monkeypatch) -> None:
    from diffusekit.memory import MemoryBudgetError

    pipe = SD3Pipeline.from_file(tiny35, precision="fp32")
    small = pipe.memory_estimate(GenerationParams(prompt="x", width=64, height=64))
    large = pipe.memory_estimate(GenerationParams(prompt="x", width=128, height=128, batch_size=2))
    assert 0 < small.unet < large.unet and small.resident > 0
    monkeypatch.setenv("DIFFUSEKIT_MEMORY_LIMIT_MB", "1")  # 1 MiB: nothing fits
    with pytest.raises(MemoryBudgetError, match="activations"):
        pipe.generate(GenerationParams(prompt="x", steps=1))


def test_fp8_and_bf16_files_load(tiny35: Path, tmp_path: Path) -> None:
    """Files with an fp8 (e4m3fn) T5 and a bf16 MMDiT, as shipped for SD3.5, load and generate."""
    import shutil

    sd, meta = load_state_dict(tiny35)
    mixed = {}
    for k, v in sd.items():
        if k.startswith(T5_PREFIX) and v.ndim == 2:
            v = v.to(torch.float8_e4m3fn)
        elif k.startswith("model.diffusion_model."):
            v = v.to(torch.bfloat16)
        mixed[k] = v
    path = tmp_path / "mixed.safetensors"
    save_state_dict(mixed, path, metadata=meta)
    shutil.copyfile(tiny35.with_suffix(".spiece.model"), path.with_suffix(".spiece.model"))
    pipe = SD3Pipeline.from_file(path, precision="fp32")
    assert pipe.model.t5.shared.weight.dtype == torch.float32
    result = pipe.generate(GenerationParams(prompt="a cat", steps=2, seed=3))
    assert np.asarray(result.images[0]).std() > 0


def test_img2img_matches_diffusers(tiny35: Path, tmp_path: Path) -> None:
    """img2img_steps="diffusers": same schedule tail, posterior sample and noise draws as
    StableDiffusion3Img2ImgPipeline, so the same image for the same seed."""
    from PIL import Image

    sd, _ = load_state_dict(tiny35)
    folder = write_sd3_diffusers_folder(
        sd, TINY_SD35, tmp_path / "folder", t5_tokenizer=tiny35.with_suffix(".spiece.model")
    )
    ref = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = SD3Pipeline.from_file(tiny35, precision="fp32")
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    params = GenerationParams(prompt="a red barn", negative_prompt="", steps=10, cfg_scale=3.0, seed=9,
                              width=80, height=64, prompt_mode="plain", denoising_strength=0.55,
                              img2img_steps="diffusers")  # fmt: skip
    result = ours.generate(params, init_image=init)
    with torch.no_grad():
        img = ref(prompt="a red barn", negative_prompt="", image=init, strength=0.55, num_inference_steps=10,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(9), output_type="np", width=80,
                  height=64, max_sequence_length=TINY_SD35.t5_max_length).images[0]  # fmt: skip
    ours_px = np.asarray(result.images[0]).astype(np.float64) / 255
    assert np.abs(ours_px - img).mean() < 1 / 255
    assert "Denoising strength: 0.55" in result.infotexts[0]


def test_unprojected_clip_l_converts_with_identity_projection(tiny35: Path, tmp_path: Path) -> None:
    """A clip_l without text_projection (Stability's files) keeps its pooled output through a folder."""
    from diffusekit.checkpoints.sd3 import build_sd3

    sd, _ = load_state_dict(tiny35)
    sd = {k: v for k, v in sd.items() if k != CLIP_L_PREFIX + "text_projection.weight"}
    cfg = replace(TINY_SD35, clip_l=replace(TINY_SD35.clip_l, projection_dim=None))
    ours, _ = build_sd3(sd, cfg, name="unprojected")
    back, back_cfg = read_sd3_diffusers_folder(write_sd3_diffusers_folder(sd, cfg, tmp_path / "f"))
    again, _ = build_sd3(back, back_cfg, name="folder")
    ids = torch.randint(0, 49000, (1, 77), generator=torch.Generator().manual_seed(0))
    ids[0, 5] = 49407
    with torch.no_grad():
        assert torch.allclose(ours.clip_l(ids).pooled, again.clip_l(ids).pooled, atol=1e-6)


def test_skip_ends_the_current_image_and_goes_on_with_the_next(tiny35: Path) -> None:
    """A1111's skip on SD3: the first of n_iter images ends at its x0 estimate, the second is untouched."""
    import threading

    ours = SD3Pipeline.from_file(tiny35, precision="fp32")
    params = GenerationParams(prompt="a red barn", steps=6, cfg_scale=3.0, seed=3, width=64, height=64,
                              n_iter=2, sampler="euler")  # fmt: skip
    full = ours.generate(params)
    skip, seen = threading.Event(), []

    def on_step(p) -> None:
        seen.append((p.batch, p.step))
        if p.batch == 0 and p.step == 2:
            skip.set()

    skipped = ours.generate(params, callback=on_step, skip=skip)
    assert [s for b, s in seen if b == 0] == [1, 2] and [s for b, s in seen if b == 1] == list(range(1, 7))
    first, second = (np.asarray(im) for im in skipped.images)
    assert not np.array_equal(first, np.asarray(full.images[0]))
    assert np.array_equal(second, np.asarray(full.images[1]))
