"""The int8 path's quality cost: the same prompts and seeds through the fp32 model and its int8 file.

Usage:
    python bench/int8_quality.py --model FP.safetensors --int8-model INT8.safetensors [--size 256]
                                 [--int8-model INT8-TE.safetensors ...] [--steps 8] [--prompts 2]
                                 [--out bench/results]

Per prompt, one image from `--model` with `--precision fp32` and one from `--int8-model` (made by
`diffusekit convert --quantize int8`), same seed, sampler (Euler) and CFG 7.5; reports the PSNR (dB) and
the mean absolute pixel difference (/255) of each pair and their mean. The prompts differ from the
calibration prompts (diffusekit/quantize.py), so this is not measured on what was calibrated on.
With several `--int8-model`s (e.g. one with int8 text encoders, `--int8-text-encoders`) each is
compared with fp32 and with the first one, same seeds (`--skip-fp32`: with the first one only, without
the fp32 model's memory). Writes OUT/int8_quality-<model stem>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

PROMPTS = (
    "a lighthouse on a cliff above a stormy sea, dramatic clouds",
    "a close-up photo of a tabby cat sleeping on a windowsill",
    "a bustling market street in marrakech, warm afternoon light",
    "an isometric illustration of a tiny wooden cabin in the snow",
)
NEGATIVE = "blurry, low quality"


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR in dB (inf when identical) and mean absolute difference / 255 of two uint8 RGB images."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff**2).mean())
    return {
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "mean_abs": diff.mean() / 255,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--int8-model", required=True, action="append")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--skip-fp32", action="store_true", help="compare the int8 files with each other only")
    args = ap.parse_args(argv)

    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    images = {}
    runs = [] if args.skip_fp32 else [("fp32", args.model, "fp32")]
    runs += [(p, p, "int8") for p in args.int8_model]
    for label, path, precision in runs:
        pipe = Pipeline.from_file(path, precision=precision)
        size = args.size or pipe.cfg.resolution
        images[label] = []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            params = GenerationParams(prompt=prompt, negative_prompt=NEGATIVE, steps=args.steps, seed=100 + i,
                                      sampler="Euler", cfg_scale=7.5, width=size, height=size)  # fmt: skip
            img = pipe.generate(params).images[0]
            images[label].append(np.asarray(img.convert("RGB")))
        del pipe
    first = args.int8_model[0]
    ref = images.get("fp32")
    pairs = [compare(b, a) for a, b in zip(ref, images[first], strict=True)] if ref else []
    others = {}
    for path in args.int8_model[1:]:
        vs_first = [compare(b, a) for a, b in zip(images[first], images[path], strict=True)]
        others[path] = {
            "pairs_vs_first_int8": vs_first,
            "psnr_db_mean_vs_first_int8": statistics.mean(p["psnr_db"] for p in vs_first),
            "mean_abs_mean_vs_first_int8": statistics.mean(p["mean_abs"] for p in vs_first),
        }
        if ref:
            vs_fp32 = [compare(b, a) for a, b in zip(ref, images[path], strict=True)]
            others[path] |= {
                "pairs_vs_fp32": vs_fp32,
                "psnr_db_mean_vs_fp32": statistics.mean(p["psnr_db"] for p in vs_fp32),
                "mean_abs_mean_vs_fp32": statistics.mean(p["mean_abs"] for p in vs_fp32),
            }
    result = {
        "model": args.model,
        "int8_model": first,
        "size": size,
        "steps": args.steps,
        "sampler": "Euler",
        "pairs": pairs,
        "psnr_db_mean": statistics.mean(p["psnr_db"] for p in pairs) if pairs else None,
        "mean_abs_mean": statistics.mean(p["mean_abs"] for p in pairs) if pairs else None,
        "other_int8_models": others,
        "load_average_end": os.getloadavg(),
    }
    out = Path(args.out) / f"int8_quality-{Path(args.model).stem}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
