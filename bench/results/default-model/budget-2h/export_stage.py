"""Reproduces: the 2-hour scaled recipe's model in this folder (`diffusekit train --scale 0.25`).

Export a scaled recipe's run at the end of one U-Net stage (EMA weights), as run_recipe exports.

Usage: python export_stage.py RUN_DIR STAGE OUT.safetensors SCALE
Used for the 2-hour budget run (`diffusekit train --scale 0.25`, stopped after stage 2b): the docs'
"How the default model was made", "What the recipe costs". With STAGE "refine" the file's recipe
metadata has no polish cycles.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.models.clip import build_text_encoder
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL
from diffusekit.train.loop import TrainConfig, Trainer
from diffusekit.train.objectives import TextToLatent, latent_scale
from diffusekit.train.recipe import Recipe, export, latent_pool


def load_ema(name: str, module: torch.nn.Module, cfg: TrainConfig, run: Path) -> None:
    """The stage's checkpoint in `run` with its EMA weights copied in, as run_recipe ends a stage."""
    trainer = Trainer(name, module, cfg, run)
    if not trainer.resume() or trainer.state.step != cfg.steps:
        raise SystemExit(
            f"{trainer.checkpoint_path} is missing or not at the stage's end ({cfg.steps} steps)"
        )
    trainer.ema.copy_to(module)


def main() -> None:
    run, stage, out, factor = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    recipe = Recipe().scaled(factor)
    if stage == "refine":
        recipe = replace(recipe, ldm_polish=())
    vae = AutoencoderKL(recipe.model.vae)
    load_ema("vae", vae, recipe.vae, run)
    scale = latent_scale(latent_pool(recipe, vae, run, resume=True))  # the run's saved pool
    ldm = TextToLatent(UNetModel(recipe.model.unet), build_text_encoder(recipe.model.text_encoders[0]))
    load_ema(stage, ldm, {n: c for n, c, _ in recipe.stages()}[stage], run)
    export(recipe, vae.eval(), ldm.eval(), scale, out)
    print(f"wrote {out} (latent scale {scale})")


if __name__ == "__main__":
    main()
