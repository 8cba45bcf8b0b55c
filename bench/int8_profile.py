"""Where an int8 U-Net CFG step spends its time: torch.profiler over one step, ops grouped by kind.

Usage:
    python bench/int8_profile.py --int8-model SD1-INT8.safetensors [--size 512] [--threads 1]
                                 [--emulate both|off|on] [--variants before,after] [--out bench/results]

Loads only the U-Net of the int8 file (made by `diffusekit convert --quantize int8`), lays it out as the
int8 path does (`runtime.prepare(..., "int8")`), and per variant runs one warm-up step and one profiled
step at `--size` (batch 2, seeded inputs, 1 thread by default); then `--repeats` unprofiled steps per
variant, the variants alternating (their median is the step time to compare). `--emulate both` runs
everything twice, in
a fresh process each: as the CPU is, and with oneDNN/MKL capped to Ice Lake's ISA
(ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, MKL_ENABLE_INSTRUCTIONS=AVX512_E1). Variants (`int8_static.TUNING`
settings) run in the same process one after the other, so the table compares them on the same machine
state. Op self times (CPU) are grouped into: int8 conv, int8 linear, activation quantize (incl. the
dynamic min/max), attention, GroupNorm/LayerNorm, elementwise, layout copies, other. Writes
OUT/int8_profile-<size>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ATTENTION_RANGE = "int8_profile::attention"
EMULATION = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX512_E1"}

GROUPS = (  # (group, substrings of op names), first match wins
    ("int8 conv", ("qconv2d_pointwise", "qconv")),
    ("int8 linear", ("qlinear_pointwise", "qlinear", "linear_dynamic", "_int_mm")),
    ("quantize activations", ("quantize_per_tensor", "int_repr", "aminmax", "quantize_")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax", "bmm", "baddbmm")),
    ("norm", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("layout copies", ("copy_", "contiguous", "clone", "to_dense", "permute", "cat", "_to_copy")),
    ("fp32 conv/linear", ("convolution", "conv2d", "addmm", "linear", "matmul", "mm")),
    ("elementwise", ("add", "mul", "silu", "gelu", "div", "sigmoid", "sub", "chunk", "fill_")),
)


def _group(op: str) -> str:
    for name, keys in GROUPS:
        if any(k in op for k in keys):
            return name
    return "other"


def _inputs(cfg, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, size // 8, size // 8, generator=g)  # (B, 4, h, w)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)  # (B, 77, ctx)
    return x, t, ctx


def worker(args: argparse.Namespace) -> dict:
    """Profile each variant in this process; the per-group table and the top ops of each."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffusekit.accel import int8_static
    from diffusekit.accel.int8_file import load_int8_model
    from diffusekit.runtime import cpu_features, prepare

    torch.set_num_threads(args.threads)
    unet_module = importlib.import_module("diffusekit.models.unet")
    kernel_call = unet_module.attention

    def attention(*a, **kw):  # a named range around each attention call (whatever its kernel)
        with torch.profiler.record_function(ATTENTION_RANGE):
            return kernel_call(*a, **kw)

    unet_module.attention = attention
    loaded = load_int8_model(args.int8_model)
    unet = loaded.model.unet
    fast = prepare(unet, torch.float32, "cpu", "int8")
    x, t, ctx = _inputs(loaded.model.cfg, args.size)
    out: dict = {"features": cpu_features().kind, "variants": {}}
    kernels = {m: m.kernel for m in unet.modules() if hasattr(m, "kernel")}  # what prepare chose
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own first-use setup, not timed
        torch.ones(8).add_(1)
    ref = None
    for variant in args.variants.split(","):
        int8_static.set_tuning(variant)
        for m, kernel in kernels.items():  # the attention kernel: as prepare chose, or --attention
            m.kernel = args.attention or kernel
        with torch.inference_mode():
            unet(fast.input(x), t, ctx)  # warm-up: packing, oneDNN primitives, first-touch pages
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                y = unet(fast.input(x), t, ctx).float()
            profiled = time.perf_counter() - t0
        if ref is None:
            ref = y
        rel = float((y - ref).norm() / ref.norm())
        groups: dict[str, float] = {}
        for e in prof.events():  # every op inside an attention() call counts as attention
            parent, group = e.cpu_parent, _group(e.name)
            while parent is not None:
                if parent.name == ATTENTION_RANGE:
                    group = "attention"
                    break
                parent = parent.cpu_parent
            groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total / 1e6
        ops = [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in prof.key_averages()]
        ops.sort(key=lambda o: -o[1])
        out["variants"][variant] = {
            "step_s_profiled": round(profiled, 2),
            "step_s_plain": [],
            "rel_l2_vs_first_variant": rel,
            "groups_s": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ops": ops[:25],
        }
    for _ in range(args.repeats):  # unprofiled steps, the variants alternating
        for variant in args.variants.split(","):
            int8_static.set_tuning(variant)
            for m, kernel in kernels.items():
                m.kernel = args.attention or kernel
            with torch.inference_mode():
                t0 = time.perf_counter()
                unet(fast.input(x), t, ctx)
            out["variants"][variant]["step_s_plain"].append(round(time.perf_counter() - t0, 2))
    for v in out["variants"].values():
        v["step_s_plain_median"] = statistics.median(v["step_s_plain"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int8-model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--emulate", choices=("both", "off", "on"), default="both")
    ap.add_argument("--variants", default="before,after")
    ap.add_argument(
        "--attention", choices=("sdpa", "sliced"), help="every attention kernel (default: prepare's)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="unprofiled timed steps per variant, alternating")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    runs = {"off": [False], "on": [True], "both": [False, True]}[args.emulate]
    report: dict = {
        "cpu": platform.processor() or platform.machine(),
        "load_average_start": os.getloadavg(),
        "size": args.size,
        "threads": args.threads,
        "runs": {},
    }
    try:
        report["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    for emulated in runs:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for k in EMULATION:
            env.pop(k, None)
        if emulated:
            env |= EMULATION
        cmd = [sys.executable, __file__, "--worker", "--int8-model", args.int8_model, "--size",
               str(args.size), "--threads", str(args.threads), "--variants", args.variants,
               "--repeats", str(args.repeats)]  # fmt: skip
        cmd += ["--attention", args.attention] if args.attention else []
        label = "emulated Ice Lake ISA" if emulated else "native ISA"
        print(f"[int8_profile] {label}: load average {os.getloadavg()}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        report["runs"][label] = json.loads(done.stdout.strip().splitlines()[-1])
        report["runs"][label]["load_average_end"] = os.getloadavg()
    for label, run in report["runs"].items():
        print(f"\n## {label} ({run['features']}), {args.size}px batch 2, {args.threads} thread(s)")
        names = list(run["variants"])
        print("| group | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        keys = list(run["variants"][names[0]]["groups_s"])
        for g in keys:
            cells = [f"{run['variants'][n]['groups_s'].get(g, 0):.2f}" for n in names]
            print(f"| {g} | " + " | ".join(cells) + " |")
        for what in ("step_s_profiled", "step_s_plain_median", "rel_l2_vs_first_variant"):
            print(f"| {what} | " + " | ".join(f"{run['variants'][n][what]:.4g}" for n in names) + " |")
        print(
            "| step_s_plain (each) | "
            + " | ".join(str(run["variants"][n]["step_s_plain"]) for n in names)
            + " |"
        )
    out = Path(args.out) / f"int8_profile-{args.size}.json"
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
