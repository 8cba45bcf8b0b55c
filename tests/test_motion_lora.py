"""MotionLoRA against diffusers' AnimateDiffPipeline with `load_lora_weights(..., adapter_name=...)` on tiny
random weights: original `v2_lora_*.ckpt` layout and diffusers' hub layout, merged weights checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusekit.animation.animatediff import inflate, load_motion_adapter
from diffusekit.animation.motion_lora import (
    MotionLoraError,
    apply_motion_loras,
    load_motion_lora,
    parse_motion_lora,
)
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

FRAMES = 6
RANK = 4


def _adapter_ref(cfg, seed=0):
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


def _original_lora(adapter, seed: int) -> dict[str, torch.Tensor]:
    """A random MotionLoRA in the original v2_lora_*.ckpt layout: every temporal attention projection."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in adapter.named_parameters():
        projections = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
        if ".attention_blocks." not in name or not name.endswith(projections):
            continue
        base, proj = name.removesuffix(".weight").removesuffix(".0").rsplit(".", 1)
        stem = f"{base}.processor.{proj}_lora"
        out[f"{stem}.down.weight"] = torch.randn(RANK, p.shape[1], generator=g) * 0.3
        out[f"{stem}.up.weight"] = torch.randn(p.shape[0], RANK, generator=g) * 0.3
    return out


def _to_hub_layout(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The renames of diffusers' scripts/convert_animatediff_motion_lora_to_diffusers.py, plus `unet.`."""
    out = {}
    for k, v in original.items():
        k = k.replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
        out["unet." + k.replace(".temporal_transformer", "")] = v
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlora")
    cfg, sd, path = make_checkpoint("tiny_sd1", tmp)
    ref_adapter = _adapter_ref(cfg)
    ref_adapter.save_pretrained(tmp / "adapter")
    ours = load_motion_adapter(tmp / "adapter")
    zoom = _original_lora(ours, 1)
    torch.save(zoom, tmp / "v2_lora_ZoomIn.ckpt")
    pan = _original_lora(ours, 2)
    (tmp / "pan_left").mkdir()
    save_file(_to_hub_layout(pan), tmp / "pan_left" / "diffusion_pytorch_model.safetensors")
    return cfg, sd, path, ref_adapter, tmp, zoom, pan


def test_merged_weights_equal_a_direct_computation(setup):
    cfg, sd, path, ref_adapter, tmp, zoom, pan = setup
    adapter = load_motion_adapter(tmp / "adapter")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    a, b = load_motion_lora(tmp / "v2_lora_ZoomIn.ckpt"), load_motion_lora(tmp / "pan_left")
    assert len(a.pairs) == len(b.pairs) == len(zoom) // 2 and a.rank == RANK
    assert sorted(a.pairs) == sorted(b.pairs)  # both layouts name the same motion-module weights
    apply_motion_loras(adapter, [(a, 0.7), (b, -0.4)])
    after = adapter.state_dict()
    changed = 0
    for key, w0 in before.items():
        base = key.removesuffix(".weight").removesuffix(".0")
        stem = base.rsplit(".", 1)[0] + ".processor." + base.rsplit(".", 1)[1] + "_lora"
        if f"{stem}.down.weight" in zoom:
            want = w0 + 0.7 * zoom[f"{stem}.up.weight"] @ zoom[f"{stem}.down.weight"]
            want = want - 0.4 * pan[f"{stem}.up.weight"] @ pan[f"{stem}.down.weight"]
            torch.testing.assert_close(after[key], want, rtol=1e-5, atol=1e-6)
            changed += 1
        else:
            assert torch.equal(after[key], w0), key
    assert changed == len(zoom) // 2 and changed > 0


def test_peft_layout_reads_as_the_same_lora(setup, tmp_path):
    """What diffusers' save_lora_weights writes (PEFT names: `attn1.to_q.lora_A`, `to_out.0.lora_B`)."""
    cfg, sd, path, ref_adapter, tmp, zoom, pan = setup
    peft = {}
    for k, v in _to_hub_layout(zoom).items():
        stem, proj, side = k.removesuffix(".weight").rsplit(".", 2)  # (..attn1.processor, to_q_lora, down)
        proj = proj.removesuffix("_lora") + (".0" if proj == "to_out_lora" else "")
        ab = "lora_A" if side == "down" else "lora_B"
        peft[f"{stem.removesuffix('.processor')}.{proj}.{ab}.weight"] = v
    (tmp_path / "peft").mkdir()
    save_file(peft, tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    a, b = load_motion_lora(tmp / "v2_lora_ZoomIn.ckpt"), load_motion_lora(tmp_path / "peft")
    assert sorted(a.pairs) == sorted(b.pairs)
    assert all(torch.equal(x, y) for k in a.pairs for x, y in zip(a.pairs[k], b.pairs[k], strict=True))


def test_animatediff_pipeline_with_motion_loras(setup):
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    cfg, sd, path, ref_adapter, tmp, zoom, pan = setup
    folder = write_diffusers_folder(sd, cfg, tmp / "sd_folder")
    sd_ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    scheduler = EulerDiscreteScheduler.from_config(sd_ref.scheduler.config, timestep_spacing="linspace")
    ref = AnimateDiffPipeline(vae=sd_ref.vae, text_encoder=sd_ref.text_encoder, tokenizer=sd_ref.tokenizer,
                              unet=sd_ref.unet, motion_adapter=ref_adapter, scheduler=scheduler)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    (tmp / "zoom_hub").mkdir(exist_ok=True)
    save_file(_to_hub_layout(zoom), tmp / "zoom_hub" / "diffusion_pytorch_model.safetensors")
    ref.load_lora_weights(str(tmp / "zoom_hub"), adapter_name="zoom-in")
    ref.load_lora_weights(str(tmp / "pan_left"), adapter_name="pan-left")
    ref.set_adapters(["zoom-in", "pan-left"], adapter_weights=[0.8, 0.5])
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(40 + i))
                       for i in range(FRAMES)])  # our per-frame seeds: seed + i  # fmt: skip
    kw = dict(negative_prompt="gray", num_frames=FRAMES, num_inference_steps=5, guidance_scale=5.0,
              output_type="np", latents=noise.transpose(0, 1)[None])  # fmt: skip
    want = ref("a red circle", **kw).frames[0]
    ref.disable_lora()
    plain = ref("a red circle", **kw).frames[0]

    pipe = Pipeline.from_file(path, precision="fp32")
    params = GenerationParams(prompt="a red circle", negative_prompt="gray", steps=5, cfg_scale=5.0,
                              sampler="euler", schedule="normal", seed=40, prompt_mode="plain",
                              batch_size=FRAMES)  # fmt: skip
    adapter = load_motion_adapter(tmp / "adapter")
    loras = [(load_motion_lora(tmp / "v2_lora_ZoomIn.ckpt"), 0.8), (load_motion_lora(tmp / "pan_left"), 0.5)]
    apply_motion_loras(adapter, loras)
    with inflate(pipe, adapter, FRAMES):
        got = pipe.generate(params)
    ours = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in got.images])
    assert ours.shape == want.shape and want.std() > 0.05
    mad = np.abs(ours - want).reshape(FRAMES, -1).mean(1)
    lora_effect = np.abs(plain - want).reshape(FRAMES, -1).mean(1)
    print(f"MotionLoRA end to end, mean pixel difference per frame: {(mad * 255).round(4)}/255 "
          f"(LoRA effect {(lora_effect * 255).round(2)}/255)")  # fmt: skip
    assert (mad < 1 / 255).all()
    assert (lora_effect > 4 / 255).any()  # the LoRAs really change the frames


def test_parse_and_bad_files(setup, tmp_path):
    cfg, sd, path, ref_adapter, tmp, zoom, pan = setup
    assert parse_motion_lora("a/zoom.ckpt") == ("a/zoom.ckpt", 1.0)
    assert parse_motion_lora("a/zoom.ckpt:0.6") == ("a/zoom.ckpt", 0.6)
    assert parse_motion_lora("C:\\m\\zoom.ckpt:-1") == ("C:\\m\\zoom.ckpt", -1.0)
    with pytest.raises(MotionLoraError, match="must be a number"):
        parse_motion_lora("zoom.ckpt:strong")
    with pytest.raises(MotionLoraError, match="out of range"):
        parse_motion_lora("zoom.ckpt:9")
    with pytest.raises(MotionLoraError, match="not an AnimateDiff MotionLoRA"):
        load_motion_lora(tmp / "adapter")  # a motion module is not a LoRA
    with pytest.raises(MotionLoraError, match="no MotionLoRA at"):
        load_motion_lora(tmp_path / "missing.ckpt")
    half = {k: v for k, v in zoom.items() if ".up." not in k}
    torch.save(half, tmp_path / "half.ckpt")
    with pytest.raises(MotionLoraError, match="only its LoRA down half"):
        load_motion_lora(tmp_path / "half.ckpt")
    wide = {k: torch.cat([v, v], 1) if ".down." in k else v for k, v in zoom.items()}
    torch.save(wide, tmp_path / "wide.ckpt")
    adapter = load_motion_adapter(tmp / "adapter")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with pytest.raises(MotionLoraError, match="another motion module"):
        apply_motion_loras(adapter, [(load_motion_lora(tmp / "v2_lora_ZoomIn.ckpt"), 1.0),
                                     (load_motion_lora(tmp_path / "wide.ckpt"), 1.0)])  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())  # nothing half-applied


def test_cli_motion_lora(setup, tmp_path):
    from PIL import Image

    from diffusekit.cli import main

    cfg, sd, path, ref_adapter, tmp, zoom, pan = setup
    out = tmp_path / "ad.gif"
    args = ["animate", "a red circle", "--model", str(path), "--mode", "animatediff",
            "--motion-module", str(tmp / "adapter"),
            "--motion-lora", str(tmp / "v2_lora_ZoomIn.ckpt") + ":0.7",
            "--motion-lora", str(tmp / "pan_left"), "--frames", "4", "--steps", "2", "--seed", "5",
            "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.n_frames == 4
    info = tmp_path / "ad.frames" / "frame_000000.png"
    with Image.open(info) as im:
        assert "Motion LoRA" in im.info["parameters"] and "v2_lora_ZoomIn.ckpt:0.7" in im.info["parameters"]
    bad = ["animate", "x", "--model", str(path), "--mode", "travel", "--motion-lora", "z.ckpt",
           "--frames", "2", "-o", str(tmp_path / "b.gif")]  # fmt: skip
    assert main(bad) == 2  # --motion-lora outside animatediff: a one-line error
