"""kill -9 of the server while a job runs and others wait; after a restart every job completes exactly once
and every image is whole."""

from __future__ import annotations

import sqlite3
import time

import pytest
import requests
from PIL import Image

from server_helpers import ServerProcess

pytest.importorskip("fastapi")

SMALL = dict(prompt="a red circle", width=64, height=64, cfg_scale=2.0, sampler="Euler")


def _post(srv, params, key=None):
    headers = {"Idempotency-Key": key} if key else {}
    r = requests.post(
        srv.url + "/v1/jobs", json={"kind": "txt2img", "params": params}, headers=headers, timeout=10
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job(srv, job_id):
    return requests.get(f"{srv.url}/v1/jobs/{job_id}", timeout=10).json()


def test_kill9_loses_nothing_and_runs_nothing_twice(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    srv = ServerProcess(data, "--no-auth").start()
    try:
        long_id = _post(srv, {**SMALL, "seed": 1, "steps": 60, "n_iter": 2})
        queued = [
            _post(srv, {**SMALL, "seed": 10 + i, "steps": 2, "batch_size": 2}, key=f"q{i}") for i in range(3)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            j = _job(srv, long_id)
            if j["state"] == "running" and j["progress"]["step"] >= 1:
                break
            time.sleep(0.02)
        assert j["state"] == "running"
        assert all(_job(srv, q)["state"] == "queued" for q in queued)
        srv.kill9()
    finally:
        srv.stop()

    srv = ServerProcess(data, "--no-auth", port=srv.port).start()
    try:
        # a retried POST after the crash still finds its job (the 202 was only sent after the commit)
        assert _post(srv, {**SMALL, "seed": 10, "steps": 2, "batch_size": 2}, key="q0") == queued[0]
        deadline = time.monotonic() + 180
        jobs = {}
        while time.monotonic() < deadline:
            jobs = {i: _job(srv, i) for i in [long_id, *queued]}
            if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
                break
            time.sleep(0.2)
        assert all(j["state"] == "succeeded" for j in jobs.values()), {i: j["state"] for i, j in jobs.items()}
        assert jobs[long_id]["attempts"] == 2 and len(jobs[long_id]["images"]) == 2
        for q in queued:
            assert jobs[q]["attempts"] == 1 and len(jobs[q]["images"]) == 2
        assert [im["seed"] for im in jobs[long_id]["images"]] == [1, 2]
        for j in jobs.values():
            for im in j["images"]:
                r = requests.get(srv.url + im["url"], timeout=10)
                assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    finally:
        srv.stop()

    # on disk: one row per image, every file a whole PNG, no temp files, no orphans
    conn = sqlite3.connect(data / "diffusekit.db")
    rows = conn.execute("SELECT path FROM images WHERE role = 'output'").fetchall()
    n_jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    conn.close()
    assert n_jobs == 4 and len(rows) == 2 + 3 * 2
    files = sorted(p for p in (data / "images").rglob("*") if p.is_file())
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert {str(p.relative_to(data)) for p in files} == {r[0] for r in rows}
    for (path,) in rows:
        with Image.open(data / path) as im:
            im.load()
            assert im.size == (64, 64) and "Seed:" in im.info["parameters"]
