"""CPU benchmark: diffusekit against diffusers on real-size SD1.5 weights (random, one fp16 single file).

Usage:
    python bench/perf.py [--model PATH] [--out bench/results] [--only a,b,...] [--config sd1|tiny_sd1]
                         [--repeats N] [--with-ours-fp32] [--variants METRIC=SIDE:PREC,SIDE:PREC ...]
                         [--threads N] [--matmul-n N] [--timeout S]

Metrics (names for --only): load, text, unet512, unet768, vae512, vae1024, image512, matmul, and sdcpp
(stable-diffusion.cpp, run only where its Python package imports). Every measurement runs in a fresh
`python bench/perf_worker.py SPEC` process that prints one JSON line; the parent alternates diffusekit
("ours") and diffusers runs for each metric, `--repeats` times, and reports median and min.

Weights: the SD1.5 architecture with seeded random weights, cached as one fp16 safetensors file
(default ~/.cache/diffusekit-bench/sd15-random-fp16.safetensors, made once with `diffusekit create`) and a
diffusers folder of the same weights next to it (made once with `diffusekit convert --format diffusers`).
Prompt, negative prompt, seed and sampler (Euler, 20 steps, CFG 7.5) are the same on both sides.

Writes OUT/perf.json (every raw number and the machine) and OUT/perf.md (the table, also printed).
`--config tiny_sd1` runs the same harness on the tiny preset: a smoke test of the harness, not a benchmark.

Files: this one is the CLI and the parent side (settings, variants, weights, running workers, summaries,
perf.json); bench/perf_worker.py is everything that runs inside a worker (the ours/diffusers sides, the
measurements) and holds the shared constants (prompt, sampler, sizes, metric names); bench/perf_report.py
renders perf.md. bench/ is not a package: the two are imported by plain name, which works from any cwd
because Python puts the running script's folder (bench/) first on sys.path.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from perf_report import _median, render_markdown
from perf_worker import (
    CFG_SCALE,
    METRICS,
    NEGATIVE,
    PROMPT,
    SAMPLER,
    SEED,
    STEPS,
    UNET_SIZES,
    VAE_SIZES,
    worker_main,
)

CONFIGS = {"sd1": "sd15-random-fp16.safetensors", "tiny_sd1": "tiny-sd1-random-fp16.safetensors"}
MATMUL_N = {"sd1": 4096, "tiny_sd1": 1024}  # the smoke test keeps the matmul probe cheap
CACHE_DIR = Path("~/.cache/diffusekit-bench").expanduser()
SDCPP_WTYPES = ("f16", "q8_0")  # "+fa" adds its diffusion flash attention, e.g. "f16+fa"
PRECISIONS = {
    "ours": ("auto", "fp32", "bf16", "openvino", "openvino-int8"),
    "diffusers": ("fp32", "bf16"),
    "sdcpp": (*SDCPP_WTYPES, *(f"{w}+fa" for w in SDCPP_WTYPES)),
}
SUMMARY_KEYS = (
    "value",
    "load_s",
    "import_s",
    "generate_s",
    "total_s",
    "wall_s",
    "peak_rss_mb",
    "peak_hwm_mb",
    "rss_after_load_mb",
)


class BenchmarkError(RuntimeError):
    """A worker failed, or the benchmark could not be set up."""


def log(message: str) -> None:
    """A progress line on stderr (stdout is reserved for the report and the worker's JSON line)."""
    print(f"[perf] {message}", file=sys.stderr, flush=True)


# --- variants --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Who runs a measurement ("ours", "diffusers", "torch" for matmul, "sdcpp") and at which precision."""

    side: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.side} {self.precision}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        side, _, precision = text.strip().partition(":")
        if precision not in PRECISIONS.get(side, ()):
            valid = ", ".join(f"{s}:{p}" for s, ps in PRECISIONS.items() for p in ps)
            raise ValueError(f"unknown variant {text!r}; valid: {valid}")
        return cls(side, precision)


DIFFUSERS_FP32, DIFFUSERS_BF16 = Variant("diffusers", "fp32"), Variant("diffusers", "bf16")
OURS_AUTO, OURS_FP32 = Variant("ours", "auto"), Variant("ours", "fp32")


def default_variants(with_ours_fp32: bool) -> dict[str, list[Variant]]:
    """Per metric, what runs: diffusers fp32 and bf16 against ours auto (+ ours fp32 where asked)."""
    base = [DIFFUSERS_FP32, DIFFUSERS_BF16, OURS_AUTO]
    out = {m: list(base) for m in ("load", "text", *UNET_SIZES, *VAE_SIZES, "image512")}
    if with_ours_fp32:
        out["unet512"].append(OURS_FP32)
        out["image512"].append(OURS_FP32)
    out["matmul"] = [Variant("torch", "fp32"), Variant("torch", "bf16")]
    out["sdcpp"] = [Variant("sdcpp", w) for w in SDCPP_WTYPES]
    return out


def parse_variant_overrides(items: Iterable[str]) -> dict[str, list[Variant]]:
    """`unet512=diffusers:fp32,ours:auto` -> {"unet512": [...]}; `sdcpp=sdcpp:f16,sdcpp:f16+fa` too."""
    out: dict[str, list[Variant]] = {}
    for item in items:
        metric, _, spec = item.partition("=")
        if metric not in METRICS or metric == "matmul" or not spec:
            raise ValueError(f"bad --variants {item!r}; expected METRIC=SIDE:PREC[,SIDE:PREC...]")
        out[metric] = [Variant.parse(v) for v in spec.split(",")]
    return out


def alternate(variants: Sequence[Variant]) -> list[Variant]:
    """Ours and the other side interleaved (ours, theirs, ours, theirs...) so drift hits both alike."""
    ours = [v for v in variants if v.side == "ours"]
    theirs = [v for v in variants if v.side != "ours"]
    return [v for pair in itertools.zip_longest(ours, theirs) for v in pair if v is not None]


# --- weights ---------------------------------------------------------------------------------------


def diffusekit_cli(*args: str) -> None:
    """Run `diffusekit ARGS` with this interpreter; raise with its stderr on failure."""
    cmd = [sys.executable, "-m", "diffusekit.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchmarkError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def ensure_weights(path: Path, preset: str) -> Path:
    """The fp16 single file at `path`, created with `diffusekit create PRESET` when missing."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"creating {path} (preset {preset}, random weights, fp16)")
        diffusekit_cli("create", preset, str(path), "--dtype", "fp16", "--seed", "0")
    return path


def diffusers_folder_for(path: Path) -> Path:
    return path.with_name(f"{path.stem}-diffusers")


def ensure_diffusers_folder(path: Path) -> Path:
    """A diffusers folder of the same weights next to the file, converted once (atomically by rename)."""
    folder = diffusers_folder_for(path)
    if not (folder / "model_index.json").is_file():
        log(f"converting {path.name} -> {folder} (diffusers layout)")
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".convert-") as tmp:
            staged = Path(tmp) / "folder"
            diffusekit_cli("convert", str(path), str(staged), "--format", "diffusers")
            if folder.exists():
                shutil.rmtree(folder)
            staged.rename(folder)
    return folder


# --- machine ---------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The cpuinfo flags that decide bf16 speed (AVX512-BF16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def machine_info(threads: int | None) -> dict[str, Any]:
    """Read without importing torch, so the parent stays small (its RSS would leak into workers' maxrss)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "diffusers": _package_version("diffusers"),
        "transformers": _package_version("transformers"),
        "diffusekit": _package_version("diffusekit"),
        "stable_diffusion_cpp": _package_version("stable-diffusion-cpp-python"),
    }


def sdcpp_available() -> bool:
    return importlib.util.find_spec("stable_diffusion_cpp") is not None


# --- parent: orchestration -------------------------------------------------------------------------


def worker_env(threads: int | None) -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DIFFUSERS_VERBOSITY="error",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run `perf_worker.py SPEC` in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("perf_worker.py")), json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(spec.get("threads"))
        )
    except subprocess.TimeoutExpired as e:
        raise BenchmarkError(
            f"worker {spec['metric']} {spec.get('side')} timed out after {timeout:.0f} s"
        ) from e
    wall_s = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BenchmarkError(
            f"worker {spec['metric']} {spec.get('side')} {spec.get('precision')} "
            f"exited {done.returncode}:\n{tail}"
        )
    return json.loads(lines[-1]) | {"wall_s": wall_s}


@dataclass
class Settings:
    config: str
    model: Path
    folder: Path | None
    out: Path
    metrics: list[str]
    variants: dict[str, list[Variant]]
    repeats: int
    threads: int | None
    matmul_n: int
    timeout: float


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """min/median/max of each numeric field of the successful runs of one variant."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, dict[str, float]] = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values:
            out[key] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
                "n": len(values),
            }
    return out


def _spec(s: Settings, metric: str, variant: Variant) -> dict[str, Any]:
    return {
        "metric": metric,
        "side": variant.side,
        "precision": variant.precision,
        "config": s.config,
        "model": str(s.model),
        "folder": str(s.folder) if s.folder else None,
        "threads": s.threads,
        "matmul_n": s.matmul_n,
    }


def _describe(metric: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return "FAILED"
    unit = "GFLOP/s" if metric == "matmul" else "s"
    rss = f", peak RSS {result['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in result else ""
    return f"{result['value']:.3f} {unit} (dtype {result.get('dtype', '-')}{rss})"


def run_metric(s: Settings, metric: str, report: dict[str, Any]) -> None:
    """Every variant of one metric, `repeats` times, sides alternating; results go into `report`."""
    runs: dict[str, list[dict[str, Any]]] = report["runs"].setdefault(metric, {})
    order = alternate(s.variants[metric])
    for rep in range(s.repeats):
        for variant in order:
            try:
                result = run_worker(_spec(s, metric, variant), timeout=s.timeout)
            except BenchmarkError as e:
                result = {"error": str(e)}
                report["errors"].append(f"{metric} {variant.label}: {e}")
            runs.setdefault(variant.label, []).append(result)
            log(f"{metric} {variant.label} [{rep + 1}/{s.repeats}]: {_describe(metric, result)}")
            report["summary"][metric] = {label: summarize(rs) for label, rs in runs.items()}
            write_json(s.out / "perf.json", report)


def derive_unet(report: dict[str, Any]) -> dict[str, Any]:
    """Achieved GFLOP/s and fraction of the measured bf16 (and fp32) matmul peak for every U-Net row."""
    flops = report.get("flops") or {}
    peaks = {p: _best(report, p) for p in ("bf16", "fp32")}
    out: dict[str, Any] = {"peak_gflops": peaks}
    for metric in UNET_SIZES:
        if metric not in flops:
            continue
        for label in report["summary"].get(metric, {}):
            seconds = _median(report, metric, label)
            if not seconds:
                continue
            gflops = flops[metric] / seconds / 1e9
            row = {"gflops": gflops, "seconds_median": seconds}
            for p, peak in peaks.items():
                row[f"fraction_of_{p}_peak"] = gflops / peak if peak else None
            out.setdefault(metric, {})[label] = row
    return out


def _best(report: dict[str, Any], precision: str) -> float | None:
    stats = report["summary"].get("matmul", {}).get(f"torch {precision}", {}).get("value")
    return stats["max"] if stats else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", choices=tuple(CONFIGS), default="sd1", help="model preset (tiny_sd1: smoke test)"
    )
    p.add_argument("--model", type=Path, help=f"fp16 single file (default: {CACHE_DIR}/<config file>)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for perf.json and perf.md")
    p.add_argument("--only", help=f"comma-separated metrics from: {', '.join(METRICS)}")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant and metric")
    p.add_argument(
        "--with-ours-fp32", action="store_true", help="also run ours at fp32 for unet512, image512"
    )
    p.add_argument(
        "--variants",
        action="append",
        default=[],
        metavar="METRIC=SIDE:PREC,...",
        help="replace one metric's variants, e.g. unet512=diffusers:bf16,ours:auto,ours:bf16",
    )
    p.add_argument("--threads", type=int, help="torch threads in the workers (default: torch's default)")
    p.add_argument("--matmul-n", type=int, help="matmul probe size (default 4096; 1024 for tiny_sd1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per worker process")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # old spelling of `perf_worker.py SPEC`
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def selected_metrics(only: str | None) -> list[str]:
    if not only:
        return list(METRICS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def build_settings(args: argparse.Namespace) -> Settings:
    variants = default_variants(args.with_ours_fp32) | parse_variant_overrides(args.variants)
    metrics = selected_metrics(args.only)
    model = ensure_weights((args.model or CACHE_DIR / CONFIGS[args.config]).expanduser(), args.config)
    needs_folder = any(v.side == "diffusers" for m in metrics for v in variants[m])
    return Settings(
        config=args.config,
        model=model,
        folder=ensure_diffusers_folder(model) if needs_folder else None,
        out=args.out,
        metrics=metrics,
        variants=variants,
        repeats=args.repeats,
        threads=args.threads,
        matmul_n=args.matmul_n or MATMUL_N[args.config],
        timeout=args.timeout,
    )


def new_report(s: Settings) -> dict[str, Any]:
    return {
        "machine": machine_info(s.threads),
        "settings": {
            "config": s.config,
            "model": str(s.model),
            "folder": str(s.folder),
            "repeats": s.repeats,
            "metrics": s.metrics,
            "matmul_n": s.matmul_n,
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "seed": SEED,
            "steps": STEPS,
            "cfg_scale": CFG_SCALE,
            "sampler": SAMPLER,
            "variants": {m: [v.label for v in s.variants[m]] for m in s.metrics},
        },
        "flops": None,
        "stable_diffusion_cpp": None,
        "runs": {},
        "summary": {},
        "derived": {},
        "errors": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_benchmark(s: Settings) -> dict[str, Any]:
    report = new_report(s)
    if any(m in UNET_SIZES for m in s.metrics):
        log("counting U-Net FLOPs on the meta device")
        report["flops"] = run_worker({"metric": "flops", "config": s.config}, timeout=s.timeout)["flops"]
    for metric in s.metrics:
        if metric == "sdcpp":
            if not sdcpp_available():
                report["stable_diffusion_cpp"] = "not installed"
                log("sdcpp: stable_diffusion_cpp is not importable; skipped")
                continue
            report["stable_diffusion_cpp"] = "installed"
        run_metric(s, metric, report)
    report["derived"] = derive_unet(report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    settings = build_settings(args)
    report = run_benchmark(settings)
    write_json(settings.out / "perf.json", report)
    markdown = render_markdown(report)
    (settings.out / "perf.md").write_text(markdown)
    print(markdown)
    if report["errors"]:
        raise BenchmarkError(
            f"{len(report['errors'])} run(s) failed; details in {settings.out / 'perf.json'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
