"""How the previous shipped model's run was driven: `Recipe()` as it was then (stage 2: 8,000 steps,
stage 2b: 4,000 steps at timestep shift 3; today's `Recipe()` uses shift 2, so this sets 3 explicitly).

Stage 1 (VAE) and the latent pool were copied from the previous model's run: the same recipe fields
(vae, kl_weight, data_seed, pool_size, model.vae), so the same computation (18 min there). Stage 2 was
started from an older Recipe object with the same ldm config, and stopped and resumed at its step-1800
and step-2000 checkpoints to change the stage-2b length before that stage began.
"""

import time
from dataclasses import replace

from diffusekit.params import ModelDefaults
from diffusekit.train.contrast import Contrast
from diffusekit.train.recipe import Recipe, run_recipe

r = Recipe(recommended=ModelDefaults(cfg_scale=2.0))  # the file's recommendation then: DPM++ 2M
r = replace(r, refine_objective=replace(r.refine_objective, timestep_shift=3.0, contrast=Contrast()))
assert r.ldm.steps == 8000 and r.ldm_refine.steps == 4000 and r.model.prediction == "v", r
t = time.time()
run_recipe(r, "/work/run16", resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
