"""Cost of one stage-2 training step (U-Net + text encoder, forward, backward, AdamW) per U-Net layout.

Usage: python bench/train_step.py [--batch 64] [--steps 6] [--json out.json] [--precision]
Why it exists: the default model's VAE went from 8x to 4x downsampling (16x16 instead of 8x8 latents at
64 px). This measures, side by side in one process, what a step costs with the previous U-Net on 8x8
latents, the same U-Net on 16x16, and the narrower three-level U-Net that the recipe now uses on 16x16;
then the current U-Net with the training loop's kernels (`diffusekit.train.loop`: SDPA math backend,
fused AdamW) against PyTorch's defaults (flash attention on CPU, foreach AdamW).
Timing: the minimum over the steps after two warm-up steps, bf16 autocast as in the recipe.
`--precision` instead times the current U-Net's step with bf16 autocast against fp32, side by side: the
training loop autocasts only where the CPU computes bf16 natively (`diffusekit.train.loop`), because
elsewhere PyTorch emulates it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusekit.models.clip import build_text_encoder
from diffusekit.models.configs import DEFAULT, UNetConfig
from diffusekit.models.unet import UNetModel
from diffusekit.runtime import cpu_has_native_bf16

PREVIOUS = replace(DEFAULT.unet, model_channels=64, channel_mult=(1, 2), transformer_depth=(1, 1))
# name -> (U-Net, latent side, training-loop kernels (True) or PyTorch defaults (False))
LAYOUTS: dict[str, tuple[UNetConfig, int, bool]] = {
    "previous U-Net, 8x8 latents (8x VAE)": (PREVIOUS, 8, True),
    "previous U-Net, 16x16 latents (4x VAE)": (PREVIOUS, 16, True),
    "current U-Net, 16x16 latents (4x VAE)": (DEFAULT.unet, 16, True),
    "current U-Net, 16x16, PyTorch defaults (flash SDPA, foreach AdamW)": (DEFAULT.unet, 16, False),
}


def step_seconds(
    cfg: UNetConfig, side: int, batch: int, steps: int, ours: bool, bf16: bool = True
) -> tuple[float, int]:
    """(min seconds per step after warm-up, U-Net parameters)."""
    torch.manual_seed(0)
    unet, text = UNetModel(cfg), build_text_encoder(DEFAULT.text_encoders[0])
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4, fused=ours)
    backend = SDPBackend.MATH if ours else SDPBackend.FLASH_ATTENTION
    ids = torch.randint(0, 49407, (batch, 77))
    x = torch.randn(batch, cfg.in_channels, side, side)  # (B, 4, side, side)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(backend):
            context = text(ids, return_pooled=False).hidden  # (B, 77, 128)
            out = unet(x, torch.rand(batch) * 999, context).float()
        loss = (out - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[2:]), sum(p.numel() for p in unet.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--precision", action="store_true", help="bf16 autocast against fp32 instead")
    args = parser.parse_args()
    rows = []
    layouts = {name: (*layout, True) for name, layout in LAYOUTS.items()}
    if args.precision:
        print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
        current = (DEFAULT.unet, 16, True)
        layouts = {"current U-Net, bf16 autocast": (*current, True), "current U-Net, fp32": (*current, False)}
    print("| layout | U-Net params | s/step |\n|---|---:|---:|")
    for name, (cfg, side, ours, bf16) in layouts.items():
        seconds, params = step_seconds(cfg, side, args.batch, max(3, args.steps), ours, bf16)
        rows.append({"layout": name, "unet_params": params, "seconds_per_step": round(seconds, 3)})
        print(f"| {name} | {params / 1e6:.2f}M | {seconds:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            figures = {"batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}
            json.dump(figures | {"native_bf16": cpu_has_native_bf16()}, f, indent=2)
    if args.precision:
        bf16, fp32 = (row["seconds_per_step"] for row in rows)
        print(f"bf16 autocast / fp32: {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
