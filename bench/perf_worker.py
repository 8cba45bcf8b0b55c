"""The worker side of `bench/perf.py`: one measurement in a fresh process, printed as one JSON line.

Usage (the parent does this; by hand only to debug one measurement):
    python bench/perf_worker.py SPEC_JSON

SPEC_JSON names the metric ("load", "text", "unet512", "unet768", "vae512", "vae1024", "image512",
"matmul", "flops", "sdcpp"), the side ("ours", "diffusers", "torch", "sdcpp"), its precision, the model
file / diffusers folder, the preset and the thread count (see `perf._spec`). The measurement's result,
its peak memory and torch's thread count go to stdout as the process's only line; everything else
goes to stderr.

This module also holds the constants the parent and the report share (prompt, sampler, sizes, metric
names): they are defined here once and imported by `perf.py` and `perf_report.py`. It imports torch,
diffusers and diffusekit only inside functions, so importing it keeps the parent process small.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import sys
import time
from collections.abc import Callable
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
    # its own default (-1) counted one core on this 2-core VM; give it every core, as torch takes
    threads = spec.get("threads") or os.cpu_count() or -1
    wtype, _, flash = spec["precision"].partition("+")  # "f16+fa": with diffusion flash attention
    sd = StableDiffusion(
        **_accepted(
            StableDiffusion,
            model_path=spec["model"],
            wtype=wtype,
            n_threads=threads,
            diffusion_flash_attn=flash == "fa",
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
        "sdcpp_threads": threads,
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC_JSON")
    worker_main(sys.argv[1])
