"""What is in a checkpoint: family, components, parameters, bytes, memory estimates, hashes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.configs import PRESETS, ModelConfig
from ..models.sd import StableDiffusion
from ..params import ModelDefaults
from .hashes import AUTOV2_LEN, autov1, sha256_file
from .load import read_checkpoint, validate_state_dict
from .single_file import detect_format

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class ComponentReport:
    name: str
    prefix: str
    parameters: int
    bytes: int
    dtypes: dict[str, int]  # dtype name -> parameter count


@dataclass
class InspectReport:
    path: str
    format: str
    family: str
    preset: str | None  # the named preset this model's structure equals, if any
    prediction: str
    components: list[ComponentReport]
    parameters: int
    weight_bytes: int
    file_bytes: int
    memory_estimate: dict[str, int]  # bytes of weights at fp32 / fp16 / int8
    hashes: dict[str, str] = field(default_factory=dict)
    extra_keys: int = 0
    notes: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # trained on the zero-terminal-SNR schedule (sampled from sigma 4096)
    recommended: dict[str, object] = field(default_factory=dict)  # the file's ModelDefaults overrides

    def to_dict(self) -> dict:
        return asdict(self)


def matching_preset(cfg: ModelConfig) -> str | None:
    """The name of the preset equal to `cfg` in structure and prediction (ignoring names)."""
    for name, p in PRESETS.items():
        if name != "tiny" and p == cfg:
            return name
    return None


def _component_reports(sd: Mapping[str, torch.Tensor], model: StableDiffusion) -> list[ComponentReport]:
    out = []
    for name, (prefix, _) in model.components().items():
        params = bytes_ = 0
        dtypes: Counter[str] = Counter()
        for key, t in sd.items():
            if key.startswith(prefix):
                params += t.numel()
                bytes_ += t.numel() * t.element_size()
                dtypes[dtype_name(t.dtype)] += t.numel()
        out.append(ComponentReport(name, prefix, params, bytes_, dict(dtypes)))
    return out


def inspect_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, *, path: str, fmt: str, file_bytes: int
) -> InspectReport:
    """Report on a single-file-keyed state dict (tensors may be on the meta device)."""
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    keep, notes = validate_state_dict(sd, model, Path(path).name)
    components = _component_reports(keep, model)
    params = sum(c.parameters for c in components)
    return InspectReport(
        path=path,
        format=fmt,
        family=cfg.family,
        preset=matching_preset(cfg),
        prediction=cfg.prediction,
        zero_terminal_snr=cfg.zero_terminal_snr,
        components=components,
        parameters=params,
        weight_bytes=sum(c.bytes for c in components),
        file_bytes=file_bytes,
        memory_estimate={"fp32": params * 4, "fp16": params * 2, "int8": params},
        extra_keys=len(sd) - len(keep),
        notes=notes,
    )


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def inspect_checkpoint(
    path: str | Path, *, prediction: str | None = None, hashes: bool = True
) -> InspectReport:
    """Inspect a single file or a diffusers folder without materializing the model."""
    path = Path(path)
    from .sd3 import is_sd3_file  # SD3/SD3.5 (MMDiT) models have their own report

    if is_sd3_file(path):
        from .sd3_tools import inspect_sd3

        return inspect_sd3(path, hashes=hashes)
    sd, cfg, _, metadata, _ = read_checkpoint(path, prediction=prediction)
    if metadata.get("diffusekit.quantization") == "int8-static":  # int8 weights: report them as they are
        from ..accel.int8_static import QUANT_SUFFIXES
        from ..accel.int8_text import packed_float_keys  # OpenCLIP's int8 in_proj back to its own keys

        sd = {packed_float_keys(k) or k: v for k, v in sd.items() if not k.endswith(QUANT_SUFFIXES)}
    if path.is_dir():
        fmt = "diffusers folder"
    else:
        fmt = "safetensors" if detect_format(path) == "safetensors" else "pickle (.ckpt)"
    report = inspect_state_dict(sd, cfg, path=str(path), fmt=fmt, file_bytes=disk_bytes(path))
    report.recommended = ModelDefaults.from_metadata(metadata, path.name).overrides()
    if hashes and path.is_file():
        sha = sha256_file(path)  # one pass over the file: AutoV2 is its prefix
        report.hashes = {"sha256": sha, "autov2": sha[:AUTOV2_LEN], "autov1": autov1(path)}
    return report


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(r: InspectReport) -> str:
    """Human-readable table of an InspectReport."""
    lines = [
        f"{r.path}",
        f"  format      {r.format}",
        f"  family      {r.family}" + (f" (preset {r.preset})" if r.preset else ""),
        f"  prediction  {r.prediction}" + (", zero terminal SNR" if r.zero_terminal_snr else ""),
    ]
    if r.recommended:
        lines.append("  recommends  " + ", ".join(f"{k} {v}" for k, v in r.recommended.items()))
    lines += [
        "",
        f"  {'component':<16}{'parameters':>16}{'bytes':>14}  dtype",
    ]
    for c in r.components:
        dt = ", ".join(f"{k}" for k in c.dtypes) or "-"
        lines.append(f"  {c.name:<16}{c.parameters:>16,}{_gib(c.bytes):>14}  {dt}")
    lines += [
        f"  {'total':<16}{r.parameters:>16,}{_gib(r.weight_bytes):>14}",
        "",
        f"  file size   {_gib(r.file_bytes)} ({r.file_bytes:,} bytes)"
        + (f", {r.extra_keys} non-network keys" if r.extra_keys else ""),
        "  weights in memory: " + ", ".join(f"{k} {_gib(v)}" for k, v in r.memory_estimate.items()),
    ]
    if r.hashes:
        lines += [
            f"  sha256      {r.hashes['sha256']}",
            f"  model hash  {r.hashes['autov2']} (A1111 AutoV2), old hash {r.hashes['autov1']} (AutoV1)",
        ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
