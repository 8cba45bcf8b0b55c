"""train-lora shapes:+heart: the shapes world with a new shape is deterministic, keeps its held-out colors
out, is read back by the extended detector, and a tiny train-lora run on it writes a LoRA."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from diffusekit.adapters.lora import load_lora
from diffusekit.checkpoints.single_file import load_state_dict, read_safetensors_header
from diffusekit.cli import main
from diffusekit.data.concepts import Concept, ConceptDataset, ConceptError, parse_concept, split_violations
from diffusekit.data.shapes import (
    SHAPES,
    CaptionSpec,
    Group,
    ShapesDataset,
    parse_caption,
    render_scene,
    scene_for_spec,
)
from diffusekit.eval.concept import check_concept, concept_prompts, detector_shapes, evaluate_concept
from diffusekit.eval.detector import compare_to_scene, detect
from diffusekit.eval.geneval import blank_generator
from helpers import make_checkpoint

warnings.filterwarnings("ignore")
HEART = parse_concept("shapes:+heart")


def test_concept_names():
    assert HEART == Concept("heart") and HEART.name == "shapes:+heart"
    assert set(HEART.train_colors).isdisjoint(HEART.heldout_colors) and len(HEART.train_colors) == 5
    for bad, words in [
        ("shapes:+star", "not new"),
        ("shapes:+blob", r"shapes:\+heart"),
        ("shapes:heart", "expected"),
    ]:
        with pytest.raises(ConceptError, match=words):
            parse_concept(bad)
    with pytest.raises(ConceptError, match="held-out colors"):
        Concept("heart", ("mauve",))


def test_dataset_is_deterministic_and_keeps_the_split():
    a, b = ConceptDataset(HEART, seed=3, length=120), ConceptDataset(HEART, seed=3, length=120)
    other = ConceptDataset(HEART, seed=4, length=120)
    shown = 0
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert sa.caption == sb.caption and np.array_equal(sa.pixels(), sb.pixels())
        assert not split_violations(sa, HEART), sa.caption
        assert parse_caption(sa.caption) == sa.spec  # the default model's caption grammar, heart included
        if a.shows_concept(sa):
            shown += 1
            assert "heart" in sa.caption and any(o.shape == "heart" for o in sa.scene.objects)
        else:
            assert all(o.shape in SHAPES for o in sa.scene.objects)
    assert 40 <= shown <= 80  # share 0.5
    assert [other[i].caption for i in range(20)] != [a[i].caption for i in range(20)]


def test_detector_reads_hearts_and_is_unchanged_without_them():
    ds = ConceptDataset(HEART, seed=0, length=24, share=1.0)
    shapes = detector_shapes(HEART)
    for i in range(len(ds)):
        s = ds[i]
        assert compare_to_scene(detect(s.image, shapes), s.scene) == [], s.caption
        assert all(d.shape != "heart" for d in detect(s.image))  # default detector: the model's shapes only
    plain = ShapesDataset(1, 64, 16)
    for i in range(len(plain)):  # adding the heart outline does not misread the known shapes
        assert compare_to_scene(detect(plain[i].image, shapes), plain[i].scene) == []
    with pytest.raises(ValueError, match="detector shapes"):
        detect(ds[0].image, ("circle", "blob"))


def test_heldout_prompts_are_unseen_and_gradeable():
    prompts = concept_prompts(HEART)
    assert len(prompts) == 30 and {p.category for p in prompts} == {
        "single", "size", "position", "count", "two_objects"
    }  # fmt: skip
    for p in prompts:
        (heart,) = [g for g in p.spec.groups if g.shape == "heart"]
        assert heart.color in HEART.heldout_colors
    trained = {ConceptDataset(HEART, seed=0, length=400)[i].caption for i in range(400)}
    assert trained.isdisjoint(p.prompt for p in prompts)
    for p in prompts:  # a perfect generator passes every prompt, a blank one none
        img = render_scene(scene_for_spec(p.spec, np.random.default_rng(len(p.prompt)), 64, split=None))
        assert check_concept(p, detect(img, detector_shapes(HEART)), 64), p.prompt
    assert evaluate_concept(blank_generator(), HEART, images_per_prompt=1).accuracy == 0.0
    wrong = {"size": {"small": "large", "large": "small"}, "position": {"left": "right", "top": "bottom"}}
    for p in prompts[:8]:  # the wrong size or place fails
        g = p.spec.groups[0]
        if p.category == "size":
            other = CaptionSpec((Group("heart", g.color, 1, wrong["size"][g.size]),))
        elif p.category == "position" and g.position in wrong["position"]:
            other = CaptionSpec((Group("heart", g.color, position=wrong["position"][g.position]),))
        else:
            continue
        img = render_scene(scene_for_spec(other, np.random.default_rng(0), 64, split=None))
        assert not check_concept(p, detect(img, detector_shapes(HEART)), 64), p.prompt
    train_set = concept_prompts(HEART, "train")
    assert all(g.color in HEART.train_colors for p in train_set for g in p.spec.groups if g.shape == "heart")


def test_train_lora_on_the_concept(tmp_path, capsys):
    targets = "xattn-kv"  # (the attn targets' training is tested in test_train_lora.py)
    _, _, model = make_checkpoint("tiny_sd1", tmp_path)
    out = tmp_path / f"heart-{targets}.safetensors"
    argv = ["train-lora", "shapes:+heart", "--model", str(model), "-o", str(out), "--steps", "2",
            "--batch", "2", "--lr", "5e-3", "--resolution", "64", "--shapes-images", "6",
            "--targets", targets, "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    meta = read_safetensors_header(out)[1]
    assert meta["ss_num_train_images"] == "6"
    keys = load_state_dict(out)[0]
    assert keys and all("attn2_to_k" in k or "attn2_to_v" in k for k in keys)
    assert all(float(m.up.abs().max()) > 0 for m in load_lora(out).modules.values())


def test_train_lora_rejects_an_unknown_concept(tmp_path, capsys):
    assert main(["train-lora", "shapes:+star", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "not new" in capsys.readouterr().err


def test_preserve_pulls_anchor_images_toward_the_frozen_model(tmp_path):
    from diffusekit.adapters.train_lora import (
        CaptionedImages,
        LoraTrainConfig,
        LoraTraining,
        make_loss_fn,
        new_network,
    )
    from diffusekit.checkpoints.load import load_model

    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    loaded = load_model(path)
    model = loaded.model.float()
    ds = ConceptDataset(HEART, length=4)
    pairs = [(ds[i].image, ds[i].caption) for i in range(4)]
    cfg = LoraTrainConfig(resolution=64)
    net = new_network(model, "h", cfg, seed=0)  # up = 0: the LoRA starts as the identity

    def loss(anchors: frozenset[int], batch: int) -> float:
        data = CaptionedImages.from_pairs(pairs, 64, anchors)
        training = LoraTraining(model, loaded.tokenizer, data, cfg)
        return float(make_loss_fn(training, net, batch)(model, 0).detach())

    assert loss(frozenset(range(4)), 2) == 0.0  # every target is the model's own output
    assert loss(frozenset(), 2) > 0.0
    assert 0.0 < loss(frozenset({0, 1}), 4) < loss(frozenset(), 4)
