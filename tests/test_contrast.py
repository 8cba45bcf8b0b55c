"""The binding contrast: contradicting captions, the pairs it picks, and its loss."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from diffusekit.models.clip import build_text_encoder
from diffusekit.models.configs import TINY_SD1
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.models.unet import UNetModel
from diffusekit.train.contrast import BREAKS, Contrast, contrast_caption, contrast_captions, contrast_loss
from diffusekit.train.objectives import LatentDiffusionObjective, LatentPool, Objective, TextToLatent

V = Objective(prediction="v", zero_terminal_snr=True)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle to the left of a blue star", "a red circle to the right of a blue star"),
        ("a red circle left of a blue star", "a red circle right of a blue star"),
        (
            "a red circle over a blue star on a dark gray background",
            "a red circle under a blue star on a dark gray background",
        ),
        ("an orange cross below a green star", "an orange cross above a green star"),
        ("a star above a cross", "a star below a cross"),  # no colors: the relation still reverses
        ("a red circle on the left", "a red circle on the right"),
        ("a large star near the top", "a large star near the bottom"),
        ("a pink cross on the right side", "a pink cross on the left side"),
        ("a red circle and a blue star", "a blue circle and a red star"),
        (
            "two red circles and one blue star on a black background",
            "two blue circles and one red star on a black background",
        ),
        ("two red circles and one blue circle", "two blue circles and one red circle"),  # counts differ
    ],
)  # fmt: skip
def test_contrast_caption_breaks_one_binding_in_the_same_phrasing(caption, expected):
    assert contrast_caption(caption) == expected


@pytest.mark.parametrize(
    "caption",
    [
        "",  # a dropped caption
        "a red circle",  # nothing to bind
        "a red circle in the center",  # no mirror image
        "a red circle and a star",  # a color missing
        "a red circle and a red star",  # one color for both
        "a purple diamond and a pink diamond",  # exchanging the colors describes the same objects
        "a red circle, a blue star and a green square",  # three groups
        "a cat",  # outside the grammar
        "a blue star above a red circle",  # -> "a red circle above a blue star": a held-out relation
        "a red star and a cyan diamond",  # -> "a cyan star ...": a held-out color-shape pair
    ],
)
def test_contrast_caption_is_none_without_a_usable_binding(caption):
    assert contrast_caption(caption) is None


def test_contrast_settings_are_checked():
    for field in ("weight", "margin", "max_snr"):
        with pytest.raises(ValueError, match=f"Contrast.{field} must be >= 0, got -1"):
            Contrast(**{field: -1})
    with pytest.raises(ValueError, match="Contrast.samples must be at least 1, got 0"):
        Contrast(samples=0)
    with pytest.raises(ValueError, match=r"unknown or none \['colour'\]; valid: binding, shared, count"):
        Contrast(breaks=("binding", "colour"))
    with pytest.raises(ValueError, match="valid: binding, shared, count"):
        Contrast(breaks=())


@pytest.mark.parametrize(
    "caption, expected",
    [
        (
            "a red circle and a blue star",
            {"a blue circle and a red star",  # binding: colors exchanged
             "a red circle and a blue circle", "a red star and a blue star",  # shared shape
             "a red circle and a red star", "a blue circle and a blue star"},  # shared color
        ),
        (
            "two red circles and a blue star on a black background",
            {"two blue circles and a red star on a black background",
             "two red circles and a blue circle on a black background",
             "two red stars and a blue star on a black background",
             "two red circles and a red star on a black background",
             "two blue circles and a blue star on a black background"},
        ),
        ("a red circle and a red star", set()),  # sharing the shape would write one group twice
        (
            "a red star and a cyan diamond",  # "a cyan star": held out
            {"a red star and a red diamond", "a red diamond and a cyan diamond"},
        ),
        ("three red circles", {"two red circles", "four red circles"}),  # count: one fewer, one more
        ("a large red circle", {"two large red circles"}),
        ("four pink squares on a gray background", {"three pink squares on a gray background"}),
        ("three cyan stars", set()),  # every count of a held-out pair is held out
        ("one red circle", set()),  # not the canonical phrasing: a rewrite would change more words
        ("a red circle on the left", {"a red circle on the right"}),  # positions and relations: binding
        ("a red circle to the left of a blue star", {"a red circle to the right of a blue star"}),
        ("a red circle in the center", set()),
        ("", set()),
        ("a cat", set()),
    ],
)  # fmt: skip
def test_contrast_captions_for_every_break(caption, expected):
    got = contrast_captions(caption, BREAKS)
    assert set(got) == expected and len(got) == len(expected)
    assert contrast_captions(caption) == tuple(c for c in [contrast_caption(caption)] if c)  # binding alone


def test_contrast_loss_is_a_relative_hinge():
    e_true, e_false = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.05, 2.0])
    loss = contrast_loss(e_true, e_false, 4, Contrast(weight=2.0, margin=0.1))
    assert loss.item() == pytest.approx(2.0 * (0.1 + 0.05 + 0.0) / 4)
    use = torch.tensor([1.0, 0.0, 1.0])
    masked = contrast_loss(e_true, e_false, 4, Contrast(weight=2.0, margin=0.1), use)
    assert masked.item() == pytest.approx(2.0 * 0.1 / 4)


def objective(captions: list[str], contrast: Contrast) -> LatentDiffusionObjective:
    moments = torch.randn(len(captions), 8, 8, 8, generator=torch.Generator().manual_seed(0))
    pool = LatentPool(moments, captions)
    return LatentDiffusionObjective(
        pool, CLIPTokenizer.bundled(), batch_size=len(captions), scaling_factor=1.0, caption_dropout=0.0,
        objective=replace(V, contrast=contrast),
    )  # fmt: skip


CAPTIONS = [
    "a red circle to the left of a blue star",  # contrastable
    "a red circle",  # not
    "an orange cross below a green star",  # contrastable
    "a yellow square and a pink star",  # contrastable
]


def test_contrast_pairs_take_noisy_rows_with_a_contradicting_caption():
    obj = objective(CAPTIONS, Contrast(weight=1.0, max_snr=0.1, samples=4))
    alphas = torch.tensor([0.0, 0.0, 0.5, 0.05])  # SNR 0, 0, 1 (too clean), 0.053
    rows, false, use = obj.contrast_pairs(CAPTIONS, alphas)
    assert rows == [0, 3, 0, 3] and use.tolist() == [1.0, 1.0, 0.0, 0.0]  # padded by repeats to 4
    assert false[:2] == ["a red circle to the right of a blue star", "a pink square and a yellow star"]
    rows, _, use = objective(CAPTIONS, Contrast(weight=1.0, samples=1)).contrast_pairs(CAPTIONS, alphas)
    assert rows == [0] and use.tolist() == [1.0]  # at most `samples`
    assert objective(CAPTIONS, Contrast()).contrast_pairs(CAPTIONS, alphas)[0] == []  # off at weight 0


def test_contrast_pairs_draw_one_of_several_contradicting_captions_from_the_python_rng():
    captions = ["three red circles"] * 8
    obj = objective(captions, Contrast(weight=1.0, samples=8, breaks=("count",)))
    random.seed(0)
    _, false, use = obj.contrast_pairs(captions, torch.zeros(8))
    assert set(false) == {"two red circles", "four red circles"} and use.sum() == 8
    random.seed(0)
    assert obj.contrast_pairs(captions, torch.zeros(8))[1] == false  # a resumed run draws the same


def test_contrast_adds_its_hinge_and_trains_the_relation_words():
    torch.manual_seed(0)
    model = TextToLatent(UNetModel(TINY_SD1.unet), build_text_encoder(TINY_SD1.text_encoders[0]))
    off, on = (objective(CAPTIONS, Contrast(weight=w, margin=10.0, max_snr=1e9, samples=4)) for w in (0, 1))
    torch.manual_seed(1)
    plain = off(model, 0)
    torch.manual_seed(1)
    with_contrast = on(model, 0)  # the same draws; a margin no untrained model meets
    assert with_contrast.item() > plain.item() * 1.5
    tok = CLIPTokenizer.bundled()
    table = dict(model.text_encoder.named_parameters())["text_model.embeddings.token_embedding.weight"]
    for loss, trained in ((plain, False), (with_contrast, True)):
        model.zero_grad()
        loss.backward()
        for word in ("right", "above"):  # only in the contradicting captions
            (token,) = tok.encode(word)
            assert (table.grad[token].abs().sum() > 0) == trained, word
