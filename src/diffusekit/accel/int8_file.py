"""Int8-quantized checkpoints on disk: recognise one, and load it into a model with its int8 layers.

A quantized checkpoint is an ordinary single file (safetensors) whose metadata has
`diffusekit.quantization` = "int8-static" and whose quantized layers hold int8 `weight`s plus their
QUANT_SUFFIXES entries (`weight_scale`, `input_scale`, `input_zero_point`); every other tensor is as in a
float checkpoint. `diffusekit convert --quantize int8` writes one (diffusekit/quantize.py); loading it
needs no calibration. Which layers are int8 is read from the keys, not from a rule.

Format versions (`diffusekit.quantization.format`; absent means 1):
- 1: int8 layers in the U-Net only (the files of the first int8 release);
- 2: int8 layers may also sit in the text encoders (accel/int8_text.py), listed with the U-Net in
  `diffusekit.quantization.components` (e.g. "unet,text_encoder"). A version-1 file loads as before.
A file of a later version is refused with a clear error rather than half-loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.checkpoints.load import LoadedModel, build_model
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, read_safetensors_header
from diffusekit.models.configs import TEXT_PREFIXES, UNET_PREFIX
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.params import ModelDefaults

from .int8_static import QUANT_SUFFIXES, restore_int8_unet
from .int8_text import packed_float_keys, restore_int8_text_encoder

__all__ = [
    "COMPONENTS_KEY",
    "format_version",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "INT8_STATIC",
    "QUANTIZATION_KEY",
    "is_int8_checkpoint",
    "load_int8_model",
    "split_int8",
]

QUANTIZATION_KEY = "diffusekit.quantization"
INT8_STATIC = "int8-static"
FORMAT_KEY = "diffusekit.quantization.format"
COMPONENTS_KEY = "diffusekit.quantization.components"
FORMAT_VERSION = 2  # what this code writes and the newest it reads
# Where int8 layers may sit: the U-Net and every family's text encoder prefixes.
_PREFIXES = (UNET_PREFIX, *sorted({p for ps in TEXT_PREFIXES.values() for p in ps}))


def is_int8_checkpoint(path: str | Path) -> bool:
    """True for a safetensors file marked int8-static in its metadata (reads the header only)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        _, metadata = read_safetensors_header(path)
    except CheckpointError:
        return False  # not safetensors after all: the ordinary loader explains what it is
    return metadata.get(QUANTIZATION_KEY) == INT8_STATIC


def format_version(metadata: dict[str, str]) -> int:
    """The quantized file's format version (1 when unmarked); a clear error for an unreadable one."""
    raw = metadata.get(FORMAT_KEY, "1")
    try:
        version = int(raw)
    except ValueError:
        raise CheckpointError(f"int8 checkpoint: format version {raw!r} is not a number") from None
    if not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"int8 checkpoint format {version} is newer than this diffusekit reads (1..{FORMAT_VERSION}); "
            "upgrade diffusekit, or re-quantize the float checkpoint with this version"
        )
    return version


def split_int8(
    sd: dict[str, torch.Tensor], version: int = FORMAT_VERSION
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(a float state dict a model builds from, the int8 layers' state under their full keys).

    In the float one each int8 weight is replaced by a zero-stride fp32 placeholder of its shape (no
    memory; the int8 layer replaces it right after the build), the QUANT_SUFFIXES entries are dropped,
    and a packed OpenCLIP in-projection goes back to its original key names. A version-1 file may hold
    int8 layers in the U-Net only.
    """
    prefixes = _PREFIXES if version >= 2 else (UNET_PREFIX,)
    quant = {k[: -len(s)] for k in sd for s in QUANT_SUFFIXES if k.endswith(s) and k.startswith(prefixes)}
    if not any(q.startswith(UNET_PREFIX) for q in quant):
        raise CheckpointError("marked int8-static, but holds no int8 layer (no *.weight_scale U-Net keys)")
    floats: dict[str, torch.Tensor] = {}
    int8: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        layer, _, leaf = key.rpartition(".")
        if layer in quant:
            int8[key] = value
            name = packed_float_keys(key) or key
            if leaf == "weight":
                if value.dtype != torch.int8:
                    raise CheckpointError(f"int8 checkpoint: {key} is {value.dtype}, expected int8")
                floats[name] = torch.zeros((), dtype=torch.float32).expand(value.shape)
            elif not key.endswith(QUANT_SUFFIXES):
                floats[name] = value  # the bias
        else:
            floats[key] = value
    return floats, int8


def _component_state(int8: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in int8.items() if k.startswith(prefix)}


def load_int8_model(
    path: str | Path,
    *,
    prediction: str | None = None,
    vae: str | Path | None = None,
    keep_ema: bool = False,
) -> LoadedModel:
    """Load an int8-static checkpoint: the model built from its float tensors, the U-Net's quantized
    layers restored as int8 modules (`vae` replaces the VAE as for any checkpoint)."""
    from diffusekit.checkpoints.detect import detect_config
    from diffusekit.checkpoints.load import load_vae_state_dict, replace_vae

    del keep_ema  # a quantized file holds no EMA weights (convert writes the inference weights only)
    path = Path(path)
    sd, metadata = load_state_dict(path)
    floats, int8 = split_int8(sd, format_version(metadata))
    notes = []
    if vae is not None:
        floats = replace_vae(floats, load_vae_state_dict(vae))
        notes.append(f"VAE replaced by {Path(vae).name}")
    cfg = detect_config(floats, metadata, prediction=prediction, name=path.name)
    defaults = ModelDefaults.from_metadata(metadata, path.name)
    model, load_notes = build_model(floats, cfg, name=path.name)
    count = restore_int8_unet(model.unet, _component_state(int8, UNET_PREFIX))
    notes.append(f"int8-static: {count} U-Net layers with int8 weights and activations")
    for name, (prefix, module) in model.components().items():
        state = _component_state(int8, prefix) if name.startswith("text_encoder") else {}
        if state:
            n = restore_int8_text_encoder(module, state)
            notes.append(f"int8: {n} {name} linears with int8 weights and dynamic activations")
    restored = {p for _, (p, _m) in model.components().items()}
    stray = [k for k in int8 if not k.startswith(tuple(restored))]
    if stray:
        raise CheckpointError(f"int8 checkpoint: {stray[0]} belongs to no component of this model")
    return LoadedModel(
        model=model,
        tokenizer=CLIPTokenizer.bundled(),
        path=path,
        metadata=dict(metadata),
        notes=notes + load_notes,
        vae_path=Path(vae) if vae is not None else None,
        defaults=defaults,
    )
