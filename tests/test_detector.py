"""The pixel detector on ground-truth images, and the GenEval-style evaluation built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusekit.data import COLORS, SHAPES, CaptionSpec, Group, ShapesDataset, parse_caption, render_scene
from diffusekit.data.shapes import HELDOUT_PAIRS, Scene, _make_object, spec_is_heldout
from diffusekit.eval.detector import (
    DetectedObject,
    _gaussian_matrix,
    background_name,
    compare_to_scene,
    describe,
    detect,
    fit_shapes,
    label_components,
    measure_accuracy,
    polygon_moments,
    render_coverage,
)
from diffusekit.eval.geneval import (
    CATEGORIES,
    blank_generator,
    check,
    eval_prompts,
    evaluate,
    format_table,
    ground_truth_generator,
    pooled,
    report_from_dict,
    wilson_interval,
)


def _fail_text(rep) -> str:
    return "\n".join(f"#{i} {c!r}: {'; '.join(p)}" for i, c, p in rep.failures[:10])


def test_accuracy_on_500_ground_truth_images_at_64():
    rep = measure_accuracy(n=500, seed=0, size=64, split="train")
    assert rep.n_images == 500
    assert rep.accuracy >= 0.98, _fail_text(rep)


def test_accuracy_on_heldout_split():
    rep = measure_accuracy(n=200, seed=1, size=64, split="heldout")
    assert rep.accuracy >= 0.98, _fail_text(rep)


@pytest.mark.parametrize("size", [32, 128])
def test_accuracy_at_other_sizes(size):
    rep = measure_accuracy(n=100, seed=2, size=size)
    assert rep.accuracy >= 0.98, _fail_text(rep)


def test_accuracy_on_blurred_noisy_images():
    """Soft edges and noise, as a small generative model draws them: blur sigma 1 px, noise 8/255."""
    ds = ShapesDataset(4, 64, 200)
    bad = []
    for i in range(len(ds)):
        s = ds[i]
        rng = np.random.default_rng(i)
        arr = np.asarray(s.image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        arr = np.clip(arr + rng.normal(0.0, 8.0, arr.shape), 0, 255).astype(np.uint8)
        problems = compare_to_scene(detect(arr), s.scene)
        if problems:
            bad.append((i, s.caption, problems))
    assert 1 - len(bad) / len(ds) >= 0.98, bad[:10]


@pytest.mark.parametrize("size_name,extent", [("small", 14.0), ("large", 25.0)])
def test_every_color_and_shape_is_read(size_name, extent):
    for color in COLORS:
        for shape in SHAPES:
            obj = _make_object(shape, color, size_name, extent, (30.3, 33.7))
            scene = Scene(64, "gray", (obj,))
            dets = detect(render_scene(scene))
            assert len(dets) == 1 and (dets[0].color, dets[0].shape) == (color, shape), (color, shape, dets)
            assert abs(dets[0].center[0] - 30.3) < 0.6 and abs(dets[0].center[1] - 33.7) < 0.6
            assert abs(dets[0].extent - extent) < 0.6


def test_blank_and_noise_images_have_no_objects():
    assert detect(Image.new("RGB", (64, 64), (52, 52, 56))) == []
    noise = np.random.default_rng(0).normal(60, 6, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    assert detect(noise) == []


def test_background_name_and_describe():
    s = ShapesDataset(5, 64, 1)[0]
    assert background_name(s.image) == s.scene.background
    text = describe(s.image)
    assert f"{s.scene.background} background" in text
    for o in s.scene.objects:
        assert f"{o.color} {o.shape}" in text


def test_compare_to_scene_reports_each_kind_of_error():
    s = next(s for s in ShapesDataset(6, 64, 50) if len(s.scene.objects) >= 2)
    dets = detect(s.image)
    assert compare_to_scene(dets, s.scene) == []
    assert any("missed" in p for p in compare_to_scene(dets[1:], s.scene))
    wrong = [DetectedObject("star" if dets[0].shape != "star" else "circle", *_fields(dets[0]))] + dets[1:]
    assert compare_to_scene(wrong, s.scene)
    moved = [_shifted(dets[0], 10.0)] + dets[1:]
    assert compare_to_scene(moved, s.scene)
    assert any("spurious" in p or "detected" in p for p in compare_to_scene(dets + dets[:1], s.scene))


def _fields(d: DetectedObject) -> tuple:
    return (d.color, d.center, d.bbox, d.area, d.extent, d.blur, d.shape_error, d.shape_margin, d.color_error)


def _shifted(d: DetectedObject, dx: float) -> DetectedObject:
    return DetectedObject(d.shape, d.color, (d.center[0] + dx, d.center[1]), *_fields(d)[2:])


def test_label_components_uses_8_connectivity():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True  # diagonal neighbor joins the first blob
    mask[4:6, 5:7] = True
    labels, n = label_components(mask)
    assert n == 2
    assert labels[0, 0] == labels[2, 2] == 1 and labels[5, 6] == 2 and labels[3, 3] == 0


def test_polygon_moments_of_unit_square():
    area, cx, cy, vx, vy = polygon_moments(np.array([(0, 0), (2, 0), (2, 1), (0, 1)], dtype=float))
    assert area == pytest.approx(2.0) and (cx, cy) == pytest.approx((1.0, 0.5))
    assert vx == pytest.approx(4 / 12) and vy == pytest.approx(1 / 12)


@pytest.mark.parametrize("shape", SHAPES)
def test_fit_recovers_shape_position_extent_and_blur(shape):
    sharp = render_coverage(shape, (15.4, 14.6), 16.0, (30, 30))
    blurred = _gaussian_matrix(30, 1.2) @ sharp @ _gaussian_matrix(30, 1.2).T
    best = fit_shapes(blurred)[0]
    assert best.shape == shape
    assert best.center == pytest.approx((15.4, 14.6), abs=0.25)
    assert best.extent == pytest.approx(16.0, abs=0.4)
    assert best.sigma == pytest.approx(1.2, abs=0.35)


def test_detect_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((16, 16)))
    with pytest.raises(ValueError, match="too small"):
        detect(np.zeros((4, 4, 3)))


# ---------------------------------------------------------------- GenEval-style evaluation


def test_eval_prompt_sets_are_well_formed():
    prompts = eval_prompts("heldout")
    assert prompts == eval_prompts("heldout")
    per_cat = {c: [p for p in prompts if p.category == c] for c in CATEGORIES}
    assert {c: len(v) for c, v in per_cat.items()} == {
        "single_object": 6,
        "colors": 8,
        "shapes": 8,
        "counting": 8,
        "two_objects": 8,
        "position": 8,
        "color_attribution": 8,
    }
    for p in prompts:
        assert parse_caption(p.prompt) == p.spec
        assert p.held_out == (p.category != "single_object")
        assert p.held_out == spec_is_heldout(p.spec)
    for p in per_cat["two_objects"]:
        assert p.spec.groups[0].shape != p.spec.groups[1].shape
    assert len({p.prompt for p in prompts if p.category != "shapes"}) == len(prompts) - 8
    assert {(g.color, g.shape) for p in per_cat["colors"] for g in p.spec.groups} == set(HELDOUT_PAIRS)
    assert not any(p.held_out for p in eval_prompts("train"))
    with pytest.raises(ValueError, match="prompt set"):
        eval_prompts("test")


def test_perfect_generator_scores_in_every_category():
    report = evaluate(ground_truth_generator(64), images_per_prompt=4, seed=0)
    for c in CATEGORIES:
        assert report.categories[c] >= 0.98, (
            c,
            [r for r in report.results if r.category == c and r.accuracy < 1],
        )
    assert report.held_out is not None and report.held_out >= 0.98
    assert set(report.held_out_categories) == set(CATEGORIES) - {"single_object"}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["overall"] == report.overall and len(data["results"]) == len(eval_prompts())
    table = format_table(report)
    assert all(f"| {c} |" in table for c in CATEGORIES) and "overall" in table and "95% interval" in table
    for c in CATEGORIES:
        lo, hi = data["category_intervals95"][c]
        assert lo <= report.categories[c] <= hi == 1.0
    lo, hi = report.overall_interval
    assert lo < report.overall <= hi and data["overall_interval95"] == [lo, hi]


def test_wilson_interval_matches_published_values_and_checks_its_input():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I: Wilson's
    # interval for 0/10 is 0-0.2775 and for 5/10 0.2366-0.7634
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    lo, hi = wilson_interval(26, 32)
    assert lo < 26 / 32 < hi and hi - lo > wilson_interval(104, 128)[1] - wilson_interval(104, 128)[0]
    for bad in ((3, 2), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="passed"):
            wilson_interval(*bad)


def test_in_distribution_prompt_set_has_no_heldout_score():
    report = evaluate(ground_truth_generator(64), images_per_prompt=1, prompt_set="train")
    assert report.held_out is None and report.held_out_categories == {}
    assert report.overall >= 0.98


def test_blank_and_wrong_generators_score_low():
    blank = evaluate(blank_generator(64), images_per_prompt=2)
    assert blank.overall == 0.0 and blank.held_out == 0.0
    assert blank.interval("colors")[0] == 0.0 < blank.interval("colors")[1] < 0.25  # 0 of 16
    assert blank.overall_interval[0] == 0.0 < blank.overall_interval[1]
    assert all(v == 0.0 for v in blank.categories.values())
    truth = ground_truth_generator(64)

    def always_red_circle(prompts, seeds):
        return truth(["a red circle"] * len(prompts), seeds)

    wrong = evaluate(always_red_circle, images_per_prompt=2)
    assert wrong.categories["single_object"] == pytest.approx(1 / 6)  # "a circle"
    assert wrong.categories["shapes"] == pytest.approx(2 / 8)  # "a green circle", "a pink circle"
    assert all(wrong.categories[c] == 0.0 for c in CATEGORIES if c not in ("single_object", "shapes"))


def test_pooled_seed_blocks_equal_one_run_over_all_their_seeds():
    truth, blank = ground_truth_generator(64), blank_generator(64)

    def right_on_even_seeds(prompts, seeds):
        images = [(truth if s % 2 == 0 else blank)([p], [s])[0] for p, s in zip(prompts, seeds, strict=True)]
        return images

    one_run = evaluate(right_on_even_seeds, images_per_prompt=3, seed=0)
    blocks = [evaluate(right_on_even_seeds, images_per_prompt=n, seed=s) for s, n in ((0, 2), (2, 1))]
    merged = pooled([report_from_dict(json.loads(json.dumps(b.to_dict()))) for b in blocks])
    assert merged.results == one_run.results and merged.images_per_prompt == 3
    assert merged.categories == one_run.categories and merged.overall == one_run.overall
    assert merged.held_out == one_run.held_out and 0.6 < merged.overall < 0.7  # 2 of 3 seeds drawn right
    assert merged.interval("colors") == wilson_interval(16, 24)
    with pytest.raises(ValueError, match="count images twice"):
        pooled([blocks[0], blocks[0]])
    with pytest.raises(ValueError, match="same prompts"):
        pooled([blocks[0], evaluate(right_on_even_seeds, images_per_prompt=1, seed=5, prompt_set="train")])


def test_evaluate_rejects_a_generator_returning_the_wrong_number_of_images():
    def short(prompts, seeds):
        return blank_generator(64)(prompts[:-1], seeds[:-1])

    with pytest.raises(ValueError, match="returned"):
        evaluate(short, images_per_prompt=1, batch_size=4)


def _det(color: str, shape: str, x: float, y: float) -> DetectedObject:
    return DetectedObject(shape, color, (x, y), (0, 0, 1, 1), 100, 14.0, 0.0, 0.05, 0.2, 1.0)


def test_checkers_judge_each_category_on_its_own_terms():
    by = {(p.category, p.prompt): p for p in eval_prompts()}
    star = by[("single_object", "a star")]
    assert check(star, [_det("green", "star", 30, 30)], 64)
    assert check(star, [_det("green", "star", 30, 30), _det("red", "circle", 50, 50)], 64)  # extras ignored
    assert not check(star, [_det("green", "star", 30, 30), _det("red", "star", 50, 50)], 64)
    colors, shapes = by[("colors", "a purple star")], by[("shapes", "a purple star")]
    assert not check(colors, [_det("pink", "star", 30, 30)], 64) and check(
        shapes, [_det("pink", "star", 30, 30)], 64
    )
    count = by[("counting", "three orange diamonds")]
    three = [_det("orange", "diamond", x, 30) for x in (10, 30, 50)]
    assert check(count, three, 64) and not check(count, three[:2], 64)
    assert not check(count, three[:2] + [_det("red", "diamond", 50, 30)], 64)
    two = by[("two_objects", "a red triangle and an orange diamond")]
    assert check(two, [_det("blue", "triangle", 10, 10), _det("blue", "diamond", 50, 50)], 64)
    attr = by[("color_attribution", "a red triangle and a green circle")]
    assert check(attr, [_det("red", "triangle", 10, 10), _det("green", "circle", 50, 50)], 64)
    assert not check(attr, [_det("green", "triangle", 10, 10), _det("red", "circle", 50, 50)], 64)
    pos = by[("position", "a red circle above a blue star")]
    assert check(pos, [_det("red", "circle", 30, 12), _det("blue", "star", 33, 50)], 64)
    assert not check(pos, [_det("red", "circle", 30, 50), _det("blue", "star", 33, 12)], 64)
    assert not check(pos, [_det("red", "circle", 10, 30), _det("blue", "star", 50, 34)], 64)


def test_ground_truth_generator_is_deterministic_and_follows_the_prompt():
    gen = ground_truth_generator(64)
    a = gen(["two cyan stars", "a red circle to the left of a blue square"], [0, 1])
    b = gen(["two cyan stars", "a red circle to the left of a blue square"], [0, 1])
    assert [i.tobytes() for i in a] == [i.tobytes() for i in b]
    assert [(d.color, d.shape) for d in detect(a[0])] == [("cyan", "star")] * 2
    spec = CaptionSpec((Group("circle", "red"), Group("square", "blue")), "left of")
    dets = {(d.color, d.shape): d for d in detect(a[1])}
    assert dets[("red", "circle")].center[0] < dets[("blue", "square")].center[0]
    assert spec == parse_caption("a red circle to the left of a blue square")
