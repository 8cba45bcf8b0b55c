"""Int8-quantized checkpoints on disk: recognise one, and load it into a model with int8 U-Net layers.

A quantized checkpoint is an ordinary single file (safetensors) whose metadata has
`diffusekit.quantization` = "int8-static" and whose U-Net layers chosen by `int8_static.quantizable` hold
int8 `weight`s plus their QUANT_SUFFIXES entries (`weight_scale`, `input_scale`, `input_zero_point`);
every other tensor is as in a float checkpoint. `diffusekit convert --quantize int8` writes one
(diffusekit/quantize.py); loading it needs no calibration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusekit.checkpoints.load import LoadedModel, build_model
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, read_safetensors_header
from diffusekit.models.configs import UNET_PREFIX
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.params import ModelDefaults

from .int8_static import QUANT_SUFFIXES, restore_int8_unet

__all__ = ["QUANTIZATION_KEY", "INT8_STATIC", "is_int8_checkpoint", "load_int8_model", "split_int8"]

QUANTIZATION_KEY = "diffusekit.quantization"
INT8_STATIC = "int8-static"


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


def split_int8(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(a float state dict a model builds from, the U-Net's int8 layer state with the prefix stripped).

    In the float one each int8 weight is replaced by a zero-stride fp32 placeholder of its shape (no
    memory; the int8 layer replaces it right after the build) and the QUANT_SUFFIXES entries are dropped.
    """
    quant = {k[: -len(s)] for k in sd for s in QUANT_SUFFIXES if k.endswith(s) and k.startswith(UNET_PREFIX)}
    if not quant:
        raise CheckpointError("marked int8-static, but holds no int8 layer (no *.weight_scale U-Net keys)")
    floats: dict[str, torch.Tensor] = {}
    int8: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        layer, _, leaf = key.rpartition(".")
        if layer in quant:
            int8[key[len(UNET_PREFIX) :]] = value
            if leaf == "weight":
                if value.dtype != torch.int8:
                    raise CheckpointError(f"int8 checkpoint: {key} is {value.dtype}, expected int8")
                floats[key] = torch.zeros((), dtype=torch.float32).expand(value.shape)
            elif not key.endswith(QUANT_SUFFIXES):
                floats[key] = value  # the bias
        else:
            floats[key] = value
    return floats, int8


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
    floats, int8 = split_int8(sd)
    notes = []
    if vae is not None:
        floats = replace_vae(floats, load_vae_state_dict(vae))
        notes.append(f"VAE replaced by {Path(vae).name}")
    cfg = detect_config(floats, metadata, prediction=prediction, name=path.name)
    defaults = ModelDefaults.from_metadata(metadata, path.name)
    model, load_notes = build_model(floats, cfg, name=path.name)
    count = restore_int8_unet(model.unet, int8)
    notes.append(f"int8-static: {count} U-Net layers with int8 weights and activations")
    return LoadedModel(
        model=model,
        tokenizer=CLIPTokenizer.bundled(),
        path=path,
        metadata=dict(metadata),
        notes=notes + load_notes,
        vae_path=Path(vae) if vae is not None else None,
        defaults=defaults,
    )
