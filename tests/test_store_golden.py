"""Golden-image checks: pass on unchanged weights and code, fail on a flipped weight or changed sampler
arithmetic (naming the version), promote refuses a failing version, rollback restores identical images."""

from __future__ import annotations

import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.checkpoints.hashes import sha256_file
from diffusekit.cli import main
from diffusekit.cli_generate import default_model_path
from diffusekit.diffusion import samplers
from diffusekit.metadata import read_infotext
from diffusekit.params import GenerationParams
from diffusekit.store import ModelStore, StoreError
from diffusekit.store.audit import verify
from store_helpers import create_tiny, fine_tune, flip_bit, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    base = create_tiny(d / "base.safetensors")
    return {"base": base, "ft": fine_tune(base, d / "ft.safetensors", scale=0.05)}


@pytest.fixture(scope="module")
def template(tmp_path_factory, files):
    """A store with m@1 (base) and m@2 (U-Net fine-tune), goldens recorded; each test gets a copy."""
    root = tmp_path_factory.mktemp("template") / "store"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s = ModelStore(root)
    s.add(files["base"], "m")
    s.add(files["ft"], "m")
    torch.set_num_threads(before)
    return root


@pytest.fixture
def store(tmp_path, template):
    shutil.copytree(template, tmp_path / "store")
    return ModelStore(tmp_path / "store")


def _render(store: ModelStore, ref: str) -> bytes:
    pipe = store.pipeline(ref, precision="fp32")
    image = pipe.generate(GenerationParams(prompt="a blue ball", seed=5, steps=6, sampler="Euler")).images[0]
    return np.asarray(image).tobytes()


def test_check_passes_on_unchanged_weights(store, capsys):
    v = store.get("m@1")
    assert len(v.golden.images) == 3 and v.golden.min_psnr == 50.0
    report = store.check("m@1")
    assert report["passed"] and all(i["identical"] and i["max_diff"] == 0 for i in report["images"])
    assert main(["models", "check", "m@2", "--store", str(store.root)]) == 0
    assert "golden check passed" in capsys.readouterr().out


def test_flipped_weight_fails_check_and_verify(store, capsys):
    unet = next(c["blob"] for c in store.get("m@2").manifest["components"] if c["name"] == "unet")
    flip_bit(store.blobs.path(unet), "out.2.weight", index=7, bit=30)  # an exponent bit of one weight
    report = store.check("m@2")
    assert not report["passed"] and report["ref"] == "m@2"
    assert all(i["psnr"] is not None and i["psnr"] < 20 for i in report["images"])
    assert store.check("m@1")["passed"]  # the other version shares no U-Net bytes with it
    assert verify(store)["broken_versions"] == ["m@2"]
    assert main(["models", "check", "m@2", "--store", str(store.root)]) == 1
    assert "m@2: golden check FAILED" in capsys.readouterr().out


def _scaled_euler(fn, factor):
    def sample(denoiser, x, sigmas, **kw):  # a test double: Euler on a denoiser output off by `factor`
        return fn(lambda x, s, **k: denoiser(x, s, **k) * factor, x, sigmas, **kw)

    return sample


def _warped_euler(fn, factor):
    def sample(denoiser, x, sigmas, **kw):  # a test double: the late sigmas warped by up to `factor`
        return fn(denoiser, x, sigmas * torch.linspace(1.0, factor, len(sigmas)), **kw)

    return sample


def test_changed_sampler_arithmetic_fails_and_promote_refuses(store, monkeypatch):
    spec = samplers.SAMPLERS["euler"]
    monkeypatch.setitem(samplers.SAMPLERS, "euler", dataclasses.replace(spec, fn=_scaled_euler(spec.fn, 1.1)))
    report = store.check("m@2")
    assert not report["passed"]
    assert min(i["psnr"] for i in report["images"]) < 50  # measured: about 44 dB
    with pytest.raises(StoreError, match="m@2 fails its golden check"):
        store.promote("m@2")
    assert store.get("m").version == 1  # nothing switched
    monkeypatch.setitem(samplers.SAMPLERS, "euler", spec)
    assert store.promote("m@2")["check"]["passed"]


def test_rollback_restores_identical_images(store):
    before = _render(store, "m")
    store.promote("m@2", force=True, reason="try the fine-tune")
    assert _render(store, "m") != before
    store.rollback("m")
    assert _render(store, "m") == before


def test_record_replaces_goldens_and_generate_resolves_names(store, tmp_path, capsys):
    old = store.get("m@1").golden
    assert (
        main(["models", "check", "m@1", "--record", "--reason", "new code", "--store", str(store.root)]) == 0
    )
    new = store.get("m@1").golden
    assert [g.fingerprint for g in new.images] == [
        g.fingerprint for g in old.images
    ]  # same code, same pixels
    assert store.history("m")[-1]["action"] == "golden"
    out = tmp_path / "gen.png"
    args = ["generate", "a red cube", "--model", "m@2", "--store", str(store.root), "--steps", "3"]
    assert main([*args, "--seed", "1", "--out", str(out), "--precision", "fp32"]) == 0
    info = read_infotext(Image.open(out))
    assert "Model: m@2" in info and f"Model hash: {store.get('m@2').autov2}" in info
    capsys.readouterr()
    assert main(["generate", "x", "--model", "nosuch@1", "--store", str(store.root), "--out", str(out)]) == 2
    assert "no model named 'nosuch'" in capsys.readouterr().err


def test_default_model_is_default_at_1_and_its_check_catches_a_warped_sampler(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSEKIT_HOME", str(tmp_path / "home"))
    with ThreadPoolExecutor(2) as pool:  # two first uses at once seed it once
        list(pool.map(lambda _: ModelStore(None, seed_default=True), range(2)))
    assert main(["models", "list"]) == 0  # the per-user store starts with the bundled model
    autov2 = sha256_file(default_model_path())[:10]
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"default@1  sd1  AutoV2 {autov2}  versions: 1  ")
    store = ModelStore(tmp_path / "home" / "models")
    assert [h["action"] for h in store.history("default")] == ["add"]
    assert store.check("default")["passed"]
    spec = samplers.SAMPLERS["euler"]
    monkeypatch.setitem(samplers.SAMPLERS, "euler", dataclasses.replace(spec, fn=_warped_euler(spec.fn, 0.9)))
    report = store.check("default@1")
    assert not report["passed"]
    assert min(i["psnr"] for i in report["images"]) < 50  # measured: 42-54 dB, max diff up to 30
