"""Which nncf settings the OpenVINO int8 U-Net needs: PSNR against the fp32 graph per setting, one run.

Usage:
    python bench/openvino_int8_settings.py --model MODEL [--size 64] [--steps 20] [--prompts 4]
                                           [--only name,name] [--out bench/results]

Loads MODEL with `--precision openvino` (the fp32 graph, cached), generates bench/int8_quality.py's
prompts (Euler, CFG 7.5, seeds 100+i) as the reference, captures 32 U-Net calls' inputs while sampling
the calibration prompts (4 prompts x 8 steps), then for each setting quantizes the fp32 graph with
`quantize_int8` on 8 (or 32) of those samples, generates the same images through the int8 graph and
reports PSNR and mean absolute pixel difference against the reference. Nothing is cached for the int8
graphs made here. Writes OUT/openvino_int8_settings-<model stem>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_quality import NEGATIVE, PROMPTS, compare  # noqa: E402


def settings(backend) -> dict[str, tuple]:
    """name -> (Int8Calibration, how many samples)."""
    cal, keep = backend.Int8Calibration, backend.KEEP_FP32
    return {
        "nncf-defaults": (cal(ranges="minmax", ignored=()), 8),
        "mean-minmax": (cal(ignored=()), 8),
        "default": (cal(), 8),
        "default-32-samples": (cal(), 32),
        "default+sdpa-fp32": (cal(ignored=keep + (r".*scaled_dot_product_attention.*",)), 8),
        "default-no-outliers": (cal(ranges="mean_no_outliers_minmax"), 8),
        "default-histogram": (cal(ranges="histogram"), 8),
        "default+smoothquant": (cal(smooth_quant_alpha=0.95), 8),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--only", help="comma-separated setting names")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    from diffusekit.accel import openvino_backend as backend
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    pipe = Pipeline.from_file(args.model, precision="openvino")
    fp32 = pipe.ov_unet
    size = args.size or pipe.cfg.resolution

    def images() -> list[np.ndarray]:
        out = []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            params = GenerationParams(prompt=prompt, negative_prompt=NEGATIVE, steps=args.steps, seed=100 + i,
                                      sampler="Euler", cfg_scale=7.5, width=size, height=size)  # fmt: skip
            out.append(np.asarray(pipe.generate(params).images[0].convert("RGB")))
        return out

    reference = images()
    samples = backend.capture_calibration(pipe, fp32, backend.Int8Calibration(prompts=4, steps=8, size=size))
    table = settings(backend)
    chosen = args.only.split(",") if args.only else list(table)
    results = {}
    for name in chosen:
        calibration, n = table[name]
        subset = samples[:: max(1, len(samples) // n)][:n]
        t0 = time.perf_counter()
        graph = backend.quantize_int8(fp32.model, subset, calibration)
        pipe.ov_unet = backend.OpenVinoUNet(graph, precision="openvino-int8", threads=fp32.threads)
        quantize_s = time.perf_counter() - t0
        pairs = [compare(b, a) for a, b in zip(reference, images(), strict=True)]
        pipe.ov_unet = fp32
        results[name] = {
            "samples": len(subset),
            "quantize_s": quantize_s,
            "psnr_db": [p["psnr_db"] for p in pairs],
            "psnr_db_mean": float(np.mean([p["psnr_db"] for p in pairs])),
            "mean_abs_mean": float(np.mean([p["mean_abs"] for p in pairs])),
        }
        print(f"[openvino_int8_settings] {name}: {results[name]['psnr_db_mean']:.2f} dB", file=sys.stderr)
    report = {"model": args.model, "size": size, "steps": args.steps, "prompts": args.prompts,
              "load_average_end": os.getloadavg(), "settings": results}  # fmt: skip
    out = Path(args.out) / f"openvino_int8_settings-{Path(args.model).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
