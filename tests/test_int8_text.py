"""Int8 text encoders: CLIP / OpenCLIP linears in int8, close to fp32, through the quantized file."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffusekit.accel.errors import AccelError
from diffusekit.accel.int8_file import (
    COMPONENTS_KEY,
    FORMAT_KEY,
    is_int8_checkpoint,
    load_int8_model,
    split_int8,
)
from diffusekit.accel.int8_static import Int8Linear, int8_unavailable, quantize_unet
from diffusekit.accel.int8_text import Int8InProjection, quantize_text_encoder, text_quantizable
from diffusekit.checkpoints.inspect import inspect_checkpoint
from diffusekit.checkpoints.load import checkpoint_metadata, load_model
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, save_state_dict
from diffusekit.models.clip import build_text_encoder
from diffusekit.models.configs import TextEncoderConfig
from diffusekit.models.init import randomize_
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))


pytestmark = [pytestmark, pytest.mark.usefixtures("one_thread")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).detach().norm() / b.float().detach().norm())


def _ids(cfg: TextEncoderConfig, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size - 1, (batch, 77), generator=g)  # (B, T)
    ids[:, 20] = cfg.vocab_size - 1  # the end-of-text token (largest id) sets the pooled position
    return ids


@pytest.mark.parametrize("layout", ["hf", "openclip"])
def test_int8_text_encoder_is_close_to_fp32(layout):
    cfg = TextEncoderConfig(
        width=64, layers=3, heads=4, mlp_width=256, layout=layout, projection_dim=32, vocab_size=1000,
        pad_token_id=0, use_layers=3, activation="gelu" if layout == "openclip" else "quick_gelu",
    )  # fmt: skip
    enc = randomize_(build_text_encoder(cfg), seed=0).eval()
    fp32 = copy.deepcopy(enc)
    count = quantize_text_encoder(enc)
    assert count == 3 * (6 if layout == "hf" else 4)
    int8 = [m for m in enc.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == count and all(m.dynamic for m in int8)
    if layout == "openclip":
        assert all(isinstance(b.attn.in_proj, Int8InProjection) for b in enc.transformer.resblocks)
        assert "transformer.resblocks.0.attn.in_proj_weight" not in enc.state_dict()
        assert "transformer.resblocks.0.attn.in_proj.weight" in enc.state_dict()
    ids = _ids(cfg)
    with torch.inference_mode():
        a, ref = enc(ids), fp32(ids)
    cos = torch.nn.functional.cosine_similarity(a.hidden.flatten(1), ref.hidden.flatten(1)).min()
    print(f"{layout}: hidden rel {_rel(a.hidden, ref.hidden):.4f}, pooled {_rel(a.pooled, ref.pooled):.4f}")
    # measured 0.027 (hf) / 0.034 (openclip) relative, cosine > 0.999: 3 blocks of width 64, where the
    # rounding of each 64-term dot product averages out far less than at CLIP's widths (768-1280)
    assert _rel(a.hidden, ref.hidden) < 0.06 and float(cos) > 0.998
    assert _rel(a.pooled, ref.pooled) < 0.06
    assert not list(text_quantizable(enc))  # nothing float left to quantize
    with pytest.raises(AccelError, match="no float linears"):
        quantize_text_encoder(enc)


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_quantized_file_round_trip_with_text_encoders(tmp_path, name):
    cfg, _, path = make_checkpoint(name, tmp_path)
    model = load_model(path).model
    fp32 = copy.deepcopy(model)
    quantize_unet(model.unet, dynamic=True)
    counts = [quantize_text_encoder(e) for e in model.text_encoders]
    meta = checkpoint_metadata(
        cfg, {"diffusekit.quantization": "int8-static", FORMAT_KEY: "2", COMPONENTS_KEY: "unet,text_encoder"}
    )
    out = tmp_path / "q.safetensors"
    save_state_dict(model.state_dict(), out, metadata=meta)
    assert is_int8_checkpoint(out)
    loaded = load_int8_model(out)
    assert any("text_encoder" in n and "int8" in n for n in loaded.notes)
    encoders = (loaded.model.text_encoders, model.text_encoders, fp32.text_encoders, counts)
    for enc, q, ref, n in zip(*encoders, strict=True):
        assert sum(isinstance(m, Int8Linear) for m in enc.modules()) == n
        ids = _ids(enc.cfg)
        with torch.inference_mode():
            a, b, r = enc(ids), q(ids), ref(ids)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)  # exactly what was saved
        assert _rel(a.hidden, r.hidden) < 0.05
    sd, _ = load_state_dict(out)
    floats, int8 = split_int8(sd)
    assert any(k.startswith("cond_stage_model") or k.startswith("conditioner") for k in int8)
    if name != "tiny_sd1":  # OpenCLIP: the packed projection goes back to its original key names
        assert any(k.endswith("attn.in_proj_weight") for k in floats)
        assert not any(k.endswith("attn.in_proj.weight") for k in floats)
    report = inspect_checkpoint(out, hashes=False)  # `diffusekit inspect` reads the file as it is
    te = [c for c in report.components if c.name.startswith("text_encoder")]
    assert te and all("int8" in c.dtypes for c in te)


def test_format_versions(tmp_path):
    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    model = load_model(path).model
    quantize_unet(model.unet, dynamic=True)
    old = tmp_path / "v1.safetensors"  # as the first int8 release wrote it: no format key
    save_state_dict(
        model.state_dict(), old, metadata=checkpoint_metadata(cfg, {"diffusekit.quantization": "int8-static"})
    )
    loaded = load_int8_model(old).model
    assert not any(isinstance(m, Int8Linear) for e in loaded.text_encoders for m in e.modules())
    assert any(isinstance(m, Int8Linear) for m in loaded.unet.modules())
    new = tmp_path / "v9.safetensors"
    save_state_dict(
        model.state_dict(),
        new,
        metadata=checkpoint_metadata(cfg, {"diffusekit.quantization": "int8-static", FORMAT_KEY: "9"}),
    )
    with pytest.raises(CheckpointError, match="format 9 is newer"):
        load_int8_model(new)


def test_convert_with_text_encoders_and_generate(tmp_path, capsys):
    from diffusekit.cli import main
    from diffusekit.params import GenerationParams

    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    plain, te = tmp_path / "plain.safetensors", tmp_path / "te.safetensors"
    assert main(["convert", str(path), str(plain), "--quantize", "int8"]) == 0
    assert "0 text encoder layers" in capsys.readouterr().out
    assert main(["convert", str(path), str(te), "--quantize", "int8", "--int8-text-encoders"]) == 0
    assert "18 text encoder layers" in capsys.readouterr().out  # tiny CLIP: 3 blocks x 6 linears
    _, meta = load_state_dict(te)
    assert meta[FORMAT_KEY] == "2" and meta[COMPONENTS_KEY] == "unet,text_encoder"
    assert load_state_dict(plain)[1][COMPONENTS_KEY] == "unet"
    assert te.stat().st_size < plain.stat().st_size
    params = GenerationParams(prompt="a red cube", steps=2, seed=3, width=64, height=64)
    other = GenerationParams(prompt="a green forest at night", steps=2, seed=3, width=64, height=64)

    def pixels(pipe: Pipeline, p: GenerationParams) -> torch.Tensor:
        return torch.from_numpy(np.asarray(pipe.generate(p).images[0].convert("RGB"))).float()

    plain_pipe = Pipeline.from_file(plain, precision="int8")
    te_pipe = Pipeline.from_file(te, precision="int8")
    assert sum(isinstance(m, Int8Linear) for m in te_pipe.model.text_encoders[0].modules()) == 18
    assert not any(isinstance(m, Int8Linear) for m in plain_pipe.model.text_encoders[0].modules())
    a, b, c = pixels(plain_pipe, params), pixels(te_pipe, params), pixels(plain_pipe, other)
    te_mse, prompt_mse = float(((a - b) ** 2).mean()), float(((a - c) ** 2).mean())
    print(f"tiny model image MSE: text encoder int8 {te_mse:.1f}, another prompt {prompt_mse:.1f}")
    # the text encoder's int8 changes the image (it runs), far less than changing the prompt does:
    # measured 126 against 1021 (this tiny CLIP is 32 wide, where int8 rounding averages out least)
    assert 0 < te_mse < 0.25 * prompt_mse


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.parametrize("merge", [False, True])
def test_a_lora_acts_on_int8_layers_as_on_float_ones(name, merge):
    from diffusekit.adapters.lora import apply_loras
    from diffusekit.adapters.lora_file import LoraModule, LoraNetwork
    from diffusekit.models.configs import preset
    from diffusekit.models.sd import StableDiffusion

    g = torch.Generator().manual_seed(0)

    def lora(out: int, inp: int) -> LoraModule:
        return LoraModule(
            0.1 * torch.randn(4, inp, generator=g), 0.1 * torch.randn(out, 4, generator=g), alpha=4.0
        )

    net = LoraNetwork("t", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": lora(32, 32),  # OpenCLIP: packed in_proj
        "lora_te_text_model_encoder_layers_1_mlp_fc1": lora(64, 32),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lora(64, 64),
    })  # fmt: skip
    fp32 = randomize_(StableDiffusion(preset(name)), 0).eval()
    int8 = copy.deepcopy(fp32)
    quantize_unet(int8.unet, dynamic=True)
    quantize_text_encoder(int8.text_encoders[0])
    ids = _ids(fp32.text_encoders[0].cfg, 1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    outs = []
    for model in (fp32, int8):
        with torch.inference_mode():
            base = model.text_encoders[0](ids).hidden
            base_eps = model.unet(x, t, base)
        applied = apply_loras(model, [(net, 1.0, 10.0)], merge=merge)  # one U-Net layer: a strong one
        assert applied.unmatched["t"] == []
        with torch.inference_mode():
            outs.append((model.text_encoders[0](ids).hidden, model.unet(x, t, base), base, base_eps))
        applied.remove()
        with torch.inference_mode():
            assert torch.equal(model.text_encoders[0](ids).hidden, base)  # removed without a trace
    (te_f, unet_f, te_f0, unet_f0), (te_q, unet_q, _, _) = outs
    # with the LoRA, the int8 model is as close to the float model with the LoRA as int8 rounding
    # allows, and far closer than to the float model without it (a LoRA that did not act on int8
    # layers would leave the int8 model where the float one was before)
    for q, f, f0 in ((te_q, te_f, te_f0), (unet_q, unet_f, unet_f0)):
        print(f"int8 vs float with the LoRA {_rel(q, f):.3f}; the LoRA's own change {_rel(f, f0):.3f}")
        assert _rel(q, f) < 0.1 and _rel(q, f) < 0.5 * _rel(f, f0)
