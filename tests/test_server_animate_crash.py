"""An animate job through a server stop (SIGTERM) and a crash (kill -9): each restart resumes the render
from its last whole frame, the job finishes once, and its frames equal an uninterrupted CLI render."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from server_helpers import ServerProcess, env

pytest.importorskip("fastapi")

PROMPTS = {"0": "a red circle", "7": "a blue square"}
PARAMS = dict(prompt="a red circle", prompts=PROMPTS, frames=8, steps=12, width=64, height=64, cfg_scale=2.0,
              sampler="Euler", seed=9, fps=8, format="mp4")  # fmt: skip


def _job(srv, job_id):
    return requests.get(f"{srv.url}/v1/jobs/{job_id}", timeout=10).json()


def _until(srv, job_id, ok, timeout=120):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        j = _job(srv, job_id)
        if j["state"] == "running" and "frames_done" in j["progress"]:
            seen.append(j["progress"]["frames_done"])
        if ok(j):
            return j, seen
        time.sleep(0.02)
    raise TimeoutError(j)


def test_stop_and_kill9_resume_from_the_last_frame_and_finish_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    srv = ServerProcess(data, "--no-auth").start()
    try:
        r = requests.post(srv.url + "/v1/jobs", json={"kind": "animate", "params": PARAMS}, timeout=10)
        job_id = r.json()["id"]
        j, _ = _until(srv, job_id, lambda j: j["progress"].get("frames_done", 0) >= 2)
        before_stop = j["progress"]["frames_done"]
    finally:
        srv.stop()  # SIGTERM: a graceful stop keeps the job (not cancelled) for the next start
    conn = sqlite3.connect(data / "diffusekit.db")
    assert conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == "running"
    conn.close()
    assert len(list((data / "animations" / job_id).glob("frame_*.png"))) >= before_stop

    srv = ServerProcess(data, "--no-auth", port=srv.port).start()
    try:
        j, seen = _until(srv, job_id, lambda j: j["progress"].get("frames_done", 0) >= before_stop + 2)
        assert seen and seen[0] >= before_stop  # resumed, not started over
        before_kill = j["progress"]["frames_done"]
        assert before_kill < 8
        srv.kill9()
    finally:
        srv.stop()

    srv = ServerProcess(data, "--no-auth", port=srv.port).start()
    try:
        j, seen = _until(srv, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
        assert j["state"] == "succeeded", j["error"]
        assert all(s >= before_kill for s in seen)
        assert j["attempts"] == 3 and len(j["images"]) == 8
        resumed = [requests.get(srv.url + im["url"], timeout=10).content for im in j["images"]]
        video = requests.get(srv.url + j["video"]["url"], timeout=10)
        assert video.status_code == 200 and len(video.content) == j["video"]["bytes"]
    finally:
        srv.stop()

    # the uninterrupted render, by the CLI, has the same frames
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "diffusekit.cli", "animate", PARAMS["prompt"],
           "--prompts", json.dumps(PROMPTS), "--frames", "8", "--steps", "12", "--width", "64",
           "--height", "64", "--cfg", "2", "--sampler", "Euler", "--seed", "9", "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, env=env(), check=True, capture_output=True, timeout=300)
    for i, png in enumerate(resumed):
        with Image.open(out / f"frame_{i:06d}.png") as cli:
            got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            assert np.array_equal(np.asarray(cli.convert("RGB")), got), i

    # on disk: one image row per frame, no leftovers of the render, no orphan files
    conn = sqlite3.connect(data / "diffusekit.db")
    rows = conn.execute("SELECT path FROM images WHERE job_id = ?", (job_id,)).fetchall()
    conn.close()
    assert len(rows) == 8
    files = {str(p.relative_to(data)) for p in (data / "images").rglob("*.png")}
    assert files == {r[0] for r in rows}
    assert not (data / "animations" / job_id).exists()
