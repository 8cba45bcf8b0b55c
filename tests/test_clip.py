"""CLIP text encoders: parity with transformers in both layouts, key maps, pooling, sizes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from diffusekit.checkpoints.convert_clip import (
    text_config_from_transformers,
    text_config_to_transformers,
    text_from_transformers,
    text_to_transformers,
    trim_text_encoder,
)
from diffusekit.models.clip import (
    UNUSED_KEY_SUFFIXES,
    CLIPTextModel,
    OpenCLIPTextModel,
    build_text_encoder,
)
from diffusekit.models.configs import (
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    TINY_SD1,
    TINY_SD2,
    TINY_SDXL,
    TextEncoderConfig,
)

TOL = 1e-4  # max |ours - reference| / max |reference|, fp32
BOS, EOS = 49406, 49407

TINY_HF = TINY_SD1.text_encoders[0]  # 3 layers, quick_gelu, no projection, uses all layers + final LN
TINY_OPENCLIP = TINY_SD2.text_encoders[0]  # 3 layers, gelu, projection, uses 2 layers + final LN
CASES = {
    "hf": TINY_HF,
    "hf-proj": replace(TINY_HF, projection_dim=24),
    "openclip": TINY_OPENCLIP,
    "openclip-noproj": replace(TINY_OPENCLIP, projection_dim=None),
    "sdxl-hf": TINY_SDXL.text_encoders[0],  # penultimate layer, no final LN
    "sdxl-openclip": TINY_SDXL.text_encoders[1],
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def prompt_ids(pad: int, lengths: tuple[int, ...] = (5, 1, 20, 75), total: int = 77) -> torch.Tensor:
    """Token ids laid out like a tokenized prompt: BOS, words, EOS, then padding with `pad`."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.full((len(lengths), total), pad, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(1, BOS, (n,), generator=gen)
        ids[row, n + 1] = EOS
    return ids


def transformers_reference(cfg: TextEncoderConfig, folder: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A seeded random transformers model for `cfg`, saved and reloaded, and its weights as stored."""
    torch.manual_seed(1)
    config = CLIPTextConfig(**text_config_to_transformers(cfg))
    cls = HFCLIPTextModelWithProjection if cfg.projection_dim else HFCLIPTextModel
    ref = cls(config)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.05)
    ref.save_pretrained(folder)
    ref = cls.from_pretrained(folder).eval()
    assert ref.config.eos_token_id == EOS  # transformers pools at the first EOS, as our argmax does
    return ref, load_file(folder / "model.safetensors")


@pytest.mark.parametrize("pad", [EOS, 0], ids=["pad-eos", "pad-zero"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name: str, pad: int, tmp_path: Path) -> None:
    cfg = replace(CASES[name], pad_token_id=pad)
    ref, stored = transformers_reference(cfg, tmp_path)
    ours = build_text_encoder(cfg).eval()
    ours.load_state_dict(text_from_transformers(stored, cfg), strict=True)
    ids = prompt_ids(pad)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        last = ours(ids, use_layers=cfg.layers, final_norm=True)
        penult = ours(ids, use_layers=cfg.layers - 1, final_norm=False)
        default = ours(ids)
        context_only = ours(ids, return_pooled=False)
    pooled_ref = out.text_embeds if cfg.projection_dim else out.pooler_output
    want_default = out.hidden_states[cfg.use_layers]
    if cfg.final_norm:
        with torch.no_grad():
            want_default = getattr(ref, "text_model", ref).final_layer_norm(want_default)
    assert last.pooled.shape == (ids.shape[0], cfg.projection_dim or cfg.width)
    for what, a, b in [
        ("last_hidden_state", last.hidden, out.last_hidden_state),
        ("hidden_states[-2]", penult.hidden, out.hidden_states[-2]),
        ("pooled", last.pooled, pooled_ref),
        ("default hidden", default.hidden, want_default),
        ("context only", context_only.hidden, want_default),
    ]:
        assert rel_err(a, b) <= TOL, f"{what}: relative error {rel_err(a, b):.2e}"
    assert torch.equal(default.pooled, last.pooled) and context_only.pooled is None


def test_pooling_uses_first_eos() -> None:
    """With EOS padding the pooled row is the first EOS, not a later padding position."""
    cfg = TINY_HF
    model = build_text_encoder(cfg).eval()
    ids = prompt_ids(EOS, lengths=(3,))
    with torch.no_grad():
        out = model(ids)
        full = model(ids, use_layers=cfg.layers, final_norm=True).hidden
    assert torch.equal(out.pooled[0], full[0, 4])
    assert not torch.allclose(out.pooled[0], full[0, 5])


@pytest.mark.parametrize("name", ["hf", "hf-proj", "openclip", "openclip-noproj"])
def test_export_loads_in_transformers(name: str, tmp_path: Path) -> None:
    """Our weights + config, exported, load into transformers (no missing/unexpected keys) and agree."""
    cfg = CASES[name]
    ours = build_text_encoder(cfg).eval()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    save_file(text_to_transformers(ours.state_dict(), cfg), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(text_config_to_transformers(cfg)))
    cls = HFCLIPTextModelWithProjection if cfg.projection_dim else HFCLIPTextModel
    ref, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = prompt_ids(cfg.pad_token_id)
    with torch.no_grad():
        out, mine = ref.eval()(ids), ours(ids, use_layers=cfg.layers, final_norm=True)
    assert rel_err(mine.hidden, out.last_hidden_state) <= TOL
    assert rel_err(mine.pooled, out.text_embeds if cfg.projection_dim else out.pooler_output) <= TOL
    d = text_config_to_transformers(cfg)
    back = text_config_from_transformers(
        d, layout=cfg.layout, use_layers=cfg.use_layers, final_norm=cfg.final_norm
    )
    assert back == cfg


@pytest.mark.parametrize("name", ["hf", "openclip"])
def test_key_maps_round_trip_exactly(name: str) -> None:
    cfg = CASES[name]
    sd = build_text_encoder(cfg).state_dict()
    there = text_to_transformers(sd, cfg)
    back = text_from_transformers(there, cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # transformers 5 saves a plain CLIPTextModel without the "text_model." prefix; both spellings load.
    bare = {k.removeprefix("text_model."): v for k, v in there.items()}
    bare["embeddings.position_ids"] = torch.arange(77)[None]  # persisted by older transformers
    assert all(torch.equal(v, sd[k]) for k, v in text_from_transformers(bare, cfg).items())


def test_openclip_layout_matches_single_file_converters() -> None:
    """Our keys are open_clip's / LDM's: diffusers' single-file converters give the same transformers dict."""
    cfg = TINY_OPENCLIP
    sd = build_text_encoder(cfg).state_dict()
    prefix = "conditioner.embedders.1.model."
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=cfg.width))
    reference = convert_open_clip_checkpoint(
        text_model, {prefix + k: v for k, v in sd.items()}, prefix=prefix
    )
    ours = text_to_transformers(sd, cfg)
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)

    hf_sd = build_text_encoder(TINY_HF).state_dict()
    reference = convert_ldm_clip_checkpoint(
        {"cond_stage_model.transformer." + k: v for k, v in hf_sd.items()}
    )
    assert text_to_transformers(hf_sd, TINY_HF).keys() == reference.keys()


def test_sd2_diffusers_layout_is_trimmed_file() -> None:
    """diffusers' SD2 text encoder = the ViT-H file minus layer 24 and the projection."""
    sd = OpenCLIPTextModel(OPENCLIP_H, device="meta").state_dict()
    prefix = "cond_stage_model.model."
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=1024))
    reference = convert_open_clip_checkpoint(
        text_model, {prefix + k: v for k, v in sd.items()}, prefix=prefix
    )
    trimmed, cfg23 = trim_text_encoder(sd, OPENCLIP_H, projection=False)
    assert (cfg23.layers, cfg23.use_layers, cfg23.projection_dim) == (23, 23, None)
    ours = text_to_transformers(trimmed, cfg23)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    with pytest.raises(ValueError, match="hidden state needs 23"):
        trim_text_encoder(sd, OPENCLIP_H, layers=22)


def test_trimmed_encoder_keeps_the_hidden_state() -> None:
    cfg = TINY_OPENCLIP  # uses 2 of 3 layers
    full = build_text_encoder(cfg).eval()
    sd, cfg2 = trim_text_encoder(full.state_dict(), cfg, projection=False)
    small = build_text_encoder(cfg2).eval()
    small.load_state_dict(sd, strict=True)
    ids = prompt_ids(0)
    with torch.no_grad():
        assert torch.equal(small(ids).hidden, full(ids).hidden)
        assert small(ids).pooled.shape == (ids.shape[0], cfg.width)


def test_sizes_of_real_encoders() -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    h23 = replace(OPENCLIP_H, layers=23, use_layers=23, projection_dim=None)
    assert count(CLIPTextModel(CLIP_L, device="meta")) == 123_060_480
    assert count(OpenCLIPTextModel(h23, device="meta")) == 340_387_840
    layer = 12 * 1024 * 1024 + 13 * 1024  # attention 4 W^2 + MLP 8 W^2, biases, two LayerNorms
    assert count(OpenCLIPTextModel(OPENCLIP_H, device="meta")) == 340_387_840 + layer + 1024 * 1024
    assert count(OpenCLIPTextModel(OPENCLIP_BIGG, device="meta")) == 694_659_840
    with torch.device("meta"):  # transformers agrees on the same structures
        hf_l = HFCLIPTextModel(CLIPTextConfig(**text_config_to_transformers(CLIP_L)))
        hf_g = HFCLIPTextModelWithProjection(CLIPTextConfig(**text_config_to_transformers(OPENCLIP_BIGG)))
    assert count(hf_l) == 123_060_480 and count(hf_g) == 694_659_840


def test_meta_device_forward() -> None:
    model = build_text_encoder(OPENCLIP_BIGG, device="meta")
    out = model(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    assert out.hidden.shape == (2, 77, 1280) and out.pooled.shape == (2, 1280)
    assert out.hidden.device.type == "meta"


def test_errors() -> None:
    with pytest.raises(ValueError, match="layout 'hf'"):
        CLIPTextModel(TINY_OPENCLIP)
    with pytest.raises(ValueError, match="layout 'openclip'"):
        OpenCLIPTextModel(TINY_HF)
    model = build_text_encoder(TINY_HF)
    with pytest.raises(ValueError, match="77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="use_layers=4"):
        model(torch.zeros(1, 77, dtype=torch.long), use_layers=4)
    sd = text_to_transformers(model.state_dict(), TINY_HF)
    with pytest.raises(ValueError, match="unexpected key 'text_projection.weight'"):
        text_from_transformers({**sd, "text_projection.weight": torch.zeros(32, 32)}, TINY_HF)
    with pytest.raises(ValueError, match=r"missing key 'text_model.encoder.layers.2.mlp.fc2.bias'"):
        text_from_transformers({k: v for k, v in sd.items() if "layers.2.mlp.fc2.bias" not in k}, TINY_HF)
    with pytest.raises(ValueError, match="hidden_act"):
        text_config_from_transformers(
            {**text_config_to_transformers(TINY_HF), "hidden_act": "relu"},
            layout="hf",
            use_layers=3,
            final_norm=True,
        )


def test_unused_key_suffixes() -> None:
    assert (
        "text_model.embeddings.position_ids" in UNUSED_KEY_SUFFIXES and "logit_scale" in UNUSED_KEY_SUFFIXES
    )
    for cfg in (CLIP_L, OPENCLIP_H):
        keys = build_text_encoder(cfg, device="meta").state_dict()
        assert not any(k.endswith(UNUSED_KEY_SUFFIXES) for k in keys)


def test_config_from_diffusers_style_dicts() -> None:
    """diffusers' configs: SD2 = 23-layer CLIPTextModel (pad id placeholder 1), SDXL bigG = WithProjection."""
    sd2 = {
        **text_config_to_transformers(replace(OPENCLIP_H, layers=23, projection_dim=None)),
        "pad_token_id": 1,
    }
    cfg = text_config_from_transformers(sd2, layout="openclip", use_layers=23, final_norm=True)
    assert cfg == replace(OPENCLIP_H, layers=23, projection_dim=None)
    bigg = text_config_to_transformers(OPENCLIP_BIGG)
    assert (
        text_config_from_transformers(bigg, layout="openclip", use_layers=31, final_norm=False)
        == OPENCLIP_BIGG
    )
    no_arch = {k: v for k, v in bigg.items() if k != "architectures"}
    got = text_config_from_transformers(no_arch, layout="openclip", use_layers=31, final_norm=False)
    assert got.projection_dim is None
    got = text_config_from_transformers(
        no_arch, layout="openclip", use_layers=31, final_norm=False, with_projection=True
    )
    assert got == OPENCLIP_BIGG


@pytest.mark.slow
def test_full_size_clip_l_matches_transformers(tmp_path: Path) -> None:
    ref, stored = transformers_reference(CLIP_L, tmp_path)
    ours = CLIPTextModel(CLIP_L).eval()
    ours.load_state_dict(text_from_transformers(stored, CLIP_L), strict=True)
    ids = prompt_ids(EOS)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        mine, penult = ours(ids), ours(ids, use_layers=11, final_norm=False)
    assert rel_err(mine.hidden, out.last_hidden_state) <= TOL
    assert rel_err(penult.hidden, out.hidden_states[-2]) <= TOL
    assert rel_err(mine.pooled, out.pooler_output) <= TOL
