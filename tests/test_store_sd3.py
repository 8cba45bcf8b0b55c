"""Model store with SD3/SD3.5: components (mmdit, vae, clip_l, clip_g, t5xxl) shared between fine-tunes,
export round trips (single file and diffusers folder), golden checks, promote/rollback, flipped weights,
and generate through the store equal to generate from the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.checkpoints.hashes import sha256_file
from diffusekit.checkpoints.sd3_diffusers import read_sd3_diffusers_folder
from diffusekit.checkpoints.single_file import load_state_dict, save_state_dict
from diffusekit.cli import main
from diffusekit.store import ModelStore, StoreError
from diffusekit.store.audit import diff, du, export, verify
from store_helpers import fine_tune, flip_bit, one_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("sentencepiece")

SD3_KEYS = ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")


def _spiece(path: Path) -> Path:
    return path.with_suffix(".spiece.model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd35")
    base = d / "base.safetensors"
    assert main(["create", "tiny_sd35", str(base), "--seed", "1"]) == 0
    ft = fine_tune(base, d / "ft.safetensors", scale=0.05)  # the MMDiT perturbed, the rest byte-identical
    shutil.copyfile(_spiece(base), _spiece(ft))
    return {"dir": d, "base": base, "ft": ft}


def _blobs(v) -> dict[str, str]:
    return {c["name"]: c["blob"] for c in v.manifest["components"]}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_two_sd35_fine_tunes_share_vae_and_text_encoders(tmp_path, files, capsys):
    store = ModelStore(tmp_path / "store")
    v1 = store.add(files["base"], "s", golden=False)
    v2 = store.add(files["ft"], "s", golden=False, note="MMDiT fine-tune")
    b1, b2 = _blobs(v1), _blobs(v2)
    assert set(b1) == set(SD3_KEYS) and v1.manifest["family"] == "sd3"
    assert all(b1[k] == b2[k] for k in ("vae", "clip_l", "clip_g", "t5xxl")) and b1["mmdit"] != b2["mmdit"]
    report = du(store)
    # base = what the user had on disk (the file and its T5 tokenizer); the fine-tune adds its MMDiT only
    base = files["base"].stat().st_size + _spiece(files["base"]).stat().st_size
    expect = base + store.blobs.size(b2["mmdit"])
    assert report["logical_bytes"] > 1.8 * expect / 1.05  # each version counted whole
    assert abs(report["physical_bytes"] - expect) < 0.01 * expect, (report["physical_bytes"], expect)
    by_ref = {v["ref"]: v for v in report["versions"]}
    assert by_ref["s@2"]["components"]["t5xxl"]["shared_with"] == ["s@1"]
    assert by_ref["s@2"]["components"]["mmdit"]["shared_with"] == []
    d = {c["component"]: c for c in diff(store, "s@1", "s@2")["components"]}
    assert all(d[k]["status"] == "identical" for k in ("vae", "clip_l", "clip_g", "t5xxl"))
    assert d["mmdit"]["status"] == "differs" and 0 < d["mmdit"]["relative_change"] < 1
    card = v2.card()
    assert card["family"] == "sd3" and card["prediction"] == "flow" and card["parent"] == "s@1"
    assert card["sd3"] == {"shift": 3.0, "t5_max_length": 16, "text_encoders": ["clip_l", "clip_g", "t5xxl"],
                           "t5_tokenizer": True, "qk_norm": True, "mmdit_depth": 3,
                           "mmdit_x_layers": 2}  # fmt: skip
    comps = {c["name"]: c for c in card["components"]}
    assert comps["t5xxl"]["parameters"] > 0 and comps["mmdit"]["tensor_bytes"] > 0
    assert main(["models", "show", "s@2", "--store", str(store.root)]) == 0
    shown = capsys.readouterr().out
    assert "sd3          shift 3.0, T5 length 16" in shown and "t5xxl" in shown
    assert main(["models", "du", "--store", str(store.root)]) == 0
    assert "t5xxl=s@1" in capsys.readouterr().out
    # lost blobs (the fine-tune's MMDiT, the shared T5 tokenizer) are named, and repair restores them
    spiece = v2.manifest["layout"]["t5_tokenizer_blob"]
    for digest in (b2["mmdit"], spiece):
        store.blobs.path(digest).unlink()
    report = verify(store)
    assert not report["ok"] and report["broken_versions"] == ["s@1", "s@2"]
    restored = store.repair(files["ft"])
    assert sorted(restored["restored_blobs"]) == sorted([b2["mmdit"], spiece]) and verify(store)["ok"]


def test_export_round_trips_and_folders_dedupe(tmp_path, files):
    store = ModelStore(tmp_path / "store")
    v = store.add(files["ft"], "s", golden=False)
    out = export(store, "s@1", tmp_path / "out.safetensors")
    assert out["identical_file"] and out["sha256"] == sha256_file(files["ft"])
    assert _spiece(tmp_path / "out.safetensors").read_bytes() == _spiece(files["ft"]).read_bytes()
    folder = tmp_path / "folder"
    export(store, "s@1", folder, fmt="diffusers")
    sd, cfg = read_sd3_diffusers_folder(folder)
    original, _ = load_state_dict(files["ft"])
    assert _equal(dict(sd), dict(original)) and cfg == v.config
    # the exported folder added back: every component is the same blob (stored once), tokenizer too
    v2 = store.add(folder, "s", golden=False)
    assert _blobs(v2) == _blobs(v) and v2.manifest["source_file"]["format"] == "diffusers folder"
    assert v2.manifest["layout"]["t5_tokenizer_blob"] == v.manifest["layout"]["t5_tokenizer_blob"]
    again = export(store, "s@2", tmp_path / "again.safetensors")
    assert not again["identical_file"]  # a fresh file (the folder had no original header) ...
    assert _equal(load_state_dict(tmp_path / "again.safetensors")[0], dict(original))  # ... same tensors


def test_without_text_encoders_and_with_separate_ones(tmp_path, files):
    sd, meta = load_state_dict(files["base"])
    bare = {k: v for k, v in sd.items() if not k.startswith("text_encoders.")}
    encoders = {k: v for k, v in sd.items() if k.startswith("text_encoders.")}
    save_state_dict(bare, tmp_path / "bare.safetensors", metadata=meta)
    save_state_dict(encoders, tmp_path / "enc.safetensors")
    store = ModelStore(tmp_path / "store")
    v1 = store.add(tmp_path / "bare.safetensors", "bare")  # nothing to render golden images with
    assert set(_blobs(v1)) == {"mmdit", "vae"} and v1.golden is None
    assert any("no golden images" in n for n in v1.manifest["stored"]["notes"])
    with pytest.raises(StoreError, match="cannot be written as a diffusers folder"):
        export(store, "bare@1", tmp_path / "nofolder", fmt="diffusers")
    assert not (tmp_path / "nofolder").exists()
    whole = store.add(files["base"], "whole", golden=False)
    shutil.copyfile(_spiece(files["base"]), _spiece(tmp_path / "bare.safetensors"))
    enc = (tmp_path / "enc.safetensors",)
    v2 = store.add(tmp_path / "bare.safetensors", "bare", golden=False, text_encoders=enc)
    assert _blobs(v2) == _blobs(whole) and not v2.manifest["stored"]["exact_export"]
    with pytest.raises(StoreError, match="--prune applies to U-Net checkpoints"):
        store.add(files["base"], "x", prune=True)
    half = store.add(files["base"], "half", golden=False, fp16=True)
    assert all(c["dtypes"] == {"fp16": c["parameters"]} for c in half.manifest["components"])
    assert not half.manifest["stored"]["exact_export"] and half.config == whole.config


def _render(args: list[str], out: Path) -> np.ndarray:
    cmd = ["generate", "a red circle", *args, "--seed", "5", "--steps", "3", "--cfg", "2", "-o", str(out)]
    assert main([*cmd, "--width", "64", "--height", "64"]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def test_golden_promote_rollback_flip_and_generate(tmp_path, files, capsys):
    root = tmp_path / "store"
    assert main(["models", "add", str(files["base"]), "--name", "s", "--store", str(root)]) == 0
    assert main(["models", "add", str(files["ft"]), "--name", "s", "--store", str(root)]) == 0
    store = ModelStore(root)
    assert [len(store.get(f"s@{i}").golden.images) for i in (1, 2)] == [3, 3]
    capsys.readouterr()
    assert main(["models", "check", "s@1", "--store", str(root)]) == 0
    assert "s@1: golden check passed" in capsys.readouterr().out
    # generate through the store == generate from the file, for both versions
    for ref, path in (("s@1", files["base"]), ("s@2", files["ft"])):
        via_store = _render(["--model", ref, "--store", str(root)], tmp_path / f"{ref}.png")
        from_file = _render(["--model", str(path)], tmp_path / f"{path.stem}.png")
        assert via_store.std() > 1 and np.array_equal(via_store, from_file)
    assert main(["models", "promote", "s@2", "--store", str(root)]) == 0  # its golden check passes
    assert store.get("s").version == 2
    assert main(["models", "rollback", "s", "--store", str(root)]) == 0
    assert store.get("s").version == 1
    before = _render(["--model", "s", "--store", str(root)], tmp_path / "before.png")
    # one flipped exponent bit in s@2's MMDiT: verify and check name s@2, promote refuses it
    mmdit = store.blobs.path(_blobs(store.get("s@2"))["mmdit"])
    flip_bit(mmdit, "final_layer.linear.weight", index=3)
    capsys.readouterr()
    assert main(["models", "verify", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "breaks s@2" in out and "s@1" not in out.split("breaks")[1]
    assert verify(store)["broken_versions"] == ["s@2"]
    assert main(["models", "check", "s@2", "--store", str(root)]) == 1
    assert "s@2: golden check FAILED" in capsys.readouterr().out
    assert main(["models", "promote", "s@2", "--store", str(root)]) == 2
    assert "s@2 fails its golden check" in capsys.readouterr().err
    # s@1 (current) is untouched: same pixels as before the flip
    assert np.array_equal(_render(["--model", "s", "--store", str(root)], tmp_path / "after.png"), before)


def test_golden_renders_of_big_sd3_models_fall_back_to_bf16():
    from diffusekit.models.sd3 import StableDiffusion3
    from diffusekit.models.sd3_configs import SD35_LARGE, TINY_SD35
    from diffusekit.store.sd3 import golden_dtype

    def params(cfg, **kw) -> int:
        return sum(p.numel() for p in StableDiffusion3(cfg, device="meta", **kw).parameters())

    assert golden_dtype(params(TINY_SD35)) == torch.float32
    assert golden_dtype(params(SD35_LARGE)) == torch.bfloat16  # ~45 GB in fp32 with T5-XXL
    assert golden_dtype(params(SD35_LARGE, with_t5=False, with_clip=False)) == torch.bfloat16
