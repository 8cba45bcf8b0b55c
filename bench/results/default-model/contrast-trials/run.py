"""How the binding-contrast trials were driven, one at a time on both cores (34 and 46 min).

Each continues the shipped run's stage 2 (the 8,000-step eps checkpoint, with its stage 1 and latent pool:
the same recipe fields, so the same computation) and trains stage 2b as the shipped recipe does (v,
zero-terminal SNR, timestep shift 2, 4,000 steps) plus `Objective.contrast` (train/contrast.py):
- relations/: contradicting captions are relations reversed and two-group captions with the colors
  exchanged, at most 12 pairs per batch (the code of commit 0da5506);
- relations-positions: the same, plus absolute positions mirrored ("on the left" -> "on the right"),
  at most 16 pairs per batch. This is what `Recipe()` now trains and ships; results in the folder above.
Usage: python run.py TRIAL OUT  (OUT holds the shipped run's vae.train.pt, latents.pt, ldm.train.pt)
"""

import sys
import time
from dataclasses import replace

from diffusekit.params import ModelDefaults
from diffusekit.train.contrast import Contrast
from diffusekit.train.recipe import Recipe, run_recipe

trial, out = sys.argv[1], sys.argv[2]
samples = {"relations": 12, "relations-positions": 16}[trial]
base = Recipe(recommended=ModelDefaults(cfg_scale=2.0))  # the file's recommendation then: DPM++ 2M
contrast = Contrast(weight=1.0, margin=0.1, max_snr=0.1, samples=samples)
recipe = replace(base, refine_objective=replace(base.refine_objective, timestep_shift=2.0, contrast=contrast))
t = time.time()
run_recipe(recipe, out, resume=True)
print(f"recipe wall time {(time.time() - t) / 60:.1f} min", flush=True)
