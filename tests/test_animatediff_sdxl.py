"""AnimateDiff-SDXL motion modules (mm_sdxl_v10_beta layout: 3 levels, no mid-block module) in our SDXL
U-Net against diffusers' UNetMotionModel.from_unet2d and AnimateDiffSDXLPipeline on tiny random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusekit.animation.animatediff import inflate, load_motion_adapter
from diffusekit.animation.motion_lora import apply_motion_loras, load_motion_lora
from diffusekit.checkpoints.convert_unet import unet_config_to_diffusers, unet_to_diffusers
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.models.unet import size_embedding
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

FRAMES = 5


def _adapter_ref(cfg, seed=0):
    """A diffusers MotionAdapter shaped like the SDXL beta one (no mid-block module), all weights random."""
    from diffusers import MotionAdapter

    widths = tuple(m * cfg.unet.model_channels for m in cfg.unet.channel_mult)
    ref = MotionAdapter(block_out_channels=widths, motion_layers_per_block=cfg.unet.num_res_blocks,
                        motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                        use_motion_mid_block=False)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adxl")
    cfg, sd, path = make_checkpoint("tiny_sdxl", tmp)
    ref_adapter = _adapter_ref(cfg)
    ref_adapter.save_pretrained(tmp / "adapter")
    ours = load_motion_adapter(tmp / "adapter")
    assert ours.mid_block is None and len(ours.down_blocks) == 3
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp / "mm_sdxl_tiny.safetensors")
    return cfg, sd, path, ref_adapter, tmp


def test_original_sdxl_layout_round_trips_through_diffusers_converter(setup):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    cfg, sd, path, ref_adapter, tmp = setup
    original = load_motion_adapter(tmp / "mm_sdxl_tiny.safetensors")
    assert original.cfg == load_motion_adapter(tmp / "adapter").cfg
    assert original.cfg.channels == (32, 64, 64) and not original.cfg.mid_block
    converted = convert_animatediff_checkpoint_to_diffusers(dict(original.state_dict()))
    want = {k: v for k, v in ref_adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert sorted(converted) == sorted(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)


def test_full_size_sdxl_module_has_diffusers_layout():
    """mm_sdxl_v10_beta's shape (diffusers' animatediff-motion-adapter-sdxl-beta config), built on meta."""
    from diffusers import MotionAdapter as RefAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    from diffusekit.animation.motion_module import MotionAdapter, MotionConfig

    with torch.device("meta"):
        ref = RefAdapter(block_out_channels=(320, 640, 1280), motion_layers_per_block=2,
                         motion_max_seq_length=32, use_motion_mid_block=False)  # fmt: skip
        ours = MotionAdapter(MotionConfig(channels=(320, 640, 1280), mid_block=False))
    converted = convert_animatediff_checkpoint_to_diffusers(dict(ours.state_dict()))
    want = {k: v for k, v in ref.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert sorted(converted) == sorted(want)
    assert all(converted[k].shape == want[k].shape for k in want)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    print(f"SDXL motion module parameters: {n:,}")


def test_inflated_sdxl_unet_matches_unet_motion_model(setup):
    from diffusers import UNet2DConditionModel, UNetMotionModel

    cfg, sd, path, ref_adapter, tmp = setup
    unet2d = UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet))
    prefix = "model.diffusion_model."
    unet2d.load_state_dict(
        unet_to_diffusers({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, cfg.unet)
    )
    ref = UNetMotionModel.from_unet2d(unet2d, ref_adapter).eval()
    # diffusers 0.42.1's from_unet2d copies every U-Net weight but SDXL's add_embedding (it stays random)
    ref.add_embedding.load_state_dict(unet2d.add_embedding.state_dict())
    pipe = Pipeline.from_file(path, precision="fp32")
    adapter = load_motion_adapter(tmp / "mm_sdxl_tiny.safetensors")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(FRAMES, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g).expand(FRAMES, -1, -1)
    pooled = torch.randn(1, cfg.unet.adm_in_channels - 6 * cfg.unet.size_embed_dim, generator=g)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    y = torch.cat([pooled, size_embedding(ids, cfg.unet.size_embed_dim)], 1).expand(FRAMES, -1)
    t = torch.tensor(500.0)
    with torch.no_grad():
        # UNetMotionModel repeats the time and added embeddings over the frames itself
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        want = ref(x[None].transpose(1, 2), t, ctx, **kw).sample
        want = want.transpose(1, 2)[0]  # (F, 4, 8, 8)
        base = pipe.model.unet(x, t.expand(FRAMES), ctx, y)
        with inflate(pipe, adapter, FRAMES):
            got = pipe.model.unet(x, t.expand(FRAMES), ctx, y)
        after = pipe.model.unet(x, t.expand(FRAMES), ctx, y)
    rel = (got - want).abs().max() / want.abs().max()
    worst = float((got - want).abs().max())
    print(f"inflated SDXL U-Net vs UNetMotionModel: max abs {worst:.2e}, rel {float(rel):.2e}")
    assert rel < 1e-4
    assert (got - base).abs().max() > 1e-2  # the motion modules really act
    assert torch.equal(after, base)


def test_animatediff_sdxl_pipeline_end_to_end_with_a_motion_lora(setup):
    from diffusers import AnimateDiffSDXLPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline

    cfg, sd, path, ref_adapter, tmp = setup
    folder = write_diffusers_folder(sd, cfg, tmp / "sdxl_folder")
    base = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing="linspace")
    ref = AnimateDiffSDXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                  text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                  tokenizer_2=base.tokenizer_2, unet=base.unet, motion_adapter=ref_adapter,
                                  scheduler=scheduler)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.unet.add_embedding.load_state_dict(base.unet.add_embedding.state_dict())  # see the test above
    # a MotionLoRA for this SDXL module in diffusers' hub layout
    g = torch.Generator().manual_seed(9)
    lora = {}
    for name, p in load_motion_adapter(tmp / "adapter").named_parameters():
        if ".attention_blocks." in name and name.endswith(("to_k.weight", "to_out.0.weight")):
            proj = "to_out" if "to_out" in name else "to_k"
            stem = name.split(f".{proj}")[0].replace(".temporal_transformer", "")
            stem = stem.replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
            lora[f"unet.{stem}.processor.{proj}_lora.down.weight"] = torch.randn(2, p.shape[1], generator=g)
            lora[f"unet.{stem}.processor.{proj}_lora.up.weight"] = (
                torch.randn(p.shape[0], 2, generator=g) * 0.5
            )
    (tmp / "lora_xl").mkdir()
    save_file(lora, tmp / "lora_xl" / "diffusion_pytorch_model.safetensors")
    ref.load_lora_weights(str(tmp / "lora_xl"), adapter_name="tilt")
    ref.set_adapters(["tilt"], adapter_weights=[0.6])

    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(40 + i))
                       for i in range(FRAMES)])  # fmt: skip
    want = ref("a red circle", negative_prompt="gray", num_frames=FRAMES, num_inference_steps=4,
               guidance_scale=5.0, output_type="np", height=64, width=64,
               latents=noise.transpose(0, 1)[None]).frames[0]  # fmt: skip
    pipe = Pipeline.from_file(path, precision="fp32")
    params = GenerationParams(prompt="a red circle", negative_prompt="gray", steps=4, cfg_scale=5.0,
                              sampler="euler", schedule="normal", seed=40, prompt_mode="plain",
                              width=64, height=64, batch_size=FRAMES)  # fmt: skip
    adapter = load_motion_adapter(tmp / "mm_sdxl_tiny.safetensors")
    apply_motion_loras(adapter, [(load_motion_lora(tmp / "lora_xl"), 0.6)])
    with inflate(pipe, adapter, FRAMES):
        got = pipe.generate(params)
    ours = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in got.images])
    assert ours.shape == want.shape and want.std() > 0.05
    mad = np.abs(ours - want).reshape(FRAMES, -1).mean(1)
    print(f"AnimateDiff-SDXL end to end, mean pixel difference per frame: {(mad * 255).round(4)}/255")
    assert (mad < 1 / 255).all()


def test_sd15_module_in_an_sdxl_unet_is_a_clear_error(setup, tmp_path):
    from diffusekit.animation.motion_module import MotionAdapter, MotionConfig

    cfg, sd, path, ref_adapter, tmp = setup
    pipe = Pipeline.from_file(path, precision="fp32")
    with pytest.raises(ValueError, match="mm_sdxl"), inflate(pipe, MotionAdapter(MotionConfig(
            channels=(32, 64, 64, 64))), 4):  # fmt: skip
        pass


def test_cli_animatediff_on_an_sdxl_model(setup, tmp_path):
    from PIL import Image

    from diffusekit.cli import main

    cfg, sd, path, ref_adapter, tmp = setup
    out = tmp_path / "xl.webp"
    args = ["animate", "a red circle", "--model", str(path), "--mode", "animatediff",
            "--motion-module", str(tmp / "mm_sdxl_tiny.safetensors"), "--frames", "5", "--context", "3",
            "--overlap", "1", "--steps", "2", "--seed", "3", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.n_frames == 5
