"""How the shipped model's run was driven: `Recipe()` (stage 2: 8,000 steps eps; stage 2b: 4,000 steps v /
zero terminal SNR, timestep shift 2, binding contrast on relations, color pairs and absolute positions).

Stage 1, the latent pool and stage 2 are the previous shipped runs' (`previous-shift3/run.py`): the same
recipe fields and seeds, so the same computation; only stage 2b was trained here, alone on both cores
(46 min, 1.40 steps/s). This is `contrast-trials/run.py relations-positions OUT` with OUT holding those
checkpoints.
The run's file recommended DPM++ 2M; the shipped file's metadata was later rewritten (tensors untouched)
to today's `Recipe().recommended`, DPM++ 2M SDE (README, "The default model", `sampler-check/shipped/`).
"""

import time

from diffusekit.train.recipe import Recipe, run_recipe

r = Recipe()
c = r.refine_objective.contrast
assert r.ldm.steps == 8000 and r.ldm_refine.steps == 4000 and r.refine_objective.timestep_shift == 2.0, r
assert (c.weight, c.margin, c.max_snr, c.samples) == (1.0, 0.1, 0.1, 16), c
t = time.time()
run_recipe(r, "/work/run21", resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
