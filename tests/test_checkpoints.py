"""Whole-model checkpoint I/O: detection, loading, diffusers folders, convert, inspect, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diffusekit.checkpoints.detect import detect_config
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.checkpoints.inspect import inspect_checkpoint, inspect_state_dict
from diffusekit.checkpoints.load import checkpoint_metadata, load_model
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, save_state_dict
from diffusekit.cli import main
from diffusekit.diffusion.schedules import sd_alphas_cumprod
from diffusekit.models.configs import preset
from diffusekit.models.init import randomize_
from diffusekit.models.sd import StableDiffusion
from helpers import make_checkpoint

TINY = ["tiny_sd1", "tiny_sd1_inpaint", "tiny_sd2", "tiny_sd2_v", "tiny_sdxl"]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sd1_inpaint", "sd2", "sdxl"])
def test_real_presets_are_detected_from_shapes_alone(name):
    cfg = preset(name)
    with torch.device("meta"):
        sd = StableDiffusion(cfg).state_dict()
    assert detect_config(sd, {}) == cfg


def test_v_prediction_comes_from_metadata_or_option_never_from_weights():
    with torch.device("meta"):
        sd = StableDiffusion(preset("sd2")).state_dict()
    assert detect_config(sd, {}).prediction == "eps"
    assert detect_config(sd, {"modelspec.prediction_type": "v"}) == preset("sd2_v")
    assert detect_config(sd, {}, prediction="v").prediction == "v"
    assert detect_config(sd | {"v_pred": torch.empty(0, device="meta")}, {}).prediction == "v"


def test_zero_terminal_snr_comes_from_marker_key_or_training_table():
    with torch.device("meta"):
        sd = StableDiffusion(preset("sd2")).state_dict()
    marker = {"ztsnr": torch.empty(0, device="meta")}  # ComfyUI's marker key
    assert detect_config(sd | marker, {}, prediction="v").zero_terminal_snr
    v = {"modelspec.prediction_type": "v"}
    zero_snr_table = {"alphas_cumprod": sd_alphas_cumprod(zero_terminal_snr=True)}  # LDM training buffer
    assert detect_config(sd | zero_snr_table, v).zero_terminal_snr
    assert not detect_config(sd | {"alphas_cumprod": sd_alphas_cumprod()}, v).zero_terminal_snr
    with pytest.raises(CheckpointError, match="zero-terminal-SNR, which needs prediction 'v', not 'eps'"):
        detect_config(sd | marker, {})


def test_real_size_parameter_counts_via_inspect():
    with torch.device("meta"):
        sd = StableDiffusion(preset("sd1")).state_dict()
    report = inspect_state_dict(sd, detect_config(sd, {}), path="sd15.safetensors", fmt="meta", file_bytes=0)
    counts = {c.name: c.parameters for c in report.components}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert report.preset == "sd1"
    assert report.memory_estimate["fp16"] == 2 * report.parameters


# --- single files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_single_file_roundtrip_is_exact(name, tmp_path):
    cfg, sd, path = make_checkpoint(name, tmp_path)
    loaded = load_model(path)
    assert loaded.cfg == cfg
    assert_same_tensors(loaded.model.state_dict(), sd)


def test_ckpt_with_ema_and_training_state_loads(tmp_path):
    cfg, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): v + 1
        for k, v in sd.items()
        if k.startswith("model.")
    }
    path = tmp_path / "train.ckpt"
    full = sd | ema | {"model_ema.num_updates": torch.tensor(3), "betas": torch.linspace(0, 1, 1000)}
    torch.save({"state_dict": full, "global_step": 10, "epoch": 1}, path)
    meta_path = tmp_path / "meta.safetensors"  # the same weights with our config, for comparison
    save_state_dict(sd, meta_path, metadata=checkpoint_metadata(cfg))
    plain = load_model(path)  # no metadata: structure from shapes, heads from the sd1 rule
    assert_same_tensors(plain.model.state_dict(), sd)
    assert any("non-network" in n for n in plain.notes)
    ema_model = load_model(path, keep_ema=True)
    unet_key = "model.diffusion_model.out.2.bias"
    assert torch.equal(ema_model.model.state_dict()[unet_key], sd[unet_key] + 1)


def test_fp16_file_keeps_its_dtype_and_can_be_cast(tmp_path):
    _, sd, path = make_checkpoint("tiny_sd1", tmp_path, dtype=torch.float16)
    loaded = load_model(path)
    assert {t.dtype for t in loaded.model.state_dict().values()} == {torch.float16}
    as32 = load_model(path, dtype=torch.float32)
    assert {t.dtype for t in as32.model.state_dict().values()} == {torch.float32}


# --- diffusers folders -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd1_inpaint", "tiny_sdxl", "tiny_sd2_v"])
def test_single_file_to_diffusers_folder_and_back_is_identical(name, tmp_path):
    cfg, sd, _ = make_checkpoint(name, tmp_path)
    folder = write_diffusers_folder(sd, cfg, tmp_path / "folder")
    loaded = load_model(folder)
    back = loaded.model.state_dict()
    assert loaded.cfg.prediction == cfg.prediction
    if cfg.family == "sd2":
        # diffusers keeps only the layers SD2 uses (use_layers) and no projection
        used = cfg.text_encoders[0].use_layers
        dropped = {
            k
            for k in sd
            if k.startswith("cond_stage_model.model.transformer.resblocks.") and int(k.split(".")[4]) >= used
        } | {"cond_stage_model.model.text_projection"}
        sd = {k: v for k, v in sd.items() if k not in dropped}
    assert_same_tensors(back, sd)


def test_zero_terminal_snr_survives_a_diffusers_folder(tmp_path):
    """The folder's scheduler config is diffusers' own switch for the rescale, and reads back."""
    from diffusers import EulerDiscreteScheduler

    zero_snr = replace(preset("tiny_sd2_v"), zero_terminal_snr=True)
    cfg, sd, _ = make_checkpoint("tiny_sd2_v", tmp_path, cfg=zero_snr)
    folder = write_diffusers_folder(sd, cfg, tmp_path / "folder")
    ref = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    # diffusers builds its betas in float32, we in float64 (as LDM does): equal to float32 rounding
    assert torch.allclose(ref.alphas_cumprod.float(), sd_alphas_cumprod(zero_terminal_snr=True), atol=1e-6)
    assert ref.alphas_cumprod[-1] == 2.0**-24
    assert ref.config.timestep_spacing == "trailing"
    loaded = load_model(folder)
    assert loaded.cfg.zero_terminal_snr and loaded.cfg.prediction == "v"
    assert inspect_checkpoint(folder, hashes=False).zero_terminal_snr
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"prediction_type": "epsilon"})
    )
    with pytest.raises(CheckpointError, match="rescale_betas_zero_snr needs prediction_type v_prediction"):
        load_model(folder)


def _diffusers_pipeline(name):
    """A diffusers pipeline with random weights at our tiny config, built with diffusers' own classes."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusekit.checkpoints.convert_clip import text_config_to_transformers
    from diffusekit.checkpoints.convert_unet import unet_config_to_diffusers
    from diffusekit.checkpoints.convert_vae import vae_config_to_diffusers

    cfg = preset(name)
    unet = randomize_(UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)), 1)
    vae = randomize_(AutoencoderKL(**vae_config_to_diffusers(cfg.vae)), 2)
    encoders = []
    for i, t in enumerate(cfg.text_encoders):
        tc = CLIPTextConfig(**text_config_to_transformers(t))
        cls = CLIPTextModelWithProjection if t.projection_dim and cfg.family == "sdxl" else CLIPTextModel
        encoders.append(randomize_(cls(tc), 3 + i))
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return cfg, unet, vae, encoders, sched


def test_diffusers_folder_to_single_file_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from diffusekit.models.tokenizer import CLIPTokenizer

    cfg, unet, vae, (te,), sched = _diffusers_pipeline("tiny_sd1")
    CLIPTokenizer.bundled().save_folder(tmp_path / "tok")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=HFTokenizer.from_pretrained(tmp_path / "tok"),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "diffusers")
    # diffusers folder -> diffusekit -> single file
    assert main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "single.safetensors")]) == 0
    # -> diffusers' own single-file loader, offline, with the folder as its config
    again = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "single.safetensors"), config=str(tmp_path / "diffusers"), local_files_only=True
    )
    for a, b in [(pipe.unet, again.unet), (pipe.vae, again.vae), (pipe.text_encoder, again.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        common = sa.keys() & sb.keys()
        assert len(common) >= len(sa) - 1  # transformers may or may not keep position_ids
        for k in common:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)


def test_our_diffusers_folder_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg, sd, _ = make_checkpoint("tiny_sdxl", tmp_path)
    write_diffusers_folder(sd, cfg, tmp_path / "folder")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    ours = load_model(tmp_path / "folder").model
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, cfg.unet.context_dim)
    pooled = torch.randn(1, 32)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    from diffusekit.models.unet import size_embedding

    t = torch.tensor([500.0])
    ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    got = ours.unet(x, t, ctx, y=torch.cat([pooled, size_embedding(ids, cfg.unet.size_embed_dim)], 1))
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


# --- convert and inspect -----------------------------------------------------------------------


def test_convert_fp16_and_prune_report_bytes(tmp_path, capsys):
    _, sd, path = make_checkpoint("tiny_sd1", tmp_path)
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): v for k, v in sd.items() if k.startswith("model.")
    }
    full = tmp_path / "full.safetensors"
    save_state_dict(sd | ema, full)
    out = tmp_path / "pruned.safetensors"
    assert main(["convert", str(full), str(out), "--prune", "--dtype", "fp16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "fp16"
    assert result["bytes_after"] < 0.6 * result["bytes_before"] * len(sd) / (len(sd) + len(ema)) + 4096
    pruned, _ = load_state_dict(out)
    assert pruned.keys() == sd.keys()
    assert all(v.dtype == torch.float16 for v in pruned.values())


def test_inspect_cli_text_and_json(tmp_path, capsys):
    _, sd, path = make_checkpoint("tiny_sdxl", tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sdxl" and report["preset"] == "tiny_sdxl"
    assert [c["name"] for c in report["components"]] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert report["parameters"] == sum(v.numel() for v in sd.values())
    assert len(report["hashes"]["autov2"]) == 10 and len(report["hashes"]["autov1"]) == 8
    assert main(["inspect", str(path)]) == 0
    assert "model hash" in capsys.readouterr().out
    assert inspect_checkpoint(path).hashes == report["hashes"]


# --- bad input ---------------------------------------------------------------------------------


def _bad(tmp_path, sd, metadata=None):
    path = tmp_path / "bad.safetensors"
    save_state_dict(sd, path, metadata=metadata)
    return path


def test_missing_key_is_named(tmp_path):
    cfg, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key model\.diffusion_model\.out\.2\.bias"):
        load_model(_bad(tmp_path, sd, checkpoint_metadata(cfg)))


def test_unexpected_key_is_named(tmp_path):
    cfg, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected key model\.diffusion_model\.extra\.weight"):
        load_model(_bad(tmp_path, sd, checkpoint_metadata(cfg)))


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    cfg, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    key = "first_stage_model.encoder.conv_in.bias"
    sd[key] = torch.zeros(5)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch at first_stage_model\.encoder\.conv_in\.bias: "
        r"expected \(32,\), found \(5,\)",
    ):
        load_model(_bad(tmp_path, sd, checkpoint_metadata(cfg)))


def test_vae_only_and_ambiguous_files_are_refused(tmp_path):
    _, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    vae_only = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="no U-Net weights"):
        load_model(_bad(tmp_path, vae_only))
    mixed = sd | {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match=r"matches several families \(sd1, sd2\)"):
        load_model(_bad(tmp_path, mixed))


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusekit: error: ") and err.count("\n") == 1 and "junk.safetensors" in err
    with pytest.raises(CheckpointError):
        main(["--debug", "inspect", str(junk)])
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_separate_vae_file_or_folder_replaces_the_models_vae(tmp_path):
    from diffusekit.checkpoints.convert_vae import vae_config_to_diffusers, vae_to_diffusers

    cfg, _, path = make_checkpoint("tiny_sd1", tmp_path)
    (tmp_path / "other").mkdir()
    _, other, _ = make_checkpoint("tiny_sd1", tmp_path / "other", seed=9)
    prefix = "first_stage_model."
    vae_sd = {k[len(prefix) :]: v for k, v in other.items() if k.startswith(prefix)}
    save_state_dict(vae_sd, tmp_path / "vae.safetensors")  # bare keys, as VAE files are shared

    def assert_vae_is_other(loaded):
        got = loaded.model.state_dict()
        assert all(torch.equal(got["first_stage_model." + k], v) for k, v in vae_sd.items())
        assert any("VAE replaced" in n for n in loaded.notes)

    assert_vae_is_other(load_model(path, vae=tmp_path / "vae.safetensors"))
    folder = tmp_path / "vae_folder"  # a diffusers vae/ folder works too
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vae_config_to_diffusers(cfg.vae)))
    save_state_dict(vae_to_diffusers(vae_sd, cfg.vae), folder / "diffusion_pytorch_model.safetensors")
    assert_vae_is_other(load_model(path, vae=folder))
    save_state_dict({"foo": torch.zeros(1)}, tmp_path / "notvae.safetensors")
    with pytest.raises(CheckpointError, match="notvae.safetensors: not a VAE"):
        load_model(path, vae=tmp_path / "notvae.safetensors")
