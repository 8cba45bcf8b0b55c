"""CPU compute paths side by side: one U-Net CFG step (batch 2) per path, in one run, alternating.

Usage:
    python bench/cpu_paths.py --model SD1.safetensors --int8-model SD1-INT8.safetensors [--size 512]
                              [--rounds 2] [--steps 2] [--only a,b,...] [--threads 2] [--out bench/results]

Paths (names for --only): diffusers-fp32 (diffusers' UNet2DConditionModel with the same weights),
ours-fp32 (the parity path), ours-fp32-fast, ours-int8 (`--int8-model`, made by `diffusekit convert
--quantize int8`), ours-bf16 (only where the CPU has native bf16), ours-openvino and
ours-openvino-int8 (diffusekit's OpenVINO backend as a user gets it: `Pipeline.from_file(precision=...)`,
IR from its cache, compiled for the input's static shape (ours-openvino-dynamic: once, for dynamic
shapes), int8 calibrated by nncf on U-Net inputs captured
while sampling; `DIFFUSEKIT_OPENVINO_CACHE` picks the cache), and the peer: openvino-fp32 and
openvino-int8 (our U-Net converted here with `openvino.convert_model` and OpenVINO's defaults, dynamic
shapes, int8 by nncf calibrated on a few random inputs, as a user of OpenVINO alone would; only where
`openvino`/`nncf` import; cached next to the model).

Each (round, path) runs in a fresh `python bench/cpu_paths.py --worker SPEC` process: load, one warm-up
step (oneDNN packing, first-touch pages), then `--steps` timed steps; the worker reports their median.
Rounds visit the paths in rotated order, so a machine that speeds up or slows down during the run affects
every path alike. The report gives per path the median over rounds with min and max, the ratio to
diffusers-fp32 per round (median, min, max), peak RSS, and the output's relative L2 difference from
ours-fp32 on the same inputs. Writes OUT/cpu_paths.json with the CPU model and its lscpu flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PATHS = (
    "diffusers-fp32",
    "ours-fp32",
    "ours-fp32-fast",
    "ours-int8",
    "ours-bf16",
    "ours-openvino",
    "ours-openvino-int8",
    "ours-openvino-dynamic",
    "openvino-fp32",
    "openvino-int8",
)
BASELINE = "diffusers-fp32"


def log(message: str) -> None:
    print(f"[cpu_paths] {message}", file=sys.stderr, flush=True)


# --- worker ------------------------------------------------------------------------------------------


def _inputs(cfg, size: int):
    """The CFG step's U-Net inputs: (2, 4, h, w) latents, two timesteps, (2, 77, ctx) context; seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, size // 8, size // 8, generator=g)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    return x, t, ctx


def _ours(spec: dict[str, Any]):
    """(step function, config) for one of our paths."""

    from diffusekit.pipeline import Pipeline

    precision = spec["path"].removeprefix("ours-")
    if precision == "openvino-dynamic":  # the backend compiling once for all shapes
        os.environ["DIFFUSEKIT_OPENVINO_SHAPES"], precision = "dynamic", "openvino"
    model = spec["int8_model"] if precision == "int8" else spec["model"]
    pipe = Pipeline.from_file(model, precision=precision)
    unet, fast = pipe.ov_unet or pipe.model.unet, pipe.fast

    def step(x, t, ctx):
        return unet(fast.input(x), t, ctx.to(fast.dtype)).float()

    info = {k: v for k, v in (getattr(pipe.ov_unet, "info", None) or {}).items() if k.endswith("seconds")}
    return step, pipe.cfg, {"path": pipe.path.name, "reason": pipe.path.reason, **info}


def _diffusers(spec: dict[str, Any]):
    """(step function, config): diffusers' U-Net in fp32 with the same weights."""
    from diffusers import UNet2DConditionModel

    from diffusekit.checkpoints.convert_unet import unet_config_to_diffusers, unet_to_diffusers
    from diffusekit.checkpoints.load import load_model

    loaded = load_model(spec["model"])
    cfg = loaded.cfg
    sd = unet_to_diffusers({k: v.float() for k, v in loaded.model.unet.state_dict().items()}, cfg.unet)
    del loaded
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)).eval()
    theirs.load_state_dict(sd)

    def step(x, t, ctx):
        return theirs(x, t, encoder_hidden_states=ctx).sample

    return step, cfg, {}


def _openvino(spec: dict[str, Any]):
    """(step function, config): our U-Net through OpenVINO (fp32, or nncf int8), cached as IR."""
    import openvino as ov
    import torch

    from diffusekit.checkpoints.load import load_model

    loaded = load_model(spec["model"], dtype=torch.float32)
    cfg, unet = loaded.cfg, loaded.model.unet
    x, t, ctx = _inputs(cfg, spec["size"])
    kind = spec["path"].removeprefix("openvino-")
    ir = Path(spec["cache"]) / f"{Path(spec['model']).stem}-{spec['size']}-{kind}.xml"
    core = ov.Core()
    info: dict[str, Any] = {"ir": str(ir)}
    if not ir.exists():
        t0 = time.perf_counter()
        with torch.no_grad():
            ovm = ov.convert_model(unet, example_input=(x, t, ctx))
        if kind == "int8":
            import nncf

            g = torch.Generator().manual_seed(1)
            samples = [
                (torch.randn(x.shape, generator=g).numpy(), torch.tensor([s, s]).numpy(),
                 torch.randn(ctx.shape, generator=g).numpy())
                for s in (900.0, 500.0, 100.0)
            ]  # fmt: skip
            ovm = nncf.quantize(ovm, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                subset_size=len(samples))  # fmt: skip
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ovm, str(ir), compress_to_fp16=False)
        info["convert_s"] = time.perf_counter() - t0
    del loaded, unet
    compiled = core.compile_model(str(ir), "CPU", {"INFERENCE_NUM_THREADS": spec["threads"],
                                                   "INFERENCE_PRECISION_HINT": "f32"})  # fmt: skip

    def step(x, t, ctx):
        out = compiled((x.numpy(), t.numpy(), ctx.numpy()))
        return torch.from_numpy(out[0])

    return step, cfg, info


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one path, warm it up, time `steps` U-Net CFG steps; the median and the output."""
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    side = spec["path"].split("-", 1)[0]
    build = {"ours": _ours, "diffusers": _diffusers, "openvino": _openvino}[side]
    step, cfg, info = build(spec)
    load_s = time.perf_counter() - t0
    x, t, ctx = _inputs(cfg, spec["size"])
    times = []
    with torch.inference_mode():
        out = step(x, t, ctx)  # warm-up
        for _ in range(spec["steps"]):
            s = time.perf_counter()
            out = step(x, t, ctx)
            times.append(time.perf_counter() - s)
    torch.save(out.float(), spec["out_tensor"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "times": times, "load_s": load_s, "peak_rss_mb": peak_mb,
            **info}  # fmt: skip


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {done.returncode}: {tail[0][-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- parent ------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """The CPU model, its lscpu flags, and what diffusekit's detection reads."""
    from diffusekit.runtime import cpu_features

    out: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        out["model_name"] = fields.get("Model name", "").strip()
        out["flags"] = fields.get("Flags", "").split()
    except (OSError, subprocess.SubprocessError):
        out["flags"] = []
    features = cpu_features()
    out["detected"] = {**features.__dict__, "kind": features.kind}
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(k)}  # fmt: skip
    if caps:  # an ISA cap emulates an older CPU on this one: say so beside every figure
        out["isa_caps"] = caps
        out["emulation"] = f"{out.get('model_name', 'this CPU')} with " + ", ".join(
            f"{k}={v}" for k, v in caps.items()
        )
    out["load_average"] = os.getloadavg()
    return out


def available(path: str, int8_model: str | None) -> str | None:
    """Why `path` cannot run here, or None."""
    import importlib.util

    from diffusekit.runtime import cpu_features

    if path == "ours-bf16" and not cpu_features().bf16:
        return "this CPU has no native bf16"
    if path == "ours-int8" and not int8_model:
        return "no --int8-model given"
    if "openvino" in path and importlib.util.find_spec("openvino") is None:
        return "openvino is not installed"
    if path.endswith("openvino-int8") and importlib.util.find_spec("nncf") is None:
        return "nncf is not installed"
    if path == BASELINE and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed"
    return None


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


def summarize(results: dict[str, list[dict[str, Any]]], tensors: dict[str, list[str]]) -> dict[str, Any]:
    import torch

    summary: dict[str, Any] = {}
    base = results.get(BASELINE, [])
    ref = tensors.get("ours-fp32", [None])[0]
    for path, runs in results.items():
        ok = [r for r in runs if "step_s" in r]
        if not ok:
            summary[path] = {"error": runs[0].get("error") if runs else "not run"}
            continue
        steps = [r["step_s"] for r in ok]
        row = {"step_s_median": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
               "rounds": len(ok), "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}  # fmt: skip
        pairs = [
            b["step_s"] / r["step_s"]
            for b, r in zip(base, runs, strict=False)
            if "step_s" in b and "step_s" in r
        ]
        if pairs:
            row |= {"speedup_vs_diffusers_median": statistics.median(pairs), "speedup_min": min(pairs),
                    "speedup_max": max(pairs)}  # fmt: skip
        if ref is not None and tensors.get(path):
            row["rel_l2_vs_ours_fp32"] = rel_l2(torch.load(tensors[path][0]), torch.load(ref))
        for key in ("path", "reason", "convert_s"):
            if key in ok[0]:
                row[key] = ok[0][key]
        summary[path] = row
    return summary


def markdown(summary: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        f"U-Net CFG step (batch 2) at {cfg['size']}x{cfg['size']}, {cfg['threads']} threads, "
        f"{cfg['rounds']} rounds x {cfg['steps']} steps; CPU: {cfg['cpu']['model_name']} "
        f"({cfg['cpu']['detected']['kind']}); load average at start {cfg['cpu']['load_average'][0]:.1f}"
        + (
            f"; EMULATED: {cfg['cpu']['emulation']}, not a real CPU of that kind"
            if "emulation" in cfg["cpu"]
            else ""
        )
        + (f"; load average at end {cfg['load_average_end'][0]:.1f}" if "load_average_end" in cfg else ""),
        "",
        "| path | s/step median (min-max) | vs diffusers fp32 median (min-max) | rel. L2 vs ours fp32 "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for path, row in summary.items():
        if "error" in row:
            lines.append(f"| {path} | {row['error']} | | | |")
            continue
        speed = "-"
        if "speedup_vs_diffusers_median" in row:
            lo_hi = f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}"
            speed = f"{row['speedup_vs_diffusers_median']:.2f}x ({lo_hi})"
        err = f"{row['rel_l2_vs_ours_fp32']:.2e}" if "rel_l2_vs_ours_fp32" in row else "-"
        lines.append(
            f"| {path} | {row['step_s_median']:.2f} ({row['step_s_min']:.2f}-{row['step_s_max']:.2f}) "
            f"| {speed} | {err} | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--model", help="float single-file checkpoint (e.g. `diffusekit create sd1 X --dtype fp16`)"
    )
    ap.add_argument("--int8-model", help="the same model after `diffusekit convert --quantize int8`")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per worker (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(PATHS))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cache", help="where OpenVINO IR is cached (default: next to --model)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not args.model:
        ap.error("--model is required")
    chosen = [p.strip() for p in args.only.split(",")] if args.only else list(PATHS)
    unknown = [p for p in chosen if p not in PATHS]
    if unknown:
        ap.error(f"unknown path {unknown[0]!r}; valid: {', '.join(PATHS)}")
    skipped = {p: why for p in chosen if (why := available(p, args.int8_model))}
    paths = [p for p in chosen if p not in skipped]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cpu_paths-"))  # each worker's output tensor, compared at the end
    cfg = {"model": args.model, "int8_model": args.int8_model, "size": args.size, "rounds": args.rounds,
           "steps": args.steps, "threads": args.threads, "cpu": cpu_info(), "skipped": skipped}  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    tensors: dict[str, list[str]] = {p: [] for p in paths}
    for r in range(args.rounds):
        order = paths[r % len(paths) :] + paths[: r % len(paths)]  # rotate: no path always goes first
        for path in order:
            tensor = str(tmp / f"{path}-{r}.pt")
            spec = {"path": path, "model": args.model, "int8_model": args.int8_model, "size": args.size,
                    "steps": args.steps, "threads": args.threads, "out_tensor": tensor,
                    "cache": args.cache or str(Path(args.model).parent / "openvino-ir")}  # fmt: skip
            log(f"round {r + 1}/{args.rounds}: {path}")
            res = run_worker(spec, args.timeout)
            log(f"  {res}")
            results[path].append(res)
            if "step_s" in res:
                tensors[path].append(tensor)
    cfg["load_average_end"] = os.getloadavg()
    summary = summarize(results, tensors)
    report = {"config": cfg, "summary": summary, "raw": results, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
              time.gmtime())}  # fmt: skip
    (out / "cpu_paths.json").write_text(json.dumps(report, indent=2))
    md = markdown(summary, cfg)
    if skipped:
        md += "\n\nSkipped: " + "; ".join(f"{p} ({why})" for p, why in skipped.items())
    (out / "cpu_paths.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
