"""The OpenVINO backend's quality cost: the same prompts and seeds through several compute paths.

Usage:
    python bench/openvino_quality.py --model SD1.safetensors [--paths fp32,openvino,openvino-int8]
                                     [--size 512] [--steps 8] [--prompts 2] [--out bench/results]

Per prompt, one image per path (`Pipeline.from_file(model, precision=path)`), same seed, sampler (Euler)
and CFG 7.5; each image is compared with the first path's (the reference, normally fp32, our parity
path): PSNR (dB) and mean absolute pixel difference (/255), per pair and their mean. The prompts are
bench/int8_quality.py's, not the int8 calibration prompts. Also records each path's load time (the first
load of an OpenVINO path converts, and for int8 calibrates, then caches) and seconds per image.
Writes OUT/openvino_quality-<model stem>-<size>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_quality import NEGATIVE, PROMPTS, compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--paths", default="fp32,openvino,openvino-int8")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import torch

    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [p.strip() for p in args.paths.split(",")]
    images: dict[str, list[np.ndarray]] = {}
    runs: dict[str, dict] = {}
    size = args.size
    for path in paths:
        t0 = time.perf_counter()
        pipe = Pipeline.from_file(args.model, precision=path)
        load_s = time.perf_counter() - t0
        size = args.size or pipe.cfg.resolution
        images[path], seconds = [], []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            params = GenerationParams(prompt=prompt, negative_prompt=NEGATIVE, steps=args.steps, seed=100 + i,
                                      sampler="Euler", cfg_scale=7.5, width=size, height=size)  # fmt: skip
            s = time.perf_counter()
            img = pipe.generate(params).images[0]
            seconds.append(time.perf_counter() - s)
            images[path].append(np.asarray(img.convert("RGB")))
            print(f"[openvino_quality] {path} image {i}: {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
        info = dict(getattr(pipe.ov_unet, "info", None) or {})
        kept = {k: v for k, v in info.items() if k.endswith(("seconds", "samples"))}
        chosen = {"path": pipe.path.name, "reason": pipe.path.reason}
        runs[path] = {"load_s": load_s, "image_s": seconds, **chosen, **kept}
        del pipe
        gc.collect()
    ref = paths[0]
    result = {
        "model": args.model,
        "size": size,
        "steps": args.steps,
        "sampler": "Euler",
        "threads": torch.get_num_threads(),
        "reference": ref,
        "isa_caps": {
            k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ
        },
        "load_average_end": os.getloadavg(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "runs": runs,
        "vs_reference": {},
    }
    for path in paths[1:]:
        pairs = [compare(b, a) for a, b in zip(images[ref], images[path], strict=True)]
        result["vs_reference"][path] = {
            "pairs": pairs,
            "psnr_db_mean": statistics.mean(p["psnr_db"] for p in pairs),
            "mean_abs_mean": statistics.mean(p["mean_abs"] for p in pairs),
        }
    out = Path(args.out) / f"openvino_quality-{Path(args.model).stem}-{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
