"""The bundled default model: what `Recipe()` trains, loadable like any checkpoint, within its size."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from safetensors import safe_open

from diffusekit.checkpoints.detect import CONFIG_METADATA_KEY
from diffusekit.cli_generate import default_model_path
from diffusekit.models.configs import ModelConfig
from diffusekit.params import ModelDefaults
from diffusekit.train.recipe import Recipe


def _metadata() -> dict[str, str]:
    with safe_open(str(default_model_path()), framework="pt") as f:
        return f.metadata()


def test_bundled_model_is_what_the_default_recipe_trains():
    """`diffusekit train` (Recipe()) must describe the shipped file, not an older or newer recipe."""
    written = json.loads(_metadata()["diffusekit.recipe"])
    assert written == json.loads(json.dumps(asdict(Recipe()), default=str))


def test_bundled_model_config_is_the_default_preset_with_its_measured_latent_scale():
    cfg = ModelConfig.from_json(_metadata()[CONFIG_METADATA_KEY])
    recipe = Recipe()
    assert cfg == replace(recipe.model, vae=replace(recipe.model.vae, scaling_factor=cfg.vae.scaling_factor))
    assert cfg.vae.scaling_factor != 1.0  # measured by the recipe, not the preset's placeholder


def test_bundled_model_fits_the_size_budget():
    assert default_model_path().stat().st_size <= 30 * 2**20


def test_bundled_model_recommends_the_recipes_generation_settings():
    """`diffusekit generate` / `eval` without flags sample the default model at the recipe's CFG."""
    assert ModelDefaults.from_metadata(_metadata()) == Recipe().recommended != ModelDefaults()
