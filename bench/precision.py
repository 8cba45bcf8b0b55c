"""What bf16 (the CPU fast path) costs against fp32: one U-Net step on real-size weights, and the
default model's prompt-adherence evaluation.

1. U-Net: one CFG call (batch 2, 512x512 latents at t=500) of the same fp16 single file loaded with
   `precision="fp32"` and with `precision="bf16"` (each in a fresh process), relative L2 and max error of
   the bf16 output against the fp32 one.
2. Eval: `diffusekit eval` of the shipped default model at fp32 and at bf16 (the auto rule runs that
   small model in fp32; this measures what forcing bf16 would cost).

Usage: python bench/precision.py [--model FILE] [--skip-eval] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "/work/bench-cache/sd15-random-fp16.safetensors"

UNET_CHILD = r"""
import sys, time, torch
from diffusekit.pipeline import Pipeline
path, precision, out = sys.argv[1:]
pipe = Pipeline.from_file(path, precision=precision)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, pipe.cfg.unet.in_channels, 64, 64, generator=g)
ctx = torch.randn(2, 77, pipe.cfg.unet.context_dim, generator=g)
with torch.inference_mode():
    pipe.unet_call(x, torch.full((2,), 500.0), ctx)  # warm-up
    t0 = time.perf_counter()
    y = pipe.unet_call(x, torch.full((2,), 500.0), ctx)
    print(time.perf_counter() - t0)
torch.save(y.float(), out)
"""


def unet_error(model: str) -> dict[str, float]:
    import torch  # the parent only loads the two outputs

    with tempfile.TemporaryDirectory() as tmp:
        outs, secs = {}, {}
        for precision in ("fp32", "bf16"):
            path = str(Path(tmp, f"{precision}.pt"))
            run = subprocess.run(
                [sys.executable, "-c", UNET_CHILD, model, precision, path],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            secs[precision] = float(run.stdout.strip().splitlines()[-1])
            outs[precision] = torch.load(path)
    ref, bf16 = outs["fp32"], outs["bf16"]
    return {
        "relative_l2": float((bf16 - ref).norm() / ref.norm()),
        "relative_max": float((bf16 - ref).abs().max() / ref.abs().max()),
        "fp32_s": secs["fp32"],
        "bf16_s": secs["bf16"],
    }


def eval_accuracy(precision: str, tmp: str) -> dict:
    path = Path(tmp, f"eval-{precision}.json")
    cmd = [sys.executable, "-m", "diffusekit.cli", "eval", "--precision", precision, "--json", str(path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(path.read_text())
    return {"overall": report["overall"], "held_out": report["held_out"],
            "categories": report["categories"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--out", default=None, help="folder for precision.json")
    args = ap.parse_args()
    result: dict = {"model": args.model, "unet": unet_error(args.model)}
    u = result["unet"]
    print(f"U-Net CFG step at 512, bf16 vs fp32: relative L2 {100 * u['relative_l2']:.2f}%, "
          f"max {100 * u['relative_max']:.2f}% ({u['bf16_s']:.2f} s vs {u['fp32_s']:.2f} s)")  # fmt: skip
    if not args.skip_eval:
        with tempfile.TemporaryDirectory() as tmp:
            result["eval"] = {p: eval_accuracy(p, tmp) for p in ("fp32", "bf16")}
        e = result["eval"]
        print(f"default model eval overall: fp32 {e['fp32']['overall']:.3f}, bf16 {e['bf16']['overall']:.3f} "
              f"({100 * (e['bf16']['overall'] - e['fp32']['overall']):+.1f} points)")  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "precision.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
