"""LoRA training step against a full U-Net fine-tune step, and the run-time cost of an applied LoRA.

Usage: python bench/lora_step.py [--model PATH] [--batch 8] [--steps 8] [--rank 4] [--json out.json]
Both training steps use the same frozen-VAE latents, text, loss and fp32 AdamW on the bundled default model
(or --model); the LoRA step updates only the LoRA matrices (attention layers, as `train-lora --targets
attn`), the full step every U-Net parameter. Runs alternate (LoRA, full, LoRA, full ...) so load on a
shared machine hits both alike; each figure is the minimum over the steps after one warm-up step. The
inference part times one U-Net forward (batch 2, as a CFG step) plain, with the LoRA hooked in, and with
it merged (the pipeline's mode), and the merge's apply + remove time. Reports seconds and the ratios,
with the CPU kind.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from diffusekit.adapters.lora import apply_loras
from diffusekit.adapters.train_lora import LoraParameters, LoraTrainConfig, new_network
from diffusekit.checkpoints.load import load_model
from diffusekit.cli_generate import default_model_path
from diffusekit.runtime import cpu_has_native_bf16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    loaded = load_model(args.model or default_model_path())
    model = loaded.model.float()
    cfg = loaded.cfg
    model.requires_grad_(False)
    net = new_network(model, "bench", LoraTrainConfig(rank=args.rank, resolution=64), seed=0)
    for m in net.modules.values():  # non-zero up, so the update is really computed
        torch.nn.init.normal_(m.up, std=0.01)
    lora_params = LoraParameters(net)
    side = cfg.resolution // cfg.vae.downscale
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.unet.in_channels, side, side, generator=g)
    ctx = torch.randn(args.batch, 77, cfg.unet.context_dim, generator=g)
    t = torch.rand(args.batch, generator=g) * 999
    target = torch.randn(x.shape, generator=g)
    unet = model.unet
    opt_lora = torch.optim.AdamW(lora_params.parameters(), lr=1e-4)
    full_params = list(unet.parameters())
    opt_full = torch.optim.AdamW(full_params, lr=1e-6)

    def lora_step() -> float:
        t0 = time.perf_counter()
        with apply_loras(model, [(net, 1.0, 1.0)]):
            loss = (unet(x, t, ctx) - target).pow(2).mean()
        opt_lora.zero_grad()
        loss.backward()
        opt_lora.step()
        return time.perf_counter() - t0

    def full_step() -> float:
        for p in full_params:
            p.requires_grad_(True)
        t0 = time.perf_counter()
        loss = (unet(x, t, ctx) - target).pow(2).mean()
        opt_full.zero_grad()
        loss.backward()
        opt_full.step()
        dt = time.perf_counter() - t0
        for p in full_params:
            p.requires_grad_(False)
        return dt

    lora_t, full_t = [], []
    for i in range(args.steps + 1):
        a, b = lora_step(), full_step()
        if i:  # the first pair is warm-up
            lora_t.append(a)
            full_t.append(b)

    xi, ci, ti = x[:2], ctx[:2], t[:2]
    plain_t, hooked_t, merged_t, switch_t = [], [], [], []
    with torch.no_grad():
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            unet(xi, ti, ci)
            t1 = time.perf_counter()
            with apply_loras(model, [(net, 1.0, 1.0)]):
                unet(xi, ti, ci)
            t2 = time.perf_counter()
            applied = apply_loras(model, [(net, 1.0, 1.0)], merge=True)
            t3 = time.perf_counter()
            unet(xi, ti, ci)
            t4 = time.perf_counter()
            applied.remove()
            t5 = time.perf_counter()
            if i:
                plain_t.append(t1 - t0)
                hooked_t.append(t2 - t1)
                merged_t.append(t4 - t3)
                switch_t.append((t3 - t2) + (t5 - t4))
    trainable = sum(p.numel() for p in lora_params.parameters())
    result = {
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "rank": args.rank,
        "lora_layers": len(net.modules),
        "lora_parameters": trainable,
        "unet_parameters": sum(p.numel() for p in full_params),
        "lora_step_s": min(lora_t),
        "full_step_s": min(full_t),
        "full_over_lora": min(full_t) / min(lora_t),
        "unet_forward_s": min(plain_t),
        "unet_forward_with_lora_s": min(hooked_t),
        "lora_forward_overhead": min(hooked_t) / min(plain_t),
        "unet_forward_merged_s": min(merged_t),
        "merged_forward_overhead": min(merged_t) / min(plain_t),
        "merge_apply_and_remove_s": min(switch_t),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
