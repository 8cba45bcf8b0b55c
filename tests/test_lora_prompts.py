"""<lora:NAME:TE:UNET> in prompts: parsing, folder lookup, pipeline and CLI, Lora hashes in the infotext."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from diffusekit.adapters.extra_networks import (
    LoraLibrary,
    lora_weights,
    parse_extra_networks,
    parse_hashes,
)
from diffusekit.adapters.keys import preferred_names
from diffusekit.adapters.lora import LoraError, load_lora
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.cli import main
from diffusekit.metadata import parse_infotext, read_infotext
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint


def test_tags_are_parsed_and_removed():
    text, calls = parse_extra_networks(
        "a cat <lora:style:0.5>, <lora:b:0.3:0.8> sitting <lyco:c:te=0.2:unet=0.4>"
    )
    assert text == "a cat ,  sitting "
    assert [c.name for c in calls] == ["style", "b", "c"]
    assert [lora_weights(c) for c in calls] == [(0.5, 0.5), (0.3, 0.8), (0.2, 0.4)]
    assert lora_weights(parse_extra_networks("<lora:x>")[1][0]) == (1.0, 1.0)
    for bad, msg in [("<lora:x:abc>", "not a number"), ("<lora:x:1:1:8>", "dyn"), ("<lora:x:foo=1>", "foo")]:
        with pytest.raises(LoraError, match=msg):
            lora_weights(parse_extra_networks(bad)[1][0])


def _random_lora(cfg, path, seed=0, rank=2):
    """A kohya file over every attention layer of the U-Net and text encoder, random down and up."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for target, name in preferred_names(cfg, "kohya").items():
        if target.kind != "linear":
            continue
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, _fan_in(cfg, target), generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(_fan_out(cfg, target), rank, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_state_dict(sd, path, metadata={"ss_output_name": "aliased"})
    return path


_SHAPES: dict = {}


def _shape(cfg, target):
    if cfg not in _SHAPES:
        from diffusekit.models.sd import StableDiffusion

        m = StableDiffusion(cfg, device="meta")
        comps = {k: mod for k, (_, mod) in m.components().items()}
        _SHAPES[cfg] = comps
    return _SHAPES[cfg][target.component].get_submodule(target.path).weight.shape


def _fan_in(cfg, target):
    return _shape(cfg, target)[1]


def _fan_out(cfg, target):
    return _shape(cfg, target)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lp")
    cfg, _, path = make_checkpoint("tiny_sd1", tmp)
    (tmp / "loras" / "sub").mkdir(parents=True)
    _random_lora(cfg, tmp / "loras" / "sub" / "style.safetensors")
    pipe = Pipeline.from_file(path, precision="fp32")
    pipe.loras = LoraLibrary(tmp / "loras")
    return pipe, path, tmp


def _pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


P = dict(steps=3, seed=7, width=64, height=64, sampler="euler")


def test_prompt_tag_equals_explicit_lora_and_leaves_base_untouched(setup):
    pipe, _, tmp = setup
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base = pipe.generate(GenerationParams(prompt="a red circle", **P))
    tagged = pipe.generate(GenerationParams(prompt="a red circle <lora:style:0.8:1.2>", **P))
    net = pipe.loras.get("style")
    explicit = pipe.generate(GenerationParams(prompt="a red circle", **P), loras=[(net, 0.8, 1.2)])
    again = pipe.generate(GenerationParams(prompt="a red circle", **P))
    zero = pipe.generate(GenerationParams(prompt="a red circle <lora:style:0>", **P))
    assert np.abs(_pixels(tagged) - _pixels(base)).max() > 10
    assert np.array_equal(_pixels(tagged), _pixels(explicit))
    assert np.array_equal(_pixels(base), _pixels(again)) and np.array_equal(_pixels(base), _pixels(zero))
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    info = parse_infotext(tagged.infotexts[0])
    assert tagged.infotexts[0].startswith("a red circle <lora:style:0.8:1.2>")  # A1111 keeps the tag
    assert parse_hashes(info["Lora hashes"]) == {"style": net.shorthash}
    assert "Lora hashes" not in parse_infotext(base.infotexts[0])


def test_addnet_hash_is_sha256_after_the_header(setup):
    _, _, tmp = setup
    path = tmp / "loras" / "sub" / "style.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert load_lora(path).shorthash == hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def test_alias_and_unknown_names(setup):
    pipe, _, _ = setup
    assert pipe.loras.get("aliased").path.name == "style.safetensors"  # ss_output_name
    with pytest.raises(LoraError, match="no LoRA named 'nope'.*style"):
        pipe.generate(GenerationParams(prompt="x <lora:nope:1>", **P))
    with pytest.raises(LoraError, match="unsupported extra network"):
        pipe.generate(GenerationParams(prompt="x <hypernet:h:1>", **P))


def test_cli_generate_with_loras_and_info_reads_hashes(setup, capsys):
    _, path, tmp = setup
    out = tmp / "cli.png"
    argv = ["generate", "a blue square <lora:style:1>", "--model", str(path), "--loras", str(tmp / "loras"),
            "--steps", "2", "--seed", "1", "-o", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parse_hashes(parsed["Lora hashes"]) == {
        "style": load_lora(tmp / "loras/sub/style.safetensors").shorthash
    }
    assert "<lora:style:1>" in read_infotext(out)
    assert main(argv[:1] + ["x <lora:style:1>", "--model", str(path), "-o", str(out)]) == 2
    assert "no LoRA folder" in capsys.readouterr().err
