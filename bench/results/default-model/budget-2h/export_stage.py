"""Export a scaled recipe's run at the end of one U-Net stage (EMA weights), as run_recipe exports.

Usage: python export_stage.py RUN_DIR STAGE OUT.safetensors SCALE
Used for the 2-hour budget run (`diffusekit train --scale 0.25`, stopped after stage 2b): the README's
"A recipe sized to two hours". With STAGE "refine" the file's recipe metadata has no polish cycles.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.models.clip import build_text_encoder
from diffusekit.models.unet import UNetModel
from diffusekit.models.vae import AutoencoderKL
from diffusekit.train.objectives import LatentPool, TextToLatent, latent_scale
from diffusekit.train.recipe import Recipe, export


def load_ema(module: torch.nn.Module, checkpoint: Path, steps: int) -> None:
    """The trainer checkpoint's weights with its EMA copied over them (Trainer.ema.copy_to)."""
    ck = torch.load(checkpoint, weights_only=True)
    if ck["step"] != steps:
        raise SystemExit(f"{checkpoint} is at step {ck['step']}, not at the stage's end ({steps})")
    module.load_state_dict(ck["module"])
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ck["ema"]:
                p.copy_(ck["ema"][name])


def main() -> None:
    run, stage, out, factor = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    recipe = Recipe().scaled(factor)
    if stage == "refine":
        recipe = replace(recipe, ldm_polish=())
    vae = AutoencoderKL(recipe.model.vae)
    load_ema(vae, run / "vae.train.pt", recipe.vae.steps)
    saved = torch.load(run / "latents.pt", weights_only=True)
    scale = latent_scale(LatentPool(saved["moments"], saved["captions"]))
    ldm = TextToLatent(UNetModel(recipe.model.unet), build_text_encoder(recipe.model.text_encoders[0]))
    load_ema(ldm, run / f"{stage}.train.pt", {n: c.steps for n, c, _ in recipe.stages()}[stage])
    export(recipe, vae.eval(), ldm.eval(), scale, out)
    print(f"wrote {out} (latent scale {scale})")


if __name__ == "__main__":
    main()
