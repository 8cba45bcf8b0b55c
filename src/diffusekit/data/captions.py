"""The caption language of the shapes data: vocabulary, `CaptionSpec`, caption text <-> spec, random specs.

A `CaptionSpec` is what a caption asserts; `format_caption` writes it as text (a random phrasing or the
canonical one) and `parse_caption` reads the text back. `sample_spec` draws a spec for a split: "train" never
names a held-out composition (`HELDOUT_PAIRS`, `HELDOUT_RELATIONS`), "heldout" always does. Scenes, layout
and rendering are in `diffusekit.data.shapes`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# Shapes the default model never saw: drawn and parsed like SHAPES, but in no default dataset, caption or
# eval prompt. They are the new concepts a LoRA can be taught (`diffusekit.data.concepts`).
EXTRA_SHAPES: tuple[str, ...] = ("heart",)
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES

# Saturated object colors, well apart in CIELAB and from every background (checked in tests).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 145, 15),
    "yellow": (240, 225, 40),
    "green": (40, 180, 60),
    "cyan": (40, 205, 225),
    "blue": (40, 110, 250),
    "purple": (165, 50, 200),
    "pink": (250, 130, 200),
}

# Dark, near-neutral backgrounds: every object color stands well clear of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 14),
    "dark gray": (52, 52, 56),
    "gray": (100, 100, 104),
    "brown": (66, 46, 32),
}

# Object extent (largest side of its box) as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.22, 0.27), "large": (0.34, 0.40)}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

# Color-shape pairs that never appear in training: one per color, every shape still seen in other colors.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("orange", "diamond"),
    ("yellow", "cross"),
    ("green", "circle"),
    ("cyan", "star"),
    ("blue", "square"),
    ("purple", "star"),
    ("pink", "circle"),
)

# (A, relation, B): "A <relation> B" never holds in a training image (nor "B <inverse> A"); the reverse
# orientation ("B <relation> A") is allowed. A and B are themselves ordinary training pairs.
HELDOUT_RELATIONS: tuple[tuple[tuple[str, str], str, tuple[str, str]], ...] = (
    (("red", "circle"), "above", ("blue", "star")),
    (("green", "square"), "left of", ("yellow", "circle")),
    (("purple", "diamond"), "below", ("orange", "triangle")),
    (("pink", "cross"), "right of", ("cyan", "circle")),
)

SPLITS: tuple[str, ...] = ("train", "heldout")
KINDS: tuple[str, ...] = ("single", "count", "position", "relation", "list")
_KIND_WEIGHTS = (0.2, 0.2, 0.15, 0.25, 0.2)


NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
# The first phrasing of each is the canonical one (used for eval prompts).
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}


@dataclass(frozen=True)
class Group:
    """`count` objects of one shape (and color, size, absolute position when stated)."""

    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asserts: its object groups, a relation between groups 0 and 1, a background."""

    groups: tuple[Group, ...]
    relation: str | None = None
    background: str | None = None

    @property
    def kind(self) -> str:
        """One of KINDS."""
        if self.relation is not None:
            return "relation"
        if self.groups[0].position is not None:
            return "position"
        if len(self.groups) > 1:
            return "list"
        return "count" if self.groups[0].count > 1 else "single"


def pick(rng: np.random.Generator, items: Sequence):
    """One item of `items`, drawn uniformly with `rng`."""
    return items[int(rng.integers(len(items)))]


def color_distance(a: str, b: str) -> int:
    """Steps between two colors on the ring COLORS lists them in (red, orange, ..., pink, red): 0..4."""
    ring = list(COLORS)
    for c in (a, b):
        if c not in COLORS:
            raise ValueError(f"unknown color {c!r}; valid: {', '.join(COLORS)}")
    d = abs(ring.index(a) - ring.index(b))
    return min(d, len(ring) - d)


def has_near_color_pair(spec: CaptionSpec, within: int = 1) -> bool:
    """Whether two of the spec's groups differ in shape and their colors are at most `within` ring steps
    apart ("a red circle and an orange star"): what the default model most often draws as one shape
    twice (bench/two_object_hues.py)."""
    groups = spec.groups
    return any(
        a.shape != b.shape and a.color is not None and b.color is not None
        and color_distance(a.color, b.color) <= within
        for i, a in enumerate(groups) for b in groups[i + 1 :]
    )  # fmt: skip


def spec_is_heldout(spec: CaptionSpec) -> bool:
    """Whether a caption names a held-out pair or states a held-out relation (either phrasing)."""
    if any((g.color, g.shape) in HELDOUT_PAIRS for g in spec.groups):
        return True
    if spec.relation is None:
        return False
    a, b = (spec.groups[0].color, spec.groups[0].shape), (spec.groups[1].color, spec.groups[1].shape)
    return (a, spec.relation, b) in HELDOUT_RELATIONS or (b, INVERSE_RELATION[spec.relation], a) in (
        HELDOUT_RELATIONS
    )


# ---------------------------------------------------------------- captions


def plural(shape: str) -> str:
    """The plural of a shape name."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def _group_text(g: Group, rng: np.random.Generator | None, allow_one: bool) -> str:
    words = [w for w in (g.size, g.color) if w is not None]
    noun = g.shape if g.count == 1 else plural(g.shape)
    if g.count == 1 and not (allow_one and rng is not None and rng.random() < 0.15):
        first = (words or [noun])[0]
        det = "an" if first[0] in "aeiou" else "a"
    else:
        det = NUMBERS[g.count - 1]
    return " ".join([det, *words, noun])


def format_caption(spec: CaptionSpec, rng: np.random.Generator | None = None) -> str:
    """The caption text of a spec: a random phrasing with `rng`, the canonical one without."""

    def choose(options: Sequence[str]) -> str:
        return options[0] if rng is None else pick(rng, options)

    parts = [_group_text(g, rng, spec.kind == "single") for g in spec.groups]
    if spec.relation is not None:
        text = f"{parts[0]} {choose(RELATION_PHRASES[spec.relation])} {parts[1]}"
    elif spec.groups[0].position is not None:
        text = f"{parts[0]} {choose(POSITION_PHRASES[spec.groups[0].position])}"
    elif len(parts) > 1:
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    else:
        text = parts[0]
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def _parse_group(text: str, caption: str) -> Group:
    words = text.split()
    if len(words) < 2 or words[0] not in ("a", "an", *NUMBERS):
        raise ValueError(f"cannot read {text!r} in caption {caption!r}: expected 'a|an|one..four ... shape'")
    count = 1 if words[0] in ("a", "an") else NUMBERS.index(words[0]) + 1
    rest = words[1:]
    size = rest.pop(0) if rest[0] in SIZES else None
    color = rest.pop(0) if rest and rest[0] in COLORS else None
    names = {(s if count == 1 else plural(s)): s for s in ALL_SHAPES}
    if len(rest) != 1 or rest[0] not in names:
        raise ValueError(f"cannot read {text!r} in caption {caption!r}: unknown or misplaced shape word")
    return Group(names[rest[0]], color, count, size)


def parse_caption(text: str) -> CaptionSpec:
    """The spec a caption states (inverse of format_caption); ValueError for text outside the grammar."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    background = None
    for bg in sorted(BACKGROUNDS, key=len, reverse=True):
        if t.endswith(f" on a {bg} background"):
            background, t = bg, t[: -len(f" on a {bg} background")]
            break
    phrases = sorted(((p, r) for r, ps in RELATION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
    for phrase, rel in phrases:
        if f" {phrase} " in t:
            a, b = t.split(f" {phrase} ", 1)
            groups = (_parse_group(a, text), _parse_group(b, text))
            if any(g.count != 1 or g.size is not None for g in groups):
                raise ValueError(f"caption {text!r}: a relation links exactly one object to one object")
            return CaptionSpec(groups, rel, background)
    for pos, ps in POSITION_PHRASES.items():
        for phrase in ps:
            if t.endswith(f" {phrase}"):
                g = _parse_group(t[: -len(phrase) - 1], text)
                if g.count != 1:
                    raise ValueError(f"caption {text!r}: an absolute position applies to exactly one object")
                return CaptionSpec((Group(g.shape, g.color, 1, g.size, pos),), None, background)
    groups = tuple(_parse_group(part, text) for part in re.split(r", | and ", t))
    if sum(g.count for g in groups) > 4:
        raise ValueError(f"caption {text!r} names more than 4 objects")
    return CaptionSpec(groups, None, background)


# ---------------------------------------------------------------- specs


def sample_spec(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> CaptionSpec:
    """A random caption spec; "train" avoids every held-out composition, "heldout" contains one."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if kind is None:
        kind = KINDS[int(rng.choice(len(KINDS), p=_KIND_WEIGHTS))]
    if kind not in KINDS:
        raise ValueError(f"unknown caption kind {kind!r}; expected one of {', '.join(KINDS)}")
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    heldout = split == "heldout"
    first = pick(rng, HELDOUT_PAIRS if heldout else allowed)
    with_bg = kind in ("single", "count", "list") and rng.random() < 0.2
    background = pick(rng, list(BACKGROUNDS)) if with_bg else None
    if kind == "single":
        size = pick(rng, list(SIZES)) if rng.random() < 0.3 else None
        color = None if not heldout and rng.random() < 0.15 else first[0]
        return CaptionSpec((Group(first[1], color, 1, size),), None, background)
    if kind == "count":
        return CaptionSpec((Group(first[1], first[0], int(rng.integers(2, 5))),), None, background)
    if kind == "position":
        return CaptionSpec((Group(first[1], first[0], position=pick(rng, POSITIONS)),), None, None)
    if kind == "relation":
        if heldout and rng.random() < 0.5:
            pa, rel, pb = pick(rng, HELDOUT_RELATIONS)
            if rng.random() < 0.5:  # the same fact, stated the other way round
                pa, rel, pb = pb, INVERSE_RELATION[rel], pa
            return CaptionSpec((Group(pa[1], pa[0]), Group(pb[1], pb[0])), rel, None)
        pool = [p for p in (list(HELDOUT_PAIRS) + allowed if heldout else allowed) if p != first]
        while True:
            second = pick(rng, pool)
            pair = [first, second] if rng.random() < 0.5 else [second, first]
            spec = CaptionSpec(tuple(Group(s, c) for c, s in pair), pick(rng, RELATIONS), None)
            if heldout or not spec_is_heldout(spec):
                return spec
    # list: 2-3 distinct pairs, at most 4 objects
    n_groups = 2 if rng.random() < 0.6 else 3
    pool = [p for p in (allowed + list(HELDOUT_PAIRS) if heldout else allowed) if p != first]
    picks = [first] + [pool[i] for i in rng.choice(len(pool), size=n_groups - 1, replace=False)]
    order = rng.permutation(n_groups)
    counts = [1] * n_groups
    for i in range(n_groups):
        if sum(counts) < 4 and rng.random() < 0.25:
            counts[i] = 2
    groups = tuple(Group(picks[i][1], picks[i][0], counts[j]) for j, i in enumerate(order))
    return CaptionSpec(groups, None, background)
