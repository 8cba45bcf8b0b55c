"""Reproduces: the shipped model's two polish cycles (longer-finetune/second-cycle/) and the fine-tune trials.

Fine-tune trials: continue the shipped default model with stage 2b's objective and another contrast.

No stage-2 checkpoint exists on this machine, and stage 1 + stage 2 take about 2 h, so these trials
start from the shipped file itself (fp16 EMA weights of stage 2b, cast to fp32) with a fresh optimizer,
and train `--steps` more steps of `Recipe().refine_objective` with the contrast's breaks set per variant:
- binding: the shipped contrast (relation reversed, position mirrored, colors exchanged): the control,
  which measures what the extra steps alone do;
- all: breaks ("binding", "shared", "count"), aimed at two objects drawn as one shape or in one color,
  and at wrong counts.
`--pad-dropout P` (0 unless given, so the runs above are unchanged) also sets `Objective.pad_dropout`
(pad-trial/, docs: how-it-was-made).
`--hue-weight F` (1 unless given) sets `Objective.near_color_weight`: the pool's images with two groups
of different shapes in colors at most one ring step apart are drawn F times as often (hue-trial/): what
a model that draws "a red circle and an orange star" as two circles gets wrong. (hue-trial/ ran this
with the same rule written out here; its weights were checked equal to the option's over the pool.)
The variant "shared" adds the contrast break of that name ("... an orange star" against "... an orange
circle").
`--top-attention` (attn16-trial/) adds a spatial transformer (self- and cross-attention) to each block of
the U-Net's first level, the 16x16 latent, where the shipped U-Net has convolutions only: the lower
levels (8x8, 4x4) decide where things go, and this asks whether letting each 16x16 position read the
prompt's shape words draws two different shapes as two. The new blocks' output projections start at
zero, so the model starts as the shipped one; no existing key moves (the first level's output blocks
have no upsampler), so the shipped weights load as they are.
The training loop's precision is its default, "auto": the trials before attn16-trial/ ran on CPUs with
native bf16 and trained with bf16 autocast; attn16-trial/ ran on an AVX2-only CPU, in fp32, with its own
control (both 800 steps).
The latent pool is the recipe's (the first 50,000 training images), encoded once by the shipped VAE
into OUT/../latents.pt and shared by the variants. The exported file's recipe metadata is `Recipe()`
with this contrast: it does not record that the run continued the shipped file (lr, steps: see here).

Every trial here, and the first polish cycle (longer-finetune/), continued the file shipped before the
polish stage; the second cycle continued the first's file. The bundled file is now the second cycle's,
so `--base` names the file to continue (`git show bf159ca:src/diffusekit/assets/default.safetensors >
before-polish.safetensors`; the first cycle's file is at 3717a86).

Usage: python run.py VARIANT OUT [--base FILE] [--steps 1500] [--lr 2e-4] [--threads 1] [--pad-dropout 0.5]
       [--hue-weight 3] [--seed 4] [--top-attention]
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.checkpoints.load import load_model
from diffusekit.cli_generate import default_model_path
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.models.unet import UNetModel
from diffusekit.params import ModelDefaults
from diffusekit.train.contrast import BREAKS as ALL_BREAKS
from diffusekit.train.loop import Trainer
from diffusekit.train.objectives import LatentDiffusionObjective, TextToLatent
from diffusekit.train.recipe import Recipe, _seeded, export, latent_pool

BREAKS = {"binding": ("binding",), "shared": ("binding", "shared"), "all": ALL_BREAKS}

ap = argparse.ArgumentParser()
ap.add_argument("variant", choices=sorted(BREAKS))
ap.add_argument("out")
ap.add_argument("--base", help="the model to continue (default: the bundled one)")
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--lr", type=float, default=2e-4)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--pad-dropout", type=float, default=0.0)
ap.add_argument("--hue-weight", type=float, default=1.0)
ap.add_argument("--seed", type=int, default=4, help="the training draws' seed (batches, noise, timesteps)")
ap.add_argument("--top-attention", action="store_true", help="attention at the 16x16 level too")
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
base = Recipe(recommended=ModelDefaults(cfg_scale=2.0))  # the file's recommendation then: DPM++ 2M
loaded = load_model(args.base or default_model_path(), dtype=torch.float32)
sd = loaded.model
scale = sd.cfg.vae.scaling_factor
pool = latent_pool(base, sd.vae, out.parent, resume=True)
unet = sd.unet
if args.top_attention:
    depth = tuple(max(1, d) for d in base.model.unet.transformer_depth)  # (0, 1, 1) -> (1, 1, 1)
    base = replace(base, model=replace(base.model, unet=replace(base.model.unet, transformer_depth=depth)))
    torch.manual_seed(args.seed)  # the new blocks' initial weights
    unet = UNetModel(base.model.unet)
    missing, unexpected = unet.load_state_dict(sd.unet.state_dict(), strict=False)
    new_blocks = sorted({".".join(k.split(".")[:3]) for k in missing})  # e.g. input_blocks.1.1
    assert not unexpected and all(b.endswith(".1") for b in new_blocks), (missing, unexpected)
    for block in new_blocks:
        torch.nn.init.zeros_(unet.get_submodule(f"{block}.proj_out").weight)  # starts as an identity
        torch.nn.init.zeros_(unet.get_submodule(f"{block}.proj_out").bias)
    print(f"top attention: {len(missing)} new tensors in {new_blocks}", flush=True)
model = TextToLatent(unet, sd.text_encoders[0]).requires_grad_(True)
cfg = replace(base.ldm_polish[0], steps=args.steps, lr=args.lr, seed=args.seed)  # a polish cycle
objective = replace(
    base.refine_objective,
    contrast=replace(base.refine_objective.contrast, breaks=BREAKS[args.variant]),
    pad_dropout=args.pad_dropout,
    near_color_weight=args.hue_weight,
)
_seeded(cfg.seed)
trainer = Trainer("finetune", model, cfg, out)
trainer.resume()
loss = LatentDiffusionObjective(
    pool, CLIPTokenizer.bundled(), batch_size=cfg.batch_size, scaling_factor=scale,
    caption_dropout=base.caption_dropout, objective=objective,
)  # fmt: skip
if loss.weights is not None:
    print(f"near-color images: {int((loss.weights > 1).sum())} of {len(pool.captions)}", flush=True)
t = time.time()
trainer.run(loss)
trainer.ema.copy_to(model)
recipe = replace(base, refine_objective=objective)
export(recipe, sd.vae, model.eval(), scale, out / "model.safetensors")
print(f"{args.variant}: {args.steps} steps in {(time.time() - t) / 60:.1f} min", flush=True)
