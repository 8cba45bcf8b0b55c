"""Golden-image checks: a few fixed generations recorded per version, re-rendered and compared later.

Renders run in fp32 on the CPU with a deterministic sampler (Euler) and fixed seeds, so the same
weights and the same code give the same pixels bit for bit on one machine. The comparison is on the
8-bit RGB output: PSNR = 10 log10(255^2 / MSE) over all pixels and channels, and the largest absolute
difference of any one channel value. A check passes when PSNR >= `min_psnr` (default 50 dB, an RMS
error of 0.8 levels) and the max difference <= `max_diff` (default 16 levels).

Why these numbers (measured on this repo's models, fp32, one CPU): the same weights rendered with a
different thread count (another float reduction order, as on another CPU or BLAS build) stay at
86-89 dB with max diff 1; warping the last sampler sigmas by 10% gives 42-54 dB on the default model,
scaling the denoiser output by 1.1 gives 44 dB on a random tiny model; a flipped exponent bit in one
U-Net weight gives under 20 dB. Changes that keep every image above 50 dB are below what the eye sees.
"""

from __future__ import annotations

import hashlib
import io
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..models.configs import ModelConfig
from ..params import GenerationParams, ModelDefaults

MIN_PSNR = 50.0
MAX_DIFF = 16
GOLDEN_SAMPLER = "Euler"
GOLDEN_PROMPTS = (
    ("a red circle above a blue square", 11),
    ("a photo of a cat sitting on a wooden table", 22),
    ("a green triangle, white background", 33),
)


@dataclass(frozen=True)
class GoldenSpec:
    """What one golden generation renders."""

    prompt: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: str = GOLDEN_SAMPLER

    def params(self) -> GenerationParams:
        return GenerationParams(
            prompt=self.prompt,
            seed=self.seed,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            sampler=self.sampler,
            schedule="automatic",
            width=self.width,
            height=self.height,
        )


def default_specs(cfg: ModelConfig, defaults: ModelDefaults) -> list[GoldenSpec]:
    """Three 8-step images at the native size for small models; two 6-step 128-px images for big ones.

    128 px keeps every U-Net level (a 16x16 latent) while a real-size SD1.5 check stays near a minute on
    one CPU core (256 px took 194 s there: bench/results/store_golden_time_256px.json)."""
    small = cfg.resolution <= 128
    side = cfg.resolution if small else 128
    steps, count = (8, 3) if small else (6, 2)
    return [
        GoldenSpec(prompt, seed, steps, defaults.cfg_scale, side, side)
        for prompt, seed in GOLDEN_PROMPTS[:count]
    ]


def pixels(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def fingerprint(px: np.ndarray) -> str:
    """sha256 of the shape and the RGB bytes: equal fingerprints mean identical pixels."""
    return hashlib.sha256(f"{px.shape}".encode() + px.tobytes()).hexdigest()


def png_bytes(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(data)))


def compare(golden: np.ndarray, now: np.ndarray) -> dict:
    """PSNR (dB, inf when identical), max and mean absolute difference in 0..255 levels."""
    if golden.shape != now.shape:
        return {"psnr": 0.0, "max_diff": 255, "mean_diff": 255.0, "identical": False, "shape_changed": True}
    d = golden.astype(np.int16) - now.astype(np.int16)
    mse = float(np.mean(d.astype(np.float64) ** 2))
    return {
        "psnr": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "max_diff": int(np.abs(d).max()),
        "mean_diff": float(np.abs(d).mean()),
        "identical": mse == 0,
    }


def environment() -> dict[str, str]:
    """What rendered a golden image: software versions and CPU, shown when a check fails."""
    return {
        "diffusekit": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


@dataclass
class GoldenImage:
    """One recorded golden generation: its spec, PNG blob and pixel fingerprint."""

    spec: GoldenSpec
    png_blob: str
    fingerprint: str
    seconds: float


@dataclass
class GoldenRecord:
    """A version's golden set and the thresholds its checks use."""

    images: list[GoldenImage]
    min_psnr: float = MIN_PSNR
    max_diff: int = MAX_DIFF
    recorded_at: float = 0.0
    environment: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GoldenRecord:
        images = [
            GoldenImage(GoldenSpec(**i["spec"]), i["png_blob"], i["fingerprint"], i["seconds"])
            for i in d["images"]
        ]
        return cls(images, d["min_psnr"], d["max_diff"], d["recorded_at"], d.get("environment", {}))


def render(pipe, specs: list[GoldenSpec]) -> list[tuple[np.ndarray, float]]:
    """Render each spec with `pipe` (an fp32 Pipeline): [(pixels, seconds)]."""
    out = []
    for spec in specs:
        t0 = time.perf_counter()
        image = pipe.generate(spec.params()).images[0]
        out.append((pixels(image), time.perf_counter() - t0))
    return out


def record(pipe, specs: list[GoldenSpec], put_bytes: Callable[[bytes], str]) -> GoldenRecord:
    """Render `specs` and store each image as a PNG blob through `put_bytes` (returns its digest)."""
    images = []
    for spec, (px, seconds) in zip(specs, render(pipe, specs), strict=True):
        images.append(GoldenImage(spec, put_bytes(png_bytes(px)), fingerprint(px), seconds))
    return GoldenRecord(images, recorded_at=time.time(), environment=environment())


@dataclass
class CheckResult:
    """The outcome of re-rendering one golden image."""

    index: int
    spec: GoldenSpec
    psnr: float
    max_diff: int
    mean_diff: float
    identical: bool
    passed: bool
    seconds: float
    error: str | None = None  # why no image could be made (e.g. NaN output), if so

    def to_dict(self) -> dict:
        d = asdict(self)
        d["psnr"] = None if math.isinf(self.psnr) else round(self.psnr, 3)
        return d


def check(
    pipe,
    rec: GoldenRecord,
    read_bytes: Callable[[str], bytes],
    *,
    min_psnr: float | None = None,
    max_diff: int | None = None,
) -> list[CheckResult]:
    """Re-render every golden image and compare it with the recorded one."""
    min_psnr = rec.min_psnr if min_psnr is None else min_psnr
    max_diff = rec.max_diff if max_diff is None else max_diff
    from ..pipeline import NonFiniteError

    results = []
    for i, g in enumerate(rec.images):
        t0 = time.perf_counter()
        try:
            [(px, seconds)] = render(pipe, [g.spec])
        except NonFiniteError as e:  # NaN/inf weights: no image at all, the worst possible difference
            seconds = time.perf_counter() - t0
            results.append(CheckResult(i, g.spec, 0.0, 255, 255.0, False, False, seconds, error=str(e)))
            continue
        if fingerprint(px) == g.fingerprint:
            m = {"psnr": math.inf, "max_diff": 0, "mean_diff": 0.0, "identical": True}
        else:
            m = compare(png_pixels(read_bytes(g.png_blob)), px)
        ok = m["psnr"] >= min_psnr and m["max_diff"] <= max_diff
        results.append(
            CheckResult(i, g.spec, m["psnr"], m["max_diff"], m["mean_diff"], m["identical"], ok, seconds)
        )
    return results
