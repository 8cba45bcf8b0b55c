"""Batching compatible jobs, without the server: N jobs (different prompts and seeds) as one sampler run
(jobs.batch) against the same N jobs run one at a time through Pipeline.generate, alternating, in one
process. Also the largest pixel difference between the two ways.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/batch_jobs.py --jobs 8 --steps 8 --size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusekit.cli_generate import default_model_path  # noqa: E402
from diffusekit.jobs.batch import batchable, generate_batch  # noqa: E402
from diffusekit.params import GenerationParams  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from serve_load import cpu_kind  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pipe = Pipeline.from_file(default_model_path())
    base = GenerationParams(
        steps=args.steps, width=args.size, height=args.size, sampler="Euler a", cfg_scale=2.0
    )
    params = [base.replace(prompt=f"a red circle number {i}", seed=100 + i) for i in range(args.jobs)]
    pipe.generate(params[0])  # warm-up
    batched, solo = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        conds = batchable(pipe, params)  # prompt encoding is part of the batched cost
        out_b = generate_batch(pipe, params, conds)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_s = [pipe.generate(p) for p in params]
        solo.append(time.perf_counter() - t0)
    diff = max(
        int(np.abs(np.asarray(b.images[0]).astype(int) - np.asarray(s.images[0]).astype(int)).max())
        for b, s in zip(out_b, out_s, strict=True)
    )
    report = {
        "cpu": cpu_kind(),
        "torch_threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "steps": args.steps,
        "size": args.size,
        "batched_s": round(statistics.median(batched), 3),
        "solo_s": round(statistics.median(solo), 3),
        "max_pixel_diff": diff,
    }
    report["speedup"] = round(report["solo_s"] / report["batched_s"], 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
