"""Which int8 choices cost the most image quality: one layer group / observer / scheme at a time, one process.

Usage:
    python bench/int8_sensitivity.py --model FP.safetensors [--size 256] [--steps 8] [--prompts 2]
                                     [--calib-prompts 4] [--calib-steps 8] [--only a,b] [--out FILE]

The fp32 model is loaded once; it generates the reference images (bench/int8_quality.py's prompts, seeds,
Euler, CFG 7.5) and, on the calibration prompts (diffusekit/quantize.py), every candidate layer's input
statistics per call (`accel.int8_static.Calibrator` with all statistics kept). Each configuration then
swaps the chosen layers for int8 ones (the real oneDNN kernels, not a simulation), generates the same
images, reports their PSNR against fp32 and the mean time of one U-Net call, and swaps the fp32 layers
back. Configurations: the int8 path's default; each layer group alone; the default minus each group;
and the activation-range choices (observer percentile, how calls are combined, per-call dynamic ranges).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from int8_quality import NEGATIVE, PROMPTS, compare

GROUPS = {  # name pattern of each layer group (U-Net module names)
    "res.conv1": r"\.in_layers\.2$",
    "res.conv2": r"\.out_layers\.3$",
    "res.skip": r"\.skip_connection$",
    "resample": r"(\.op|\.conv)$",
    "proj_in": r"\.proj_in$",
    "proj_out": r"\.proj_out$",
    "attn1.qkv": r"attn1\.to_[qkv]$",
    "attn1.out": r"attn1\.to_out\.0$",
    "attn2.q": r"attn2\.to_q$",
    "attn2.out": r"attn2\.to_out\.0$",
    "ff.in": r"ff\.net\.0\.proj$",
    "ff.out": r"ff\.net\.2$",
}


def group_of(name: str) -> str:
    for group, pattern in GROUPS.items():
        if re.search(pattern, name):
            return group
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--calib-size", type=int)
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--out", default="bench/results/int8_sensitivity.json")
    args = ap.parse_args(argv)

    from diffusekit.accel import int8_static as q
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline
    from diffusekit.quantize import QuantizeSettings, calibrate

    torch.set_grad_enabled(False)
    pipe = Pipeline.from_file(args.model, precision="fp32")
    unet = pipe.model.unet
    size = args.size or pipe.cfg.resolution
    calls = {"n": 0, "s": 0.0}

    def timed_forward(fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            calls["n"] += 1
            calls["s"] += time.perf_counter() - t0
            return out

        return wrapped

    unet.forward = timed_forward(unet.forward)

    def images() -> tuple[list[np.ndarray], float]:
        calls["n"], calls["s"] = 0, 0.0
        out = []
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            params = GenerationParams(prompt=prompt, negative_prompt=NEGATIVE, steps=args.steps, seed=100 + i,
                                      sampler="Euler", cfg_scale=7.5, width=size, height=size)  # fmt: skip
            out.append(np.asarray(pipe.generate(params).images[0].convert("RGB")))
        return out, calls["s"] / max(calls["n"], 1)

    ref, ref_call_s = images()
    print(f"fp32: {ref_call_s:.3f} s per U-Net call", file=sys.stderr, flush=True)

    settings = QuantizeSettings(prompts=args.calib_prompts, steps=args.calib_steps, size=args.calib_size)
    t0 = time.perf_counter()
    static = not args.only or any("dynamic" not in c for c in args.only.split(","))
    stats = calibrate(pipe, settings, keep_calls=True, include_all=True) if static else {}
    print(f"calibrated {len(stats)} layers in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    originals = dict(q.candidates(unet))
    default = {n for n, _ in q.quantizable(unet)}
    by_group: dict[str, set[str]] = {}
    for name in originals:
        by_group.setdefault(group_of(name), set()).add(name)

    def run(label: str, names: set[str], **how) -> dict:
        dynamic = how.get("dynamic", False)
        for name in names:
            m = originals[name]
            scale, zp = (0.0, 0) if dynamic else q._activation_qparams(*q.combine(stats[name], **how))
            layer = (
                q.Int8Conv2d(m, scale, zp) if isinstance(m, torch.nn.Conv2d) else q.Int8Linear(m, scale, zp)
            )
            q._set(unet, name, layer)
        try:
            imgs, call_s = images()
        finally:
            for name in names:
                q._set(unet, name, originals[name])
        pairs = [compare(b, a) for a, b in zip(ref, imgs, strict=True)]
        row = {
            "config": label,
            "layers": len(names),
            "psnr_db": statistics_mean([p["psnr_db"] for p in pairs]),
            "mean_abs": statistics_mean([p["mean_abs"] for p in pairs]),
            "call_s": round(call_s, 4),
            "fp32_call_s": round(ref_call_s, 4),
            **{k: v for k, v in how.items()},
        }
        print(json.dumps(row), flush=True)
        return row

    configs: list[tuple[str, set[str], dict]] = [("default", default, {})]
    configs.append(("default@dynamic", default, {"dynamic": True}))
    for pct in (99.99, 99.9, 100.0):
        configs.append((f"default@mean-p{pct}", default, {"percentile": pct, "over_calls": "mean"}))
    for pct in (100.0, 99.999, 99.9):
        configs.append((f"default@p{pct}", default, {"percentile": pct}))
    for group, names in sorted(by_group.items()):
        if names & default:
            configs.append((f"default-minus:{group}", default - names, {}))
    for group, names in sorted(by_group.items()):
        configs.append((f"only:{group}", names, {}))
    for group, names in sorted(by_group.items()):
        if names & default:
            configs.append((f"dynamic-minus:{group}", default - names, {"dynamic": True}))
    configs.append(("dynamic+res.skip", default | by_group.get("res.skip", set()), {"dynamic": True}))
    wanted = args.only.split(",") if args.only else [label for label, _, _ in configs]
    known = {label: (names, how) for label, names, how in configs}
    out = Path(args.out)
    header = {"model": args.model, "size": size, "steps": args.steps, "prompts": args.prompts,
              "static_calibration": {k: v for k, v in vars(settings).items() if k != "activations"},
              "fp32_call_s": round(ref_call_s, 4)}  # fmt: skip
    rows = []
    for label in wanted:
        if label not in known:
            raise SystemExit(f"unknown configuration {label!r}; valid: {', '.join(known)}")
        rows.append(run(label, *known[label][:1], **known[label][1]))
        out.write_text(json.dumps({**header, "rows": rows}, indent=2))  # after each row: a cut run keeps it
    return 0


def statistics_mean(xs: list[float]) -> float:
    return math.inf if any(math.isinf(x) for x in xs) else float(np.mean(xs))


if __name__ == "__main__":
    sys.exit(main())
