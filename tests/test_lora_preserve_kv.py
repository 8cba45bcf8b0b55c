"""train-lora --preserve-kv: the penalty is the change the LoRA really makes to the cross-attention keys and
values of the prior captions, it is zero for an untrained LoRA, and training with it keeps that change
smaller than training without it; wrong uses are clear errors."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from diffusekit.adapters.keys import adapter_names
from diffusekit.adapters.train_lora import (
    CaptionedImages,
    LoraParameters,
    LoraTrainConfig,
    LoraTraining,
    make_loss_fn,
    new_network,
)
from diffusekit.checkpoints.load import load_model
from diffusekit.cli import main
from diffusekit.data.concepts import ConceptDataset, parse_concept
from helpers import make_checkpoint

warnings.filterwarnings("ignore")
HEART = parse_concept("shapes:+heart")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path_factory.mktemp("kv"))
    loaded = load_model(path)
    ds = ConceptDataset(HEART, length=8)
    samples = [ds[i] for i in range(8)]
    pairs = [(s.image, s.caption) for s in samples]
    prior = [s.caption for s in samples if not ds.shows_concept(s)]
    assert prior and len(prior) < 8
    return path, loaded, pairs, prior


def _training(loaded, pairs, prior, weight: float, targets: str = "xattn-kv") -> LoraTraining:
    cfg = LoraTrainConfig(rank=4, alpha=4, targets=targets, resolution=64, preserve_kv=weight)
    data = CaptionedImages.from_pairs(pairs, 64)
    return LoraTraining(loaded.model.float(), loaded.tokenizer, data, cfg, prior)


def test_penalty_is_the_change_of_keys_and_values(setup):
    _, loaded, pairs, prior = setup
    training = _training(loaded, pairs, prior, 1.0, targets="attn")  # attn: k/v among other layers
    net = new_network(training.model, "h", training.cfg, seed=0)
    assert float(training.kv_change(net, 0).detach()) == 0.0  # up = 0: the LoRA starts as the identity
    g = torch.Generator().manual_seed(1)
    for m in net.modules.values():
        m.up.data = torch.randn(m.up.shape, generator=g) * 0.1
    names = {n: t for n, t in adapter_names(loaded.cfg).items() if n in net.modules}
    kv = [(n, t) for n, t in names.items() if t.path.endswith(("attn2.to_k", "attn2.to_v"))]
    assert 0 < len(kv) < len(net.modules)
    # the captions kv_change draws at step 3; the change computed directly from the LoRA's matrices
    k = len(training.prior_captions)
    picked = random.Random(training.cfg.seed * 1_000_033 + 3).sample(training.prior_captions, k)
    ctx = torch.cat([training.encode(c)[0] for c in picked]).flatten(0, 1)  # (N * T, C)
    unet = training.model.unet
    ratios = []
    with torch.no_grad():
        for n, t in kv:
            m = net.modules[n]
            delta = ctx @ m.down.t() @ m.up.t() * m.scale
            ratios.append(
                float(delta.square().sum() / (ctx @ unet.get_submodule(t.path).weight.t()).square().sum())
            )
        got = float(training.kv_change(net, 3, captions=k))
    assert got == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)


def test_penalty_sees_a_text_encoder_lora(setup):
    _, loaded, pairs, prior = setup
    cfg = LoraTrainConfig(
        rank=4, alpha=4, targets="xattn-kv", resolution=64, preserve_kv=1.0, train_text_encoder=True
    )
    training = LoraTraining(
        loaded.model.float(), loaded.tokenizer, CaptionedImages.from_pairs(pairs, 64), cfg, prior
    )
    net = new_network(training.model, "h", cfg, seed=0)
    text = [m for n, m in net.modules.items() if n.startswith("lora_te")]
    assert text and len(text) < len(net.modules)
    with torch.no_grad():
        assert float(training.kv_change(net, 0)) == 0.0
        text[0].up.data.fill_(0.05)  # only a text-encoder layer moves: the context, hence K and V, change
        assert float(training.kv_change(net, 0)) > 0.0


def test_training_with_it_keeps_the_prior_keys_and_values(setup):
    _, loaded, pairs, prior = setup
    changes = {}
    for weight in (0.0, 100.0):
        training = _training(loaded, pairs, prior, weight)
        net = new_network(training.model, "h", training.cfg, seed=0)
        params = LoraParameters(net)
        opt = torch.optim.Adam(params.parameters(), lr=2e-2)
        loss_fn = make_loss_fn(training, net, 4)
        for step in range(4):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step()
        with torch.no_grad():
            changes[weight] = float(training.kv_change(net, 0, captions=len(prior)))
    assert changes[0.0] > 0
    assert changes[100.0] < 0.5 * changes[0.0]


def test_wrong_uses_are_errors(setup, tmp_path, capsys):
    path, loaded, pairs, _ = setup
    with pytest.raises(ValueError, match="prior captions"):
        _training(loaded, pairs, [], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        LoraTrainConfig(preserve_kv=-1.0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    pairs[0][0].save(folder / "a.png")
    (folder / "a.txt").write_text("a red circle")
    out = str(tmp_path / "x.safetensors")
    assert main(["train-lora", str(folder), "--model", str(path), "-o", out, "--preserve-kv", "1"]) == 2
    assert "--preserve-kv needs a shapes:+SHAPE dataset" in capsys.readouterr().err


def test_cli_writes_the_option_into_the_file(setup, tmp_path, capsys):
    path = setup[0]
    out = tmp_path / "heart.safetensors"
    argv = ["train-lora", "shapes:+heart", "--model", str(path), "-o", str(out), "--steps", "2",
            "--batch", "2", "--resolution", "64", "--shapes-images", "8", "--targets", "xattn-kv",
            "--preserve-kv", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["final_loss"] > 0
    from diffusekit.checkpoints.single_file import read_safetensors_header

    assert read_safetensors_header(out)[1]["ss_preserve_kv"] == "2.0"


def test_prior_captions_are_the_default_models_training_text():
    from diffusekit.data.concepts import prior_captions
    from diffusekit.data.shapes import parse_caption, spec_is_heldout

    captions = prior_captions(0, 300)
    assert captions == prior_captions(0, 300) and captions != prior_captions(1, 300)
    specs = [parse_caption(c) for c in captions]
    assert not any(g.shape == "heart" for s in specs for g in s.groups)
    assert not any(spec_is_heldout(s) for s in specs)
