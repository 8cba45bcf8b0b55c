"""Checkpoint merging: A1111's weighted sum and add difference checked against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch

from diffusekit.checkpoints.merge import merge_state_dicts
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, read_safetensors_header
from diffusekit.cli import main
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    out = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        sub = tmp / name
        sub.mkdir()
        _, sd, path = make_checkpoint("tiny_sd1", sub, seed=seed)
        out[name] = (sd, path)
    _, sd, path = make_checkpoint("tiny_sd1_inpaint", tmp, seed=3)
    out["inpaint"] = (sd, path)
    return tmp, out


def test_weighted_sum_cli(models):
    tmp, m = models
    (a, pa), (b, pb) = m["a"], m["b"]
    out = tmp / "ws.safetensors"
    assert main(["merge", str(pa), str(pb), "--alpha", "0.3", "-o", str(out)]) == 0
    got = load_state_dict(out)[0]
    assert got.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(got[k], 0.7 * a[k] + 0.3 * b[k], rtol=1e-6, atol=1e-6, msg=k)
    recipe = json.loads(read_safetensors_header(out)[1]["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.3
    assert len(json.loads(read_safetensors_header(out)[1]["sd_merge_models"])) == 2


def test_add_difference_cli_and_missing_c_keys(models):
    tmp, m = models
    (a, pa), (b, pb), (c, pc) = m["a"], m["b"], m["c"]
    out = tmp / "ad.safetensors"
    argv = [
        "merge",
        str(pa),
        str(pb),
        str(pc),
        "--method",
        "add-difference",
        "--alpha",
        "0.8",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    got = load_state_dict(out)[0]
    for k in a:
        torch.testing.assert_close(got[k], a[k] + 0.8 * (b[k] - c[k]), rtol=1e-5, atol=1e-5, msg=k)
    key = next(iter(c))
    partial = {k: v for k, v in c.items() if k != key}
    direct = merge_state_dicts(a, b, partial, 0.8, "add-difference")
    assert torch.equal(direct[key], a[key])  # C lacks the key: B - C counts as zero


def test_inpaint_a_merges_latent_channels_only(models):
    _, m = models
    (a, _), (b, _) = m["inpaint"], m["b"]
    got = merge_state_dicts(a, b, None, 0.5, "weighted-sum")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(got[key][:, :4], 0.5 * a[key][:, :4] + 0.5 * b[key], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[key][:, 4:], a[key][:, 4:])
    with pytest.raises(CheckpointError, match="inpainting model must be A"):
        merge_state_dicts(b, a, None, 0.5, "weighted-sum")
    with pytest.raises(CheckpointError, match="third model"):
        merge_state_dicts(a, b, None, 0.5, "add-difference")
