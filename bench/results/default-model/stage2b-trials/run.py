"""How the stage-2b trials were driven: kind-weights and shift-1.5 side by side, one thread each (64 min);
shift-2 alone afterwards, on both cores.

Each continues the shipped run's stage 2 (the 8,000-step eps checkpoint, with its stage 1 and latent pool:
the same recipe fields, so the same computation) and trains a different stage 2b of 4,000 steps:
- kind-weights/: `Objective.kind_weights` draws relation captions 2x and list captions 1.5x as often;
- shift-1.5/: timestep shift 1.5 instead of 3;
- shift 2: shipped until the binding contrast was added; its results are in ../previous-shift2/.
"""

import sys
import time
from dataclasses import replace

import torch

from diffusekit.params import ModelDefaults
from diffusekit.train.contrast import Contrast
from diffusekit.train.recipe import Recipe, run_recipe

trial, out = sys.argv[1], sys.argv[2]  # out: a folder holding the shipped run's vae/ldm checkpoints, latents
base = Recipe(recommended=ModelDefaults(cfg_scale=2.0))  # the file's recommendation then: DPM++ 2M
changes = {
    "kind-weights": {"kind_weights": (("relation", 2.0), ("list", 1.5))},
    "shift-1.5": {"timestep_shift": 1.5},
    "shift-2": {"timestep_shift": 2.0},
}[trial]
if trial != "shift-2":
    torch.set_num_threads(1)
recipe = replace(base, refine_objective=replace(base.refine_objective, contrast=Contrast(), **changes))
t = time.time()
run_recipe(recipe, out, resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
