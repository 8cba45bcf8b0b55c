"""Opt-in accelerators (diffusekit.accel): speed and quality cost of each, against the plain pipeline.

Usage:
    python bench/accel.py [--model PATH] [--size 512] [--steps 20] [--only baseline,deepcache,...]
                          [--eval-model PATH] [--eval-prompts N] [--eval-images-per-prompt 4]
                          [--eval-steps 20]
                          [--skip-eval] [--precision auto] [--out bench/results] [--timeout S]

Two measurements per accelerator, each in a fresh `python bench/accel.py --worker SPEC` process (one JSON
line on stdout), so one variant's compiled code, quantized weights or caches never leak into another:

* image: on `--model` (default: real-size SD1.5 random weights, fp16 file), one `--size`-pixel image with
  `--steps` Euler steps at CFG 7.5 (each step is one batched cond + uncond U-Net call). Seconds per step are
  (time of the last step's end - time of the first step's end) / (steps - 1): steady state, with the first
  step (torch.compile's compilation, first-touch page faults) left out and reported as `first_step_s`.
  Quality: the image against the baseline's for the same seed, prompt and sampler: mean and max absolute
  pixel difference / 255 and PSNR (dB; random weights make "image quality" meaningless, the difference is
  the cost that is measurable).
* eval: on the default model (`--eval-model`, the shipped 64x64 model), the GenEval-style prompt adherence
  of `diffusekit eval` (the model's recommended sampler and CFG, `--eval-steps`); with `--eval-prompts N`
  only every k-th prompt is used (N prompts spread over the categories, for smoke tests), and the score
  is their pass rate.

Writes OUT/accel.json (every raw number) and OUT/accel.md (the table, also printed).
Smoke test: `diffusekit create tiny_sd1 /tmp/tiny.safetensors` then
`python bench/accel.py --model /tmp/tiny.safetensors --size 64 --steps 4 --eval-prompts 4 --eval-steps 4
--eval-images-per-prompt 1 --out /tmp/accel-smoke`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
SEED = 1
CFG_SCALE = 7.5
SAMPLER = "Euler"
DEFAULT_MODEL = Path("/work/bench-cache/sd15-random-fp16.safetensors")
VARIANTS: dict[str, dict[str, Any]] = {  # name -> diffusekit.accel.Accel fields
    "baseline": {},
    "deepcache": {"deepcache_interval": 3, "deepcache_branch": 0},
    "tome": {"tome_ratio": 0.5},
    "int8": {"int8": True},
    "compile": {"compile": True},
}


def log(message: str) -> None:
    print(f"[accel] {message}", file=sys.stderr, flush=True)


# --- workers (run in a fresh process each) -----------------------------------------------------------


def worker_image(spec: dict[str, Any]) -> dict[str, Any]:
    """One image with the given accelerators; per-step times from the progress callback."""
    from diffusekit.accel import Accel
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_file(spec["model"], precision=spec["precision"], accel=Accel(**spec["accel"]))
    load_s = time.perf_counter() - t0
    size = spec["size"]
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=spec["steps"], seed=SEED,
                              cfg_scale=CFG_SCALE, sampler=SAMPLER, width=size, height=size)  # fmt: skip
    stamps: list[float] = []
    t1 = time.perf_counter()
    result = pipe.generate(params, callback=lambda _p: stamps.append(time.perf_counter()))
    total_s = time.perf_counter() - t1
    result.images[0].save(spec["png"])
    steps = len(stamps)
    return {
        "load_s": load_s,
        "generate_s": total_s,
        "first_step_s": stamps[0] - t1,
        "step_s": (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else stamps[0] - t1,
        "steps": steps,
        "dtype": str(pipe.dtype),
        "infotext": result.infotexts[0].splitlines()[-1],
    }


def worker_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """GenEval-style accuracy of the default model with the given accelerators."""
    import numpy as np

    from diffusekit.accel import Accel
    from diffusekit.eval.detector import detect
    from diffusekit.eval.geneval import check, eval_prompts, evaluate, pipeline_generator
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    pipe = Pipeline.from_file(spec["model"], accel=Accel(**spec["accel"]))
    base = pipe.defaults.fill(GenerationParams(steps=spec["steps"]))  # `diffusekit eval`'s settings
    generate = pipeline_generator(pipe, base)
    t0 = time.perf_counter()

    n, limit = spec["images_per_prompt"], spec["prompts"]
    if limit is None:  # the full evaluation: the scores `diffusekit eval` reports
        report = evaluate(generate, images_per_prompt=n, seed=0)
        return {"accuracy": report.overall, "held_out": report.held_out, "prompts": len(report.results),
                "images": len(report.results) * n, "eval_s": time.perf_counter() - t0}  # fmt: skip
    prompts = eval_prompts("heldout")
    chosen = prompts[:: max(1, len(prompts) // limit)][:limit]  # spread over the categories
    passed = []
    for p in chosen:
        for image in generate([p.prompt] * n, list(range(n))):
            arr = np.asarray(image.convert("RGB"))
            passed.append(check(p, detect(arr), arr.shape[1]))
    return {"accuracy": sum(passed) / len(passed), "held_out": None, "prompts": len(chosen),
            "images": len(passed), "eval_s": time.perf_counter() - t0}  # fmt: skip


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`spec` in a fresh interpreter; its one JSON line, or {"error": ...} (a failed variant is reported)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {done.returncode}: {tail[0][-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- image comparison --------------------------------------------------------------------------------


def image_difference(path: str, reference: str) -> dict[str, float]:
    """Mean and max absolute pixel difference (/255) and PSNR in dB (inf for identical images)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(reference).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{path} is {a.shape} but the baseline {reference} is {b.shape}")
    diff = np.abs(a - b)
    mse = float((diff**2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {
        "mean_abs_diff": float(diff.mean()) / 255,
        "max_abs_diff": float(diff.max()) / 255,
        "psnr_db": psnr,
    }


# --- report ------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """One row per variant: speed, image difference vs the baseline, eval accuracy and its change."""
    cfg = results["config"]
    rows = results["variants"]
    base = rows.get("baseline", {})
    base_step = base.get("image", {}).get("step_s")
    base_acc = base.get("eval", {}).get("accuracy")
    lines = [
        f"Accelerators on {Path(cfg['model']).name} ({cfg['size']}x{cfg['size']}, {cfg['steps']} {SAMPLER} "
        f"steps, CFG {CFG_SCALE}, precision {cfg['precision']}); eval on {Path(cfg['eval_model']).name} "
        f"({cfg['eval_desc']})",
        "",
        "| variant | settings | s/step | speedup | first step s | mean abs diff | max abs diff | PSNR dB "
        "| eval acc | Δ acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        img, ev = row.get("image", {}), row.get("eval", {})
        step = img.get("step_s")
        speedup = base_step / step if step and base_step else None
        acc = ev.get("accuracy")
        delta = acc - base_acc if acc is not None and base_acc is not None else None
        settings = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-"
        cells = [name, settings, _fmt(step, ".3f"), _fmt(speedup, ".2f"),
                 _fmt(img.get("first_step_s"), ".2f"), _fmt(img.get("mean_abs_diff"), ".4f"),
                 _fmt(img.get("max_abs_diff"), ".4f"),
                 _fmt(img.get("psnr_db"), ".1f"), _fmt(acc, ".3f"), _fmt(delta, "+.3f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        for kind in ("image", "eval"):
            if "error" in row.get(kind, {}):
                lines.append(f"|  | {kind} failed: {row[kind]['error']} |" + " |" * 8)
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model for speed and image difference")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--eval-model", type=Path, help="model for the eval (default: the shipped default model)")
    ap.add_argument("--eval-prompts", type=int, help="use only N prompts (a smoke test; default: all)")
    ap.add_argument("--eval-images-per-prompt", type=int, default=4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")  # every difference and speedup is against it
    args.names = names
    if args.steps < 2:
        ap.error("--steps must be >= 2 (seconds per step leave the first step out)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        work = worker_image if spec["kind"] == "image" else worker_eval
        print(json.dumps(work(spec)))
        return 0
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}; pass --model PATH (a single-file checkpoint)")
    if args.eval_model is None:
        from diffusekit.cli_generate import default_model_path

        args.eval_model = default_model_path()
    eval_desc = (f"{args.eval_prompts or 'all'} prompts x {args.eval_images_per_prompt} images, "
                 f"{args.eval_steps} DPM++ 2M steps")  # fmt: skip
    config = {"model": str(args.model), "size": args.size, "steps": args.steps, "precision": args.precision,
              "eval_model": str(args.eval_model), "eval_desc": eval_desc, "variants": args.names}  # fmt: skip
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    results: dict[str, Any] = {"config": config, "machine": machine, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="accel-bench-") as tmp:
        for name in args.names:
            row: dict[str, Any] = {}
            png = str(Path(tmp) / f"{name}.png")
            log(f"{name}: image ({args.size}px, {args.steps} steps)")
            spec = {"kind": "image", "model": str(args.model), "precision": args.precision,
                    "accel": VARIANTS[name], "size": args.size, "steps": args.steps, "png": png}  # fmt: skip
            row["image"] = run_worker(spec, args.timeout)
            if "error" not in row["image"] and "error" not in results["variants"].get("baseline", {}).get(
                "image", {}
            ):
                row["image"] |= image_difference(png, str(Path(tmp) / "baseline.png"))
            if not args.skip_eval:
                log(f"{name}: eval on {args.eval_model.name}")
                spec = {"kind": "eval", "model": str(args.eval_model), "accel": VARIANTS[name],
                        "steps": args.eval_steps, "images_per_prompt": args.eval_images_per_prompt,
                        "prompts": args.eval_prompts}  # fmt: skip
                row["eval"] = run_worker(spec, args.timeout)
            results["variants"][name] = row
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accel.json").write_text(json.dumps(results, indent=2))
    (args.out / "accel.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
