"""Absolute placement ("a red circle on the left"), which the GenEval-style eval does not score.

For each model: 4 positions x 4 color-shape pairs x 4 seeds, read back by the eval's detector. An image
passes when exactly one object of the asked color and shape is found and its center lies in the asked
third of the image (left: x < 1/3 of the width, center: the middle third of both axes, and so on).
Usage: python bench/absolute_position.py MODEL [MODEL ...] [--cfg C] [--sampler S]
(CFG and sampler left out: each model's own recommendation)
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from diffusekit.eval.detector import detect
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline

PAIRS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"))
WHERE = {
    "on the left": lambda x, y: x < 1 / 3,
    "on the right": lambda x, y: x > 2 / 3,
    "at the top": lambda x, y: y < 1 / 3,
    "at the bottom": lambda x, y: y > 2 / 3,
}
SEEDS = range(4)


def score(path: str, cfg: float | None, device: str = "cpu", sampler: str | None = None) -> dict:
    pipe = Pipeline.from_file(path, device=device)
    per_place = {}
    for place, ok in WHERE.items():
        passed = []
        for color, shape in PAIRS:
            for seed in SEEDS:
                prompt = f"a {color} {shape} {place}"
                params = GenerationParams(prompt=prompt, seed=seed, cfg_scale=cfg, sampler=sampler)
                arr = np.asarray(pipe.generate(params).images[0].convert("RGB"))
                found = [d for d in detect(arr) if (d.color, d.shape) == (color, shape)]
                size = arr.shape[1]
                passed.append(len(found) == 1 and ok(found[0].center[0] / size, found[0].center[1] / size))
        per_place[place] = sum(passed) / len(passed)
    used = pipe.defaults.fill(GenerationParams(cfg_scale=cfg, sampler=sampler))
    overall = float(np.mean(list(per_place.values())))
    return {"model": path, "cfg_scale": used.cfg_scale, "sampler": used.sampler, "overall": overall,
            "by_place": per_place}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--cfg", type=float, help="guidance for every model (default: each model's own)")
    ap.add_argument("--sampler", help="sampler for every model (default: each model's own)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (the figures in results/ are on cpu)")
    args = ap.parse_args()
    for m in args.models:
        print(json.dumps(score(m, args.cfg, args.device, args.sampler)))


if __name__ == "__main__":
    main()
