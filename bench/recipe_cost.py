"""What the default model's recipe costs in arithmetic, and the fastest this CPU could possibly run it.

Usage: python bench/recipe_cost.py [--steps 4] [--json out.json]
Why it exists: issue #4 asks for the recipe in about 2 hours on a 2-core machine. This counts the
floating-point operations of one training step of every stage with the recipe's own objectives
(`torch.utils.flop_counter`: matmuls and convolutions, forward and backward), multiplies by the
recipe's step counts, and divides by the fp32 matmul rate this CPU sustains (a 2048x2048 matmul, the
most efficient kernel it has): a lower bound on the recipe's time that no kernel work can beat.
It also times each stage's step as the training loop runs it (`Trainer.train_step`: same objective,
fused AdamW, gradient clipping, EMA, the loop's precision for this device), for the time the recipe
would take at that rate; `--compile` times stage 2b's step under torch.compile as well, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusekit.models.clip import build_text_encoder
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL
from diffusekit.runtime import cpu_has_native_bf16
from diffusekit.train.loop import Trainer
from diffusekit.train.objectives import (
    LatentDiffusionObjective,
    LatentPool,
    TextToLatent,
    image_batch,
    vae_loss,
)
from diffusekit.train.recipe import Recipe, dataset_sampler

SMALL_POOL = 512  # images encoded for the U-Net stages' batches (the recipe's pool has 50,000)


def matmul_rate(side: int = 2048, repeats: int = 10) -> float:
    """Sustained fp32 GFLOP/s of one large matmul on this process's threads."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * side**3 * repeats / (time.perf_counter() - t0) / 1e9


def measure(trainer: Trainer, loss_fn, steps: int, count: bool = True) -> tuple[float | None, float]:
    """(GFLOP of one step, seconds per step): one step counted (or, with count=False, run uncounted, as
    a warm-up), then the fastest of `steps` timed ones, each the training loop's own step
    (`Trainer.train_step`)."""
    with FlopCounterMode(display=False) if count else contextlib.nullcontext() as counter:
        trainer.train_step(loss_fn, 0)
    seconds = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        trainer.train_step(loss_fn, step)
        seconds.append(time.perf_counter() - t0)
    return (counter.get_total_flops() / 1e9 if count else None), min(seconds)


def stage_costs(recipe: Recipe, steps: int, out: Path, compiled: bool) -> tuple[list[dict], dict | None]:
    """One row per recipe stage (steps, GFLOP per step, measured seconds per step) and, if `compiled`,
    stage 2b's step again with the U-Net and text encoder under torch.compile (None otherwise)."""
    sample, compiled_row = dataset_sampler(recipe), None
    vae = AutoencoderKL(recipe.model.vae)
    trainer = Trainer("vae", vae, recipe.vae, out)
    gflop, sec = measure(trainer, lambda m, s: vae_loss(m, image_batch(sample, recipe.vae.batch_size, s)[0],
                                                        recipe.kl_weight), steps)  # fmt: skip
    rows = [{"stage": "vae", "steps": recipe.vae.steps, "gflop_per_step": gflop, "seconds_per_step": sec}]

    vae.eval()
    with FlopCounterMode(display=False) as counter:
        pool = LatentPool.encode(vae, sample, SMALL_POOL)
    per_image = counter.get_total_flops() / 1e9 / SMALL_POOL
    t0 = time.perf_counter()
    LatentPool.encode(vae, sample, SMALL_POOL)
    per_image_s = (time.perf_counter() - t0) / SMALL_POOL
    rows.append({"stage": "latent pool", "steps": recipe.pool_size, "gflop_per_step": per_image,
                 "seconds_per_step": per_image_s})  # fmt: skip

    tokenizer = CLIPTokenizer.bundled()
    for name, cfg, objective in recipe.stages():
        model = TextToLatent(UNetModel(recipe.model.unet), build_text_encoder(recipe.model.text_encoders[0]))
        loss = LatentDiffusionObjective(
            pool, tokenizer, batch_size=cfg.batch_size, scaling_factor=0.3,
            caption_dropout=recipe.caption_dropout, objective=objective,
        )  # fmt: skip
        gflop, sec = measure(Trainer(name, model, cfg, out), loss, steps)
        rows.append({"stage": name, "steps": cfg.steps, "gflop_per_step": gflop, "seconds_per_step": sec})
        if compiled and name == "refine":
            model.unet, model.text_encoder = torch.compile(model.unet), torch.compile(model.text_encoder)
            t0 = time.perf_counter()
            _, sec_c = measure(Trainer(name, model, cfg, out), loss, steps, count=False)  # step 0 compiles
            compile_s = time.perf_counter() - t0 - steps * sec_c  # about: the timed steps vary a little
            compiled_row = {"stage": "refine, torch.compile", "compile_seconds": compile_s,
                            "seconds_per_step": sec_c, "eager_over_compiled": sec / sec_c}  # fmt: skip
    return rows, compiled_row


def total(rows: list[dict]) -> dict:
    """PFLOP, hours at the matmul peak and hours at the measured step times, summed over rows."""
    return {key: sum(r[key] for r in rows) for key in ("pflop", "floor_hours", "hours")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage (after one counted)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--compile", action="store_true", help="also time stage 2b under torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    rate = matmul_rate()
    with tempfile.TemporaryDirectory() as tmp:
        rows, compiled = stage_costs(Recipe(), max(2, args.steps), Path(tmp), args.compile)
    print(f"threads {torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}, "
          f"fp32 matmul {rate:.1f} GFLOP/s\n")  # fmt: skip
    for row in rows:
        row["pflop"] = row["steps"] * row["gflop_per_step"] / 1e6
        row["floor_hours"] = row["pflop"] * 1e6 / rate / 3600
        row["hours"] = row["steps"] * row["seconds_per_step"] / 3600
    print("| stage | steps | GFLOP/step | s/step | PFLOP | h at matmul peak | h at measured s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['steps']:,} | {r['gflop_per_step']:.2f} | {r['seconds_per_step']:.3f} "
              f"| {r['pflop']:.3f} | {r['floor_hours']:.2f} | {r['hours']:.2f} |")  # fmt: skip
    totals = {
        "all": total(rows),
        "without polish (--no-polish)": total([r for r in rows if not r["stage"].startswith("polish")]),
    }
    for name, t in totals.items():
        print(f"| **{name}** | | | | {t['pflop']:.3f} | **{t['floor_hours']:.2f}** | **{t['hours']:.2f}** |")
    if compiled:
        print(f"\nstage 2b's step under torch.compile: {compiled['seconds_per_step']:.3f} s "
              f"({compiled['eager_over_compiled']:.2f}x faster than eager) after "
              f"{compiled['compile_seconds']:.0f} s of compiling")  # fmt: skip
    if args.json:
        summary = {"threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
                   "matmul_gflops": rate, "totals": totals, "stages": rows, "compiled": compiled}  # fmt: skip
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
