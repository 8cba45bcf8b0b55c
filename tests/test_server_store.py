"""The server on a model store and with SD3 models: one real server (auth on, real SQLite, a real store of a
tiny model and a fine-tune of its U-Net, a models folder with a tiny SD3.5 file). Promote and rollback
through the server and from the CLI reach the next job without a restart, and every image equals the CLI's
image of the exact version (pixel for pixel)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from diffusekit.cli import main
from server_helpers import ServerProcess, env, make_key
from store_helpers import create_tiny, fine_tune

GEN = dict(prompt="a red circle", seed=5, steps=3, width=64, height=64, cfg_scale=2.0)
CLI_GEN = ["--seed", "5", "--steps", "3", "--width", "64", "--height", "64", "--cfg", "2"]
CLI_GEN += ["--sampler", "Euler"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("srvstore")
    store, models, data = root / "store", root / "models", root / "data"
    models.mkdir()
    data.mkdir()
    base = create_tiny(root / "base.safetensors", seed=0)
    tuned = fine_tune(base, root / "tuned.safetensors", scale=0.05)
    for path in (base, tuned):
        assert main(["models", "add", str(path), "--name", "m", "--store", str(store)]) == 0
    assert main(["create", "tiny_sd35", str(models / "sd35.safetensors"), "--seed", "1"]) == 0
    s35 = ["models", "add", str(models / "sd35.safetensors"), "--name", "s35", "--store", str(store)]
    assert main([*s35, "--no-golden"]) == 0  # the same file, also as an SD3 store version
    sd35dir = ["convert", str(models / "sd35.safetensors"), str(models / "sd35dir"), "--format", "diffusers"]
    assert main(sd35dir) == 0
    keys = {"admin": make_key(data, "boss", "admin"), "user": make_key(data, "alice")}
    srv = ServerProcess(data, "--store", str(store), "--models", str(models)).start()
    srv.keys, srv.store, srv.models, srv.root = keys, store, models, root
    yield srv
    srv.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _cli(srv, name: str, *model: str) -> np.ndarray:
    """`diffusekit generate` in a fresh process, as a user runs it."""
    out = srv.root / f"cli-{name}.png"
    cmd = [
        sys.executable,
        "-m",
        "diffusekit.cli",
        "generate",
        GEN["prompt"],
        *model,
        *CLI_GEN,
        "-o",
        str(out),
    ]
    subprocess.run(cmd, env=env(), check=True, capture_output=True, timeout=300)
    return np.asarray(Image.open(out).convert("RGB"))


def _job(srv, model: str, kind: str = "txt2img", **params) -> tuple[dict, np.ndarray]:
    key = srv.keys["user"]
    body = {"kind": kind, "params": {**GEN, "sampler": "Euler", "model": model, **params}}
    r = requests.post(f"{srv.url}/v1/jobs", json=body, headers=_h(key), timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/jobs/{r.json()['id']}", headers=_h(key), timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["state"] == "succeeded", job
    png = requests.get(srv.url + job["images"][0]["url"], headers=_h(key), timeout=10).content
    return job, _png(png)


def _gauge(srv, model: str) -> float | None:
    text = requests.get(f"{srv.url}/metrics", headers=_h(srv.keys["admin"]), timeout=10).text
    m = re.search(rf'^diffusekit_model_current_version\{{model="{model}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_store_and_sd3_models_are_listed(server):
    rows = requests.get(f"{server.url}/v1/models", headers=_h(server.keys["user"]), timeout=10).json()
    by = {r["name"]: r for r in rows}
    assert {"m", "m@1", "m@2", "default", "sd35"} <= set(by)
    assert by["m"]["version"] == "m@1" and by["m@1"]["current"] and not by["m@2"]["current"]
    assert by["m"]["kind"] == "store" and by["m"]["family"] == "sd1" and by["m"]["sha256"]
    assert by["sd35"]["family"] == "sd3" and by["sd35"]["kind"] == "file" and by["default"]["kind"] == "file"
    assert by["sd35dir"]["family"] == "sd3" and by["sd35dir"]["kind"] == "diffusers"
    sd = requests.get(f"{server.url}/sdapi/v1/sd-models", headers=_h(server.keys["user"]), timeout=10).json()
    titles = {r["model_name"]: r for r in sd}
    assert titles["m"]["title"] == f"m [{by['m']['sha256'][:10]}]" and titles["sd35"]["family"] == "sd3"
    card = requests.get(f"{server.url}/v1/models/m@2/inspect", headers=_h(server.keys["user"]), timeout=10)
    assert card.status_code == 200 and card.json()["version"] == "m@2" and card.json()["parameters"] > 0


def test_promote_and_rollback_reach_the_next_job_without_restart(server):
    v1, v2 = (
        _cli(server, "m1", "--model", "m@1", "--store", str(server.store)),
        _cli(server, "m2", "--model", "m@2", "--store", str(server.store)),
    )
    assert v1.std() > 1 and np.abs(v1.astype(int) - v2).max() > 0  # the versions make different images
    admin, user = server.keys["admin"], server.keys["user"]
    job, img = _job(server, "m")
    assert job["model"] == "m" and job["model_version"] == "m@1" and job["model_hash"]
    assert np.array_equal(img, v1) and _gauge(server, "m") == 1
    # a user key may not switch versions
    for route, body in (("promote", {"version": 2}), ("rollback", {})):
        r = requests.post(f"{server.url}/v1/models/m/{route}", json=body, headers=_h(user), timeout=60)
        assert r.status_code == 403, r.text
    r = requests.post(f"{server.url}/v1/models/m/promote", json={"version": 2, "reason": "sharper"},
                      headers=_h(admin), timeout=300)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["current"] == "m@2" and r.json()["golden_check_passed"] is True
    job, img = _job(server, "m")
    assert job["model_version"] == "m@2" and np.array_equal(img, v2) and _gauge(server, "m") == 2
    # the same job, through the A1111 route with the name in override_settings
    body = {**GEN, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "m"}}
    a1111 = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=_h(user), timeout=300).json()
    assert np.array_equal(_png(base64.b64decode(a1111["images"][0])), v2)
    r = requests.post(f"{server.url}/v1/models/m/rollback", json={"reason": "customers preferred 1"},
                      headers=_h(admin), timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["current"] == "m@1", r.text
    job, img = _job(server, "m")
    assert job["model_version"] == "m@1" and np.array_equal(img, v1) and _gauge(server, "m") == 1
    hist = requests.get(f"{server.url}/v1/models/m/history", headers=_h(user), timeout=10).json()["history"]
    assert [h["action"] for h in hist[-2:]] == ["promote", "rollback"]
    assert all("boss" in h["actor"] for h in hist[-2:]) and hist[-1]["reason"] == "customers preferred 1"
    # a promote from the CLI while the server runs: the next job follows it
    assert main(["models", "promote", "m@2", "--store", str(server.store), "--force"]) == 0
    job, img = _job(server, "m")
    assert job["model_version"] == "m@2" and np.array_equal(img, v2) and _gauge(server, "m") == 2
    job, img = _job(server, "m@1")  # an exact version, whatever is current
    assert job["model_version"] == "m@1" and np.array_equal(img, v1)
    assert main(["models", "rollback", "m", "--store", str(server.store)]) == 0


def test_unknown_versions_are_4xx_naming_the_valid_ones(server):
    admin = server.keys["admin"]
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "txt2img", "params": {**GEN, "model": "m@9"}},
                      headers=_h(admin), timeout=10)  # fmt: skip
    assert r.status_code == 422 and "m@1, m@2" in r.text and "params.model" in r.text
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", headers=_h(admin), timeout=10,
                      json={**GEN, "override_settings": {"sd_model_checkpoint": "m@9"}})  # fmt: skip
    assert r.status_code == 422 and "m@1, m@2" in r.text
    r = requests.post(f"{server.url}/v1/models/m/promote", json={"version": 9}, headers=_h(admin), timeout=10)
    assert r.status_code == 404 and "m@1, m@2" in r.text
    r = requests.post(f"{server.url}/v1/models/nosuch/rollback", headers=_h(admin), timeout=10)
    assert r.status_code == 404 and "models in this store: m" in r.text
    r = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "m@3"},
                      headers=_h(admin), timeout=10)  # fmt: skip
    assert r.status_code == 422 and "m@1, m@2" in r.text


def test_sd3_through_the_server_equals_generate(server):
    path = server.models / "sd35.safetensors"
    cli = _cli(server, "sd35", "--model", str(path))
    user = server.keys["user"]
    sd35 = {**GEN, "override_settings": {"sd_model_checkpoint": "sd35"}}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", headers=_h(user), timeout=300,
                      json={**sd35, "sampler_name": "Euler"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert cli.std() > 1 and np.array_equal(_png(base64.b64decode(r.json()["images"][0])), cli)
    job, img = _job(server, "sd35")
    assert np.array_equal(img, cli) and job["model_hash"] and job["model_version"] is None
    job, img = _job(server, "sd35dir")  # a diffusers folder
    assert np.array_equal(img, _cli(server, "sd35dir", "--model", str(server.models / "sd35dir")))
    # what the SD3 pipeline cannot do is refused before anything is queued, naming the field
    body = {"kind": "txt2img", "params": {**GEN, "model": "sd35", "sampler": "Euler a"}}
    r = requests.post(f"{server.url}/v1/jobs", json=body, headers=_h(user), timeout=10)
    assert r.status_code == 422 and "params.sampler" in r.text and "Euler" in r.text
    white = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(white, format="PNG")
    b64 = base64.b64encode(white.getvalue()).decode()
    job, img = _job(server, "sd35", kind="img2img", init_image=b64, denoising_strength=0.5)  # img2img runs
    assert img.shape == (64, 64, 3) and "Denoising strength: 0.5" in job["images"][0]["infotext"]
    # inpaint: the right half is masked; the left half, away from the blurred edge, stays the original
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 255
    mask = io.BytesIO()
    Image.fromarray(half).save(mask, format="PNG")
    mask_b64 = base64.b64encode(mask.getvalue()).decode()
    job, img = _job(server, "sd35", kind="inpaint", init_image=b64, mask=mask_b64, denoising_strength=1.0)
    assert (img[:, :20] == 255).all() and not (img[:, 44:] == 255).all()
    # hires fix: generated at 64, returned at twice the size
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", headers=_h(user), timeout=300,
                      json={**sd35, "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2,
                            "hr_upscaler": "Latent", "denoising_strength": 0.5})  # fmt: skip
    assert r.status_code == 200, r.text
    assert _png(base64.b64decode(r.json()["images"][0])).shape == (128, 128, 3)


def test_sd3_store_version_is_listed_and_equals_its_file(server):
    user = server.keys["user"]
    rows = requests.get(f"{server.url}/v1/models", headers=_h(user), timeout=10).json()
    by = {r["name"]: r for r in rows}
    assert by["s35"]["kind"] == "store" and by["s35"]["family"] == "sd3" and by["s35"]["version"] == "s35@1"
    assert by["s35@1"]["current"] and by["s35"]["sha256"] == by["sd35"]["sha256"]
    job, img = _job(server, "s35")
    assert job["model_version"] == "s35@1" and job["model_hash"] == by["s35"]["sha256"][:10]
    _, from_file = _job(server, "sd35")  # the file it was added from, through the same server
    assert img.std() > 1 and np.array_equal(img, from_file)
    assert np.array_equal(img, _cli(server, "s35", "--model", "s35", "--store", str(server.store)))
    body = {**GEN, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "s35@1"}}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=_h(user), timeout=300)
    assert r.status_code == 200 and np.array_equal(_png(base64.b64decode(r.json()["images"][0])), img)
    # what the SD3 pipeline cannot do is refused for the store version as for the file
    body = {"kind": "txt2img", "params": {**GEN, "model": "s35", "sampler": "Euler a"}}
    r = requests.post(f"{server.url}/v1/jobs", json=body, headers=_h(user), timeout=10)
    assert r.status_code == 422 and "params.sampler" in r.text


def test_the_cache_estimate_covers_the_mmdit(tmp_path, one_thread):
    from diffusekit.jobs.catalog import ModelCatalog
    from diffusekit.jobs.loading import load_pipeline, loaded_bytes, weight_bytes
    from diffusekit.store import ModelStore

    path = tmp_path / "sd35.safetensors"
    assert main(["create", "tiny_sd35", str(path), "--seed", "2"]) == 0
    cat = ModelCatalog(tmp_path, None)
    entry = cat.get("sd35")
    pipe = load_pipeline(entry, cat, device="cpu", precision="fp32")
    mmdit = sum(p.numel() * 4 for p in pipe.model.mmdit.parameters())
    est, real = weight_bytes(entry, precision="fp32", device="cpu"), loaded_bytes(pipe)
    assert est > mmdit and 0.95 * real <= est <= 1.05 * real, (est, real, mmdit)
    assert weight_bytes(entry, precision="bf16", device="cpu") * 2 == est  # every float tensor is cast
    assert cat.family(entry) == "sd3" and pipe.model_hash == cat.sha256(entry)[:10]
    # the same file as an SD3 store version: the same estimate (every float tensor at the compute dtype)
    ModelStore(tmp_path / "store").add(path, "s", golden=False)
    (tmp_path / "empty").mkdir()
    stored = ModelCatalog(tmp_path / "empty", None, store=ModelStore(tmp_path / "store")).get("s@1")
    assert stored.family == "sd3" and weight_bytes(stored, precision="fp32", device="cpu") == est


def test_serve_store_options(tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path), "--no-store"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["serve", "--store", str(tmp_path / "none")]) == 2
    assert "no model store there" in capsys.readouterr().err
