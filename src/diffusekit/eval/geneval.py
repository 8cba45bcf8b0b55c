"""GenEval-style prompt adherence for text-to-image models on the shapes world.

Seven categories, each a fixed prompt list and a checker over detected objects (`diffusekit.eval.detector`).
With `prompt_set="heldout"` (the default) every prompt except the six `single_object` ones is built from
held-out compositions (`HELDOUT_PAIRS`, `HELDOUT_RELATIONS`) that never occur in training:

| category          | prompts | held-out | example                                | passes when            |
|-------------------|---------|----------|----------------------------------------|------------------------|
| single_object     | 6       | 0        | "a star"                               | one star               |
| colors            | 8       | 8        | "a purple star"                        | one purple star        |
| shapes            | 8       | 8        | "a purple star" (the colors prompts)   | one star               |
| counting          | 8       | 8        | "three orange diamonds"                | three orange diamonds  |
| two_objects       | 8       | 8        | "a red triangle and an orange diamond" | one of each shape      |
| position          | 8       | 8        | "a red circle above a blue star"       | one of each, related   |
| color_attribution | 8       | 8        | "a red triangle and a green circle"    | one of each color+shape|

Counts are exact ("one star": exactly one detected star); objects a prompt does not name are ignored, as
in GenEval. `single_object` has no composition to hold out (every shape occurs in training), so its six
prompts are in-distribution and stay out of the held-out score. `position` has the four HELDOUT_RELATIONS
in their held-out orientation plus four relations between held-out pairs (objects named by color and
shape); the other categories combine the eight HELDOUT_PAIRS (counts 2, 3, 4 in turn; pairs i and i+1
for two_objects, i and i+3 for color_attribution). `colors` and `shapes` share prompts and images and
differ in what they judge. `prompt_set="train"` builds the same structure from training compositions, to
measure the generalization gap.

Scores: per-category accuracy over all its images; `overall` is the mean over categories (GenEval);
`held_out` is the mean over categories of the accuracy on their held-out prompts.

Each score comes with a 95% interval, because at 4 images per prompt a category is 24-32 images and
one image moves it by 0.03-0.04: Wilson's score interval for a category (its images taken as
independent draws), and for `overall` the mean plus or minus 1.96 standard errors from the
categories' Agresti-Coull variances (colors and shapes judge the same images, so this is a little
narrower than it should be). Two seed blocks whose intervals overlap widely do not show a difference.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from diffusekit.data.shapes import (
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    RELATIONS,
    SHAPES,
    CaptionSpec,
    Group,
    format_caption,
    parse_caption,
    relation_holds,
    render_scene,
    scene_for_spec,
    spec_is_heldout,
)
from diffusekit.eval.detector import DetectedObject, detect

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "colors",
    "shapes",
    "counting",
    "two_objects",
    "position",
    "color_attribution",
)
PROMPT_SETS: tuple[str, ...] = ("heldout", "train")
Z95 = 1.959964  # the standard normal quantile of a two-sided 95% interval

# In-distribution counterparts of HELDOUT_PAIRS (one per color, same shape spacing rules) for "train".
TRAIN_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("orange", "triangle"),
    ("yellow", "star"),
    ("green", "square"),
    ("cyan", "diamond"),
    ("blue", "cross"),
    ("pink", "star"),
    ("purple", "square"),
)

Generator = Callable[[list[str], list[int]], Sequence[Image.Image]]


def pipeline_generator(pipe, base) -> Generator:
    """`evaluate`'s callable for a diffusekit `Pipeline`: one `pipe.generate(base.replace(prompt, seed))`
    per image (`base`: the GenerationParams every image shares: steps, CFG, sampler)."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        pairs = zip(prompts, seeds, strict=True)
        return [pipe.generate(base.replace(prompt=p, seed=s)).images[0] for p, s in pairs]

    return generate


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of one category, the spec it was written from, and whether it is held out."""

    category: str
    prompt: str
    spec: CaptionSpec
    held_out: bool


def _spec(*pairs: tuple[str, str], relation: str | None = None, count: int = 1) -> CaptionSpec:
    return CaptionSpec(tuple(Group(shape, color, count) for color, shape in pairs), relation)


def _shape_only(spec: CaptionSpec) -> CaptionSpec:
    return CaptionSpec(tuple(Group(g.shape, None, g.count) for g in spec.groups), spec.relation)


def eval_prompts(prompt_set: str = "heldout") -> tuple[EvalPrompt, ...]:
    """The fixed prompt list of every category (see the module docstring for the structure)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {', '.join(PROMPT_SETS)}")
    pairs = HELDOUT_PAIRS if prompt_set == "heldout" else TRAIN_PAIRS
    triples = HELDOUT_RELATIONS
    if prompt_set == "train":  # the allowed, reverse orientation of each held-out relation
        triples = tuple((b, rel, a) for a, rel, b in HELDOUT_RELATIONS)
    n = len(pairs)
    specs: dict[str, list[CaptionSpec]] = {
        "single_object": [CaptionSpec((Group(s),)) for s in SHAPES],
        "colors": [_spec(p) for p in pairs],
        "shapes": [_spec(p) for p in pairs],
        "counting": [_spec(p, count=2 + i % 3) for i, p in enumerate(pairs)],
        "two_objects": [_spec(pairs[i], pairs[(i + 1) % n]) for i in range(n)],
        "position": [_spec(a, b, relation=rel) for a, rel, b in triples]
        + [_spec(pairs[i], pairs[i + 2], relation=RELATIONS[i % 4]) for i in range(4)],
        "color_attribution": [_spec(pairs[i], pairs[(i + 3) % n]) for i in range(n)],
    }
    out = []
    for category in CATEGORIES:
        for spec in specs[category]:
            out.append(EvalPrompt(category, format_caption(spec), spec, spec_is_heldout(spec)))
    return tuple(out)


def _count(dets: Sequence[DetectedObject], shape: str, color: str | None) -> list[DetectedObject]:
    return [d for d in dets if d.shape == shape and (color is None or d.color == color)]


def check(prompt: EvalPrompt, detections: Sequence[DetectedObject], image_size: int) -> bool:
    """Whether the detected objects satisfy the prompt under its category's rule."""
    spec = prompt.spec
    if prompt.category in ("single_object", "shapes", "two_objects"):
        spec = _shape_only(spec)  # these categories judge shapes only
    elif prompt.category not in CATEGORIES:
        raise ValueError(f"unknown category {prompt.category!r}; expected one of {', '.join(CATEGORIES)}")
    found = []
    for g in spec.groups:
        hits = _count(detections, g.shape, g.color)
        if len(hits) != g.count:
            return False
        found.append(hits)
    if spec.relation is not None:
        return relation_holds(found[0][0].center, found[1][0].center, spec.relation, image_size)
    return True


@dataclass(frozen=True)
class PromptResult:
    """The per-image verdicts for one (category, prompt), with what the detector read in each image."""

    category: str
    prompt: str
    held_out: bool
    seeds: tuple[int, ...]
    passed: tuple[bool, ...]
    detected: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        """Share of this prompt's images that pass."""
        return sum(self.passed) / len(self.passed)


@dataclass(frozen=True)
class EvalReport:
    """Per-category accuracy, the GenEval overall mean, the held-out mean, and per-prompt details."""

    prompt_set: str
    images_per_prompt: int
    seed: int
    categories: dict[str, float]
    held_out_categories: dict[str, float]
    overall: float
    held_out: float | None
    results: tuple[PromptResult, ...]

    def passes(self, category: str) -> tuple[int, int]:
        """(images that pass, images judged) in a category."""
        verdicts = [v for r in self.results if r.category == category for v in r.passed]
        return sum(verdicts), len(verdicts)

    def interval(self, category: str) -> tuple[float, float]:
        """The 95% Wilson interval of a category's accuracy (see the module docstring)."""
        return wilson_interval(*self.passes(category))

    @property
    def overall_interval(self) -> tuple[float, float]:
        """`overall` plus or minus 1.96 standard errors (Agresti-Coull per category), within [0, 1]."""
        variances = []
        for c in CATEGORIES:
            passed, n = self.passes(c)
            p = (passed + Z95**2 / 2) / (n + Z95**2)
            variances.append(p * (1 - p) / (n + Z95**2))
        half = Z95 * math.sqrt(sum(variances)) / len(variances)
        return max(0.0, self.overall - half), min(1.0, self.overall + half)

    def to_dict(self) -> dict:
        """A JSON-serializable dict of the whole report."""
        return {
            "prompt_set": self.prompt_set,
            "images_per_prompt": self.images_per_prompt,
            "seed": self.seed,
            "overall": self.overall,
            "overall_interval95": list(self.overall_interval),
            "held_out": self.held_out,
            "categories": dict(self.categories),
            "category_intervals95": {c: list(self.interval(c)) for c in self.categories},
            "held_out_categories": dict(self.held_out_categories),
            "results": [
                {
                    "category": r.category,
                    "prompt": r.prompt,
                    "held_out": r.held_out,
                    "accuracy": r.accuracy,
                    "seeds": list(r.seeds),
                    "passed": list(r.passed),
                    "detected": list(r.detected),
                }
                for r in self.results
            ],
        }


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a pass rate of `passed` out of `n` independent trials (95% at z 1.96).
    Unlike p +- z se it stays inside [0, 1] and keeps a width at 0 or n passes."""
    if not 0 <= passed <= n or n < 1:
        raise ValueError(f"need 0 <= passed <= n and n >= 1, got passed={passed}, n={n}")
    p = passed / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if passed == 0 else max(0.0, center - half)  # exactly 0 and 1 at the ends, not 1 - 1e-16
    hi = 1.0 if passed == n else min(1.0, center + half)
    return lo, hi


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def _span(interval: tuple[float, float]) -> str:
    return f"{interval[0]:.2f}-{interval[1]:.2f}"


def _summary(dets: Sequence[DetectedObject]) -> str:
    return ", ".join(f"{d.color} {d.shape}@({d.center[0]:.0f},{d.center[1]:.0f})" for d in dets) or "nothing"


def evaluate(
    generate: Generator,
    images_per_prompt: int = 4,
    seed: int = 0,
    prompt_set: str = "heldout",
    batch_size: int = 16,
) -> EvalReport:
    """Score a text-to-image callable `generate(prompts, seeds) -> images` on every category.

    Image j of every prompt uses seed `seed + j`; a prompt shared by two categories is generated once.
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"images_per_prompt and batch_size must be >= 1, got {images_per_prompt}, {batch_size}"
        )
    prompts = eval_prompts(prompt_set)
    seeds = [seed + j for j in range(images_per_prompt)]
    jobs = list(dict.fromkeys((p.prompt, s) for p in prompts for s in seeds))
    verdict_input: dict[tuple[str, int], tuple[list[DetectedObject], int]] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = list(generate([p for p, _ in chunk], [s for _, s in chunk]))
        if len(images) != len(chunk):
            raise ValueError(f"generate returned {len(images)} images for {len(chunk)} prompts")
        for job, image in zip(chunk, images, strict=True):
            arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
            verdict_input[job] = (detect(arr), arr.shape[1])
    results = []
    for p in prompts:
        passed, detected = [], []
        for s in seeds:
            dets, width = verdict_input[(p.prompt, s)]
            passed.append(check(p, dets, width))
            detected.append(_summary(dets))
        results.append(
            PromptResult(p.category, p.prompt, p.held_out, tuple(seeds), tuple(passed), tuple(detected))
        )
    return _report(prompt_set, images_per_prompt, seed, results)


def _report(
    prompt_set: str, images_per_prompt: int, seed: int, results: Sequence[PromptResult]
) -> EvalReport:
    """The scores of per-prompt verdicts (see the module docstring)."""
    categories = {c: _mean([r.accuracy for r in results if r.category == c]) for c in CATEGORIES}
    held = {
        c: _mean([r.accuracy for r in results if r.category == c and r.held_out])
        for c in CATEGORIES
        if any(r.category == c and r.held_out for r in results)
    }
    return EvalReport(
        prompt_set,
        images_per_prompt,
        seed,
        categories,
        held,
        _mean(list(categories.values())),
        _mean(list(held.values())) if held else None,
        tuple(results),
    )


def report_from_dict(data: dict) -> EvalReport:
    """An EvalReport back from `EvalReport.to_dict()` (an `eval --json` file); scores are recomputed."""
    results = [
        PromptResult(r["category"], r["prompt"], r["held_out"], tuple(r["seeds"]), tuple(r["passed"]),
                     tuple(r["detected"]))
        for r in data["results"]
    ]  # fmt: skip
    return _report(data["prompt_set"], data["images_per_prompt"], data["seed"], results)


def pooled(reports: Sequence[EvalReport]) -> EvalReport:
    """Runs of one prompt set at different seeds (`eval --seed 0`, `--seed 4`, ...) as one report over
    all their images: more images per prompt, narrower intervals."""
    if not reports:
        raise ValueError("pooled() needs at least one report")
    first = reports[0]
    keys = [(r.category, r.prompt) for r in first.results]
    for other in reports[1:]:
        if other.prompt_set != first.prompt_set or [(r.category, r.prompt) for r in other.results] != keys:
            raise ValueError(
                f"can only pool runs over the same prompts; got prompt sets {first.prompt_set!r} "
                f"and {other.prompt_set!r} (or different prompt lists)"
            )
    seeds = [s for rep in reports for s in rep.results[0].seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs share seeds ({sorted(seeds)}); pooling would count images twice")
    merged = [
        PromptResult(
            r.category, r.prompt, r.held_out,
            tuple(s for rep in reports for s in rep.results[i].seeds),
            tuple(v for rep in reports for v in rep.results[i].passed),
            tuple(d for rep in reports for d in rep.results[i].detected),
        )
        for i, r in enumerate(first.results)
    ]  # fmt: skip
    return _report(first.prompt_set, sum(rep.images_per_prompt for rep in reports), first.seed, merged)


def format_table(report: EvalReport) -> str:
    """The report as a markdown table: one row per category, then overall and held-out means."""
    lines = [
        f"GenEval-style scores ({report.prompt_set} prompts, {report.images_per_prompt} images per prompt, "
        f"seed {report.seed})",
        "",
        "| category | prompts | held-out prompts | accuracy | 95% interval | held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in CATEGORIES:
        rows = [r for r in report.results if r.category == c]
        n_held = sum(r.held_out for r in rows)
        held = f"{report.held_out_categories[c]:.3f}" if c in report.held_out_categories else "-"
        interval = _span(report.interval(c))
        lines.append(f"| {c} | {len(rows)} | {n_held} | {report.categories[c]:.3f} | {interval} | {held} |")
    held_all = "-" if report.held_out is None else f"{report.held_out:.3f}"
    lines.append(f"| **overall** | {len(report.results)} | {sum(r.held_out for r in report.results)} | ")
    lines[-1] += f"**{report.overall:.3f}** | {_span(report.overall_interval)} | **{held_all}** |"
    return "\n".join(lines)


def ground_truth_generator(size: int = 64) -> Generator:
    """A "perfect" generator: parses each prompt and renders a scene satisfying it from the data generator."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        out = []
        for prompt, s in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng([s, zlib.crc32(prompt.encode("utf-8"))])
            out.append(render_scene(scene_for_spec(parse_caption(prompt), rng, size, split=None)))
        return out

    return generate


def blank_generator(size: int = 64, color: tuple[int, int, int] = (52, 52, 56)) -> Generator:
    """A generator that ignores its prompt and returns a plain canvas (scores 0 everywhere)."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [Image.new("RGB", (size, size), color) for _ in prompts]

    return generate
