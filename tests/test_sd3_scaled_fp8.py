"""Scaled-fp8 SD3 files (ComfyUI's ``*_fp8_scaled.safetensors``): fp8 weights times their per-tensor scale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.scaled_fp8 import dequantize_scaled_fp8
from diffusekit.checkpoints.sd3 import create_sd3, load_sd3
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, save_state_dict
from diffusekit.checkpoints.surgery import strip_prefix
from diffusekit.cli import main
from diffusekit.models.sd3_configs import MMDIT_PREFIX, T5_PREFIX, TINY_SD35
from diffusekit.params import GenerationParams
from diffusekit.pipeline_sd3 import SD3Pipeline

pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

FP8 = torch.float8_e4m3fn


def _quantizable(key: str) -> bool:
    """The Linear weights ComfyUI's scaled files quantize: the MMDiT's and T5's (not embeddings)."""
    if key.startswith(MMDIT_PREFIX):
        return key.endswith(".weight") and "embedder.proj" not in key
    return key.startswith(T5_PREFIX) and (".SelfAttention." in key or ".DenseReluDense." in key)


def _record(fmt: str) -> torch.Tensor:
    """A ``comfy_quant`` entry: the layer's quantization record as JSON in uint8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _scale_file(sd: dict, *, new_style: bool = False) -> tuple[dict, dict]:
    """(scaled-fp8 state dict, the dequantized weights it stands for): per-tensor absmax/448 scales."""
    out, expected = {}, {}
    for key, w in sd.items():
        if not (w.ndim == 2 and _quantizable(key)):
            out[key] = w
            continue
        layer = key[: -len(".weight")]
        scale = w.float().abs().max() / torch.finfo(FP8).max
        q = (w.float() / scale).to(FP8)
        out[key] = q
        expected[key] = q.float() * scale
        if new_style:
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = torch.tensor(
                list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
            )
        else:
            out[layer + ".scale_weight"] = scale.reshape(1)
            out[layer + ".scale_input"] = torch.ones(1)
    if not new_style:
        out[MMDIT_PREFIX + "scaled_fp8"] = torch.empty(0, dtype=FP8)
        out[T5_PREFIX + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out, expected


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SD3.5 file, the same weights as a scaled-fp8 file), each with its T5 tokenizer."""
    folder = tmp_path_factory.mktemp("fp8")
    plain = folder / "plain.safetensors"
    create_sd3(TINY_SD35, plain, seed=2)
    sd, meta = load_state_dict(plain)
    scaled, _ = _scale_file(dict(sd))
    path = folder / "scaled.safetensors"
    save_state_dict(scaled, path, metadata=meta)
    shutil.copyfile(plain.with_suffix(".spiece.model"), path.with_suffix(".spiece.model"))
    return plain, path


@pytest.mark.parametrize("new_style", [False, True], ids=["scale_weight", "weight_scale"])
def test_dequantized_weights_are_fp8_times_scale_and_near_the_originals(files, new_style: bool) -> None:
    plain, _ = files
    sd, _ = load_state_dict(plain)
    scaled, expected = _scale_file(dict(sd), new_style=new_style)
    got = dequantize_scaled_fp8(scaled, torch.float32)
    assert set(got) == set(sd)  # scales, formats and markers gone; every weight present
    assert len(expected) > 20
    for key, want in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want), key
        # e4m3 keeps 3 mantissa bits: within 1/16 of each value (plus the subnormal step near zero)
        w = sd[key].float()
        step = w.abs().max() / torch.finfo(FP8).max * 2.0**-9
        assert ((got[key] - w).abs() <= w.abs() / 16 + step).all(), key
    unscaled = {k: v.float() for k, v in scaled.items() if k in expected}  # fp8 values without the scale
    assert max(float((unscaled[k] - sd[k]).abs().max()) for k in expected) > 1.0  # the scale matters
    assert got[T5_PREFIX + "shared.weight"].dtype == sd[T5_PREFIX + "shared.weight"].dtype  # untouched
    bf16 = dequantize_scaled_fp8(scaled, torch.bfloat16)
    key = next(iter(expected))
    assert bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], expected[key].to(torch.bfloat16))


def test_scaled_file_generates_as_its_dequantized_weights(files, tmp_path: Path) -> None:
    plain, path = files
    pipe = SD3Pipeline.from_file(path, precision="fp32")
    sd, meta = load_state_dict(plain)
    _, expected = _scale_file(dict(sd))
    got = pipe.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    # the reference: a plain fp32 file holding the dequantized weights gives the same latents
    ref_path = tmp_path / "deq.safetensors"
    save_state_dict({**dict(sd), **expected}, ref_path, metadata=meta)
    shutil.copyfile(plain.with_suffix(".spiece.model"), ref_path.with_suffix(".spiece.model"))
    params = GenerationParams(prompt="a cat", steps=3, seed=1, width=64, height=64)
    ours = pipe.generate(params)
    ref = SD3Pipeline.from_file(ref_path, precision="fp32").generate(params)
    assert torch.equal(ours.latents, ref.latents)
    orig = SD3Pipeline.from_file(plain, precision="fp32").generate(params)
    diff = np.abs(np.asarray(ours.images[0], dtype=float) - np.asarray(orig.images[0], dtype=float)).mean()
    assert diff < 20, diff  # near the unquantized model's image (fp8 rounding only)


def test_bf16_compute_dequantizes_straight_to_bf16(files) -> None:
    _, path = files
    pipe = SD3Pipeline.from_file(path, precision="bf16")
    assert pipe.dtype == torch.bfloat16 and pipe.path.name == "bf16"
    weights = [p.dtype for p in pipe.model.mmdit.parameters()] + [p.dtype for p in pipe.model.t5.parameters()]
    assert set(weights) == {torch.bfloat16}


def test_separate_scaled_t5_file(files, tmp_path: Path) -> None:
    """A bare transformers T5 file in ComfyUI's scaled layout (t5xxl_fp8_e4m3fn_scaled) as a text encoder."""
    plain, path = files
    sd, meta = load_state_dict(path)
    base = {k: v for k, v in sd.items() if not k.startswith(T5_PREFIX)}
    save_state_dict(base, tmp_path / "base.safetensors", metadata=meta)
    t5 = strip_prefix({k: v for k, v in sd.items() if k.startswith(T5_PREFIX)}, T5_PREFIX)
    assert "scaled_fp8" in t5 and "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in t5
    save_state_dict(t5, tmp_path / "t5_scaled.safetensors")
    loaded = load_sd3(tmp_path / "base.safetensors", text_encoders=[tmp_path / "t5_scaled.safetensors"])
    whole = load_sd3(path, dtype=torch.float32).model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(whole) and all(torch.equal(got[k].float(), whole[k]) for k in whole)


def test_unsupported_format_and_missing_weight_are_clear_errors(files) -> None:
    plain, _ = files
    sd, _ = load_state_dict(plain)
    key = MMDIT_PREFIX + "context_embedder"
    bad = {**dict(sd), key + ".weight_scale": torch.tensor(1.0), key + ".comfy_quant": _record("nvfp4")}
    with pytest.raises(CheckpointError, match="'nvfp4'.*readable: float8_e4m3fn"):
        dequantize_scaled_fp8(bad)
    orphan = {**dict(sd), MMDIT_PREFIX + "nothing.scale_weight": torch.tensor(1.0)}
    with pytest.raises(CheckpointError, match="does not have"):
        dequantize_scaled_fp8(orphan)


def test_cli_inspect_and_convert_a_scaled_file(files, tmp_path: Path, capsys) -> None:
    _, path = files
    assert main(["inspect", str(path), "--no-hash"]) == 0
    assert "scaled fp8 weights" in capsys.readouterr().out
    out = tmp_path / "bf16.safetensors"
    assert main(["convert", str(path), str(out), "--dtype", "bf16"]) == 0
    conv, _ = load_state_dict(out)
    assert not any(k.endswith(("scale_weight", "scale_input", "scaled_fp8")) for k in conv)
    want = load_sd3(path, dtype=torch.bfloat16).model.state_dict()
    key = MMDIT_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"
    assert conv[key].dtype == torch.bfloat16 and torch.equal(conv[key], want[key])
