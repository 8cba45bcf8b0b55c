"""CPU compute paths: auto's choice per CPU kind, fp32-fast's bound, the int8 layers and the int8 file."""

from __future__ import annotations

import copy

import pytest
import torch

import diffusekit.runtime as runtime
from diffusekit.accel.errors import AccelError
from diffusekit.accel.int8_file import is_int8_checkpoint, load_int8_model
from diffusekit.accel.int8_static import (
    Calibrator,
    Int8Conv2d,
    Int8Linear,
    _activation_qparams,
    int8_unavailable,
    quantizable,
    quantize_unet,
)
from diffusekit.checkpoints.load import checkpoint_metadata, load_model
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.cli_generate import PRECISIONS as CLI_PRECISIONS
from diffusekit.models.configs import SD1, TINY_SD1
from diffusekit.models.unet import UNetModel
from diffusekit.pipeline import Pipeline
from diffusekit.runtime import CpuFeatures, PrecisionError, choose_path, prepare
from helpers import make_checkpoint

needs_int8 = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))

ICE_LAKE = CpuFeatures(avx2=True, avx512=True, vnni=True, bf16=False)
ZEN3 = CpuFeatures(avx2=True, avx512=False, vnni=False, bf16=False)
SAPPHIRE = CpuFeatures(avx2=True, avx512=True, vnni=True, bf16=True)


def _unet_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNetModel(cfg.unet).parameters())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_cli_and_runtime_list_the_same_paths():
    assert CLI_PRECISIONS == runtime.PRECISIONS


@pytest.mark.parametrize("fast", [False, True])
def test_auto_picks_per_cpu_kind(monkeypatch, fast):
    monkeypatch.setattr(runtime, "AUTO_FP32_FAST", fast)
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: "not installed (mocked)")
    sd1, tiny = _unet_params(SD1), _unet_params(TINY_SD1)
    p = choose_path("auto", "cpu", sd1, features=SAPPHIRE)
    assert (p.name, p.dtype) == ("bf16", torch.bfloat16) and "native bf16" in p.reason
    assert choose_path("auto", "cpu", tiny, features=SAPPHIRE).name == "fp32"  # too small for bf16
    no_bf16 = "fp32-fast" if fast else "fp32"
    for cpu in (ICE_LAKE, ZEN3):
        p = choose_path("auto", "cpu", sd1, features=cpu)
        assert (p.name, p.dtype) == (no_bf16, torch.float32) and "no native bf16" in p.reason
        assert choose_path("auto", "cpu", sd1, quantized=True, features=cpu).name == "int8"
    assert choose_path("auto", "cuda", sd1).name == "fp16"


def test_auto_reads_the_detected_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: "not installed (mocked)")
    monkeypatch.setattr(runtime, "cpu_features", lambda: ZEN3)
    assert choose_path("auto", "cpu", _unet_params(SD1)).name in ("fp32", "fp32-fast")
    assert runtime.resolve_precision("auto", "cpu", _unet_params(SD1)) == torch.float32
    monkeypatch.setattr(runtime, "cpu_features", lambda: SAPPHIRE)
    assert runtime.resolve_precision("auto", "cpu", _unet_params(SD1)) == torch.bfloat16
    assert "AVX2, no bf16" == ZEN3.kind and "AVX-512, VNNI, native bf16" == SAPPHIRE.kind


def test_a_onednn_isa_cap_below_bf16_reads_as_no_native_bf16(monkeypatch):
    for probe in ("_is_avx2_supported", "_is_avx512_supported", "_is_avx512_vnni_supported",
                  "_is_avx512_bf16_supported"):  # fmt: skip
        monkeypatch.setattr(torch.cpu, probe, lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: "not installed (mocked)")
    assert runtime.cpu_features().bf16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")  # Ice Lake's ISA
    assert runtime.cpu_features() == ICE_LAKE
    assert choose_path("auto", "cpu", _unet_params(SD1)).name == (
        "fp32-fast" if runtime.AUTO_FP32_FAST else "fp32"
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime.cpu_features() == CpuFeatures(avx2=True, avx512=False, vnni=False, bf16=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert runtime.cpu_features().bf16


def test_explicit_paths_and_their_errors():
    assert choose_path("fp32-fast", "cpu").name == "fp32-fast"
    assert choose_path("int8", "cpu", quantized=True).name == "int8"
    with pytest.raises(PrecisionError, match="needs an int8-quantized checkpoint.*--quantize int8"):
        choose_path("int8", "cpu")
    with pytest.raises(PrecisionError, match="is int8-quantized; it runs with --precision int8"):
        choose_path("bf16", "cpu", quantized=True)


def _unet_inputs(cfg, size=32, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, size // 8, size // 8, generator=g)  # (B, 4, h, w)
    t = torch.tensor([500.0, 10.0][:batch])
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=g)  # (B, 77, ctx)
    return x, t, ctx


def test_fp32_fast_stays_within_1e_3_of_the_parity_path(tmp_path):
    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    ref = load_model(path).model
    fast = copy.deepcopy(ref)
    prepare(ref, torch.float32, "cpu")
    info = prepare(fast, torch.float32, "cpu", "fp32-fast")
    assert info.channels_last and info.attention == "sdpa" and info.path == "fp32-fast"
    x, t, ctx = _unet_inputs(cfg, 64)
    with torch.inference_mode():
        want = ref.unet(x, t, ctx)
        got = fast.unet(info.input(x), t, ctx)
    assert _rel(got, want) <= 1e-3


@needs_int8
def test_int8_layers_match_float_layers_within_their_rounding():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32, 16, 16)  # (B, C, H, W)
    q = Int8Conv2d(conv, *_activation_qparams(float(x.min()), float(x.max())))
    with torch.inference_mode():
        assert _rel(q(x), conv(x)) < 0.03  # measured ~1%: 8-bit input and weights
        assert q(torch.randn(1, 32, 10, 6)).shape == (1, 48, 10, 6)  # any size after packing
    lin = torch.nn.Linear(40, 24)
    x = torch.randn(2, 7, 40)
    q = Int8Linear(lin, *_activation_qparams(float(x.min()), float(x.max())))
    with torch.inference_mode():
        assert _rel(q(x), lin(x)) < 0.03
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (24,)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 40\)"):
        q(torch.randn(3, 41))


def _calibrated_int8(path, cfg):
    """The tiny model quantized on direct U-Net calls (fast), and its fp32 twin."""
    model = load_model(path).model
    fp32 = copy.deepcopy(model)
    with Calibrator(model.unet) as cal, torch.inference_mode():
        for seed in range(2):
            x, t, ctx = _unet_inputs(cfg, 64)
            model.unet(x + seed, t, ctx)
    assert set(cal.ranges) == {n for n, _ in quantizable(model.unet)}
    count = quantize_unet(model.unet, cal.ranges)
    return model, fp32, count


@needs_int8
def test_int8_file_round_trip_is_exact_and_close_to_fp32(tmp_path):
    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    model, fp32, count = _calibrated_int8(path, cfg)
    convs = [m for m in model.unet.modules() if isinstance(m, Int8Conv2d)]
    assert count > 0 and convs and model.unet.input_blocks[0][0].weight.is_floating_point()  # first stays
    skips = [
        m
        for n, m in model.unet.named_modules()
        if n.endswith("skip_connection") and type(m) is not torch.nn.Identity
    ]
    assert skips and all(isinstance(m, torch.nn.Conv2d) for m in skips)  # concatenated inputs stay fp32
    meta = checkpoint_metadata(cfg, {"diffusekit.quantization": "int8-static"})
    out = tmp_path / "tiny-int8.safetensors"
    save_state_dict(model.state_dict(), out, metadata=meta)
    assert is_int8_checkpoint(out) and not is_int8_checkpoint(path)
    loaded = load_int8_model(out).model
    assert sum(isinstance(m, Int8Conv2d | Int8Linear) for m in loaded.unet.modules()) == count
    x, t, ctx = _unet_inputs(cfg, 64)
    with torch.inference_mode():
        a, b, ref = model.unet(x, t, ctx), loaded.unet(x, t, ctx), fp32.unet(x, t, ctx)
    assert torch.equal(a, b)  # the file holds exactly what was quantized
    print(f"int8 U-Net step relative error on tiny random weights: {_rel(a, ref):.4f}")
    assert _rel(a, ref) < 0.1  # measured 0.06 on these tiny random weights, calibrated on 2 calls
    with pytest.raises(AccelError, match="no float Conv2d/Linear layers"):
        quantize_unet(loaded.unet, {})


@needs_int8
def test_pipeline_runs_an_int8_file_and_says_so(tmp_path):
    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    model, _, _ = _calibrated_int8(path, cfg)
    out = tmp_path / "q.safetensors"
    save_state_dict(
        model.state_dict(), out, metadata=checkpoint_metadata(cfg, {"diffusekit.quantization": "int8-static"})
    )
    pipe = Pipeline.from_file(out)
    assert pipe.path.name == "int8" and "int8-quantized" in pipe.path.reason
    assert pipe.fast.channels_last
    with pytest.raises(PrecisionError, match="int8-quantized"):
        Pipeline.from_file(out, precision="fp32")
    with pytest.raises(PrecisionError, match="--quantize int8"):
        Pipeline.from_file(path, precision="int8")


@needs_int8
def test_dynamic_int8_layers_follow_each_inputs_range():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    small, big = torch.randn(2, 32, 16, 16), 40 * torch.randn(2, 32, 16, 16)  # (B, C, H, W)
    static = Int8Conv2d(conv, *_activation_qparams(float(big.min()), float(big.max())))
    dynamic = Int8Conv2d(conv, 0.0, 0)
    assert dynamic.dynamic and not static.dynamic
    with torch.inference_mode():
        assert _rel(dynamic(small), conv(small)) < 0.03 and _rel(dynamic(big), conv(big)) < 0.03
        assert _rel(static(small), conv(small)) > 3 * _rel(
            dynamic(small), conv(small)
        )  # a range 40x too wide
    lin = torch.nn.Linear(40, 24)
    q = Int8Linear(lin, 0.0, 0)
    x = 1e-3 * torch.randn(2, 7, 40)  # far below any range calibrated on ordinary activations
    with torch.inference_mode():
        assert _rel(q(x) - lin.bias, lin(x) - lin.bias) < 0.03  # the product, not the bias, is resolved


@needs_int8
def test_dynamic_int8_file_round_trip_needs_no_calibration(tmp_path):
    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    model = load_model(path).model
    fp32 = copy.deepcopy(model)
    count = quantize_unet(model.unet, dynamic=True)  # no ranges
    with pytest.raises(AccelError, match="no calibrated range"):
        quantize_unet(load_model(path).model.unet, {})
    assert all(
        m.dynamic and float(m.input_scale) == 0.0 for m in model.unet.modules() if isinstance(m, Int8Conv2d)
    )
    out = tmp_path / "tiny-int8-dyn.safetensors"
    save_state_dict(
        model.state_dict(), out, metadata=checkpoint_metadata(cfg, {"diffusekit.quantization": "int8-static"})
    )
    loaded = load_int8_model(out).model
    layers = [m for m in loaded.unet.modules() if isinstance(m, Int8Conv2d | Int8Linear)]
    assert len(layers) == count and all(m.dynamic for m in layers)
    x, t, ctx = _unet_inputs(cfg, 64)
    with torch.inference_mode():
        a, b, ref = model.unet(x, t, ctx), loaded.unet(x, t, ctx), fp32.unet(x, t, ctx)
    assert torch.equal(a, b)
    print(f"dynamic int8 U-Net step relative error on tiny random weights: {_rel(a, ref):.4f}")
    assert _rel(a, ref) < 0.1


@needs_int8
def test_convert_quantize_writes_dynamic_by_default_and_static_on_request(tmp_path, capsys):
    from diffusekit.accel.int8_file import split_int8
    from diffusekit.checkpoints.single_file import load_state_dict
    from diffusekit.cli import main

    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    dyn, stat = tmp_path / "dyn.safetensors", tmp_path / "stat.safetensors"
    assert main(["convert", str(path), str(dyn), "--quantize", "int8"]) == 0
    assert "dynamic activation ranges" in capsys.readouterr().out
    small = ["--calibration-prompts", "1", "--calibration-steps", "1", "--calibration-size", "64"]
    assert (
        main(["convert", str(path), str(stat), "--quantize", "int8", "--int8-activations", "static", *small])
        == 0
    )
    scales = {}
    for out in (dyn, stat):
        sd, meta = load_state_dict(out)
        scales[out] = [float(v) for k, v in split_int8(sd)[1].items() if k.endswith(".input_scale")]
        assert meta["diffusekit.quantization"] == "int8-static"
    assert scales[dyn] and all(s == 0.0 for s in scales[dyn])
    assert scales[stat] and all(s > 0.0 for s in scales[stat])
    with pytest.raises(SystemExit):  # argparse names the valid choices
        main(
            [
                "convert",
                str(path),
                str(tmp_path / "x.safetensors"),
                "--quantize",
                "int8",
                "--int8-activations",
                "x",
            ]
        )
    assert "choose from 'dynamic', 'static'" in capsys.readouterr().err
