"""Per-model recommended generation settings: read from the file, used where the user says nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.convert import convert_checkpoint
from diffusekit.checkpoints.inspect import inspect_checkpoint
from diffusekit.checkpoints.load import checkpoint_metadata
from diffusekit.checkpoints.single_file import load_state_dict, save_state_dict
from diffusekit.cli import main
from diffusekit.metadata import parse_infotext
from diffusekit.params import GenerationParams, ModelDefaults, ParamError
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

KEY = ModelDefaults.METADATA_KEY


def test_missing_entry_means_a1111_defaults():
    d = ModelDefaults.from_metadata({})
    assert (d.steps, d.cfg_scale, d.sampler, d.schedule) == (20, 7.0, "DPM++ 2M", "automatic")
    assert d.overrides() == {} and d.to_metadata() == {}


def test_entry_sets_only_the_fields_it_names():
    d = ModelDefaults.from_metadata({KEY: '{"cfg_scale": 2, "sampler": "Euler a"}'})
    assert d == ModelDefaults(cfg_scale=2, sampler="Euler a")
    assert d.overrides() == {"cfg_scale": 2, "sampler": "Euler a"}
    assert ModelDefaults.from_metadata(d.to_metadata()) == d


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", r"m\.safetensors: bad diffusekit\.defaults metadata"),
        ("[2]", "not a JSON object"),
        ('{"guidance": 2}', r"unknown field\(s\) guidance; valid: steps, cfg_scale, sampler, schedule"),
        ('{"cfg_scale": 99}', r"default cfg_scale=99 is out of range; valid: 0\.0\.\.30\.0"),
        ('{"steps": 2.5}', r"default steps=2\.5 is out of range; valid: 1\.\.150"),
        ('{"cfg_scale": "2"}', "default cfg_scale='2'"),
        ('{"sampler": "Euler b"}', r"unknown sampler 'Euler b'; valid: .*euler_a \('Euler a'\)"),
        ('{"schedule": "sideways"}', r"unknown schedule type 'sideways'; valid: normal, karras"),
    ],
)
def test_bad_entry_names_the_file_field_and_what_is_valid(text, message):
    with pytest.raises(ParamError, match=message):
        ModelDefaults.from_metadata({KEY: text}, "m.safetensors")


def test_validate_fills_what_is_left_unset_and_keeps_what_is_given():
    d = ModelDefaults(steps=8, cfg_scale=2.5, sampler="Euler", schedule="karras")
    filled = GenerationParams(cfg_scale=4.0).validate(64, d)
    assert (filled.steps, filled.cfg_scale, filled.sampler, filled.schedule) == (8, 4.0, "Euler", "karras")
    plain = GenerationParams().validate(64)
    assert (plain.steps, plain.cfg_scale, plain.sampler, plain.schedule) == (20, 7.0, "DPM++ 2M", "automatic")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random tiny model twice: without and with a recommendation of 6 steps at CFG 2.5."""
    tmp = tmp_path_factory.mktemp("defaults")
    cfg, sd, plain = make_checkpoint("tiny_sd1", tmp)
    recommending = tmp / "recommending.safetensors"
    meta = checkpoint_metadata(cfg, ModelDefaults(steps=6, cfg_scale=2.5).to_metadata())
    save_state_dict(sd, recommending, metadata=meta)
    return plain, recommending


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im) for im in result.images])


def test_generation_uses_the_files_recommendation(files):
    plain, recommending = files
    pipe = Pipeline.from_file(recommending)
    assert pipe.defaults == ModelDefaults(steps=6, cfg_scale=2.5)
    implied = pipe.generate(GenerationParams(prompt="a red circle", seed=3))
    info = parse_infotext(implied.infotexts[0])
    assert (info["Steps"], info["CFG scale"]) == ("6", "2.5")
    # the same image as asking for those settings from the file that recommends nothing
    spelled = Pipeline.from_file(plain).generate(
        GenerationParams(prompt="a red circle", seed=3, steps=6, cfg_scale=2.5)
    )
    assert np.array_equal(_pixels(implied), _pixels(spelled))
    # and what the user asks for wins
    asked = pipe.generate(GenerationParams(prompt="a red circle", seed=3, cfg_scale=7.0))
    assert parse_infotext(asked.infotexts[0])["CFG scale"] == "7"
    assert not np.array_equal(_pixels(asked), _pixels(implied))


def test_cli_generate_takes_the_recommendation_unless_told(files, tmp_path, capsys):
    _, recommending = files
    base = ["generate", "a red circle", "--model", str(recommending), "--seed", "1", "--json"]
    assert main([*base, "-o", str(tmp_path / "a.png")]) == 0
    info = parse_infotext(json.loads(capsys.readouterr().out)["infotexts"][0])
    assert (info["Steps"], info["CFG scale"], info["Sampler"]) == ("6", "2.5", "DPM++ 2M")
    assert main([*base, "--cfg", "5", "--steps", "3", "-o", str(tmp_path / "b.png")]) == 0
    info = parse_infotext(json.loads(capsys.readouterr().out)["infotexts"][0])
    assert (info["Steps"], info["CFG scale"]) == ("3", "5")


def test_inspect_shows_and_convert_keeps_the_recommendation(files, tmp_path, capsys):
    plain, recommending = files
    assert inspect_checkpoint(recommending, hashes=False).recommended == {"steps": 6, "cfg_scale": 2.5}
    assert inspect_checkpoint(plain, hashes=False).recommended == {}
    assert main(["inspect", str(recommending)]) == 0
    assert "recommends  steps 6, cfg_scale 2.5" in capsys.readouterr().out
    out = tmp_path / "fp16.safetensors"
    convert_checkpoint(recommending, out, dtype=torch.float16)
    assert json.loads(load_state_dict(out)[1][KEY]) == {"steps": 6, "cfg_scale": 2.5}
    folder = convert_checkpoint(recommending, tmp_path / "folder", fmt="diffusers")
    assert any("no place for the recommended {'steps': 6, 'cfg_scale': 2.5}" in n for n in folder["notes"])


def test_a_file_with_a_bad_entry_does_not_load(files, tmp_path):
    _, recommending = files
    sd, meta = load_state_dict(recommending)
    bad = tmp_path / "bad.safetensors"
    save_state_dict(dict(sd), bad, metadata=meta | {KEY: '{"cfg_scale": -1}'})
    with pytest.raises(ParamError, match=r"bad\.safetensors: bad diffusekit\.defaults metadata"):
        Pipeline.from_file(bad)


def test_cli_eval_records_the_settings_it_used(files, tmp_path, capsys, monkeypatch):
    from diffusekit.eval import geneval

    every = geneval.eval_prompts("train")
    first = [next(p for p in every if p.category == c) for c in geneval.CATEGORIES]  # keep it quick
    monkeypatch.setattr(geneval, "eval_prompts", lambda prompt_set: tuple(first))
    _, recommending = files
    report = tmp_path / "eval.json"
    args = [
        "eval",
        str(recommending),
        "--images-per-prompt",
        "1",
        "--prompts",
        "train",
        "--json",
        str(report),
    ]
    assert main([*args, "--cfg-rescale", "0.7"]) == 0
    settings = json.loads(report.read_text())["settings"]
    assert (settings["steps"], settings["cfg_scale"], settings["cfg_rescale"]) == (6, 2.5, 0.7)
    assert "CFG rescale 0.7" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(report.read_text())["settings"]["cfg_rescale"] == 0.0
