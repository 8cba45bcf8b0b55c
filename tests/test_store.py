"""Model store: versions, dedup, du, export round trips, promote/rollback, rm/gc, verify, errors, CLI."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest
import torch

from diffusekit.checkpoints.hashes import sha256_file
from diffusekit.checkpoints.load import read_checkpoint
from diffusekit.checkpoints.single_file import load_state_dict
from diffusekit.cli import main
from diffusekit.store import ModelStore, Ref, StoreError
from diffusekit.store.audit import diff, du, export, verify
from store_helpers import create_tiny, fine_tune, flip_bit, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    base = create_tiny(d / "base.safetensors")
    return {
        "dir": d,
        "base": base,
        "ft": fine_tune(base, d / "ft.safetensors", seed=1),
        "ft2": fine_tune(base, d / "ft2.safetensors", seed=2),
    }


def _two_versions(tmp_path, files) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.add(files["base"], "m", golden=False, note="base", license="CC0")
    store.add(files["ft"], "m", golden=False, note="fine-tune", source="https://example.invalid/ft")
    return store


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_add_list_show_history_and_dedup(tmp_path, files):
    store = _two_versions(tmp_path, files)
    assert store.names() == ["m"]
    [row] = store.list()
    assert (
        row["versions"] == [1, 2] and row["current"] == 1
    )  # the first version stays current until a promote
    v1, v2 = store.get("m@1"), store.get("m@2")
    assert store.get("m").version == 1 and v1.current and not v2.current
    assert v2.parent == "m@1" and v2.note == "fine-tune" and v1.license == "CC0"
    assert v2.manifest["source_file"]["sha256"] == sha256_file(files["ft"])
    assert v2.card()["original"]["autov2"] == sha256_file(files["ft"])[:10]
    c1 = {c["name"]: c["blob"] for c in v1.manifest["components"]}
    c2 = {c["name"]: c["blob"] for c in v2.manifest["components"]}
    assert set(c1) == {"unet", "vae", "text_encoder"}
    assert c1["vae"] == c2["vae"] and c1["text_encoder"] == c2["text_encoder"] and c1["unet"] != c2["unet"]
    assert [h["action"] for h in store.history("m")] == ["add", "add"]

    report = du(store)
    base_bytes = files["base"].stat().st_size
    unet2 = store.blobs.size(c2["unet"])
    # the shared VAE and text encoder are stored once: physical = base + the second U-Net, within 1%
    assert report["physical_tensor_bytes"] < report["logical_tensor_bytes"]
    assert abs(report["physical_tensor_bytes"] - (base_bytes + unet2)) < 0.01 * (base_bytes + unet2)
    assert abs(report["physical_bytes"] - (base_bytes + unet2)) < 0.01 * (base_bytes + unet2)
    by_ref = {v["ref"]: v for v in report["versions"]}
    assert by_ref["m@2"]["adds"] == by_ref["m@2"]["unique"] >= unet2
    assert by_ref["m@2"]["adds"] < 0.5 * by_ref["m@2"]["logical"]
    assert by_ref["m@2"]["components"]["vae"]["shared_with"] == ["m@1"]

    d = {c["component"]: c for c in diff(store, "m@1", "m@2")["components"]}
    assert d["vae"]["status"] == d["text_encoder"]["status"] == "identical"
    assert d["unet"]["status"] == "differs" and 0 < d["unet"]["relative_change"] < 1
    assert d["unet"]["tensors_changed"] == d["unet"]["tensors_compared"]


def test_export_round_trips(tmp_path, files):
    store = _two_versions(tmp_path, files)
    out = export(store, "m@2", tmp_path / "out.safetensors")
    assert out["identical_file"] and out["sha256"] == sha256_file(
        files["ft"]
    )  # the added file, byte for byte
    assert out["autov2"] == out["original_autov2"]
    assert _tensors_equal(load_state_dict(tmp_path / "out.safetensors")[0], load_state_dict(files["ft"])[0])

    # a .ckpt (pickle) source: same tensors in a fresh .safetensors, different file hash (reported)
    sd, _ = load_state_dict(files["ft2"])
    torch.save({"state_dict": sd}, tmp_path / "ft2.ckpt")
    store.add(tmp_path / "ft2.ckpt", "ck", golden=False)
    out = export(store, "ck@1", tmp_path / "ck.safetensors")
    assert not out["identical_file"] and out["original_autov2"] != out["autov2"]
    assert _tensors_equal(load_state_dict(tmp_path / "ck.safetensors")[0], sd)

    # --fp16: the export is the fp16 tensors; the original's hashes stay in the card
    v = store.add(files["base"], "half", fp16=True, golden=False)
    assert v.manifest["stored"]["fp16"] and v.card()["original"]["sha256"] == sha256_file(files["base"])
    export(store, "half@1", tmp_path / "half.safetensors")
    half, _ = load_state_dict(tmp_path / "half.safetensors")
    base, _ = load_state_dict(files["base"])
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], base[k].half()) for k in base)

    # a diffusers folder export holds the same network tensors
    export(store, "m@1", tmp_path / "folder", fmt="diffusers")
    sd_folder = read_checkpoint(tmp_path / "folder")[0]
    base_net = {k: v for k, v in base.items() if k in sd_folder}
    assert len(base_net) == len(sd_folder) and _tensors_equal(base_net, sd_folder)
    # ... and adding that folder back stores nothing new: same components, same blobs as the single file
    before = set(store.blobs.all())
    store.add(tmp_path / "folder", "folder", golden=False)
    assert all(c["status"] == "identical" for c in diff(store, "m@1", "folder@1")["components"])
    assert set(store.blobs.all()) == before


def test_promote_rollback_history(tmp_path, files):
    store = _two_versions(tmp_path, files)
    store.add(files["ft2"], "m", golden=False)
    assert store.promote("m@2", force=True, reason="better")["to"] == 2
    assert store.get("m").version == 2
    assert store.promote("m@2", force=True)["action"] == "none"  # already current: no history entry
    store.promote("m@3", force=True)
    assert store.rollback("m")["to"] == 2
    assert store.rollback("m", reason="bad upgrade")["to"] == 1
    with pytest.raises(StoreError, match="no earlier current version"):
        store.rollback("m")
    hist = store.history("m")
    assert [(h["action"], h["from_version"], h["to_version"]) for h in hist] == [
        ("add", None, 1), ("add", 1, 2), ("add", 1, 3),
        ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1),
    ]  # fmt: skip
    assert hist[3]["reason"] == "better" and hist[-1]["reason"] == "bad upgrade" and "@" in hist[-1]["actor"]
    with pytest.raises(StoreError, match="promote needs a version"):
        store.promote("m", force=True)


def test_rm_gc_and_numbering(tmp_path, files):
    store = _two_versions(tmp_path, files)
    m2 = store.get("m@2").manifest
    unet2 = next(c["blob"] for c in m2["components"] if c["name"] == "unet")
    with closing(store._conn()) as c:
        only_m2 = sorted(b for b, users in store.referenced(c).items() if users == {"m@2"})
    assert unet2 in only_m2 and len(only_m2) <= 2  # its U-Net, and its header when that differs from m@1's
    with pytest.raises(StoreError, match="is the current version"):
        store.remove("m@1")
    store.remove("m@2", reason="not needed")
    assert store.blobs.exists(unet2)  # removal keeps blobs until gc
    assert verify(store)["unreferenced_blobs"] == only_m2
    out = store.gc()
    assert out["removed_blobs"] == only_m2 and not store.blobs.exists(unet2)
    assert verify(store)["ok"] and store.gc()["removed_blobs"] == []  # nothing referenced is ever removed
    assert store.add(files["ft"], "m", golden=False).version == 3  # numbers are never reused
    with pytest.raises(StoreError, match="m@2 does not exist; versions of m: m@1, m@3"):
        store.get("m@2")
    store.remove("m@3")
    store.remove("m@1")  # the last version may go; the name then has none
    assert store.names() == [] and store.gc()["freed_bytes"] > 0 and store.blobs.all() == {}


def test_verify_names_corrupt_and_missing_blobs(tmp_path, files, capsys):
    store = _two_versions(tmp_path, files)
    assert verify(store)["ok"]
    unet2 = next(c["blob"] for c in store.get("m@2").manifest["components"] if c["name"] == "unet")
    flip_bit(store.blobs.path(unet2), "out.2.bias", bit=0)  # one mantissa bit of one weight
    report = verify(store)
    assert not report["ok"] and report["broken_versions"] == ["m@2"]
    assert report["problems"][0]["kind"] == "corrupt" and report["problems"][0]["blob"] == unet2
    assert verify(store, rehash=False)["ok"]  # --quick checks presence only
    assert main(["models", "verify", "--store", str(store.root)]) == 1
    assert "corrupt" in capsys.readouterr().out
    assert main(["models", "repair", str(files["ft"]), "--store", str(store.root)]) == 0  # from a copy
    assert "restored 1 blob(s)" in capsys.readouterr().out and verify(store)["ok"]
    flip_bit(store.blobs.path(unet2), "out.2.bias", bit=0)
    vae = next(c["blob"] for c in store.get("m@1").manifest["components"] if c["name"] == "vae")
    store.blobs.path(vae).unlink()
    report = verify(store)
    missing = [p for p in report["problems"] if p["kind"] == "missing"]
    assert missing[0]["versions"] == ["m@1", "m@2"] and report["broken_versions"] == ["m@1", "m@2"]
    with pytest.raises(StoreError, match="missing"):
        store.load("m@1")


def test_concurrent_adds_are_serialized(tmp_path, files):
    root = tmp_path / "store"
    ModelStore(root)

    def add(path):
        return ModelStore(root).add(path, "c", golden=False).version

    with ThreadPoolExecutor(3) as pool:
        versions = sorted(pool.map(add, [files["base"], files["ft"], files["ft2"]]))
    assert versions == [1, 2, 3]
    store = ModelStore(root)
    assert verify(store)["ok"] and len(store.versions("c")) == 3
    report = du(store)
    assert (
        report["physical_tensor_bytes"] < 0.65 * report["logical_tensor_bytes"]
    )  # 1 base + 2 U-Nets of 3 models


def test_clear_errors(tmp_path, files):
    store = ModelStore(tmp_path / "store")
    for bad in ("", "a b", "-x", "x/y", "x@", "x@0", "x@-1", "x@two", "a" * 65):
        with pytest.raises(StoreError):
            Ref.parse(bad)
    with pytest.raises(StoreError, match="invalid model name"):
        store.add(files["base"], "bad name", golden=False)
    with pytest.raises(StoreError, match="no such file"):
        store.add(tmp_path / "missing.safetensors", "m", golden=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        store.add(tmp_path / "notes.txt", "m", golden=False)
    assert store.blobs.all() == {}  # a rejected file writes nothing
    with pytest.raises(StoreError, match="the store is empty"):
        store.get("m")
    with pytest.raises(StoreError, match="not a folder"):
        ModelStore(tmp_path / "notes.txt")
    store.add(files["base"], "m", golden=False)
    with pytest.raises(StoreError, match="unknown export format"):
        export(store, "m@1", tmp_path / "x", fmt="zip")
    with pytest.raises(StoreError, match=r"\.safetensors"):
        export(store, "m@1", tmp_path / "x.ckpt")
    with pytest.raises(StoreError, match="no golden images"):
        store.promote("m@1")
    with pytest.raises(StoreError, match="no model named 'n'"):
        store.add(files["ft"], "m", parent="n@1", golden=False)


def test_cli(tmp_path, files, capsys):
    s = ["--store", str(tmp_path / "store")]
    assert (
        main(["models", "add", str(files["base"]), "--name", "m", "--no-golden", "--note", "base", *s]) == 0
    )
    assert (
        main(["models", "add", str(files["ft"]), "--name", "m", "--no-golden", "--license", "MIT", *s]) == 0
    )
    capsys.readouterr()
    assert main(["models", "list", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out)[0]["versions"] == [1, 2]
    assert main(["models", "show", "m@2", *s]) == 0
    shown = capsys.readouterr().out
    assert "license      MIT" in shown and "parent       m@1" in shown and "unet" in shown
    assert main(["models", "du", *s]) == 0
    assert "m@2" in capsys.readouterr().out
    assert main(["models", "diff", "m@1", "m@2", *s]) == 0
    assert "vae             identical" in capsys.readouterr().out
    assert main(["models", "promote", "m@2", "--force", *s]) == 0
    assert main(["models", "rollback", "m", *s]) == 0
    assert main(["models", "history", "m", *s]) == 0
    assert "rollback @2 -> @1" in capsys.readouterr().out
    assert main(["models", "export", "m@2", str(tmp_path / "o.safetensors"), *s]) == 0
    assert "identical file" in capsys.readouterr().out
    assert main(["models", "rm", "m@2", *s]) == 0 and main(["models", "gc", *s]) == 0
    assert main(["models", "verify", *s]) == 0
    capsys.readouterr()
    assert main(["models", "show", "m@9", *s]) == 2
    assert "m@9 does not exist; versions of m: m@1" in capsys.readouterr().err
    assert main(["models", "add", str(files["base"]), "--name", "no good", *s]) == 2
    assert "invalid model name 'no good'" in capsys.readouterr().err
    assert main(["models", "list", "--store", str(tmp_path / "typo")]) == 2  # a read never creates a store
    assert "no model store there" in capsys.readouterr().err and not (tmp_path / "typo").exists()
