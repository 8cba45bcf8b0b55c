"""The server against real clients: PyPI webuiapi unchanged, pixel identity CLI / A1111 / native, malformed
requests, auth. One server (auth on, the bundled default model at 64x64 and few steps) for the module."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from server_helpers import ServerProcess, env, make_key

webuiapi = pytest.importorskip("webuiapi")

GEN = dict(prompt="a red circle", seed=7, steps=3, width=64, height=64, cfg_scale=2.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("srv") / "data"
    data.mkdir()
    keys = {
        "admin": make_key(data, "boss", "admin"),
        "alice": make_key(data, "alice"),
        "bob": make_key(data, "bob", rate_per_min=1000),
    }
    srv = ServerProcess(data).start()
    srv.keys = keys
    yield srv
    srv.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _wait(srv, key: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/jobs/{job_id}", headers=_h(key), timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_webuiapi_client_unchanged(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=3)
    api.set_auth("anyone", server.keys["admin"])
    r = api.txt2img(**GEN)
    assert len(r.images) == 1 and r.image.size == (64, 64)
    assert r.info["all_seeds"] == [7] and r.info["steps"] == 3 and r.info["sampler_name"] == "Euler"
    assert "Seed: 7" in r.info["infotexts"][0] and r.image.info["parameters"] == r.info["infotexts"][0]
    # png-info reads the infotext back out of the returned PNG
    info = api.png_info(r.image)
    assert info.json["parameters"]["Seed"] == "7" and info.json["parameters"]["Prompt"] == "a red circle"
    # img2img, then inpainting with a mask: only the white area may change
    init = r.image.convert("RGB")
    r2 = api.img2img(
        images=[init],
        prompt="a blue square",
        seed=3,
        steps=3,
        width=64,
        height=64,
        denoising_strength=0.6,
        cfg_scale=2.0,
    )
    assert r2.image.size == (64, 64) and "Denoising strength: 0.6" in r2.info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    r3 = api.img2img(
        images=[init],
        mask_image=mask,
        prompt="a green dot",
        seed=4,
        steps=3,
        width=64,
        height=64,
        denoising_strength=1.0,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        cfg_scale=2.0,
    )
    out, src = _pixels(r3.image).astype(int), _pixels(init).astype(int)
    assert "Mask blur: 0" in r3.info["infotexts"][0]
    keep = np.asarray(mask) == 0
    assert np.abs(out - src)[~keep].mean() > 5  # the masked area was repainted
    assert np.abs(out - src)[keep].mean() < np.abs(out - src)[~keep].mean()
    # listings and model switching
    titles = [m["title"] for m in api.get_sd_models()]
    assert any(t.startswith("default.safetensors") for t in titles)
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    api.util_set_model("default")
    assert api.util_get_current_model().startswith("default.safetensors")
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert api.interrupt() == {}


def test_progress_and_interrupt_while_running(server):
    key = server.keys["alice"]
    body = {"kind": "txt2img", "params": {**GEN, "steps": 150, "n_iter": 50, "seed": 11}}  # long: cancelled
    job_id = requests.post(f"{server.url}/v1/jobs", json=body, headers=_h(key), timeout=10).json()["id"]
    api = webuiapi.WebUIApi(port=server.port)
    api.set_auth("alice", key)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            break
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150
    Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).load()  # a real PNG preview
    api.interrupt()
    job = _wait(server, key, job_id)
    assert job["state"] == "cancelled" and job["images"] == []


def test_same_pixels_from_cli_a1111_and_jobs(server, tmp_path):
    params = dict(GEN, seed=123, sampler="Euler a")
    out = tmp_path / "cli.png"
    cmd = [
        sys.executable,
        "-m",
        "diffusekit.cli",
        "generate",
        params["prompt"],
        "--seed",
        "123",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--cfg",
        "2",
        "--sampler",
        "Euler a",
        "-o",
        str(out),
    ]
    subprocess.run(cmd, env=env(), check=True, capture_output=True, timeout=120)
    cli = _pixels(Image.open(out))
    key = server.keys["admin"]
    a1111 = requests.post(
        f"{server.url}/sdapi/v1/txt2img",
        headers=_h(key),
        timeout=120,
        json={**GEN, "seed": 123, "sampler_name": "Euler a"},
    ).json()
    via_a1111 = _pixels(Image.open(io.BytesIO(base64.b64decode(a1111["images"][0]))))
    body = {"kind": "txt2img", "params": {**GEN, "seed": 123, "sampler": "Euler a"}}
    job_id = requests.post(f"{server.url}/v1/jobs", json=body, headers=_h(key), timeout=10).json()["id"]
    job = _wait(server, key, job_id)
    png = requests.get(server.url + job["images"][0]["url"], headers=_h(key), timeout=10).content
    via_jobs = _pixels(Image.open(io.BytesIO(png)))
    assert cli.std() > 1  # a real image, not a blank
    assert np.array_equal(cli, via_a1111) and np.array_equal(cli, via_jobs)
    assert Image.open(out).info["parameters"] == job["images"][0]["infotext"]


def _png_b64(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_b64() -> str:
    """A PNG whose header claims 30000 x 30000 pixels (a 1x1 PNG with its IHDR rewritten: tiny)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the chunk's CRC over type + data
    return base64.b64encode(bytes(data)).decode()


T2I, I2I, JOBS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs"
MALFORMED = [
    (T2I, {"steps": 0}, "steps"),
    (T2I, {"steps": 100000}, "steps"),
    (T2I, {"width": 63}, "width"),
    (T2I, {"width": 100}, "width"),
    (T2I, {"height": 10**9}, "height"),
    (T2I, {"cfg_scale": -1}, "cfg_scale"),
    (T2I, {"cfg_scale": "lots"}, "cfg_scale"),
    (T2I, {"batch_size": 0}, "batch_size"),
    (T2I, {"n_iter": 10**6}, "n_iter"),
    (T2I, {"seed": -5}, "seed"),
    (T2I, {"subseed_strength": 2}, "subseed_strength"),
    (T2I, {"sampler_name": "Nonexistent"}, "sampler_name"),
    (T2I, {"scheduler": "wobbly"}, "scheduler"),
    (T2I, {"prompt": "x" * 20000}, "prompt"),
    (T2I, {"restore_faces": True}, "restore_faces"),
    (T2I, {"tiling": True}, "tiling"),
    (T2I, {"script_name": "x/y/z plot"}, "script_name"),
    (T2I, {"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts.ControlNet"),
    (T2I, {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    (
        T2I,
        {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
        "override_settings.sd_model_checkpoint",
    ),
    (
        T2I,
        {"override_settings": {"CLIP_stop_at_last_layers": 99}},
        "override_settings.CLIP_stop_at_last_layers",
    ),
    (I2I, {"prompt": "x"}, "init_images"),
    (I2I, {"init_images": ["not base64 !!"]}, "init_images.0"),
    (I2I, {"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "init_images.0"),
    (I2I, {"init_images": ["__BOMB__"]}, "init_images.0"),
    (I2I, {"init_images": ["__PNG__"], "mask": "__PNG32__"}, "mask"),
    (I2I, {"init_images": ["__PNG__"], "resize_mode": 3}, "resize_mode"),
    (I2I, {"init_images": ["__PNG__"], "denoising_strength": 1.5}, "denoising_strength"),
    ("/sdapi/v1/png-info", {"image": "%%%"}, "image"),
    ("/sdapi/v1/png-info", {}, "image"),
    (JOBS, {"kind": "video", "params": {}}, "kind"),
    (JOBS, {"kind": "txt2img", "params": {"steps": -1}}, "params.steps"),
    (JOBS, {"kind": "txt2img", "params": {"bogus": 1}}, "params.bogus"),
    (JOBS, {"kind": "txt2img", "params": {"model": "../default"}}, "params.model"),
    (JOBS, {"kind": "txt2img", "params": {"model": "/etc/passwd"}}, "params.model"),
    (JOBS, {"kind": "txt2img", "priority": 1000}, "priority"),
    (JOBS, {"kind": "img2img", "params": {}}, "params.init_image"),
    (JOBS, {"kind": "inpaint", "params": {"init_image": "__PNG__"}}, "params.mask"),
    (JOBS, {"kind": "img2img", "params": {"init_image": "0" * 32}}, "params.init_image"),
    (JOBS, {"kind": "txt2img", "params": {"sampler": "warp drive"}}, "params.sampler"),
    (JOBS, {"kind": "txt2img", "params": {"hr_scale": 9, "enable_hr": True}}, "params.hr_scale"),
]


def _fill(value):
    if isinstance(value, str):
        return {"__PNG__": _png_b64(), "__PNG32__": _png_b64((32, 32)), "__BOMB__": _bomb_b64()}.get(
            value, value
        )
    if isinstance(value, list):
        return [_fill(v) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v) for k, v in value.items()}
    return value


def test_malformed_requests_are_4xx_naming_the_field(server):
    assert len(MALFORMED) >= 25
    h = _h(server.keys["alice"])
    failures = []
    for path, body, field in MALFORMED:
        r = requests.post(server.url + path, json=_fill(body), headers=h, timeout=30)
        text = r.text
        if not (400 <= r.status_code < 500) or field not in text:
            failures.append((path, body if len(str(body)) < 200 else "...", r.status_code, text[:300]))
    # broken JSON, wrong types of the whole body, a bad query, a bad cursor
    for path, data in ((T2I, b"{not json"), (JOBS, b"[1, 2]"), (JOBS, b"")):
        r = requests.post(
            server.url + path, data=data, headers={**h, "Content-Type": "application/json"}, timeout=10
        )
        if not (400 <= r.status_code < 500) or "body" not in r.text:
            failures.append((path, data, r.status_code, r.text[:300]))
    for query, field in (("state=dancing", "state"), ("limit=0", "limit"), ("cursor=abc", "cursor")):
        r = requests.get(f"{server.url}/v1/jobs?{query}", headers=h, timeout=10)
        if r.status_code != 422 or field not in r.text:
            failures.append((query, r.status_code, r.text[:300]))
    assert not failures, failures
    assert requests.get(server.url + "/health", timeout=30).status_code == 200  # still serving


def test_auth(server):
    url = server.url
    assert requests.get(url + "/v1/jobs", timeout=30).status_code == 401
    assert requests.get(url + "/v1/jobs", headers=_h("dk_wrong"), timeout=30).status_code == 401
    r = requests.get(url + "/sdapi/v1/sd-models", auth=("x", "dk_wrong"), timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
    assert (
        requests.get(url + "/sdapi/v1/sd-models", auth=("x", server.keys["bob"]), timeout=30).status_code
        == 200
    )
    # another user's job and its images are invisible (404), not forbidden
    body = {"kind": "txt2img", "params": {**GEN, "seed": 99}}
    job_id = requests.post(url + "/v1/jobs", json=body, headers=_h(server.keys["alice"]), timeout=10).json()[
        "id"
    ]
    job = _wait(server, server.keys["alice"], job_id)
    image_url = url + job["images"][0]["url"]
    bob = _h(server.keys["bob"])
    assert requests.get(f"{url}/v1/jobs/{job_id}", headers=bob, timeout=30).status_code == 404
    assert requests.delete(f"{url}/v1/jobs/{job_id}", headers=bob, timeout=30).status_code == 404
    assert requests.get(image_url, headers=bob, timeout=30).status_code == 404
    assert job_id not in {
        j["id"] for j in requests.get(url + "/v1/jobs", headers=bob, timeout=30).json()["jobs"]
    }
    assert requests.get(image_url, headers=_h(server.keys["alice"]), timeout=30).status_code == 200
    # a user key may not change options (switch models): 403
    r = requests.post(
        url + "/sdapi/v1/options", json={"sd_model_checkpoint": "default"}, headers=bob, timeout=30
    )
    assert r.status_code == 403
    # idempotency: the same key returns the same job
    h = {**_h(server.keys["alice"]), "Idempotency-Key": "retry-1"}
    a = requests.post(url + "/v1/jobs", json=body, headers=h, timeout=10)
    b = requests.post(url + "/v1/jobs", json=body, headers=h, timeout=10)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    # raw keys are stored nowhere in the data folder (database, WAL, images)
    blobs = b"".join(p.read_bytes() for p in server.data.rglob("*") if p.is_file())
    for raw in server.keys.values():
        assert raw.encode() not in blobs


def test_rate_and_quota(server, tmp_path):
    limited = make_key(server.data, "limited", rate_per_min=2)
    h = _h(limited)
    codes = [requests.get(server.url + "/v1/jobs", headers=h, timeout=30).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = requests.get(server.url + "/v1/jobs", headers=h, timeout=30)
    assert "2 requests per minute" in r.json()["error"] and int(r.headers["Retry-After"]) > 0
    quota = make_key(server.data, "quota", quota_per_day=1)
    body = {"kind": "txt2img", "params": {**GEN, "steps": 1}}
    assert requests.post(server.url + "/v1/jobs", json=body, headers=_h(quota), timeout=10).status_code == 202
    r = requests.post(server.url + "/v1/jobs", json=body, headers=_h(quota), timeout=10)
    assert r.status_code == 429 and "1 jobs per day" in r.json()["error"]


def test_ops_routes(server):
    assert requests.get(server.url + "/ready", timeout=30).json()["ready"] is True
    assert requests.get(server.url + "/metrics", timeout=30).status_code == 401
    text = requests.get(server.url + "/metrics", headers=_h(server.keys["admin"]), timeout=30).text
    for name in (
        "diffusekit_queue_depth",
        'diffusekit_jobs{state="succeeded"}',
        "diffusekit_job_latency_seconds",
        "diffusekit_queue_wait_seconds",
        "diffusekit_sampler_step_seconds",
        "diffusekit_images_generated",
        "diffusekit_model_loads_total",
        "diffusekit_process_rss_bytes",
    ):
        assert name in text, name
    assert requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]["/v1/jobs"]


def test_events_and_cancel_of_a_queued_job(server):
    key = server.keys["alice"]
    h = _h(key)
    long_id = requests.post(
        f"{server.url}/v1/jobs",
        headers=h,
        timeout=10,
        json={"kind": "txt2img", "params": {**GEN, "steps": 150, "n_iter": 50}},
    ).json()["id"]
    waiting = requests.post(
        f"{server.url}/v1/jobs", headers=h, timeout=10, json={"kind": "txt2img", "params": GEN}
    ).json()["id"]
    before = requests.get(f"{server.url}/v1/jobs/{waiting}", headers=h, timeout=30).json()
    assert before["state"] == "queued" and before["queue_position"] >= 0
    r = requests.delete(f"{server.url}/v1/jobs/{waiting}", headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    events = []
    with requests.get(f"{server.url}/v1/jobs/{long_id}/events", headers=h, stream=True, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
            if line.startswith("data:") and events[-1] == "progress":
                data = json.loads(line[5:])
                if data.get("step", 0) >= 2 and "preview" in data:
                    assert data["preview"].startswith("data:image/png;base64,")
                    requests.delete(f"{server.url}/v1/jobs/{long_id}", headers=h, timeout=30)
            if line.startswith("data:") and events[-1] == "done":
                assert json.loads(line[5:])["state"] == "cancelled"
                break
    assert events.count("progress") >= 2 and events[-1] == "done"
    never = requests.get(f"{server.url}/v1/jobs/{waiting}", headers=h, timeout=30).json()
    assert never["state"] == "cancelled" and never["attempts"] == 0 and never["started_at"] is None
