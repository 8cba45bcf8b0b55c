"""A train_lora job survives a graceful restart and a kill -9: the restarted server resumes it from its
checkpoint (it never trains twice to completion), and the LoRA it writes equals `diffusekit train-lora` run
straight through (without samples: the job's sample images change nothing, and none is made twice)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import requests
import torch
from PIL import Image, ImageDraw

from server_helpers import ServerProcess, env, make_key

PARAMS = dict(name="phoenix", steps=40, rank=4, alpha=4.0, lr=0.01, save_every=4, seed=9, batch=2)
SAMPLES = dict(sample_every=6, sample_prompt="a phoenix", sample_steps=1)


def _images() -> list[Image.Image]:
    out = []
    for i in range(3):
        img = Image.new("RGB", (64, 64), (250, 250, 240))
        ImageDraw.Draw(img).polygon([(32, 6 + 3 * i), (58, 56), (6, 56)], fill=(20, 40 + 50 * i, 200))
        out.append(img)
    return out


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _get(srv, key: str, job_id: str) -> dict:
    h = {"Authorization": f"Bearer {key}"}
    return requests.get(f"{srv.url}/v1/jobs/{job_id}", headers=h, timeout=10).json()


def _until(srv, key: str, job_id: str, done, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _get(srv, key, job_id)
        if done(job) or job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def _running_past(step: int):
    return lambda job: job["state"] == "running" and job["progress"]["step"] >= step


def test_stopped_and_killed_training_job_resumes_and_equals_the_cli(tmp_path):
    from diffusekit.checkpoints.single_file import load_state_dict

    data = tmp_path / "data"
    data.mkdir()
    key = make_key(data, "boss", "admin")
    srv = ServerProcess(data).start()
    try:  # 1: a graceful stop (SIGTERM) while it trains: checkpointed and left to resume, not cancelled
        body = {
            "kind": "train_lora",
            "params": {
                **PARAMS,
                **SAMPLES,
                "images": [{"image": _b64(im), "caption": "a phoenix"} for im in _images()],
            },  # fmt: skip
        }
        h = {"Authorization": f"Bearer {key}"}
        r = requests.post(srv.url + "/v1/jobs", json=body, headers=h, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = _until(srv, key, job_id, _running_past(6))
        assert job["state"] == "running" and job["progress"]["step"] < 16, job
    finally:
        srv.stop()
    srv = ServerProcess(data).start()
    try:  # 2: it resumed; now kill -9 it mid-way
        job = _until(srv, key, job_id, _running_past(20))
        assert job["state"] == "running" and job["attempts"] == 2 and job["progress"]["step"] < 32, job
        srv.kill9()
    finally:
        srv.stop()
    srv = ServerProcess(data).start()
    try:
        job = _until(srv, key, job_id, lambda job: False)
    finally:
        srv.stop()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 3 and job["result"]["resumed_from"] >= 20  # checkpointed every 4 steps
    assert [s["step"] for s in job["samples"]] == [6, 12, 18, 24, 30, 36]  # each once, across both restarts
    served = load_state_dict(data / "loras" / "phoenix.safetensors")[0]
    # the CLI on the same images and captions, uninterrupted
    folder = tmp_path / "ds"
    folder.mkdir()
    for i, im in enumerate(_images()):
        im.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text("a phoenix")
    out = tmp_path / "cli" / "phoenix.safetensors"
    cmd = [sys.executable, "-m", "diffusekit.cli", "train-lora", str(folder), "-o", str(out), "--json"]
    for flag in ("steps", "rank", "alpha", "lr", "save_every", "seed", "batch"):
        cmd += ["--" + flag.replace("_", "-"), str(PARAMS[flag])]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = load_state_dict(out)[0]
    assert served.keys() == cli.keys() and len(cli) > 100
    assert all(torch.equal(served[k], cli[k]) for k in cli)
