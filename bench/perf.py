"""CPU benchmark: diffusekit against diffusers on real-size SD1.5 weights (random, one fp16 single file).

Usage:
    python bench/perf.py [--model PATH] [--out bench/results] [--only a,b,...] [--config sd1|tiny_sd1]
                         [--repeats N] [--with-ours-fp32] [--variants METRIC=SIDE:PREC,SIDE:PREC ...]
                         [--threads N] [--matmul-n N] [--timeout S]

Metrics (names for --only): load, text, unet512, unet768, vae512, vae1024, image512, matmul, and sdcpp
(stable-diffusion.cpp, run only where its Python package imports). Every measurement runs in a fresh
`python bench/perf.py --worker SPEC` process that prints one JSON line; the parent alternates diffusekit
("ours") and diffusers runs for each metric, `--repeats` times, and reports median and min.

Weights: the SD1.5 architecture with seeded random weights, cached as one fp16 safetensors file
(default ~/.cache/diffusekit-bench/sd15-random-fp16.safetensors, made once with `diffusekit create`) and a
diffusers folder of the same weights next to it (made once with `diffusekit convert --format diffusers`).
Prompt, negative prompt, seed and sampler (Euler, 20 steps, CFG 7.5) are the same on both sides.

Writes OUT/perf.json (every raw number and the machine) and OUT/perf.md (the table, also printed).
`--config tiny_sd1` runs the same harness on the tiny preset: a smoke test of the harness, not a benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
SEED = 1
STEPS = 20
CFG_SCALE = 7.5
SAMPLER = "Euler"
IMAGE_SIZE = 512
BATCH_CFG = 2  # one CFG U-Net call: cond + uncond
TEXT_TOKENS = 77
TIMESTEP = 500.0
TEXT_INNER = 3  # text encoding is short: best of 3 calls (after a warm-up) within each process
MATMUL_INNER = 5

UNET_SIZES = {"unet512": 512, "unet768": 768}
VAE_SIZES = {"vae512": 512, "vae1024": 1024}
METRICS = ("load", "text", *UNET_SIZES, *VAE_SIZES, "image512", "matmul", "sdcpp")
CONFIGS = {"sd1": "sd15-random-fp16.safetensors", "tiny_sd1": "tiny-sd1-random-fp16.safetensors"}
MATMUL_N = {"sd1": 4096, "tiny_sd1": 1024}  # the smoke test keeps the matmul probe cheap
CACHE_DIR = Path("~/.cache/diffusekit-bench").expanduser()
PRECISIONS = {"ours": ("auto", "fp32", "bf16"), "diffusers": ("fp32", "bf16")}
SDCPP_WTYPES = ("f16", "q8_0")
COLUMN_ORDER = ("diffusers fp32", "diffusers bf16", "ours auto", "ours fp32", "ours bf16")
RATIOS = ("diffusers fp32", "diffusers bf16")  # "X / ours": speedup of ours auto, higher is better
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
    """`unet512=diffusers:fp32,ours:auto` -> {"unet512": [...]} (for the ours/diffusers metrics)."""
    out: dict[str, list[Variant]] = {}
    for item in items:
        metric, _, spec = item.partition("=")
        if metric not in METRICS or metric in ("matmul", "sdcpp") or not spec:
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


# --- worker: measurements in a fresh process -------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_stats() -> dict[str, float]:
    """ru_maxrss (may include the parent's RSS at spawn) and VmHWM (this process image only), in MB."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_hwm_mb": _status_mb("VmHWM"),
    }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class OursSide:
    """diffusekit's Pipeline loaded from the fp16 single file at a diffusekit precision."""

    def __init__(self, model: str, precision: str) -> None:
        t0 = time.perf_counter()
        import torch

        from diffusekit.params import GenerationParams
        from diffusekit.pipeline import Pipeline

        self.torch, self.params_cls = torch, GenerationParams
        t1 = time.perf_counter()
        self.pipe = Pipeline.from_file(model, precision=precision)
        self.load_s, self.import_s = time.perf_counter() - t1, t1 - t0
        self.dtype = str(self.pipe.dtype).removeprefix("torch.")
        self.context_dim: int = self.pipe.cfg.unet.context_dim

    def params(self, width: int, height: int) -> Any:
        return self.params_cls(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=width,
            height=height,
            steps=STEPS,
            cfg_scale=CFG_SCALE,
            sampler=SAMPLER,
            seed=SEED,
        )

    def encode(self) -> object:
        return self.pipe.encode(self.params(IMAGE_SIZE, IMAGE_SIZE), IMAGE_SIZE, IMAGE_SIZE)

    def unet(self, x: Any, t: Any, context: Any) -> Any:
        with self.torch.inference_mode():
            return self.pipe.unet_call(x, t, context)

    def decode(self, latents_scaled: Any) -> object:
        return self.pipe.decode(latents_scaled)

    def generate(self) -> object:
        return self.pipe.generate(self.params(IMAGE_SIZE, IMAGE_SIZE)).images


class DiffusersSide:
    """diffusers' StableDiffusionPipeline from the converted folder, Euler scheduler, fp32 or bf16."""

    def __init__(self, folder: str, precision: str) -> None:
        t0 = time.perf_counter()
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        self.torch = torch
        self.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        t1 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            torch_dtype=self.torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
        self.load_s, self.import_s = time.perf_counter() - t1, t1 - t0
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self.context_dim = int(pipe.unet.config.cross_attention_dim)

    def encode(self) -> object:
        with self.torch.inference_mode():
            return self.pipe.encode_prompt(PROMPT, self.torch.device("cpu"), 1, True, NEGATIVE)

    def unet(self, x: Any, t: Any, context: Any) -> Any:
        dt = self.torch_dtype
        with self.torch.inference_mode():
            return self.pipe.unet(x.to(dt), t, encoder_hidden_states=context.to(dt)).sample

    def decode(self, latents_scaled: Any) -> object:
        vae = self.pipe.vae
        with self.torch.inference_mode():
            return vae.decode(latents_scaled.to(self.torch_dtype) / vae.config.scaling_factor).sample

    def generate(self) -> object:
        generator = self.torch.Generator().manual_seed(SEED)
        return self.pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            width=IMAGE_SIZE,
            height=IMAGE_SIZE,
            num_inference_steps=STEPS,
            guidance_scale=CFG_SCALE,
            generator=generator,
        ).images


Side = OursSide | DiffusersSide


def load_side(spec: dict[str, Any]) -> Side:
    if spec["side"] == "ours":
        return OursSide(spec["model"], spec["precision"])
    if spec["side"] == "diffusers":
        return DiffusersSide(spec["folder"], spec["precision"])
    raise ValueError(f"unknown side {spec['side']!r}")


def _side_fields(side: Side) -> dict[str, Any]:
    return {"load_s": side.load_s, "import_s": side.import_s, "dtype": side.dtype}


def _warm_then_time(fn: Callable[[], object], inner: int = 1) -> float:
    """Seconds of the fastest of `inner` calls after one untimed warm-up call."""
    fn()
    return min(timed(fn) for _ in range(inner))


def measure_load(spec: dict[str, Any]) -> dict[str, Any]:
    side = load_side(spec)
    return {"value": side.load_s, "rss_after_load_mb": _status_mb("VmRSS"), **_side_fields(side)}


def measure_text(spec: dict[str, Any]) -> dict[str, Any]:
    side = load_side(spec)
    return {"value": _warm_then_time(side.encode, TEXT_INNER), "inner": TEXT_INNER, **_side_fields(side)}


def measure_unet(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    side = load_side(spec)
    size = UNET_SIZES[spec["metric"]] // 8
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH_CFG, 4, size, size, generator=g)
    t = torch.full((BATCH_CFG,), TIMESTEP)
    context = torch.randn(BATCH_CFG, TEXT_TOKENS, side.context_dim, generator=g)
    seconds = _warm_then_time(lambda: side.unet(x, t, context))
    return {"value": seconds, "latent": [BATCH_CFG, 4, size, size], **_side_fields(side)}


def measure_vae(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    side = load_side(spec)
    size = VAE_SIZES[spec["metric"]] // 8
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(SEED))  # scaled latents
    return {
        "value": _warm_then_time(lambda: side.decode(z)),
        "latent": [1, 4, size, size],
        **_side_fields(side),
    }


def measure_image(spec: dict[str, Any]) -> dict[str, Any]:
    """One 20-step txt2img from a cold process: imports + load + generate (no warm-up)."""
    side = load_side(spec)
    generate_s = timed(side.generate)
    total_s = time.perf_counter() - spec["_t0"]
    return {"value": total_s, "total_s": total_s, "generate_s": generate_s, **_side_fields(side)}


def measure_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """Best GFLOP/s of torch.mm on (n, n) x (n, n) in one dtype."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    n = spec["matmul_n"]
    g = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    best = _warm_then_time(lambda: torch.mm(a, b), MATMUL_INNER)
    return {"value": 2 * n**3 / best / 1e9, "seconds": best, "n": n, "inner": MATMUL_INNER, "load_s": 0.0}


def unet_flops(sizes: dict[str, int], config: str) -> dict[str, int]:
    """FLOPs of one CFG U-Net call per size, counted on the meta device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusekit.models.configs import preset
    from diffusekit.models.unet import UNetModel

    cfg = preset(config).unet
    out = {}
    with torch.device("meta"):
        model = UNetModel(cfg)
        for name, px in sizes.items():
            x = torch.empty(BATCH_CFG, cfg.in_channels, px // 8, px // 8)
            context = torch.empty(BATCH_CFG, TEXT_TOKENS, cfg.context_dim)
            with FlopCounterMode(display=False) as counter:
                model(x, torch.full((BATCH_CFG,), TIMESTEP), context)
            out[name] = int(counter.get_total_flops())
    return out


def measure_flops(spec: dict[str, Any]) -> dict[str, Any]:
    return {"flops": unet_flops(UNET_SIZES, spec["config"]), "load_s": 0.0}


def _accepted(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The kwargs `fn` accepts (all of them if its signature is unknown or takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def measure_sdcpp(spec: dict[str, Any]) -> dict[str, Any]:
    """stable-diffusion.cpp's Python binding: 20-step Euler 512 txt2img on the same single file."""
    t0 = time.perf_counter()
    from stable_diffusion_cpp import StableDiffusion

    t1 = time.perf_counter()
    threads = spec.get("threads") or -1
    sd = StableDiffusion(
        **_accepted(
            StableDiffusion,
            model_path=spec["model"],
            wtype=spec["precision"],
            n_threads=threads,
            verbose=False,
        )
    )
    load_s = time.perf_counter() - t1
    generate = getattr(sd, "generate_image", None) or sd.txt_to_img
    kwargs = _accepted(
        generate,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        sample_steps=STEPS,
        cfg_scale=CFG_SCALE,
        sample_method="euler",
        seed=SEED,
    )
    generate_s = timed(lambda: generate(**kwargs))
    total_s = time.perf_counter() - spec["_t0"]
    return {
        "value": total_s,
        "total_s": total_s,
        "generate_s": generate_s,
        "load_s": load_s,
        "import_s": t1 - t0,
        "dtype": spec["precision"],
    }


MEASURES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "load": measure_load,
    "text": measure_text,
    **dict.fromkeys(UNET_SIZES, measure_unet),
    **dict.fromkeys(VAE_SIZES, measure_vae),
    "image512": measure_image,
    "matmul": measure_matmul,
    "flops": measure_flops,
    "sdcpp": measure_sdcpp,
}


def worker_main(spec_json: str) -> None:
    """Run one measurement and print its JSON line (the only stdout line of a worker)."""
    t0 = time.perf_counter()
    spec = json.loads(spec_json) | {"_t0": t0}
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = MEASURES[spec["metric"]](spec)
    result |= memory_stats() | {"threads": torch.get_num_threads(), "process_s": time.perf_counter() - t0}
    print(json.dumps(result), flush=True)


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
    """Run `perf.py --worker SPEC` in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
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


def _median(report: dict[str, Any], metric: str, label: str, key: str = "value") -> float | None:
    stats = report["summary"].get(metric, {}).get(label, {}).get(key)
    return stats["median"] if stats else None


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


# --- markdown --------------------------------------------------------------------------------------


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if not stats:
        return "-"
    med, lo = stats["median"], stats["min"]
    return f"{med:.{digits}f}" if stats["n"] == 1 else f"{med:.{digits}f} ({lo:.{digits}f})"


def _columns(report: dict[str, Any]) -> list[str]:
    labels = {label for m, by in report["summary"].items() if m not in ("matmul", "sdcpp") for label in by}
    return [c for c in COLUMN_ORDER if c in labels] + sorted(labels - set(COLUMN_ORDER))


# (row title, metric, summary key, digits); time and memory rows: lower is better
TABLE_ROWS: tuple[tuple[str, str, str, int], ...] = (
    ("load (s)", "load", "value", 2),
    ("RSS after load (MB)", "load", "rss_after_load_mb", 0),
    ("text: prompt + negative (s)", "text", "value", 3),
    ("U-Net 512, CFG batch 2 (s/call)", "unet512", "value", 3),
    ("U-Net 768, CFG batch 2 (s/call)", "unet768", "value", 3),
    ("VAE decode 512 (s)", "vae512", "value", 3),
    ("VAE decode 1024 (s)", "vae1024", "value", 3),
    ("image512: end to end, in process (s)", "image512", "total_s", 2),
    ("image512: process wall time (s)", "image512", "wall_s", 2),
    ("image512: load (s)", "image512", "load_s", 2),
    ("image512: generate 20 steps (s)", "image512", "generate_s", 2),
    ("image512: peak RSS (MB)", "image512", "peak_rss_mb", 0),
)


def _ratio(theirs: float | None, ours: float | None) -> str:
    return f"{theirs / ours:.2f}x" if theirs and ours else "-"


def table_markdown(report: dict[str, Any]) -> list[str]:
    cols = _columns(report)
    ours = "ours auto" if "ours auto" in cols else next((c for c in cols if c.startswith("ours")), None)
    ratio_cols = [c for c in RATIOS if c in cols and ours]
    head = ["metric", *cols, *(f"{c} / {ours}" for c in ratio_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, metric, key, digits in TABLE_ROWS:
        by = report["summary"].get(metric)
        if not by:
            continue
        cells = [_cell(by.get(c, {}).get(key), digits) for c in cols]
        ours_v = _median(report, metric, ours, key) if ours else None
        ratios = [_ratio(_median(report, metric, c, key), ours_v) for c in ratio_cols]
        lines.append("| " + " | ".join([title, *cells, *ratios]) + " |")
    derived = report.get("derived", {})
    for metric in UNET_SIZES:
        rows = derived.get(metric)
        if not rows:
            continue
        gf = [f"{rows[c]['gflops']:.0f}" if c in rows else "-" for c in cols]
        frac = [_percent(rows[c].get("fraction_of_bf16_peak")) if c in rows else "-" for c in cols]
        pad = [""] * len(ratio_cols)
        lines.append("| " + " | ".join([f"{metric}: achieved GFLOP/s", *gf, *pad]) + " |")
        lines.append("| " + " | ".join([f"{metric}: fraction of bf16 matmul peak", *frac, *pad]) + " |")
    return lines


def _percent(x: float | None) -> str:
    return f"{100 * x:.0f}%" if x is not None else "-"


def _dtypes_line(report: dict[str, Any]) -> str | None:
    seen = sorted(
        {
            (label, r["dtype"])
            for by in report["runs"].values()
            for label, rs in by.items()
            for r in rs
            if label.startswith("ours") and "dtype" in r
        }
    )
    return "; ".join(f"{label} ran in {dtype}" for label, dtype in seen) or None


def matmul_markdown(report: dict[str, Any]) -> list[str]:
    by = report["summary"].get("matmul")
    if not by:
        return []
    n = report["settings"]["matmul_n"]
    lines = [
        "",
        f"## Matmul peak (torch.mm, {n}x{n}, best of {MATMUL_INNER} per process)",
        "",
        "| dtype | best GFLOP/s | median of processes |",
        "|---|---|---|",
    ]
    for label, stats in by.items():
        v = stats.get("value")
        if v:
            lines.append(f"| {label.split()[-1]} | {v['max']:.0f} | {v['median']:.0f} |")
    return lines


def flops_markdown(report: dict[str, Any]) -> list[str]:
    flops = report.get("flops")
    if not flops:
        return []
    parts = ", ".join(f"{m}: {f / 1e9:.0f} GFLOP" for m, f in flops.items())
    return ["", f"U-Net FLOPs per CFG call (batch 2, counted with FlopCounterMode on meta): {parts}."]


def sdcpp_markdown(report: dict[str, Any]) -> list[str]:
    status = report.get("stable_diffusion_cpp")
    if status is None:  # not asked for (--only without sdcpp)
        return []
    lines = ["", "## stable-diffusion.cpp (20-step Euler 512 txt2img, same single file)", ""]
    if status != "installed":
        return [*lines, f"stable_diffusion_cpp: {status}; section skipped."]
    by = report["summary"].get("sdcpp", {})
    ours_total = _median(report, "image512", "ours auto", "total_s")
    ours_gen = _median(report, "image512", "ours auto", "generate_s")
    lines += [
        "| variant | end to end (s) | generate (s) | peak RSS (MB) | sdcpp / ours auto, end to end "
        "| sdcpp / ours auto, generate |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats in by.items():
        total, gen = _median(report, "sdcpp", label, "total_s"), _median(report, "sdcpp", label, "generate_s")
        lines.append(
            f"| {label} | {_cell(stats.get('total_s'), 2)} | {_cell(stats.get('generate_s'), 2)} | "
            f"{_cell(stats.get('peak_rss_mb'), 0)} | {_ratio(total, ours_total)} | "
            f"{_ratio(gen, ours_gen)} |"
        )
    return lines


def _threads_line(report: dict[str, Any]) -> str:
    """The torch thread counts the workers actually ran with."""
    seen = {
        r["threads"] for by in report["runs"].values() for rs in by.values() for r in rs if "threads" in r
    }
    return "/".join(str(t) for t in sorted(seen)) or "unknown"


def render_markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# diffusekit vs diffusers on CPU ({s['config']}, {Path(s['model']).name})",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores, torch threads {_threads_line(report)}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}; "
        f"load average at start {m['load_average_at_start'][0]:.2f}.",
        f"Each cell: median (min) of {s['repeats']} fresh processes; sides alternate. Euler, {STEPS} steps, "
        f"CFG {CFG_SCALE}, seed {SEED}. Ratio columns are speedups of ours auto (higher is better; for "
        "memory rows, how many times less memory ours needs).",
    ]
    if dtypes := _dtypes_line(report):
        lines.append(f"Precision: {dtypes}.")
    lines += ["", *table_markdown(report), *flops_markdown(report), *matmul_markdown(report)]
    lines += sdcpp_markdown(report)
    if report["errors"]:
        lines += ["", "## Failed runs", "", *(f"- {e.splitlines()[0]}" for e in report["errors"])]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--worker", help=argparse.SUPPRESS)
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
