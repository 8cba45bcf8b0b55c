"""Batching compatible jobs, without the server: N jobs (different prompts and seeds) as one sampler run
(jobs.batch) against the same N jobs run one at a time through Pipeline.generate, alternating, in one
process. The batch runs both ways: exact (per-job GEMMs, bit-identical to solo; the server's default)
and fully batched (GEMMs too; a few pixels may move by 1/255). Also the largest pixel difference of each.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/batch_jobs.py --jobs 8 --steps 8 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
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
    batched, loose, solo = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        conds = batchable(pipe, params)  # prompt encoding is part of the batched cost
        out_b = generate_batch(pipe, params, conds)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_l = generate_batch(pipe, params, batchable(pipe, params), exact=False)
        loose.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_s = [pipe.generate(p) for p in params]
        solo.append(time.perf_counter() - t0)

    def diff(outs) -> int:
        return max(
            int(np.abs(np.asarray(b.images[0]).astype(int) - np.asarray(s.images[0]).astype(int)).max())
            for b, s in zip(outs, out_s, strict=True)
        )

    report = {
        "cpu": cpu_kind(),
        "torch_threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "steps": args.steps,
        "size": args.size,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "batched_exact_s": round(statistics.median(batched), 3),
        "batched_loose_s": round(statistics.median(loose), 3),
        "solo_s": round(statistics.median(solo), 3),
        "max_pixel_diff_exact": diff(out_b),
        "max_pixel_diff_loose": diff(out_l),
    }
    report["speedup_exact"] = round(report["solo_s"] / report["batched_exact_s"], 2)
    report["speedup_loose"] = round(report["solo_s"] / report["batched_loose_s"], 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
