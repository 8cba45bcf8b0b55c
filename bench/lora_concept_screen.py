"""Screen a heart LoRA quickly: held-out heart accuracy and the default eval's change at weight 1.

Usage: python bench/lora_concept_screen.py LORA OUT.json
The two measurements of bench/lora_concept.py that decide between training variants (the held-out
`shapes:+heart` prompts and the default model's held-out eval, both with the LoRA at weight 1, seeds 0-3,
4 images per prompt); the base model's categories are read from bench/results/lora_concept.json (the
same seeds and sampler), so one screen costs two eval passes instead of the bench's five.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusekit.adapters.lora import load_lora  # noqa: E402
from diffusekit.cli_generate import default_model_path  # noqa: E402
from diffusekit.data.concepts import parse_concept  # noqa: E402
from diffusekit.eval.concept import evaluate_concept  # noqa: E402
from diffusekit.eval.geneval import CATEGORIES, evaluate  # noqa: E402
from diffusekit.params import GenerationParams  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from lora_concept import batched_generator  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    lora, out_path = sys.argv[1], sys.argv[2]
    base_cats = json.loads(Path("bench/results/lora_concept.json").read_text())["default_eval"]["base"]
    pipe = Pipeline.from_file(default_model_path())
    base = pipe.defaults.fill(GenerationParams())
    net = load_lora(lora)
    gen = batched_generator(pipe, base, [(net, 1.0, 1.0)])
    t = time.perf_counter()
    concept = evaluate_concept(gen, parse_concept("shapes:+heart"), 4, 0)
    print(lora, "concept", round(concept.accuracy, 3), concept.categories, flush=True)
    rep = evaluate(gen, images_per_prompt=4, seed=0, prompt_set="heldout")
    points = {c: round(100 * (rep.categories[c] - base_cats["categories"][c]), 2) for c in CATEGORIES}
    out = {"lora": lora, "concept": concept.accuracy, "concept_categories": concept.categories,
           "default_eval_w1": rep.categories, "points_vs_base": points,
           "max_abs_points": max(abs(v) for v in points.values()),
           "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    print(lora, "eval points", points, "max", out["max_abs_points"], flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
