"""Does a model draw a new concept? Held-out prompts that use it, judged by the extended detector.

The detector is the default model's eval detector (`diffusekit.eval.detector`) with the new shape added
to the outlines it fits, so a blob is called a heart only when a heart outline fits it better than every
known shape. The prompts use the new shape only in `Concept.heldout_colors`, which it is never drawn in
during training (`diffusekit.data.concepts`), in five categories per color:

| category    | per color | example                           | passes when                                 |
|-------------|----------:|-----------------------------------|---------------------------------------------|
| single      | 1         | "a green heart"                   | exactly one green heart                     |
| size        | 2         | "a large green heart"             | exactly one green heart, of that size       |
| position    | 5         | "a green heart on the left"       | exactly one green heart, its center there   |
| count       | 1         | "two green hearts"                | exactly two green hearts                    |
| two_objects | 1         | "a green heart and a pink square" | exactly one green heart and one pink square |

As in GenEval, objects a prompt does not name are ignored. `prompt_set="train"` asks the same of the
colors the new shape was trained in (for tuning; the held-out set is for reporting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.concepts import Concept
from ..data.shapes import (
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    CaptionSpec,
    Group,
    color_distance,
    format_caption,
    region_holds,
)
from .detector import DetectedObject, detect

CONCEPT_CATEGORIES: tuple[str, ...] = ("single", "size", "position", "count", "two_objects")
PROMPT_SETS: tuple[str, ...] = ("heldout", "train")
# Extent (as a fraction of the image side) between the generator's small and large ranges.
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2

Generator = Callable[[list[str], list[int]], Sequence[Image.Image]]


@dataclass(frozen=True)
class ConceptPrompt:
    """One prompt that uses the new concept, its category and the spec it was written from."""

    category: str
    prompt: str
    spec: CaptionSpec


def _companion(color: str, index: int) -> tuple[str, str]:
    """A known (color, shape) training pair to go with the concept in `color`: a color at least 3 ring
    steps away (two alike colors are what the default model keeps apart worst), shapes in turn."""
    options = [
        (c, s)
        for c in COLORS
        for s in SHAPES
        if color_distance(c, color) >= 3 and (c, s) not in HELDOUT_PAIRS
    ]
    return options[(7 * index + 3) % len(options)]


def concept_prompts(concept: Concept, prompt_set: str = "heldout") -> tuple[ConceptPrompt, ...]:
    """The fixed prompt list: every category for each held-out color (or 3 training colors with "train")."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {', '.join(PROMPT_SETS)}")
    train = concept.train_colors
    colors = concept.heldout_colors if prompt_set == "heldout" else train[:: max(1, len(train) // 3)][:3]
    out = []
    for i, color in enumerate(colors):
        shape = concept.shape
        specs = [("single", CaptionSpec((Group(shape, color),)))]
        specs += [("size", CaptionSpec((Group(shape, color, 1, size),))) for size in SIZES]
        specs += [("position", CaptionSpec((Group(shape, color, position=p),))) for p in POSITIONS]
        specs.append(("count", CaptionSpec((Group(shape, color, 2),))))
        c2, s2 = _companion(color, i)
        specs.append(("two_objects", CaptionSpec((Group(shape, color), Group(s2, c2)))))
        out.extend(ConceptPrompt(cat, format_caption(spec), spec) for cat, spec in specs)
    return tuple(out)


def detector_shapes(concept: Concept) -> tuple[str, ...]:
    """The outlines the concept eval fits: the default model's shapes plus the new one."""
    return SHAPES + (concept.shape,)


def check_concept(prompt: ConceptPrompt, detections: Sequence[DetectedObject], image_size: int) -> bool:
    """Whether the detected objects satisfy a concept prompt (see the module docstring)."""
    found = []
    for g in prompt.spec.groups:
        hits = [d for d in detections if d.shape == g.shape and d.color == g.color]
        if len(hits) != g.count:
            return False
        for d in hits:
            if g.size is not None and (d.extent / image_size > SIZE_SPLIT) != (g.size == "large"):
                return False
            if g.position is not None and not region_holds(d.center, g.position, image_size):
                return False
        found.append(hits)
    return True


@dataclass(frozen=True)
class ConceptReport:
    """Per-category and overall accuracy of a model on the concept prompts, with per-image verdicts."""

    prompt_set: str
    images_per_prompt: int
    categories: dict[str, float]
    accuracy: float
    results: tuple[dict, ...]

    def to_dict(self) -> dict:
        """A JSON-serializable dict of the report."""
        return {
            "prompt_set": self.prompt_set,
            "images_per_prompt": self.images_per_prompt,
            "accuracy": self.accuracy,
            "categories": dict(self.categories),
            "results": list(self.results),
        }


def evaluate_concept(
    generate: Generator,
    concept: Concept,
    images_per_prompt: int = 4,
    seed: int = 0,
    prompt_set: str = "heldout",
    keep_images: dict | None = None,
) -> ConceptReport:
    """Score `generate(prompts, seeds) -> images` on the concept prompts; image j of a prompt uses seed
    `seed + j`. Accuracy is over all images (every prompt has the same number). With `keep_images`, the
    images are stored there by (prompt, seed)."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    prompts = concept_prompts(concept, prompt_set)
    shapes = detector_shapes(concept)
    seeds = [seed + j for j in range(images_per_prompt)]
    results = []
    for p in prompts:
        images = list(generate([p.prompt] * len(seeds), seeds))
        passed, detected = [], []
        for s, image in zip(seeds, images, strict=True):
            arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
            dets = detect(arr, shapes)
            passed.append(check_concept(p, dets, arr.shape[1]))
            detected.append(", ".join(f"{d.color} {d.shape}" for d in dets) or "nothing")
            if keep_images is not None:
                keep_images[(p.prompt, s)] = image
        results.append(
            {
                "category": p.category,
                "prompt": p.prompt,
                "seeds": seeds,
                "passed": passed,
                "detected": detected,
            }
        )
    cats = {}
    for c in CONCEPT_CATEGORIES:
        verdicts = [v for r in results if r["category"] == c for v in r["passed"]]
        cats[c] = sum(verdicts) / len(verdicts)
    every = [v for r in results for v in r["passed"]]
    return ConceptReport(prompt_set, images_per_prompt, cats, sum(every) / len(every), tuple(results))
