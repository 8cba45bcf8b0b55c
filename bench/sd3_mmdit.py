"""Benchmark: one CFG step (batch 2) of the SD3.5 Medium MMDiT, diffusekit against diffusers, same weights.

Usage:
    python bench/sd3_mmdit.py [--preset sd35_medium] [--size 1024] [--dtype bf16|fp32] [--repeats 2]
                              [--warmup 1] [--threads N] [--weights PATH] [--diffusers-first] [--out JSON]
                              [--side both|ours|diffusers]

Random real-size weights are made once (seeded) and cached as one safetensors file in our keys
(default ~/.cache/diffusekit-bench/<preset>-mmdit-<dtype>.safetensors); diffusers' SD3Transformer2DModel
gets the same tensors through our key conversion. Each side runs in its own fresh process (peak RSS is
per side): load, one warm-up call, then `--repeats` timed calls on the same inputs (latent at
size/8, 77 + 256 text tokens, pooled 2048). `--warmup 0 --repeats 1` times one cold call per side
(for 1024x1024 on a small machine). Prints one JSON line per side and the time ratio; `--out` also
writes them, with the CPU kind and the load averages, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_kind() -> str:
    """The CPU model name and whether it computes bf16 natively (lscpu flags)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    kinds = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    name = fields.get("Model name", "?").strip()
    return f"{name}, {os.cpu_count()} cores, {' '.join(kinds) or 'no AVX-512'}"


def _weights(preset: str, dtype: str, path: Path | None) -> Path:
    from diffusekit.checkpoints.single_file import save_state_dict
    from diffusekit.models.init import randomize_
    from diffusekit.models.mmdit import MMDiT
    from diffusekit.models.sd3_configs import sd3_preset

    path = path or Path.home() / ".cache" / "diffusekit-bench" / f"{preset}-mmdit-{dtype}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = randomize_(MMDiT(sd3_preset(preset).mmdit, dtype=DTYPES[dtype]), seed=0)
        save_state_dict(model.state_dict(), path)
        del model
    return path


def _inputs(cfg, size: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size // 8, size // 8, generator=g).to(dtype)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 77 + 256, cfg.context_dim, generator=g).to(dtype)
    y = torch.randn(2, cfg.adm_in_channels, generator=g).to(dtype)
    return x, t, ctx, y


def worker(side: str, args: argparse.Namespace, weights: Path) -> dict:
    """Load one side, time `repeats` calls, report seconds and peak RSS."""
    from safetensors.torch import load_file

    from diffusekit.checkpoints.convert_mmdit import mmdit_diffusers_config, mmdit_to_diffusers
    from diffusekit.models.mmdit import MMDiT
    from diffusekit.models.sd3_configs import sd3_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = sd3_preset(args.preset).mmdit
    dtype = DTYPES[args.dtype]
    sd = load_file(str(weights))
    if side == "ours":
        model = MMDiT(cfg, device="meta")
        model.load_state_dict(sd, strict=True, assign=True)
        call = model
    else:
        from diffusers import SD3Transformer2DModel

        with torch.device("meta"):
            model = SD3Transformer2DModel(**mmdit_diffusers_config(cfg))
        model.load_state_dict(mmdit_to_diffusers(sd, cfg.depth), strict=True, assign=True)

        def call(x, t, ctx, y):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y).sample

    model.eval()
    x, t, ctx, y = _inputs(cfg, args.size, dtype)
    times, cpu_times = [], []  # wall seconds; CPU seconds of all threads (steadier on a shared machine)
    load_before = os.getloadavg()
    with torch.inference_mode():
        for _ in range(args.warmup):
            out = call(x, t, ctx, y)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = call(x, t, ctx, y)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"side": side, "seconds": times, "best": min(times), "cpu_seconds": cpu_times,
            "peak_rss_bytes": peak, "threads": torch.get_num_threads(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "out_abs_mean": float(out.float().abs().mean())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd35_medium")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--weights", type=Path)
    p.add_argument("--diffusers-first", action="store_true", help="run the diffusers side first")
    p.add_argument("--out", type=Path, help="also write the results to this JSON file")
    p.add_argument("--side", choices=("both", "ours", "diffusers"), default="both",
                   help="run one side only, merging its result into --out")  # fmt: skip
    p.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    weights = _weights(args.preset, args.dtype, args.weights)
    if args.worker:
        print(json.dumps(worker(args.worker, args, weights)))
        return
    sides = ("diffusers", "ours") if args.diffusers_first else ("ours", "diffusers")
    results = {}
    if args.side != "both":  # one side per run (e.g. each under its own memory lock), merged into --out
        sides = (args.side,)
        if args.out and args.out.is_file():
            results = {k: v for k, v in json.loads(args.out.read_text())["results"].items() if k != args.side}
    for side in sides:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--weights", str(weights), "--worker", side]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        results[side] = json.loads(line.strip().splitlines()[-1])
        print(json.dumps(results[side]))
    cpu = cpu_kind()
    summary = {}
    if len(results) == 2:
        ours, ref = results["ours"], results["diffusers"]
        summary = {
            "diffusers_over_ours_time": ref["best"] / ours["best"],
            "ours_over_diffusers_peak_rss": ours["peak_rss_bytes"] / ref["peak_rss_bytes"],
        }
        if "cpu_seconds" in ours and "cpu_seconds" in ref:
            summary["diffusers_over_ours_cpu_time"] = min(ref["cpu_seconds"]) / min(ours["cpu_seconds"])
        print(f"{args.preset} MMDiT, {args.size}x{args.size}, batch 2 (one CFG step), {args.dtype}, {cpu}: "
              f"diffusers/ours time {summary['diffusers_over_ours_time']:.2f}x (ours {ours['best']:.2f} s, "
              f"diffusers {ref['best']:.2f} s); peak RSS ours/diffusers "
              f"{summary['ours_over_diffusers_peak_rss']:.2f}")  # fmt: skip
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "weights", "side")}
        report = {"config": config, "cpu": cpu, "results": results, "summary": summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
