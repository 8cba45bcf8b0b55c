"""`diffusekit convert --quantize int8`: quantize a model's U-Net once and write an int8 checkpoint.

Activations "dynamic" (the default): every quantizable U-Net layer becomes int8 and quantizes each
input with that input's own range, so nothing is calibrated. "static": the fp32 model first generates a
few images (CALIBRATION_PROMPTS, a few sampler steps each, CFG on) while `accel.int8_static.Calibrator`
records every layer's input range, which is then frozen (about prompts x steps CFG U-Net steps at `size`;
a little faster to run, at a large quality cost, see accel/int8_static.py). With `text_encoders` the
text encoders' attention/MLP linears become int8 too (dynamic activations, accel/int8_text.py). Either
way the whole model is saved as one safetensors file marked int8-static, format version 2
(`accel/int8_file.py` loads it back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .accel.errors import AccelError
from .accel.int8_file import COMPONENTS_KEY, FORMAT_KEY, FORMAT_VERSION, INT8_STATIC, QUANTIZATION_KEY
from .accel.int8_static import Calibrator, candidates, quantize_unet
from .accel.int8_text import quantize_text_encoder
from .checkpoints.load import checkpoint_metadata
from .checkpoints.single_file import save_state_dict
from .params import GenerationParams
from .pipeline import Pipeline

__all__ = ["ACTIVATIONS", "CALIBRATION_PROMPTS", "QuantizeSettings", "quantize_checkpoint"]

# Varied subjects, styles and lengths, so the observed ranges are not one prompt's.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed",
    "a watercolor painting of a quiet harbour at sunset, soft light",
    "portrait of an old man with a beard, studio lighting, 85mm",
    "a red cube on top of a blue sphere, 3d render",
    "a dense forest in autumn, fog, cinematic",
    "a city street at night in the rain, neon signs, reflections",
    "a bowl of fruit on a wooden table, still life oil painting",
    "an anime girl with green hair in a field of flowers",
)
NEGATIVE = "blurry, low quality"
ACTIVATIONS = ("dynamic", "static")


@dataclass(frozen=True)
class QuantizeSettings:
    """How the int8 activations are ranged, and the calibration of static ones runs."""

    activations: str = "dynamic"  # "dynamic": each call's own range; "static": calibrated once
    prompts: int = 4  # how many of CALIBRATION_PROMPTS
    steps: int = 8  # sampler steps per calibration image
    size: int | None = None  # image side in pixels; None: the model's native resolution
    percentile: float = 99.99  # per-call range kept (see Calibrator)
    seed: int = 0
    text_encoders: bool = False  # also the text encoders' linears (opt-in: docs/guides/cpu-paths.md)

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise AccelError(
                f"int8 activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}"
            )
        if not 1 <= self.prompts <= len(CALIBRATION_PROMPTS):
            raise AccelError(f"calibration prompts must be 1..{len(CALIBRATION_PROMPTS)}, got {self.prompts}")
        if self.steps < 1:
            raise AccelError(f"calibration steps must be at least 1, got {self.steps}")
        if self.size is not None and (self.size < 64 or self.size % 8):
            raise AccelError(f"calibration size must be a multiple of 8 and at least 64, got {self.size}")


def calibrate(
    pipe: Pipeline, settings: QuantizeSettings, *, keep_calls: bool = False, include_all: bool = False
) -> dict[str, Any]:
    """Input ranges of every quantizable U-Net layer of `pipe` (fp32), observed while it generates.

    `keep_calls`: the per-call statistics instead (`int8_static.combine` turns them into ranges);
    `include_all`: observe every `candidates` layer, not only the `quantizable` ones.
    """
    size = settings.size or pipe.cfg.resolution
    layers = list(candidates(pipe.model.unet)) if include_all else None
    cal = Calibrator(pipe.model.unet, percentile=settings.percentile, layers=layers)
    with cal:
        for i, prompt in enumerate(CALIBRATION_PROMPTS[: settings.prompts]):
            params = GenerationParams(
                prompt=prompt, negative_prompt=NEGATIVE, steps=settings.steps, seed=settings.seed + i,
                width=size, height=size, cfg_scale=7.0,
            )  # fmt: skip
            pipe.generate(params)  # the VAE decode is wasted work, about 1.5 U-Net steps per image
    return cal.calls if keep_calls else cal.ranges


def quantize_checkpoint(
    src: str | Path, dst: str | Path, settings: QuantizeSettings | None = None, **load_kw: Any
) -> dict[str, Any]:
    """Calibrate `src` in fp32, quantize its U-Net to int8 and write `dst` (.safetensors); a summary."""
    settings = settings or QuantizeSettings()
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise AccelError(f"--quantize int8 writes a .safetensors file; got {dst.name!r}")
    t0 = time.perf_counter()
    pipe = Pipeline.from_file(src, precision="fp32", **load_kw)
    dynamic = settings.activations == "dynamic"
    size = settings.size or pipe.cfg.resolution
    ranges = None
    if not dynamic:
        with torch.inference_mode():
            ranges = calibrate(pipe, settings)
    calib_s = time.perf_counter() - t0
    count = quantize_unet(pipe.model.unet, ranges, dynamic=dynamic)
    components = ["unet"]
    te_layers = 0
    if settings.text_encoders:
        for name, (_, encoder) in pipe.model.components().items():
            if name.startswith("text_encoder"):
                te_layers += quantize_text_encoder(encoder)
                components.append(name)
    how = "dynamic activation ranges (per call), no calibration" if dynamic else (
        f"static activation ranges: {settings.prompts} prompts x {settings.steps} steps at {size}px, "
        f"percentile {settings.percentile}"
    )  # fmt: skip
    extra = {
        QUANTIZATION_KEY: INT8_STATIC,
        "diffusekit.quantization.calibration": how,
        FORMAT_KEY: str(FORMAT_VERSION),
        COMPONENTS_KEY: ",".join(components),
    }
    metadata = {k: v for k, v in pipe.loaded.metadata.items() if not k.startswith(QUANTIZATION_KEY)}
    metadata |= checkpoint_metadata(pipe.cfg, extra)
    save_state_dict(pipe.model.state_dict(), dst, metadata=metadata)
    return {
        "src": str(src),
        "dst": str(dst),
        "quantization": INT8_STATIC,
        "layers": count,
        "text_encoder_layers": te_layers,
        "components": components,
        "calibration": extra["diffusekit.quantization.calibration"],
        "calibration_seconds": round(calib_s, 1),
        "bytes_after": dst.stat().st_size,
    }
