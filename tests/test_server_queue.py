"""Queue behaviour over real HTTP: a full queue answers 429 with Retry-After, two workers run two models side
by side with every job run once, batching (on by default) gives the solo pixels, and A1111's skip ends the
current image and goes on. One server: 2 workers, at most 6 waiting jobs, the default model twice."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

from server_helpers import ServerProcess

GEN = dict(prompt="a red circle", width=64, height=64, cfg_scale=2.0, sampler="Euler a")
LONG = dict(GEN, steps=150, n_iter=50, seed=1)  # runs until cancelled


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffusekit.cli_generate import default_model_path

    root = tmp_path_factory.mktemp("queue")
    models = root / "models"
    models.mkdir()
    shutil.copy(default_model_path(), models / "other.safetensors")  # a second model: the same weights
    data = root / "data"
    data.mkdir()
    srv = ServerProcess(data, "--no-auth", "--workers", "2", "--max-queued", "6", "--models", str(models))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe():
    from diffusekit.cli_generate import default_model_path
    from diffusekit.pipeline import Pipeline

    return Pipeline.from_file(default_model_path())


def _submit(srv, params: dict, model: str = "default") -> requests.Response:
    body = {"kind": "txt2img", "params": {**params, "model": model}}
    return requests.post(f"{srv.url}/v1/jobs", json=body, timeout=10)


def _job(srv, job_id: str) -> dict:
    return requests.get(f"{srv.url}/v1/jobs/{job_id}", timeout=10).json()


def _wait(srv, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(srv, job_id)
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"{job_id}: {job['state']}")


def _pixels(srv, job: dict, i: int = 0) -> np.ndarray:
    png = requests.get(srv.url + job["images"][i]["url"], timeout=10).content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _cancel(srv, *ids: str) -> None:
    for job_id in ids:
        requests.delete(f"{srv.url}/v1/jobs/{job_id}", timeout=10)
    for job_id in ids:
        _wait(srv, job_id)


def test_full_queue_answers_429_with_retry_after(server):
    busy = [_submit(server, LONG, m).json()["id"] for m in ("default", "other")]
    for job_id in busy:  # both workers are occupied, so new jobs wait
        _wait(server, job_id, states=("running",))
    waiting = [_submit(server, dict(GEN, steps=2, seed=s)).json()["id"] for s in range(6)]
    assert all(_job(server, j)["state"] == "queued" for j in waiting)
    r = _submit(server, dict(GEN, steps=2, seed=6))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "queue is full (6 jobs waiting)" in r.json()["error"]
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=dict(GEN, steps=2), timeout=30)  # A1111 route
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    _cancel(server, *waiting, *busy)
    assert _submit(server, dict(GEN, steps=1, seed=5)).status_code == 202  # room again


def test_two_workers_run_two_models_side_by_side_each_job_once(server):
    # the same jobs on two models with the same weights, one worker on each: equal pixels, run once each
    params = [dict(GEN, steps=12, seed=40 + i, prompt=f"shape {i}") for i in range(3)]
    ids = {m: [_submit(server, p, m).json()["id"] for p in params] for m in ("default", "other")}
    # long polling: one request answers when the job is done
    first = requests.get(f"{server.url}/v1/jobs/{ids['other'][0]}?wait=60", timeout=90).json()
    assert first["state"] == "succeeded"
    assert requests.get(f"{server.url}/v1/jobs/{ids['other'][0]}?wait=61", timeout=10).status_code == 422
    jobs = {m: [_wait(server, j) for j in ids[m]] for m in ids}
    for m in jobs:
        assert all(
            j["state"] == "succeeded" and j["attempts"] == 1 and len(j["images"]) == 1 for j in jobs[m]
        )
    for a, b in zip(jobs["default"], jobs["other"], strict=True):
        assert np.array_equal(_pixels(server, a), _pixels(server, b))
    spans = {m: (min(j["started_at"] for j in jobs[m]), max(j["finished_at"] for j in jobs[m])) for m in jobs}
    assert spans["default"][0] < spans["other"][1] and spans["other"][0] < spans["default"][1]  # overlap
    listed = requests.get(f"{server.url}/v1/jobs?limit=500", timeout=10).json()["jobs"]
    all_ids = [j["id"] for j in listed]
    assert len(all_ids) == len(set(all_ids))


def test_batched_jobs_over_http_equal_solo_runs(server, pipe, one_thread):
    from diffusekit.params import GenerationParams

    blocker = _submit(server, LONG).json()["id"]
    _wait(server, blocker, states=("running",))
    params = [dict(GEN, steps=4, seed=70 + i, prompt=f"a red circle number {i}") for i in range(3)]
    ids = [_submit(server, p).json()["id"] for p in params]  # they wait for the default model
    _cancel(server, blocker)
    jobs = [_wait(server, j) for j in ids]
    assert all(j["state"] == "succeeded" for j in jobs)
    assert len({j["started_at"] for j in jobs[1:]}) == 1  # claimed together with the first: one batch
    for p, job in zip(params, jobs, strict=True):
        solo = pipe.generate(GenerationParams(**p))
        assert np.array_equal(np.asarray(solo.images[0]), _pixels(server, job))
        assert solo.infotexts[0] == job["images"][0]["infotext"]


def test_skip_ends_the_current_image_and_the_job_goes_on(server, pipe, one_thread):
    from diffusekit.params import GenerationParams

    params = dict(GEN, steps=40, n_iter=2, seed=90)
    job_id = _submit(server, params).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]
        if state["job"] == f"task({job_id})" and state["sampling_step"] >= 2:
            break
        time.sleep(0.02)
    assert state["job_no"] == 0 and state["sampling_step"] < 40  # still on the first image
    assert requests.post(f"{server.url}/sdapi/v1/skip", timeout=10).status_code == 200
    job = _wait(server, job_id)
    assert job["state"] == "succeeded" and [im["seed"] for im in job["images"]] == [90, 91]
    full = pipe.generate(GenerationParams(**params))
    assert not np.array_equal(np.asarray(full.images[0]), _pixels(server, job, 0))  # ended early
    assert np.array_equal(np.asarray(full.images[1]), _pixels(server, job, 1))  # the next one whole
