"""The shapes world extended with a concept the default model never saw, for teaching it with a LoRA.

`shapes:+heart` names the built-in shapes dataset plus one of `EXTRA_SHAPES`. Its images come from the same
generator as the default model's data (`diffusekit.data.shapes`: layout, rendering, caption grammar); a
share of them shows the new shape, in every caption kind (alone, sized, counted, placed, related to or
listed with a known shape), and the rest are ordinary training images, so what the model already knows is
rehearsed alongside. The new shape is drawn only in its training colors: `Concept.heldout_colors` never
appear on it in training, which leaves prompts such as "a green heart on the left" unseen for the eval
(`diffusekit.eval.concept`). The default model's own held-out compositions stay out, as in its training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import (
    BACKGROUNDS,
    COLORS,
    EXTRA_SHAPES,
    HELDOUT_PAIRS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    CaptionSpec,
    Group,
    Sample,
    format_caption,
    make_sample,
    render_scene,
    sample_spec,
    scene_for_spec,
    scene_is_heldout,
    spec_is_heldout,
)

PREFIX = "shapes:+"
# Colors the new shape is never drawn in during training (spread over the color ring).
DEFAULT_HELDOUT_COLORS: tuple[str, ...] = ("yellow", "green", "blue")
_KIND_WEIGHTS = (0.25, 0.15, 0.2, 0.2, 0.2)  # single, count, position, relation, list


class ConceptError(ValueError):
    """A concept dataset name or option that cannot be used."""


@dataclass(frozen=True)
class Concept:
    """A new shape taught on top of the shapes world, and the colors it is held out in."""

    shape: str
    heldout_colors: tuple[str, ...] = DEFAULT_HELDOUT_COLORS

    def __post_init__(self) -> None:
        if self.shape not in EXTRA_SHAPES:
            known = ", ".join(f"{PREFIX}{s}" for s in EXTRA_SHAPES)
            raise ConceptError(
                f"unknown new shape {self.shape!r}; valid: {known} (the default model's own shapes "
                f"{', '.join(SHAPES)} are not new)"
            )
        bad = [c for c in self.heldout_colors if c not in COLORS]
        if bad or len(self.heldout_colors) >= len(COLORS):
            raise ConceptError(
                f"held-out colors must be some (not all) of {', '.join(COLORS)}; "
                f"got {list(self.heldout_colors)}"
            )

    @property
    def name(self) -> str:
        """The dataset name, e.g. "shapes:+heart"."""
        return PREFIX + self.shape

    @property
    def train_colors(self) -> tuple[str, ...]:
        """The colors the new shape is drawn in during training."""
        return tuple(c for c in COLORS if c not in self.heldout_colors)


def is_concept_name(text: str) -> bool:
    """Whether a train-lora data argument names a concept dataset rather than a folder."""
    return str(text).startswith("shapes:")


def parse_concept(text: str) -> Concept:
    """The concept of a dataset name "shapes:+SHAPE"."""
    if not str(text).startswith(PREFIX) or len(text) == len(PREFIX):
        valid = ", ".join(PREFIX + s for s in EXTRA_SHAPES)
        raise ConceptError(f"cannot read dataset {text!r}: expected {valid}")
    return Concept(text[len(PREFIX) :])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def sample_concept_spec(rng: np.random.Generator, concept: Concept, kind: str | None = None) -> CaptionSpec:
    """A random caption spec naming the new shape in one of its training colors (every kind of caption)."""
    if kind is None:
        kind = KINDS[int(rng.choice(len(KINDS), p=_KIND_WEIGHTS))]
    if kind not in KINDS:
        raise ConceptError(f"unknown caption kind {kind!r}; expected one of {', '.join(KINDS)}")
    new = Group(concept.shape, _pick(rng, concept.train_colors))
    others = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    background = (
        _pick(rng, list(BACKGROUNDS)) if kind in ("single", "count", "list") and rng.random() < 0.2 else None
    )
    if kind == "single":
        size = _pick(rng, list(SIZES)) if rng.random() < 0.4 else None
        return CaptionSpec((Group(new.shape, new.color, 1, size),), None, background)
    if kind == "count":
        return CaptionSpec((Group(new.shape, new.color, int(rng.integers(2, 5))),), None, background)
    if kind == "position":
        return CaptionSpec((Group(new.shape, new.color, position=_pick(rng, POSITIONS)),), None, None)
    if kind == "relation":
        color, shape = _pick(rng, others)
        pair = [new, Group(shape, color)]
        if rng.random() < 0.5:
            pair.reverse()
        return CaptionSpec(tuple(pair), _pick(rng, RELATIONS), None)
    # list: the new shape with one or two known ones, at most 4 objects
    n_others = 1 if rng.random() < 0.6 else 2
    picks = [new] + [
        Group(others[i][1], others[i][0]) for i in rng.choice(len(others), n_others, replace=False)
    ]
    counts = [1] * len(picks)
    for i in range(len(picks)):
        if sum(counts) < 4 and rng.random() < 0.25:
            counts[i] = 2
    groups = [Group(g.shape, g.color, counts[i]) for i, g in enumerate(picks)]
    order = rng.permutation(len(groups))
    return CaptionSpec(tuple(groups[i] for i in order), None, background)


def make_concept_sample(rng: np.random.Generator, concept: Concept, size: int = 64) -> Sample:
    """One captioned image that shows the new shape (never in a held-out color, nor any held-out pair)."""
    spec = sample_concept_spec(rng, concept)
    scene = scene_for_spec(spec, rng, size, split="train")
    return Sample(render_scene(scene), format_caption(spec, rng), spec, scene)


class ConceptDataset:
    """The shapes training data with the new concept mixed in: item i is a pure function of (seed, i);
    a `share` of items shows the new shape, the others are ordinary `split="train"` samples."""

    def __init__(
        self, concept: Concept, seed: int = 0, size: int = 64, length: int = 2000, share: float = 0.5
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ConceptError(f"the new concept's share of the images must be in (0, 1], got {share}")
        if length < 1:
            raise ConceptError(f"the dataset needs at least one image, got {length}")
        if size < 16:
            raise ConceptError(f"image size must be at least 16 pixels, got {size}")
        self.concept, self.seed, self.size, self.length, self.share = (
            concept,
            int(seed),
            int(size),
            int(length),
            share,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, 7])
        if rng.random() < self.share:
            return make_concept_sample(rng, self.concept, self.size)
        return make_sample(rng, self.size, "train")

    def shows_concept(self, sample: Sample) -> bool:
        """Whether a sample's caption names the new shape."""
        return any(g.shape == self.concept.shape for g in sample.spec.groups)


def prior_captions(seed: int = 0, count: int = 2000) -> list[str]:
    """`count` captions of the default model's own training distribution (no new shape, no held-out
    composition), a pure function of `seed`: the text whose conditioning train-lora --preserve-kv keeps."""
    rng = np.random.default_rng([seed, 11])
    return [format_caption(spec, rng) for spec in (sample_spec(rng, "train") for _ in range(count))]


def split_violations(sample: Sample, concept: Concept) -> list[str]:
    """What in a training sample breaks the split (a held-out color on the new shape, a held-out pair or
    relation of the default model); empty when nothing does."""
    problems = [
        f"draws a {o.color} {o.shape} (held-out color)"
        for o in sample.scene.objects
        if o.shape == concept.shape and o.color in concept.heldout_colors
    ]
    if spec_is_heldout(sample.spec) or scene_is_heldout(sample.scene):
        problems.append("shows a held-out composition of the default model")
    return problems
