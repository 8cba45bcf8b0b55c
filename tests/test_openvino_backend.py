"""The OpenVINO backend: parity with our fp32 path, the IR cache, auto's choice and the clear refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import diffusekit.runtime as runtime
from diffusekit.models.configs import SD1, TINY_SD1
from diffusekit.models.unet import UNetModel
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from diffusekit.runtime import CpuFeatures, PrecisionError, choose_path
from helpers import make_checkpoint

pytest.importorskip("openvino")
from diffusekit.accel import Accel  # noqa: E402
from diffusekit.accel import openvino_backend as backend  # noqa: E402
from diffusekit.accel.openvino_cache import IrCache, IrKey  # noqa: E402

# smaller than TINY_SD1 (two levels, one ResBlock each): OpenVINO converts and compiles it in seconds
MICRO = replace(
    TINY_SD1,
    unet=replace(TINY_SD1.unet, channel_mult=(1, 2), transformer_depth=(1, 0), num_res_blocks=1),
    name="micro_sd1",
)
ICE_LAKE = CpuFeatures(avx2=True, avx512=True, vnni=True, bf16=False)
SAPPHIRE = CpuFeatures(avx2=True, avx512=True, vnni=True, bf16=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, IR cache folder, the fp32 parity pipeline, an openvino pipeline): converted once."""
    folder = tmp_path_factory.mktemp("ov")
    _, _, path = make_checkpoint("micro_sd1", folder, cfg=MICRO)
    cache = folder / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
        ov_pipe = Pipeline.from_file(path, precision="openvino")
    return path, cache, Pipeline.from_file(path, precision="fp32"), ov_pipe


def test_openvino_unet_matches_the_parity_path_per_step(tiny):
    _, _, ref, ovp = tiny
    assert ovp.path.name == "openvino" and "convert_seconds" in ovp.ov_unet.info
    assert ovp.model.unet.time_embed[0].weight.is_meta  # the torch copy of the weights is released
    g = torch.Generator().manual_seed(3)
    for batch, side, tokens in ((2, 8, 77), (1, 12, 154)):  # a new shape compiles again
        x = torch.randn(batch, 4, side, side, generator=g)  # (B, 4, h, w)
        t = torch.tensor([900.0, 20.0][:batch])
        ctx = torch.randn(batch, tokens, MICRO.unet.context_dim, generator=g)  # (B, T, D)
        with torch.inference_mode():
            expected = ref.model.unet(x, t, ctx)
        got = ovp.ov_unet(x, t, ctx)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert _rel(got, expected) <= 1e-4  # the bound is 1e-3 per U-Net step


def test_txt2img_through_the_backend_matches_the_parity_path(tiny):
    _, _, ref, ovp = tiny
    params = GenerationParams(prompt="a red cube", steps=3, seed=7)
    a, b = ref.generate(params), ovp.generate(params)
    assert _rel(b.latents, a.latents) <= 1e-4
    for x, y in zip(a.images, b.images, strict=True):
        diff = (torch.tensor(list(x.getdata())) - torch.tensor(list(y.getdata()))).abs()
        assert int(diff.max()) <= 2  # pixels in 0..255
    assert "Quantization" not in b.infotexts[0]


def test_a_second_load_reads_the_cache_and_does_not_convert(tiny, monkeypatch):
    path, cache, _, _ = tiny
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))

    def no_conversion(unet):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(backend, "convert_unet", no_conversion)
    again = Pipeline.from_file(path, precision="openvino")
    assert "convert_seconds" not in again.ov_unet.info
    assert Path(again.ov_unet.info["fp32_entry"]).parent == cache


def _small_model():
    import openvino as ov

    return ov.convert_model(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), example_input=torch.randn(2, 4))


@pytest.mark.parametrize(
    "damage", ["flip a weight byte", "truncate the weights", "break the xml", "bad meta"]
)
def test_a_damaged_cache_entry_is_deleted_and_reads_as_a_miss(tmp_path, damage):
    cache, key = IrCache(tmp_path), IrKey("w" * 64, "unet", "dynamic", "fp32", "test")
    folder = cache.store(key, _small_model())
    assert cache.load(key) is not None and not list(tmp_path.glob(".tmp-*"))
    target = {"flip a weight byte": "model.bin", "truncate the weights": "model.bin"}.get(damage)
    if target:
        data = bytearray((folder / target).read_bytes())
        if damage.startswith("flip"):
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        (folder / target).write_bytes(bytes(data))
    elif damage == "break the xml":
        (folder / "model.xml").write_text("<net")
    else:
        (folder / "meta.json").write_text("{not json")
    assert cache.load(key) is None and not folder.exists()
    cache.store(key, _small_model())
    assert cache.load(key) is not None


def test_a_damaged_unet_entry_is_converted_again(tmp_path, monkeypatch):
    calls = []

    def fake_convert(unet):
        calls.append(1)
        return _small_model()

    monkeypatch.setattr(backend, "convert_unet", fake_convert)
    unet = UNetModel(MICRO.unet)
    cache = IrCache(tmp_path)
    first = backend.load_openvino_unet(unet, "openvino", cache=cache)
    backend.load_openvino_unet(unet, "openvino", cache=cache)
    assert len(calls) == 1  # the second load read the cache
    bin_file = Path(first.info["fp32_entry"]) / "model.bin"
    bin_file.write_bytes(b"\0" * bin_file.stat().st_size)  # same size, wrong content
    again = backend.load_openvino_unet(unet, "openvino", cache=cache)
    assert len(calls) == 2 and "convert_seconds" in again.info
    with torch.no_grad():  # other weights are another key
        unet.out[-1].bias.add_(1.0)
    backend.load_openvino_unet(unet, "openvino", cache=cache)
    assert len(calls) == 3


def _sd1_params() -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNetModel(SD1.unet).parameters())


def test_auto_takes_openvino_on_a_cpu_without_bf16_only_when_switched_on(monkeypatch):
    sd1, tiny_params = _sd1_params(), 1_000_000
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: None)
    off = choose_path("auto", "cpu", sd1, features=ICE_LAKE)  # the shipped setting: not measured faster
    assert off.name == "fp32" and "OpenVINO" not in off.reason
    monkeypatch.setattr(runtime, "AUTO_OPENVINO", True)
    p = choose_path("auto", "cpu", sd1, features=ICE_LAKE)
    assert (p.name, p.dtype) == ("openvino", torch.float32) and "no native bf16" in p.reason
    assert choose_path("auto", "cpu", sd1, features=SAPPHIRE).name == "bf16"  # bf16 CPUs keep bf16
    small = choose_path("auto", "cpu", tiny_params, features=ICE_LAKE)
    assert small.name == "fp32" and "below" in small.reason  # the conversion would not pay
    assert choose_path("auto", "cpu", sd1, features=ICE_LAKE, openvino=False).name == "fp32"  # SD3's MMDiT
    assert choose_path("auto", "cpu", sd1, quantized=True, features=ICE_LAKE).name == "int8"
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: "openvino is not installed (mocked)")
    p = choose_path("auto", "cpu", sd1, features=ICE_LAKE)
    assert p.name == "fp32" and "OpenVINO unavailable" in p.reason
    monkeypatch.setattr(runtime, "cpu_features", lambda: ICE_LAKE)  # the detection itself, mocked
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: None)
    assert choose_path("auto", "cpu", sd1).name == "openvino"


def test_clear_errors_when_openvino_is_missing_or_a_feature_needs_the_torch_unet(tiny, monkeypatch):
    path, cache, _, ovp = tiny
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
    monkeypatch.setattr(
        runtime, "openvino_missing", lambda int8=False: "the openvino package is not installed"
    )
    with pytest.raises(PrecisionError, match="openvino package is not installed.*fp32"):
        Pipeline.from_file(path, precision="openvino")
    monkeypatch.undo()
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
    with pytest.raises(PrecisionError, match="runs on the CPU only"):
        choose_path("openvino", "cuda")
    with pytest.raises(PrecisionError, match="is int8-quantized"):
        choose_path("openvino", "cpu", quantized=True)
    with pytest.raises(backend.OpenVinoError, match="DeepCache.*not supported with the OpenVINO backend"):
        Pipeline.from_file(path, precision="openvino", accel=Accel(deepcache_interval=2))
    auto = Pipeline.from_file(path, precision="auto", accel=Accel(tome_ratio=0.3))
    assert auto.ov_unet is None  # auto never picks the backend with accelerators on

    class FakeLora:
        pass

    with pytest.raises(backend.OpenVinoError, match="LoRA at run time: not supported.*merge-lora"):
        ovp.generate(GenerationParams(prompt="x", steps=1), loras=[(FakeLora(), 1.0, 1.0)])
    from diffusekit.animation.animatediff import inflate

    with pytest.raises(backend.OpenVinoError, match="AnimateDiff"):
        with inflate(ovp, None, 8):
            pass


def test_generate_json_reports_the_openvino_path(tiny, tmp_path, monkeypatch, capsys):
    from diffusekit.cli import main

    path, cache, _, _ = tiny
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
    out = tmp_path / "a.png"
    code = main(["generate", "--model", str(path), "--precision", "openvino", "--steps", "2", "--json",
                 "--out", str(out), "a cat"])  # fmt: skip
    assert code == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == {"name": "openvino", "reason": "asked for"}


def test_int8_graph_is_calibrated_once_then_read_from_the_cache(tiny, monkeypatch):
    pytest.importorskip("nncf")
    path, cache, ref, _ = tiny
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
    quick = backend.Int8Calibration(prompts=1, steps=3, bias_correction="none")  # a quick one
    monkeypatch.setattr(backend, "Int8Calibration", lambda: quick)
    p8 = Pipeline.from_file(path, precision="openvino-int8")
    assert p8.ov_unet.info["calibration_samples"] == 3  # one CFG call per step, captured while sampling
    params = GenerationParams(prompt="a red cube", steps=3, seed=7)
    got, expected = p8.generate(params), ref.generate(params)
    assert "Quantization: openvino-int8" in got.infotexts[0]
    assert torch.isfinite(got.latents).all() and 0 < _rel(got.latents, expected.latents) < 1.0
    monkeypatch.setattr(backend, "capture_calibration", lambda *a: pytest.fail("calibrated again"))
    again = Pipeline.from_file(path, precision="openvino-int8")
    assert "calibration_seconds" not in again.ov_unet.info


def test_on_autos_choice_the_torch_unet_is_kept_for_the_features_that_need_it(tiny, monkeypatch):
    path, cache, ref, _ = tiny
    monkeypatch.setenv("DIFFUSEKIT_OPENVINO_CACHE", str(cache))
    monkeypatch.setattr(runtime, "AUTO_OPENVINO", True)
    monkeypatch.setattr(runtime, "AUTO_OPENVINO_MIN_UNET_PARAMS", 0)  # a micro model counts as SD-size
    monkeypatch.setattr(runtime, "AUTO_BF16_MIN_UNET_PARAMS", 10**12)
    monkeypatch.setattr(runtime, "cpu_features", lambda: ICE_LAKE)
    monkeypatch.setattr(runtime, "openvino_missing", lambda int8=False: None)
    auto = Pipeline.from_file(path, precision="auto")
    assert auto.path.name == "openvino" and "no native bf16" in auto.path.reason
    assert backend.torch_unet_kept(auto)
    params = GenerationParams(prompt="a red cube", steps=2, seed=3)
    with backend.torch_unet(auto, "LoRA at run time", "merge it"):
        assert auto.ov_unet is None
        torch_run = auto.generate(params)
    assert auto.ov_unet is not None
    assert torch.equal(torch_run.latents, ref.generate(params).latents)  # the PyTorch U-Net ran
