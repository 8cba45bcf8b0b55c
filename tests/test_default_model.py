"""The bundled default model: what `Recipe()` trains, loadable like any checkpoint, within its size."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields, is_dataclass, replace

from safetensors import safe_open

from diffusekit.checkpoints.detect import CONFIG_METADATA_KEY
from diffusekit.cli_generate import default_model_path
from diffusekit.models.configs import ModelConfig
from diffusekit.params import ModelDefaults
from diffusekit.train.recipe import Recipe


def _metadata() -> dict[str, str]:
    with safe_open(str(default_model_path()), framework="pt") as f:
        return f.metadata()


def _without_later_defaults(obj, written):
    """`obj` as JSON, leaving out config fields added after `written` was saved, provided each still has
    its default (so the recipe is unchanged in substance); a changed new field stays and fails below."""
    if is_dataclass(obj) and isinstance(written, dict):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            default = f.default if f.default is not MISSING else MISSING
            if f.name not in written and default is not MISSING and value == default:
                continue
            out[f.name] = _without_later_defaults(value, written.get(f.name))
        return out
    if isinstance(obj, tuple | list) and isinstance(written, list):
        return [_without_later_defaults(v, w) for v, w in zip(obj, written + [None] * len(obj), strict=False)]
    return json.loads(json.dumps(asdict(obj) if is_dataclass(obj) else obj, default=str))


def test_bundled_model_is_what_the_default_recipe_trains():
    """`diffusekit train` (Recipe()) must describe the shipped file, not an older or newer recipe."""
    written = json.loads(_metadata()["diffusekit.recipe"])
    assert written == _without_later_defaults(Recipe(), written)


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
