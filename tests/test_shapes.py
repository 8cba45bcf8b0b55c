"""The procedural shapes dataset: determinism, truthful captions, layout rules and the held-out split."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from diffusekit.data import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    CaptionSpec,
    Group,
    ShapesDataset,
    format_caption,
    make_sample,
    parse_caption,
    render_scene,
    sample_spec,
    scene_for_spec,
    scene_is_heldout,
    scene_satisfies,
    spec_is_heldout,
)
from diffusekit.data.captions import plural
from diffusekit.data.shapes import (
    GAP,
    MARGIN,
    REGION_INSET,
    RELATION_MIN,
    RELATION_SLACK,
    region_holds,
    relation_holds,
)
from diffusekit.eval.detector import srgb_to_lab


@pytest.fixture(scope="module")
def train_samples():
    ds = ShapesDataset(seed=3, size=64, length=1500, split="train")
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def heldout_samples():
    ds = ShapesDataset(seed=3, size=64, length=400, split="heldout")
    return [ds[i] for i in range(len(ds))]


def test_vocabulary_sizes():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 3
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(RELATIONS) == {"left of", "right of", "above", "below"}


def test_palette_is_well_separated_in_cielab():
    colors = srgb_to_lab(np.array(list(COLORS.values()), dtype=float))
    bgs = srgb_to_lab(np.array(list(BACKGROUNDS.values()), dtype=float))
    color_gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(colors, 2)]
    assert min(color_gaps) > 40.0
    assert min(np.linalg.norm(c - b) for c in colors for b in bgs) > 45.0


def test_dataset_is_a_pure_function_of_seed_and_index():
    a, b = ShapesDataset(7, 64, 50), ShapesDataset(7, 64, 50)
    for i in (0, 13, 49):
        sa, sb = a[i], b[i]
        assert sa.caption == sb.caption and sa.scene == sb.scene
        assert sa.image.tobytes() == sb.image.tobytes()
    assert b[13].caption == a[13].caption  # order of access does not matter
    assert a[-1].caption == a[49].caption
    other = ShapesDataset(8, 64, 50)
    assert [other[i].caption for i in range(10)] != [a[i].caption for i in range(10)]
    with pytest.raises(IndexError):
        a[50]


def test_make_sample_accepts_seed_or_generator():
    s1 = make_sample(5)
    s2 = make_sample(np.random.default_rng(5))
    assert s1.caption == s2.caption and s1.image.tobytes() == s2.image.tobytes()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_images_have_requested_size_and_objects_fit_apart(size):
    ds = ShapesDataset(1, size, 150)
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        m, g = MARGIN * size, GAP * size
        for o in s.scene.objects:
            x0, y0, x1, y1 = o.bbox
            assert m - 1e-6 <= x0 and x1 <= size - m + 1e-6 and m - 1e-6 <= y0 and y1 <= size - m + 1e-6
        for a, b in itertools.combinations(s.scene.objects, 2):
            apart_x = a.bbox[2] + g <= b.bbox[0] + 1e-6 or b.bbox[2] + g <= a.bbox[0] + 1e-6
            apart_y = a.bbox[3] + g <= b.bbox[1] + 1e-6 or b.bbox[3] + g <= a.bbox[1] + 1e-6
            assert apart_x or apart_y, f"objects overlap in sample {i}: {a} {b}"


def test_sizes_small_objects_stay_readable():
    sizes = [o.extent for s in ShapesDataset(2, 64, 300) for o in s.scene.objects]
    assert min(sizes) >= 14.0 and max(sizes) <= 0.4 * 64 + 1e-6


def test_rendering_is_antialiased():
    s = make_sample(11, size=64)
    arr = np.asarray(s.image).reshape(-1, 3)
    pure = {tuple(c) for c in COLORS.values()} | {tuple(c) for c in BACKGROUNDS.values()}
    mixed = [tuple(p) for p in arr if tuple(p) not in pure]
    assert len(mixed) > 10  # edge pixels are blends, not palette colors


def test_captions_parse_back_to_their_spec_and_describe_the_scene(train_samples, heldout_samples):
    for s in train_samples + heldout_samples:
        assert parse_caption(s.caption) == s.spec, s.caption
        assert scene_satisfies(s.spec, s.scene), (s.caption, s.scene)


def test_all_kinds_and_phrasings_occur(train_samples):
    kinds = {s.spec.kind for s in train_samples}
    assert kinds == set(KINDS)
    text = " ".join(s.caption for s in train_samples)
    for phrase in ("to the left of", " left of", "above", "under", "on the right", "in the middle", "one "):
        assert phrase in text
    assert any(s.caption.startswith(("two", "three", "four")) for s in train_samples)
    assert any("background" in s.caption for s in train_samples)
    assert any(g.color is None for s in train_samples for g in s.spec.groups)
    assert any(g.size is not None for s in train_samples for g in s.spec.groups)
    counts = {sum(1 for _ in s.scene.objects) for s in train_samples}
    assert counts == {1, 2, 3, 4}


def test_generated_relations_and_positions_have_clear_margins(train_samples):
    for s in train_samples:
        if s.spec.kind == "relation":
            a = next(
                o
                for o in s.scene.objects
                if (o.color, o.shape) == (s.spec.groups[0].color, s.spec.groups[0].shape)
            )
            b = next(o for o in s.scene.objects if o is not a)
            dx, dy = (b.center[0] - a.center[0]) / 64, (b.center[1] - a.center[1]) / 64
            along, across = {
                "left of": (dx, dy),
                "right of": (-dx, dy),
                "above": (dy, dx),
                "below": (-dy, dx),
            }[s.spec.relation]
            assert along >= RELATION_MIN - 1e-9 and abs(across) <= RELATION_SLACK + 1e-9
        if s.spec.kind == "position":
            (o,) = s.scene.objects
            x, y = o.center[0] / 64, o.center[1] / 64
            third, inset = 1 / 3, REGION_INSET
            assert region_holds(o.center, s.spec.groups[0].position, 64)
            if s.spec.groups[0].position in ("left", "right", "center"):
                assert min(abs(x - third), abs(x - 2 * third)) >= inset - 1e-9
                assert third + inset - 1e-9 <= y <= 2 * third - inset + 1e-9
            if s.spec.groups[0].position in ("top", "bottom"):
                assert min(abs(y - third), abs(y - 2 * third)) >= inset - 1e-9


def test_relation_and_region_predicates():
    assert relation_holds((10, 30), (40, 32), "left of", 64)
    assert relation_holds((40, 32), (10, 30), "right of", 64)
    assert not relation_holds((10, 30), (40, 32), "right of", 64)
    assert not relation_holds((10, 10), (20, 40), "left of", 64)  # mostly vertical
    assert not relation_holds((30, 30), (33, 30), "left of", 64)  # too close
    assert relation_holds((30, 10), (32, 50), "above", 64) and relation_holds((32, 50), (30, 10), "below", 64)
    assert region_holds((10, 32), "left", 64) and not region_holds((30, 32), "left", 64)
    assert region_holds((32, 32), "center", 64) and not region_holds((32, 10), "center", 64)
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds((0, 0), (1, 1), "near", 64)


def test_heldout_list_is_well_formed():
    assert 6 <= len(HELDOUT_PAIRS) <= 8 and len(set(HELDOUT_PAIRS)) == len(HELDOUT_PAIRS)
    for color, shape in HELDOUT_PAIRS:
        assert color in COLORS and shape in SHAPES
    for shape in SHAPES:  # every shape keeps most of its colors in training
        assert sum(1 for c in COLORS if (c, shape) not in HELDOUT_PAIRS) >= 5
    for a, rel, b in HELDOUT_RELATIONS:
        assert a not in HELDOUT_PAIRS and b not in HELDOUT_PAIRS and rel in RELATIONS


def test_training_never_shows_heldout_compositions(train_samples):
    for s in train_samples:
        assert not scene_is_heldout(s.scene), s.caption
        assert not spec_is_heldout(s.spec), s.caption
        for color, shape in HELDOUT_PAIRS:
            assert f"{color} {shape}" not in s.caption and f"{color} {plural(shape)}" not in s.caption


def test_training_still_covers_every_color_shape_and_allowed_pair(train_samples):
    seen = {(o.color, o.shape) for s in train_samples for o in s.scene.objects}
    allowed = {(c, s) for c in COLORS for s in SHAPES} - set(HELDOUT_PAIRS)
    assert seen == allowed
    assert {s.scene.background for s in train_samples} == set(BACKGROUNDS)
    rels = {s.spec.relation for s in train_samples if s.spec.relation}
    assert rels == set(RELATIONS)
    # The reverse orientation of every held-out relation is a legal training caption.
    for a, rel, b in HELDOUT_RELATIONS:
        assert not spec_is_heldout(CaptionSpec((Group(b[1], b[0]), Group(a[1], a[0])), rel))


def test_heldout_split_only_yields_heldout_scenes(heldout_samples):
    for s in heldout_samples:
        assert scene_is_heldout(s.scene) and spec_is_heldout(s.spec), s.caption
    pairs = {(o.color, o.shape) for s in heldout_samples for o in s.scene.objects}
    assert set(HELDOUT_PAIRS) <= pairs
    triples = {
        ((s.spec.groups[0].color, s.spec.groups[0].shape), s.spec.relation)
        for s in heldout_samples
        if s.spec.kind == "relation"
    }
    assert {(a, rel) for a, rel, _ in HELDOUT_RELATIONS} <= triples


def test_heldout_relation_in_either_phrasing_is_detected():
    a, rel, b = HELDOUT_RELATIONS[0]
    direct = CaptionSpec((Group(a[1], a[0]), Group(b[1], b[0])), rel)
    inverse = CaptionSpec((Group(b[1], b[0]), Group(a[1], a[0])), {"above": "below"}.get(rel, rel))
    assert spec_is_heldout(direct) and spec_is_heldout(inverse)
    with pytest.raises(ValueError, match="held-out"):
        scene_for_spec(direct, np.random.default_rng(0), 64, split="train")
    scene = scene_for_spec(direct, np.random.default_rng(0), 64, split="heldout")
    assert scene_is_heldout(scene) and scene_satisfies(direct, scene)


def test_caption_grammar_roundtrip_and_errors():
    spec = CaptionSpec((Group("cross", "orange", 2), Group("star", "cyan")), None, "dark gray")
    text = format_caption(spec)
    assert text == "two orange crosses and a cyan star on a dark gray background"
    assert parse_caption(text) == spec
    assert parse_caption("An Orange circle on the left side.") == CaptionSpec(
        (Group("circle", "orange", position="left"),)
    )
    assert parse_caption("a small pink star") == CaptionSpec((Group("star", "pink", size="small"),))
    for bad in (
        "a red banana",
        "five red circles",
        "two red circle",
        "a red circle to the left of two stars",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_sample_spec_and_scene_for_spec_cover_every_kind():
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for split in ("train", "heldout"):
            spec = sample_spec(rng, split, kind)
            assert spec.kind == kind and spec_is_heldout(spec) == (split == "heldout")
            scene = scene_for_spec(spec, rng, 64, split)
            assert scene_satisfies(spec, scene)
            img = render_scene(scene)
            assert img.size == (64, 64)
    with pytest.raises(ValueError, match="unknown split"):
        sample_spec(rng, "test")


def test_crowded_scenes_fall_back_to_smaller_objects():
    spec = CaptionSpec((Group("square", "red", 4, size=None),))
    scene = scene_for_spec(spec, np.random.default_rng(1), 64)
    assert len(scene.objects) == 4 and scene_satisfies(spec, scene)
    big = CaptionSpec(
        (Group("square", "red", size="large"), Group("circle", "blue", size="large")), "left of"
    )
    assert scene_satisfies(big, scene_for_spec(big, np.random.default_rng(2), 64))


def test_sample_pixels_and_records_are_frozen():
    s = make_sample(0)
    px = s.pixels()
    assert px.shape == (3, 64, 64) and px.dtype == np.float32 and -1.0 <= px.min() and px.max() <= 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.scene.objects[0].color = "red"  # type: ignore[misc]
