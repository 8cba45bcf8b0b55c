"""train-lora: a tiny run writes a kohya file that our loader and diffusers read alike; resume is exact;
merge-lora bakes it in."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image, ImageDraw

from diffusekit.adapters.lora import apply_loras, load_lora
from diffusekit.adapters.train_lora import bucket_sizes
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.checkpoints.load import load_model
from diffusekit.checkpoints.single_file import load_state_dict, read_safetensors_header
from diffusekit.cli import main
from helpers import make_checkpoint

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tl")
    folder = tmp / "data" / "10_zorb"  # kohya's "repeats_concept" subfolder layout
    folder.mkdir(parents=True)
    for i, (color, size) in enumerate([("red", (64, 64)), ("blue", (64, 64)), ("green", (128, 64))]):
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill=color)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} zorb")
    cfg, sd, path = make_checkpoint("tiny_sd1", tmp)
    return tmp, path, cfg, sd


def _train(tmp, model, out, *extra):
    argv = ["train-lora", str(tmp / "data"), "--model", str(model), "-o", str(out), "--steps", "4",
            "--batch", "2", "--lr", "5e-3", "--resolution", "64", "--targets", "attn+conv",
            "--train-text-encoder", "--save-every", "2", "--json", *extra]  # fmt: skip
    assert main(argv) == 0


def test_buckets():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and (448, 576) in sizes and (576, 448) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)


def test_trained_file_loads_in_ours_and_diffusers(data, capsys):
    from diffusers import StableDiffusionPipeline

    tmp, model_path, cfg, sd = data
    out = tmp / "zorb.safetensors"
    _train(tmp, model_path, out)
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    assert (tmp / "zorb.work" / "loss.png").is_file()
    meta = read_safetensors_header(out)[1]
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "zorb" and json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    keys = load_state_dict(out)[0]
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(".in_layers" not in k and "resnets_0_conv1" in k for k in keys)  # LoCon layers, kohya names
    net = load_lora(out)
    assert all(float(m.up.abs().max()) > 0 for m in net.modules.values())  # every layer was trained
    ours = load_model(model_path).model
    folder = write_diffusers_folder(sd, cfg, tmp / "folder")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(out)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([300.0]),
        torch.randn(1, 77, 32, generator=g),
    )
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    with torch.no_grad(), apply_loras(ours, [(net, 1.0, 1.0)]) as applied:
        assert applied.unmatched == {"zorb": []}
        got = [ours.unet(x, t, ctx), ours.text_encoders[0](ids, final_norm=False).hidden]
        ref = [
            pipe.unet(x, t, ctx).sample,
            pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-1],
        ]
    for a, b in zip(got, ref, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


def test_resume_is_exact(data, capsys):
    tmp, model_path, _, _ = data
    straight, resumed = tmp / "straight.safetensors", tmp / "resumed.safetensors"
    _train(tmp, model_path, straight)
    _train(tmp, model_path, resumed, "--stop-after", "2")  # as if killed after the step-2 checkpoint
    _train(tmp, model_path, resumed, "--resume")
    capsys.readouterr()
    a, b = load_state_dict(straight)[0], load_state_dict(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_lora_cli_equals_runtime(data, capsys):
    tmp, model_path, _, _ = data
    lora = tmp / "zorb.safetensors"
    if not lora.is_file():
        _train(tmp, model_path, lora)
    merged = tmp / "merged.safetensors"
    assert main(["merge-lora", str(model_path), f"{lora}:0.7:1.3", "-o", str(merged)]) == 0
    base, baked = load_model(model_path).model, load_model(merged).model
    assert "sd_merge_recipe" in read_safetensors_header(merged)[1]
    g = torch.Generator().manual_seed(1)
    x, t, ctx = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([600.0]),
        torch.randn(1, 77, 32, generator=g),
    )
    with torch.no_grad(), apply_loras(base, [(load_lora(lora), 0.7, 1.3)]):
        runtime = base.unet(x, t, ctx)
    with torch.no_grad():
        got = baked.unet(x, t, ctx)
    assert float((got - runtime).abs().max() / runtime.abs().max()) <= 1e-5


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_train_ti_writes_a1111_embedding_that_changes_the_prompt(data, suffix, capsys):
    from diffusekit.adapters.embeddings import EmbeddingLibrary, load_embedding
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    tmp, model_path, _, _ = data
    out = tmp / "emb" / f"zorb{suffix}"
    out.parent.mkdir(exist_ok=True)
    argv = ["train-ti", str(tmp / "data"), "--model", str(model_path), "-o", str(out), "--steps", "3",
            "--batch", "2", "--vectors", "2", "--init-word", "ball", "--resolution", "64",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "zorb"
    emb = load_embedding(out)
    loaded = load_model(model_path)
    table = loaded.model.text_encoders[0].text_model.embeddings.token_embedding.weight
    init = table[loaded.tokenizer.encode("ball")[0]]
    assert emb.vectors["*"].shape == (2, 32)
    assert float((emb.vectors["*"] - init).abs().max()) > 0  # trained away from the init word
    pipe = Pipeline(loaded)
    params = GenerationParams(prompt="a red zorb", width=64, height=64)
    plain = pipe.encode(params, 64, 64)[0]["context"]
    pipe.embeddings = EmbeddingLibrary(out.parent)
    assert float((pipe.encode(params, 64, 64)[0]["context"] - plain).abs().max()) > 1e-3
    out.unlink()
