"""The optional OpenVINO backend: our U-Net converted by `openvino.convert_model`, cached, called like ours.

`--precision openvino` runs the U-Net as an OpenVINO graph computing in fp32 (`INFERENCE_PRECISION_HINT`
f32: the same math as the parity path, to float rounding); `--precision openvino-int8` runs an int8 graph
made by nncf's post-training quantization, calibrated on U-Net inputs captured while the fp32 graph
samples a few prompts (`capture_calibration`). The text encoder, the VAE and the samplers stay ours, in
PyTorch. The first load converts (and for int8, calibrates) and writes the IR to the cache
(accel/openvino_cache.py); later loads read it back.

The IR has dynamic batch, height, width and context length, so one entry serves every image size, batch
and prompt length. `OpenVinoUNet` compiles it per input shape ("static", the default: OpenVINO plans
static shapes better) and keeps the last compiled shape, or once for all shapes ("dynamic"; the
environment variable `DIFFUSEKIT_OPENVINO_SHAPES=dynamic`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models.unet import UNetModel
from ..precisions import OPENVINO_PRECISIONS
from ..runtime import openvino_missing
from .errors import AccelError
from .openvino_cache import IrCache, IrKey, weights_digest

__all__ = [
    "OPENVINO_PRECISIONS",
    "OpenVinoError",
    "OpenVinoUNet",
    "Int8Calibration",
    "convert_unet",
    "load_openvino_unet",
    "openvino_missing",
]

SHAPE_MODES = ("static", "dynamic")


class OpenVinoError(AccelError):
    """The OpenVINO backend cannot run here, or cannot run this feature."""


def _require(int8: bool = False) -> Any:
    why = openvino_missing(int8)
    if why is not None:
        raise OpenVinoError(f"--precision {'openvino-int8' if int8 else 'openvino'}: {why}; or use fp32")
    import openvino as ov

    return ov


# Left in fp32 by default: the ResBlocks' 1x1 skip convolutions (they read the concatenation of two
# feature maps of very different scale), the first and last convolution, and the timestep embedding's
# linears (negligible time). On the bundled model (4 prompts, 20 steps) this took int8 from 19.4 dB to
# 31.3 dB PSNR against fp32 (docs/guides/cpu-paths.md).
KEEP_FP32 = (
    r".*skip_connection.*",
    r".*input_blocks\.0\.0/.*",
    r"__module\.out\.2/.*",
    r".*time_embed.*",
    r".*emb_layers.*",
)
RANGES = ("minmax", "mean_minmax", "median_minmax", "mean_no_outliers_minmax", "histogram")


@dataclass(frozen=True)
class Int8Calibration:
    """How the int8 graph is calibrated: prompts x steps CFG U-Net calls captured at `size` pixels."""

    prompts: int = 2
    steps: int = 4
    size: int | None = None  # None: the model's native resolution
    seed: int = 0
    smooth_quant_alpha: float = -1.0  # nncf SmoothQuant for MatMuls; negative: off
    bias_correction: str = "fast"  # nncf's "fast" or "full" bias correction, or "none"
    ranges: str = "mean_minmax"  # activation range over the samples: nncf's RangeEstimatorParametersSet
    ignored: tuple[str, ...] = KEEP_FP32  # regexes of graph node names left in fp32

    def __post_init__(self) -> None:
        if self.bias_correction not in ("fast", "full", "none"):
            raise OpenVinoError(f"bias_correction must be fast, full or none, got {self.bias_correction!r}")
        if self.ranges not in RANGES:
            raise OpenVinoError(f"ranges must be one of {', '.join(RANGES)}, got {self.ranges!r}")
        if self.prompts < 1 or self.steps < 1:
            raise OpenVinoError(
                f"calibration needs at least 1 prompt and 1 step, got {self.prompts}, {self.steps}"
            )


def _input_names(unet: UNetModel) -> list[str]:
    return ["x", "timesteps", "context"] + (["y"] if unet.cfg.adm_in_channels is not None else [])


def convert_unet(unet: UNetModel) -> Any:
    """`openvino.convert_model` of our U-Net (fp32, default layout) with dynamic batch, size and length."""
    ov = _require()
    cfg = unet.cfg
    g = torch.Generator().manual_seed(0)
    example = [
        torch.randn(2, cfg.in_channels, 16, 16, generator=g),  # (B, C, h, w)
        torch.tensor([500.0, 500.0]),  # (B,)
        torch.randn(2, 77, cfg.context_dim, generator=g),  # (B, T, D)
    ]
    shapes = [[-1, cfg.in_channels, -1, -1], [-1], [-1, -1, cfg.context_dim]]
    if cfg.adm_in_channels is not None:
        example.append(torch.randn(2, cfg.adm_in_channels, generator=g))  # (B, adm)
        shapes.append([-1, cfg.adm_in_channels])
    with torch.no_grad():
        model = ov.convert_model(
            unet, example_input=tuple(example), input=[(ov.PartialShape(s), ov.Type.f32) for s in shapes]
        )
    for port, name in zip(model.inputs, _input_names(unet), strict=True):
        port.get_tensor().set_names({name})
    return model


class OpenVinoUNet:
    """A compiled OpenVINO U-Net called like ours: (x, timesteps, context, y) -> (B, C, h, w) float32."""

    def __init__(self, model: Any, *, precision: str, threads: int, shapes: str = "static", info=None):
        if shapes not in SHAPE_MODES:
            raise OpenVinoError(f"OpenVINO shapes must be one of {', '.join(SHAPE_MODES)}, got {shapes!r}")
        ov = _require()
        self.core = ov.Core()
        self.model = model  # the dynamic graph (weights memory-mapped from the cache)
        self.precision, self.shapes, self.threads = precision, shapes, threads
        self.info: dict[str, Any] = dict(info or {})
        self.config = {
            "INFERENCE_PRECISION_HINT": "f32",  # fp32 graph: fp32 math; int8 graph: fp32 between int8 ops
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self._compiled: tuple[tuple, Any] | None = None  # (shape key, request)
        self.compile_seconds = 0.0

    def _request(self, feeds: list[np.ndarray]) -> Any:
        key = tuple(a.shape for a in feeds) if self.shapes == "static" else ()
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = None  # release the previous shape's compiled graph first
            t0 = time.perf_counter()
            model = self.model
            if key:
                model = self.model.clone()
                model.reshape({i: list(s) for i, s in enumerate(key)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            self._compiled = (key, compiled.create_infer_request())
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[1]

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """One U-Net evaluation through OpenVINO; inputs as `UNetModel.forward`, output float32."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        args = [x, timesteps, context] + ([] if y is None else [y])
        feeds = [np.ascontiguousarray(a.detach().float().cpu().numpy()) for a in args]
        request = self._request(feeds)
        request.infer(feeds, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).to(x.device)  # (B, C, h, w)


class _Capture:
    """Wraps an OpenVinoUNet; records each call's inputs (as numpy) for calibration."""

    def __init__(self, unet: OpenVinoUNet):
        self.unet, self.samples = unet, []

    def __call__(self, x, timesteps, context, y=None):  # noqa: ANN001 - as OpenVinoUNet.__call__
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        args = [x, timesteps, context] + ([] if y is None else [y])
        self.samples.append(tuple(np.ascontiguousarray(a.detach().float().cpu().numpy()) for a in args))
        return self.unet(x, timesteps, context, y)


def capture_calibration(pipe: Any, unet: OpenVinoUNet, calibration: Int8Calibration) -> list[tuple]:
    """Real U-Net inputs: the pipeline samples calibration prompts with `unet` and every call is kept."""
    from ..params import GenerationParams
    from ..pipeline import Cancelled
    from ..quantize import CALIBRATION_PROMPTS, NEGATIVE

    def stop_before_decoding(progress: Any) -> None:  # the VAE decode would be wasted work
        if progress.step == progress.total:
            raise Cancelled("calibration inputs captured")

    size = calibration.size or pipe.cfg.resolution
    capture = _Capture(unet)
    previous, pipe.ov_unet = pipe.ov_unet, capture
    try:
        for i, prompt in enumerate(CALIBRATION_PROMPTS[: calibration.prompts]):
            params = GenerationParams(
                prompt=prompt, negative_prompt=NEGATIVE, steps=calibration.steps, seed=calibration.seed + i,
                width=size, height=size, cfg_scale=7.0,
            )  # fmt: skip
            try:
                pipe._generate(params, callback=stop_before_decoding)
            except Cancelled:
                pass
    finally:
        pipe.ov_unet = previous
    return capture.samples


def quantize_int8(model: Any, samples: list[tuple], calibration: Int8Calibration) -> Any:
    """nncf post-training quantization of the fp32 graph (int8 weights and activations)."""
    _require(int8=True)
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=calibration.smooth_quant_alpha),
        disable_bias_correction=calibration.bias_correction == "none",
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, calibration.ranges.upper()),
    )
    ignored = (
        nncf.IgnoredScope(patterns=list(calibration.ignored), validate=False) if calibration.ignored else None
    )
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)  # its per-layer INFO lines are not the user's business
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
            fast_bias_correction=calibration.bias_correction != "full",
            advanced_parameters=advanced,
            **({"ignored_scope": ignored} if ignored else {}),
        )
    finally:
        nncf_log.setLevel(level)


def load_openvino_unet(
    unet: UNetModel,
    precision: str,
    *,
    threads: int | None = None,
    shapes: str = "static",
    cache: IrCache | None = None,
    calibrate: Callable[[OpenVinoUNet], list[tuple]] | None = None,
    calibration: Int8Calibration | None = None,
    log: Callable[[str], None] | None = None,
    release: Callable[[], None] | None = None,
) -> OpenVinoUNet:
    """The OpenVINO U-Net for `unet` (fp32, default layout) at `precision`, from the cache or converted.

    For "openvino-int8", `calibrate(fp32_unet)` returns the captured inputs nncf calibrates on; it runs
    only when the int8 entry is not cached. The torch module is only read (for its weights' hash, and
    on a miss, to convert); `release()` is called as soon as it is not needed any more (before any
    calibration), so a caller can free its weights early.
    """
    if precision not in OPENVINO_PRECISIONS:
        valid = ", ".join(OPENVINO_PRECISIONS)
        raise OpenVinoError(f"unknown OpenVINO precision {precision!r}; valid: {valid}")
    int8 = precision == "openvino-int8"
    ov = _require(int8)
    say = log or (lambda message: None)
    cache = cache or IrCache()
    threads = threads or torch.get_num_threads()
    digest = weights_digest(unet)
    fp32_key = IrKey(digest, "unet", "dynamic", "fp32", ov.__version__)
    info: dict[str, Any] = {"cache": str(cache.root)}
    fp32 = cache.load(fp32_key)
    if fp32 is None:
        say("converting the U-Net to OpenVINO (once per model; cached)")
        t0 = time.perf_counter()
        fp32 = convert_unet(unet)
        info["convert_seconds"] = round(time.perf_counter() - t0, 1)
        cache.store(fp32_key, fp32, {"convert_seconds": info["convert_seconds"]})
        fp32 = cache.load(fp32_key) or fp32  # memory-mapped from disk, not held in the torch weights
    info["fp32_entry"] = str(cache.entry(fp32_key))
    if release is not None:
        release()
    fp32_unet = OpenVinoUNet(fp32, precision="openvino", threads=threads, shapes=shapes, info=info)
    if not int8:
        return fp32_unet
    calibration = calibration or Int8Calibration()
    settings = json.dumps(asdict(calibration), sort_keys=True)
    key = IrKey(digest, "unet", "dynamic", "int8", ov.__version__, settings)
    quantized = cache.load(key)
    if quantized is None:
        if calibrate is None:
            raise OpenVinoError("the int8 OpenVINO U-Net is not cached and no calibration was given")
        say("calibrating the int8 OpenVINO U-Net (once per model; cached)")
        t0 = time.perf_counter()
        samples = calibrate(fp32_unet)
        fp32_unet = None  # its compiled graph is not needed any more
        quantized = quantize_int8(fp32, samples, calibration)
        info["calibration_seconds"] = round(time.perf_counter() - t0, 1)
        info["calibration_samples"] = len(samples)
        cache.store(key, quantized, {k: v for k, v in info.items() if k != "cache"})
        del samples
        quantized = cache.load(key) or quantized
    info["int8_entry"] = str(cache.entry(key))
    return OpenVinoUNet(quantized, precision=precision, threads=threads, shapes=shapes, info=info)


def refuse(feature: str, fix: str) -> None:
    """Raise the backend's error for a feature that needs the PyTorch U-Net."""
    raise OpenVinoError(
        f"{feature}: not supported with the OpenVINO backend (its U-Net is a compiled graph); {fix}, "
        "or use --precision fp32"
    )


def openvino_unet(pipe: Any, calibration: Int8Calibration | None = None) -> OpenVinoUNet | None:
    """Start the backend for a Pipeline on an openvino path; the torch U-Net's weights are then released.

    On `auto`'s choice a failure falls back to the fp32 parity path (None, with the reason on
    `pipe.path`), and the PyTorch U-Net is kept for the features that need it (`torch_unet`); asked for
    by name, a failure raises and the PyTorch U-Net's weights are released (the graph has its own).
    """
    from ..runtime import ComputePath

    if pipe.device.type != "cpu":
        raise OpenVinoError(f"--precision {pipe.path.name} runs on the CPU only; got device {pipe.device}")
    if pipe.accel.active:
        refuse("the accelerators (DeepCache, ToMe, int8 Linears, torch.compile)", "turn them off")
    calibration = calibration or Int8Calibration()
    shapes = os.environ.get("DIFFUSEKIT_OPENVINO_SHAPES", "static").strip().lower()
    if shapes not in SHAPE_MODES:
        valid = ", ".join(SHAPE_MODES)
        raise OpenVinoError(f"DIFFUSEKIT_OPENVINO_SHAPES must be one of {valid}, got {shapes!r}")
    by_name = not pipe.path.reason.startswith("auto")
    try:
        ov_unet = load_openvino_unet(
            pipe.model.unet,
            pipe.path.name,
            shapes=shapes,
            calibrate=lambda fp32_unet: capture_calibration(pipe, fp32_unet, calibration),
            calibration=calibration,
            # asked for by name: the graph holds its own copy of the weights, free the torch one
            release=(lambda: pipe.model.unet.to("meta")) if by_name else None,
        )
    except Exception as e:
        if by_name:
            raise
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        reason = f"{pipe.path.reason}; but OpenVINO failed ({why}): fp32 parity path"
        pipe.path = ComputePath("fp32", torch.float32, reason)
        return None
    return ov_unet


def torch_unet_kept(pipe: Any) -> bool:
    """Whether an OpenVINO pipeline kept its PyTorch U-Net (auto's choice), so that a feature needing it
    (LoRA at run time, AnimateDiff) can run on it instead of the graph."""
    return not pipe.model.unet.time_embed[0].weight.is_meta


def torch_unet(pipe: Any, feature: str, fix: str) -> AbstractContextManager[None]:
    """A context in which `pipe` runs its PyTorch U-Net, not the OpenVINO graph; refuses clearly, at once,
    where the torch weights were released (`--precision openvino` by name)."""
    graph = getattr(pipe, "ov_unet", None)
    if graph is not None and not torch_unet_kept(pipe):
        refuse(feature, fix)
    return _without_graph(pipe, graph)


@contextmanager
def _without_graph(pipe: Any, graph: OpenVinoUNet | None) -> Iterator[None]:
    pipe.ov_unet = None
    try:
        yield
    finally:
        pipe.ov_unet = graph
