"""How the shipped model's run was driven: `Recipe()` (stage 2: 8,000 steps, stage 2b: 4,000 steps).

Stage 1 (VAE) and the latent pool were copied from the previous model's run: the same recipe fields
(vae, kl_weight, data_seed, pool_size, model.vae), so the same computation (18 min there). Stage 2 was
started from an older Recipe object with the same ldm config, and stopped and resumed at its step-1800
and step-2000 checkpoints to change the stage-2b length before that stage began.
"""

import time

from diffusekit.train.recipe import Recipe, run_recipe

r = Recipe()
assert r.ldm.steps == 8000 and r.ldm_refine.steps == 4000 and r.model.prediction == "v", r
t = time.time()
run_recipe(r, "/work/run16", resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
