"""How the previous shipped (shift-2) model's run was driven: `Recipe()` as it was then (stage 2: 8,000
steps eps; stage 2b: 4,000 steps v / zero terminal SNR, timestep shift 2, no binding contrast).

Stage 1, the latent pool and stage 2 are the previous shipped run's (`previous-shift3/run.py`): the same
recipe fields and seeds, so the same computation; only stage 2b was trained here, alone on both cores
(39 min, 1.71 steps/s). This is `stage2b-trials/run.py shift-2 OUT` with OUT holding those checkpoints.
"""

import time
from dataclasses import replace

from diffusekit.params import ModelDefaults
from diffusekit.train.contrast import Contrast
from diffusekit.train.recipe import Recipe, run_recipe

r = Recipe(recommended=ModelDefaults(cfg_scale=2.0))  # the file's recommendation then: DPM++ 2M
r = replace(r, refine_objective=replace(r.refine_objective, contrast=Contrast()))  # as it was then
assert r.ldm.steps == 8000 and r.ldm_refine.steps == 4000 and r.refine_objective.timestep_shift == 2.0, r
t = time.time()
run_recipe(r, "/work/run19", resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
