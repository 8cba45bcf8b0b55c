"""Reproduces: the bundled default.safetensors from the second polish cycle's weights.

Write a polish run's weights as the bundled default model, with `Recipe()`'s metadata.

The bundled weights are the second polish cycle's: `finetune-trials/run.py binding OUT --base FILE
--steps 1500 --seed 5 --threads 2` (lr 2e-4, fp32 on the AVX2-only EPYC) from the first cycle's file,
which was `finetune-trials/run.py binding OUT --base FILE --steps 3000 --threads 2` (training seed 4)
from the file shipped before the polish stage (`git show bf159ca:src/diffusekit/assets/default.safetensors`;
the first cycle's file is `git show 3717a86:src/diffusekit/assets/default.safetensors`). run.py's export
records the recipe of its day; this rewrites the file with `Recipe()`, whose polish cycles are those two
runs, and the current recommendation (CFG 2, DPM++ 2M SDE). The weights pass through fp32 and back to
fp16 unchanged (checked below).

Usage: python ship.py OUT/model.safetensors
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusekit.checkpoints.load import load_model
from diffusekit.cli_generate import default_model_path
from diffusekit.train.objectives import TextToLatent
from diffusekit.train.recipe import Recipe, export

source = Path(sys.argv[1])
sd = load_model(source, dtype=torch.float32).model
target = default_model_path()
export(Recipe(), sd.vae, TextToLatent(sd.unet, sd.text_encoders[0]), sd.cfg.vae.scaling_factor, target)
before, after = load_file(source), load_file(target)
assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
print(f"{target}: {len(after)} tensors, equal to {source}'s")
