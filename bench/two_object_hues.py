"""Two objects, by how far apart their two colors are: does a model draw "A and B" as two of one thing?

Usage: python bench/two_object_hues.py MODEL [--seeds 8] [--sampler NAME] [--cfg C] [--json out.json]

In the eval, `two_objects` pairs HELDOUT_PAIRS i and i+1 (neighbouring colors: red and orange, green and
cyan, ...) and scores 0.53-0.66 on shapes alone, while `color_attribution` pairs i and i+3 and scores
0.81-0.84 with colors judged too. This separates the two readings (held-out pairs against color distance)
on training compositions only: for each distance d = 0..4 around the color ring (red, orange, yellow,
green, cyan, blue, purple, pink; d = 0 is one color twice), 8 prompts "a C_i S and a C_i+d T" with two
different shapes, each color-shape pair a training one, images with seeds 0..N-1 at the model's
recommended settings. Per distance it reports the `two_objects` rule (one of each shape), the
`color_attribution` rule (one of each color and shape), and how the misses fail: one shape drawn for both
objects, or one object only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffusekit.data.shapes import COLORS, HELDOUT_PAIRS, SHAPES, CaptionSpec, Group, format_caption
from diffusekit.eval.detector import detect
from diffusekit.eval.geneval import EvalPrompt, check
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline

DISTANCES = range(5)


def prompts_at(distance: int) -> list[CaptionSpec]:
    """8 two-object specs whose colors are `distance` apart on the ring; training pairs, distinct shapes."""
    ring = list(COLORS)
    specs = []
    for i in range(len(ring)):
        ca, cb = ring[i], ring[(i + distance) % len(ring)]
        for k in range(len(SHAPES) * len(SHAPES)):  # the first allowed shape pair in a fixed rotation
            sa, sb = SHAPES[(i + k) % len(SHAPES)], SHAPES[(i + 2 + k // len(SHAPES)) % len(SHAPES)]
            if sa != sb and (ca, sa) not in HELDOUT_PAIRS and (cb, sb) not in HELDOUT_PAIRS:
                specs.append(CaptionSpec((Group(sa, ca), Group(sb, cb))))
                break
    return specs


def failure(spec: CaptionSpec, dets) -> str:
    """How an image misses the two-shapes rule: 'same shape' (one of the asked shapes twice or more and
    the other absent), 'one object' (at most one object drawn), or 'other'."""
    shapes = [d.shape for d in dets]
    a, b = (g.shape for g in spec.groups)
    if len(dets) <= 1:
        return "one object"
    if (shapes.count(a) >= 2 and b not in shapes) or (shapes.count(b) >= 2 and a not in shapes):
        return "same shape"
    return "other"


def run(model: str, seeds: int, sampler: str | None, cfg: float | None) -> dict:
    pipe = Pipeline.from_file(model, precision="fp32")
    settings = pipe.defaults.fill(GenerationParams(sampler=sampler, cfg_scale=cfg))
    rows = []
    for d in DISTANCES:
        shapes_ok = colors_ok = 0
        misses: dict[str, int] = {}
        examples = []
        specs = prompts_at(d)
        for spec in specs:
            text = format_caption(spec)
            for seed in range(seeds):
                image = pipe.generate(settings.replace(prompt=text, seed=seed)).images[0]
                arr = np.asarray(image.convert("RGB"))
                dets = detect(arr)
                ok_shapes = check(EvalPrompt("two_objects", text, spec, False), dets, arr.shape[1])
                ok_colors = check(EvalPrompt("color_attribution", text, spec, False), dets, arr.shape[1])
                shapes_ok += ok_shapes
                colors_ok += ok_colors
                if not ok_shapes:
                    kind = failure(spec, dets)
                    misses[kind] = misses.get(kind, 0) + 1
                    if len(examples) < 4:
                        drawn = ", ".join(f"{o.color} {o.shape}" for o in dets)
                        examples.append(f"{text} (seed {seed}): {drawn}")
        n = len(specs) * seeds
        rows.append(
            {"distance": d, "images": n, "two_shapes": shapes_ok / n, "colors_and_shapes": colors_ok / n,
             "misses": misses, "examples": examples}
        )  # fmt: skip
    used = {"sampler": settings.sampler, "cfg_scale": settings.cfg_scale, "steps": settings.steps}
    return {"model": Path(model).name, "seeds": seeds, "settings": used, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seeds", type=int, default=8, help="images per prompt (seeds 0..N-1)")
    ap.add_argument("--sampler", help="default: the model's recommendation")
    ap.add_argument("--cfg", type=float, help="default: the model's recommendation")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = run(args.model, args.seeds, args.sampler, args.cfg)
    print("| color distance | images | two shapes | colors and shapes | misses |\n|---:|---:|---:|---:|---|")
    for r in out["rows"]:
        misses = ", ".join(f"{k} {v}" for k, v in sorted(r["misses"].items()))
        print(
            f"| {r['distance']} | {r['images']} | {r['two_shapes']:.3f} | {r['colors_and_shapes']:.3f}"
            f" | {misses} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
