"""Procedural, seeded captioned images of colored shapes, with a held-out split of compositions.

Every caption is produced from a `CaptionSpec` (what the caption asserts, `diffusekit.data.captions`) and
every scene is laid out to satisfy its spec exactly: the objects named are exactly the objects drawn.
`parse_caption` inverts the caption grammar, so a prompt string can be turned back into a scene (the
"perfect generator" of the eval).

Held-out compositions (`HELDOUT_PAIRS`, `HELDOUT_RELATIONS`) never occur in a `split="train"` image or
caption; `split="heldout"` only yields scenes that contain one. Every color and every shape still occurs in
training: only the listed color-shape pairs and the listed relations (in that orientation) are withheld.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# The caption language is re-exported: callers import the whole shapes vocabulary from this module.
from .captions import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    POSITIONS,
    RELATIONS,
    SIZES,
    SPLITS,
    CaptionSpec,
    format_caption,
    pick,
    sample_spec,
    spec_is_heldout,
)
from .captions import EXTRA_SHAPES as EXTRA_SHAPES
from .captions import INVERSE_RELATION as INVERSE_RELATION
from .captions import KINDS as KINDS
from .captions import POSITION_PHRASES as POSITION_PHRASES
from .captions import RELATION_PHRASES as RELATION_PHRASES
from .captions import SHAPES as SHAPES
from .captions import Group as Group
from .captions import color_distance as color_distance
from .captions import has_near_color_pair as has_near_color_pair
from .captions import parse_caption as parse_caption

# Layout constants, as fractions of the image side.
MARGIN = 0.03  # free border around the canvas
GAP = 0.05  # free space between any two object boxes
REGION_INSET = 0.03  # how far inside its third an absolutely placed center lies
RELATION_MIN = 0.25  # generated relations: distance along the relation axis ...
RELATION_SLACK = 0.12  # ... and at most this offset across it
RELATION_CHECK_MIN = 0.1  # checked relations: the (looser) distance along the axis


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; `center` is the center of its tight box, all in output pixels."""

    shape: str
    color: str
    size: str
    extent: float
    center: tuple[float, float]
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A square canvas of side `size`, its background name and its objects."""

    size: int
    background: str
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True, eq=False)
class Sample:
    """A rendered image with its caption, the spec the caption states and the scene drawn."""

    image: Image.Image
    caption: str
    spec: CaptionSpec
    scene: Scene

    def pixels(self) -> np.ndarray:
        """The image as float32 CHW in [-1, 1]."""
        return image_to_array(self.image)


def image_to_array(image: Image.Image) -> np.ndarray:
    """An RGB image as float32 CHW in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 127.5 - 1.0)


def _unit_polygon(shape: str) -> np.ndarray:
    """The outline of `shape` with its tight box centered on 0 and its largest side 1 (y down)."""
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float) * 0.86
    elif shape == "triangle":
        pts = np.array([(0, -1), (1, 1), (-1, 1)], dtype=float)
    elif shape == "diamond":
        pts = np.array([(0, -1), (0.78, 0), (0, 1), (-0.78, 0)], dtype=float)
    elif shape == "star":
        k = np.arange(10)
        radius = np.where(k % 2 == 0, 1.0, 0.5)
        ang = -math.pi / 2 + k * math.pi / 5
        pts = np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)
    elif shape == "cross":
        a, b = 0.18, 0.5
        pts = np.array(
            [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a)]
            + [(-a, -a)],
            dtype=float,
        )
    elif shape == "heart":  # the classic heart curve, point down
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = 1.0 if shape != "square" else 0.86  # squares are drawn a little smaller to balance their area
    return (pts - (lo + hi) / 2) / (hi - lo).max() * scale


_UNIT_POLYGONS: dict[str, np.ndarray] = {s: _unit_polygon(s) for s in ALL_SHAPES}


def shape_polygon(shape: str, center: tuple[float, float], extent: float) -> np.ndarray:
    """The outline (N, 2) of `shape` of the given extent centered at `center`, in pixels."""
    if shape not in _UNIT_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(ALL_SHAPES)}")
    return _UNIT_POLYGONS[shape] * extent + np.asarray(center, dtype=float)


def _make_object(shape: str, color: str, size: str, extent: float, center: tuple) -> SceneObject:
    """A scene object with its tight box computed from the outline."""
    pts = shape_polygon(shape, center, extent)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    bbox = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    return SceneObject(shape, color, size, float(extent), (float(center[0]), float(center[1])), bbox)


def render_scene(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw the scene anti-aliased: at `supersample` times the size, then box-filtered down."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    big = scene.size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        pts = shape_polygon(obj.shape, obj.center, obj.extent) * supersample
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=COLORS[obj.color])
    return canvas.reduce(supersample) if supersample > 1 else canvas


def region_holds(center: tuple[float, float], position: str, size: float) -> bool:
    """Whether a center lies in the named third of a canvas of side `size` ("center": the middle cell)."""
    x, y = center[0] / size, center[1] / size
    if position == "left":
        return x < 1 / 3
    if position == "right":
        return x > 2 / 3
    if position == "top":
        return y < 1 / 3
    if position == "bottom":
        return y > 2 / 3
    if position == "center":
        return 1 / 3 <= x <= 2 / 3 and 1 / 3 <= y <= 2 / 3
    raise ValueError(f"unknown position {position!r}; expected one of {', '.join(POSITIONS)}")


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, size: float) -> bool:
    """Whether "A <relation> B" holds for centers a, b: clearly apart along the axis, and mostly along it."""
    dx, dy = (b[0] - a[0]) / size, (b[1] - a[1]) / size
    if relation == "left of":
        along, across = dx, dy
    elif relation == "right of":
        along, across = -dx, dy
    elif relation == "above":
        along, across = dy, dx
    elif relation == "below":
        along, across = -dy, dx
    else:
        raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")
    return along > RELATION_CHECK_MIN and along > abs(across)


def heldout_relation_in(objects: Sequence[SceneObject], size: float) -> bool:
    """Whether any held-out relation holds between two of the objects."""
    for pa, rel, pb in HELDOUT_RELATIONS:
        for a in objects:
            if (a.color, a.shape) != pa:
                continue
            for b in objects:
                if b is not a and (b.color, b.shape) == pb and relation_holds(a.center, b.center, rel, size):
                    return True
    return False


def scene_is_heldout(scene: Scene) -> bool:
    """Whether a scene contains a held-out color-shape pair or a held-out relation."""
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects):
        return True
    return heldout_relation_in(scene.objects, scene.size)


def scene_satisfies(spec: CaptionSpec, scene: Scene) -> bool:
    """Whether the scene is exactly what the spec states: objects, counts, sizes, position, relation."""
    if spec.background is not None and scene.background != spec.background:
        return False
    remaining = list(scene.objects)
    found: dict[int, list[SceneObject]] = {}
    for i in sorted(range(len(spec.groups)), key=lambda i: spec.groups[i].color is None):
        g = spec.groups[i]
        hits = [
            o
            for o in remaining
            if o.shape == g.shape and g.color in (None, o.color) and g.size in (None, o.size)
        ]
        if len(hits) < g.count:
            return False
        found[i] = hits[: g.count]
        remaining = [o for o in remaining if all(o is not h for h in found[i])]
        if g.position is not None and not all(
            region_holds(o.center, g.position, scene.size) for o in found[i]
        ):
            return False
    if remaining:
        return False
    return spec.relation is None or relation_holds(
        found[0][0].center, found[1][0].center, spec.relation, scene.size
    )


# ---------------------------------------------------------------- layout


def _free_range(half: float, canvas: int) -> tuple[float, float]:
    m = MARGIN * canvas
    return m + half, canvas - m - half


def _fits_apart(a: SceneObject, others: Sequence[SceneObject], canvas: int) -> bool:
    g = GAP * canvas
    for b in others:
        if a.bbox[0] < b.bbox[2] + g and b.bbox[0] < a.bbox[2] + g:
            if a.bbox[1] < b.bbox[3] + g and b.bbox[1] < a.bbox[3] + g:
                return False
    return True


class _Req(NamedTuple):
    """An object still to be placed."""

    shape: str
    color: str
    size: str
    extent: float


def _half_sizes(shape: str, extent: float) -> tuple[float, float]:
    pts = _UNIT_POLYGONS[shape] * extent
    return float(pts[:, 0].max()), float(pts[:, 1].max())


def _place_free(
    rng: np.random.Generator, req: _Req, canvas: int, placed: list[SceneObject]
) -> SceneObject | None:
    hx, hy = _half_sizes(req.shape, req.extent)
    (x0, x1), (y0, y1) = _free_range(hx, canvas), _free_range(hy, canvas)
    for _ in range(60):
        obj = _make_object(*req, (rng.uniform(x0, x1), rng.uniform(y0, y1)))
        if _fits_apart(obj, placed, canvas):
            return obj
    return None


def _place_in_region(rng: np.random.Generator, req: _Req, canvas: int, position: str) -> SceneObject | None:
    hx, hy = _half_sizes(req.shape, req.extent)
    (x0, x1), (y0, y1) = _free_range(hx, canvas), _free_range(hy, canvas)
    inset = REGION_INSET * canvas
    third = canvas / 3
    lo_mid, hi_mid = third + inset, 2 * third - inset
    xr = {"left": (x0, third - inset), "right": (2 * third + inset, x1)}.get(position, (lo_mid, hi_mid))
    yr = {"top": (y0, third - inset), "bottom": (2 * third + inset, y1)}.get(position, (lo_mid, hi_mid))
    xr, yr = (max(xr[0], x0), min(xr[1], x1)), (max(yr[0], y0), min(yr[1], y1))
    if xr[0] > xr[1] or yr[0] > yr[1]:
        return None
    return _make_object(*req, (rng.uniform(*xr), rng.uniform(*yr)))


def _place_relation(
    rng: np.random.Generator, req_a: _Req, req_b: _Req, canvas: int, relation: str
) -> list[SceneObject] | None:
    """Place A and B so that "A <relation> B" holds with a clear margin; None when the sizes cannot fit."""
    horizontal = relation in ("left of", "right of")
    ax = 0 if horizontal else 1  # the relation axis
    ha, hb = _half_sizes(req_a.shape, req_a.extent), _half_sizes(req_b.shape, req_b.extent)
    # Along the axis: "first" is the object with the smaller coordinate.
    a_first = relation in ("left of", "above")
    h_first, h_second = (ha, hb) if a_first else (hb, ha)
    lo_first, _ = _free_range(h_first[ax], canvas)
    _, hi_second = _free_range(h_second[ax], canvas)
    d_min = max(RELATION_MIN * canvas, h_first[ax] + h_second[ax] + GAP * canvas)
    d_max = hi_second - lo_first
    if d_min > d_max:
        return None
    d = rng.uniform(d_min, d_max)
    p_first = rng.uniform(lo_first, hi_second - d)
    along = (p_first, p_first + d) if a_first else (p_first + d, p_first)
    c0, c1 = _free_range(ha[1 - ax], canvas)
    across_a = rng.uniform(c0, c1)
    b0, b1 = _free_range(hb[1 - ax], canvas)
    slack = RELATION_SLACK * canvas
    lo, hi = max(b0, across_a - slack), min(b1, across_a + slack)
    if lo > hi:
        return None
    across_b = rng.uniform(lo, hi)
    ca = (along[0], across_a) if horizontal else (across_a, along[0])
    cb = (along[1], across_b) if horizontal else (across_b, along[1])
    return [_make_object(*req_a, ca), _make_object(*req_b, cb)]


def scene_for_spec(
    spec: CaptionSpec, rng: np.random.Generator, size: int = 64, split: str | None = "train"
) -> Scene:
    """A scene satisfying `spec` exactly; with split="train" no held-out composition appears in it."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")
    avoid = split == "train"
    if avoid and spec_is_heldout(spec):
        raise ValueError(f"caption spec {spec} names a held-out composition and cannot be used for training")
    background = spec.background or pick(rng, list(BACKGROUNDS))
    n_objects = sum(g.count for g in spec.groups)
    for attempt in range(80):
        reqs = []
        for g in spec.groups:
            for _ in range(g.count):
                color = g.color
                if color is None:
                    color = pick(rng, [c for c in COLORS if not (avoid and (c, g.shape) in HELDOUT_PAIRS)])
                size_name = g.size
                if size_name is None:
                    p_large = 0.0 if attempt >= 40 else (0.5 if n_objects <= 2 else 0.2)
                    size_name = "large" if rng.random() < p_large else "small"
                reqs.append(_Req(g.shape, color, size_name, float(rng.uniform(*SIZES[size_name])) * size))
        objects: list[SceneObject] | None
        if spec.relation is not None:
            objects = _place_relation(rng, reqs[0], reqs[1], size, spec.relation)
        elif spec.groups[0].position is not None:
            obj = _place_in_region(rng, reqs[0], size, spec.groups[0].position)
            objects = None if obj is None else [obj]
        else:
            objects = []
            for req in reqs:
                obj = _place_free(rng, req, size, objects)
                if obj is None:
                    objects = None
                    break
                objects.append(obj)
        if objects is None or (avoid and heldout_relation_in(objects, size)):
            continue
        order = rng.permutation(len(objects))
        return Scene(size, background, tuple(objects[i] for i in order))
    raise RuntimeError(f"could not lay out {spec} on a {size}x{size} canvas after 80 attempts")


def make_sample(rng_or_seed: int | np.random.Generator, size: int = 64, split: str = "train") -> Sample:
    """One captioned image: a caption spec, a scene satisfying it, the caption text and the render."""
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    spec = sample_spec(rng, split)
    scene = scene_for_spec(spec, rng, size, split)
    caption = format_caption(spec, rng)
    return Sample(render_scene(scene), caption, spec, scene)


class ShapesDataset:
    """An indexable dataset whose item i is a pure function of (seed, i, split, size)."""

    def __init__(self, seed: int, size: int = 64, length: int = 10_000, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        self.seed, self.size, self.length, self.split = int(seed), int(size), int(length), split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, SPLITS.index(self.split)])
        return make_sample(rng, self.size, self.split)
