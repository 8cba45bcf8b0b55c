"""AnimateDiff motion modules against diffusers' UNetMotionModel / AnimateDiffPipeline on tiny random
weights: from a diffusers MotionAdapter folder and from an original-layout file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusekit.animation.animatediff import WindowedUNet, context_windows, inflate, load_motion_adapter
from diffusekit.checkpoints.convert_unet import unet_config_to_diffusers, unet_to_diffusers
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.checkpoints.single_file import CheckpointError
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

FRAMES = 6


def _adapter_ref(cfg, seed=0):
    """A diffusers MotionAdapter shaped for `cfg`'s U-Net, every weight random (proj_out too)."""
    from diffusers import MotionAdapter

    widths = tuple(m * cfg.unet.model_channels for m in cfg.unet.channel_mult)
    ref = MotionAdapter(block_out_channels=widths, motion_layers_per_block=cfg.unet.num_res_blocks,
                        motion_num_attention_heads=8, motion_norm_num_groups=32,
                        motion_max_seq_length=32)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ad")
    cfg, sd, path = make_checkpoint("tiny_sd1", tmp)
    ref_adapter = _adapter_ref(cfg)
    ref_adapter.save_pretrained(tmp / "adapter")
    return cfg, sd, path, ref_adapter, tmp


def test_original_layout_is_what_diffusers_converts_from(setup):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    _, _, _, ref_adapter, tmp = setup
    ours = load_motion_adapter(tmp / "adapter")
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    converted = convert_animatediff_checkpoint_to_diffusers(dict(original))
    # diffusers' converter drops the fixed position tables, which its MotionAdapter recomputes
    want = {k: v for k, v in ref_adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert sorted(converted) == sorted(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)
    save_file(original, tmp / "mm_original.safetensors")
    again = load_motion_adapter(tmp / "mm_original.safetensors")
    assert again.cfg == ours.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), original.values(), strict=True))


@pytest.mark.parametrize("source", ["adapter", "mm_original.safetensors"])
def test_inflated_unet_matches_unet_motion_model(setup, source):
    from diffusers import UNet2DConditionModel, UNetMotionModel

    cfg, sd, path, ref_adapter, tmp = setup
    if not (tmp / source).exists():
        save_file(dict(load_motion_adapter(tmp / "adapter").state_dict()), tmp / source)
    unet2d = UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet))
    prefix = "model.diffusion_model."
    unet2d.load_state_dict(
        unet_to_diffusers({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, cfg.unet)
    )
    ref = UNetMotionModel.from_unet2d(unet2d, ref_adapter).eval()
    pipe = Pipeline.from_file(path, precision="fp32")
    adapter = load_motion_adapter(tmp / source)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(FRAMES, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor(500.0)
    with torch.no_grad():
        want = ref(x[None].transpose(1, 2), t, ctx.expand(FRAMES, -1, -1)).sample.transpose(1, 2)[
            0
        ]  # (F, 4, 8, 8)
        base = pipe.model.unet(x, t.expand(FRAMES), ctx.expand(FRAMES, -1, -1))
        with inflate(pipe, adapter, FRAMES):
            got = pipe.model.unet(x, t.expand(FRAMES), ctx.expand(FRAMES, -1, -1))
        after = pipe.model.unet(x, t.expand(FRAMES), ctx.expand(FRAMES, -1, -1))
    rel = (got - want).abs().max() / want.abs().max()
    print(
        f"inflated U-Net vs UNetMotionModel ({source}): "
        f"max abs {float((got - want).abs().max()):.2e}, rel {float(rel):.2e}"
    )
    assert rel < 1e-4
    assert (got - base).abs().max() > 1e-2  # the motion modules really act
    assert torch.equal(after, base)  # and leave the base U-Net as it was


def test_animatediff_pipeline_end_to_end(setup):
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    cfg, sd, path, ref_adapter, tmp = setup
    folder = write_diffusers_folder(sd, cfg, tmp / "sd_folder")
    sd_ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    scheduler = EulerDiscreteScheduler.from_config(sd_ref.scheduler.config, timestep_spacing="linspace")
    ref = AnimateDiffPipeline(vae=sd_ref.vae, text_encoder=sd_ref.text_encoder, tokenizer=sd_ref.tokenizer,
                              unet=sd_ref.unet, motion_adapter=ref_adapter, scheduler=scheduler)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_file(path, precision="fp32")
    params = GenerationParams(prompt="a red circle", negative_prompt="gray", steps=5, cfg_scale=5.0,
                              sampler="euler", schedule="normal", seed=40, prompt_mode="plain",
                              batch_size=FRAMES)  # fmt: skip
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(40 + i))
                       for i in range(FRAMES)])  # our per-frame seeds: seed + i  # fmt: skip
    want = ref("a red circle", negative_prompt="gray", num_frames=FRAMES, num_inference_steps=5,
               guidance_scale=5.0, output_type="np",
               latents=noise.transpose(0, 1)[None]).frames[0]  # fmt: skip
    with inflate(pipe, load_motion_adapter(tmp / "adapter"), FRAMES):
        got = pipe.generate(params)
    ours = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in got.images])
    assert ours.shape == want.shape and want.std() > 0.05
    mad = np.abs(ours - want).reshape(FRAMES, -1).mean(1)
    print(f"AnimateDiff end to end, mean pixel difference per frame: {(mad * 255).round(4)}/255")
    assert (mad < 1 / 255).all()


def test_context_windows_cover_every_frame_with_overlap():
    assert context_windows(10, 16, 4) == [list(range(10))]
    w = context_windows(40, 16, 4)
    assert [x[0] for x in w] == [0, 12, 24] and w[-1][-1] == 39
    assert set().union(*map(set, w)) == set(range(40))


def test_windows_of_the_full_length_equal_one_pass(setup):
    cfg, sd, path, ref_adapter, tmp = setup
    pipe = Pipeline.from_file(path, precision="fp32")
    adapter = load_motion_adapter(tmp / "adapter")
    x = torch.randn(2 * FRAMES, 4, 8, 8)
    ctx = torch.randn(2 * FRAMES, 77, cfg.unet.context_dim)
    t = torch.full((2 * FRAMES,), 300.0)
    with torch.no_grad(), inflate(pipe, adapter, FRAMES):
        whole = pipe.model.unet(x, t, ctx)
        windowed = WindowedUNet(pipe.model.unet.unet, adapter, FRAMES, length=4, overlap=2)(x, t, ctx)
    assert windowed.shape == whole.shape and not torch.equal(windowed, whole)
    assert torch.isfinite(windowed).all()


def test_wrong_files_and_wrong_models_are_clear_errors(setup, tmp_path):
    cfg, sd, path, ref_adapter, tmp = setup
    with pytest.raises(CheckpointError, match="no motion-module weights"):
        load_motion_adapter(path)
    pipe = Pipeline.from_file(path, precision="fp32")
    small = replace(load_motion_adapter(tmp / "adapter").cfg, channels=(64, 128, 128))
    from diffusekit.animation.motion_module import MotionAdapter

    with (
        pytest.raises(ValueError, match="AnimateDiff modules are for SD1.x"),
        inflate(pipe, MotionAdapter(small), 4),
    ):
        pass


def test_cli_animatediff_with_windows_and_prompt_travel(setup, tmp_path):
    from PIL import Image

    from diffusekit.cli import main

    cfg, sd, path, ref_adapter, tmp = setup
    out = tmp_path / "ad.webp"
    prompts = '{"0": "a red circle", "5": "a blue square"}'
    args = ["animate", "x", "--model", str(path), "--mode", "animatediff",
            "--motion-module", str(tmp / "adapter"),
            "--prompts", prompts, "--frames", "6", "--context", "4", "--overlap", "2", "--steps", "2",
            "--seed", "5", "-o", str(out), "--json"]  # fmt: skip
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.n_frames == 6
    assert (
        main(
            [
                "animate",
                "x",
                "--model",
                str(path),
                "--mode",
                "animatediff",
                "--frames",
                "4",
                "-o",
                str(tmp_path / "b.gif"),
            ]
        )
        == 2
    )  # fmt: skip  (no --motion-module: a one-line error)
