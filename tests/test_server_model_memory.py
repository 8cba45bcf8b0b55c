"""Model memory with several workers: a model a job is generating with is never evicted by another worker's
load; that load waits (first come, first served) and says why, then runs once memory is free; a load that
can never fit, or waits too long, fails naming what is loaded and what it needs. A real server (2 workers, a
model budget that holds one of its two models) and the ModelCache itself with real pipelines and threads."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import requests

from server_helpers import ServerProcess

GEN = dict(prompt="a red circle", width=64, height=64, cfg_scale=2.0, sampler="Euler a", seed=3)
LONG = dict(GEN, steps=150, n_iter=50)  # runs until cancelled
# The bundled model in fp32 is ~55 MiB loaded and ~68 MiB to load (weights + working room): one fits in
# 100 MiB, two do not.
BUDGET_MIB = 100


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusekit.cli_generate import default_model_path

    folder = tmp_path_factory.mktemp("mm-models")
    shutil.copy(default_model_path(), folder / "other.safetensors")  # a second model: the same weights
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    data = tmp_path_factory.mktemp("mm") / "data"
    data.mkdir()
    extra = ("--no-auth", "--workers", "2", "--batch", "1", "--precision", "fp32", "--models", str(models),
             "--model-memory", str(BUDGET_MIB))  # fmt: skip
    srv = ServerProcess(data, *extra).start()
    yield srv
    srv.stop()


def _submit(srv, params: dict, model: str) -> str:
    r = requests.post(f"{srv.url}/v1/jobs", json={"kind": "txt2img", "params": {**params, "model": model}},
                      timeout=10)  # fmt: skip
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job(srv, job_id: str) -> dict:
    return requests.get(f"{srv.url}/v1/jobs/{job_id}", timeout=10).json()


def _models(srv) -> dict[str, dict]:
    return {m["name"]: m for m in requests.get(f"{srv.url}/v1/models", timeout=10).json()}


def _wait(srv, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(srv, job_id)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_a_model_in_use_is_not_evicted_and_the_other_load_waits(server):
    a = _submit(server, LONG, "default")
    deadline = time.monotonic() + 60
    while _job(server, a)["progress"]["step"] < 1:  # A is generating on `default`
        assert time.monotonic() < deadline, "job A did not start"
        time.sleep(0.05)
    b = _submit(server, dict(GEN, steps=2), "other")  # the second worker claims it and needs `other`
    # the old cache evicted `default` here (A still ran on it) and loaded `other` beside it, over budget
    seen_waiting, t_end = None, time.monotonic() + 3.0
    while time.monotonic() < t_end:
        job_a, job_b, rows = _job(server, a), _job(server, b), _models(server)
        assert job_a["state"] == "running", job_a
        assert rows["default"]["loaded"] and rows["default"]["in_use"], rows["default"]
        assert not rows["other"]["loaded"], "a second model was loaded beyond the memory budget"
        assert job_b["progress"]["step"] == 0, job_b
        if job_b["state"] == "running":
            seen_waiting = job_b["progress"].get("waiting") or seen_waiting
        time.sleep(0.2)
    assert seen_waiting, "job B never said why it waits"
    assert "'other' needs about" in seen_waiting and "default (55 MiB, in use by 1 job)" in seen_waiting
    assert f"{BUDGET_MIB} MiB" in seen_waiting, seen_waiting
    assert requests.delete(f"{server.url}/v1/jobs/{a}", timeout=10).status_code == 200
    assert _wait(server, a)["state"] == "cancelled"
    job_b = _wait(server, b)
    assert job_b["state"] == "succeeded" and len(job_b["images"]) == 1, job_b
    assert "waiting" not in job_b["progress"]
    rows = _models(server)
    assert rows["other"]["loaded"] and not rows["default"]["loaded"]  # the idle one made room
    assert not rows["other"]["in_use"]
    # and back: `default` loads again once `other` is idle; every job ran exactly once
    c = _submit(server, dict(GEN, steps=2), "default")
    job_c = _wait(server, c)
    assert job_c["state"] == "succeeded" and job_c["attempts"] == 1 and job_b["attempts"] == 1
    assert _models(server)["default"]["loaded"] and not _models(server)["other"]["loaded"]


def test_jobs_on_two_models_alternate_without_deadlock(server):
    """Four jobs on two models with two workers and room for one model: all finish, none starves."""
    ids = [_submit(server, dict(GEN, steps=2, seed=i), ("default", "other")[i % 2]) for i in range(4)]
    jobs = [_wait(server, i, timeout=180) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [(j["state"], j["error"]) for j in jobs]
    loaded = [n for n, m in _models(server).items() if m["loaded"]]
    assert len(loaded) == 1, loaded


def _png_b64() -> str:
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8, 10, 44, 46), fill=(200, 30, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_training_jobs_model_copy_counts_against_the_budget(server):
    """train_lora trains on its own fp32 copy of the model: while it runs, that copy holds its share of
    --model-memory, so a generation on another model waits for it instead of going over the budget."""
    params = {"name": "mm_train", "steps": 5000, "rank": 2, "images": [{"image": _png_b64(), "caption": "x"}]}
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "train_lora", "params": params}, timeout=30)
    assert r.status_code == 202, r.text
    train = r.json()["id"]
    deadline = time.monotonic() + 60
    while _job(server, train)["progress"]["step"] < 1:
        assert time.monotonic() < deadline, "the training job did not start"
        time.sleep(0.05)
    assert not any(m["loaded"] for m in _models(server).values())  # idle pipelines made room for the copy
    gen = _submit(server, dict(GEN, steps=2), "other")
    deadline, reason = time.monotonic() + 30, None
    while reason is None:
        assert time.monotonic() < deadline, _job(server, gen)
        reason = _job(server, gen)["progress"].get("waiting")
        time.sleep(0.1)
    assert "default (training copy) (68 MiB, in use)" in reason and "'other' needs about 68 MiB" in reason
    assert _job(server, train)["state"] == "running" and not _models(server)["other"]["loaded"]
    assert requests.delete(f"{server.url}/v1/jobs/{train}", timeout=10).status_code == 200
    assert _wait(server, train)["state"] == "cancelled"
    assert _wait(server, gen)["state"] == "succeeded"


# --- the cache itself: real pipelines, real threads ------------------------------------------------


@pytest.fixture(scope="module")
def catalog(models):
    from diffusekit.cli_generate import default_model_path
    from diffusekit.jobs.catalog import ModelCatalog

    return ModelCatalog(models, default_model_path())


def _cache(catalog, mib: int, wait_s: float = 30.0):
    from diffusekit.jobs.cache import ModelCache

    return ModelCache(catalog, device="cpu", precision="fp32", limit_bytes=mib * 2**20, wait_s=wait_s)


def test_a_model_that_can_never_fit_fails_at_once_naming_sizes(catalog, one_thread):
    from diffusekit.jobs.cache import ModelMemoryError

    cache = _cache(catalog, 40)
    t0 = time.monotonic()
    with pytest.raises(ModelMemoryError) as err:
        cache.get(catalog.get("other"))
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "'other' needs about 68 MiB" in msg and "--model-memory" in msg and "40 MiB" in msg, msg
    assert "loaded now: nothing" in msg and cache.loaded() == []


def test_a_wait_that_lasts_too_long_fails_naming_the_model_in_use(catalog, one_thread):
    from diffusekit.jobs.cache import ModelMemoryError

    cache = _cache(catalog, BUDGET_MIB, wait_s=0.6)
    default, other = catalog.get("default"), catalog.get("other")
    reasons = []
    with cache.lease(default):
        with pytest.raises(ModelMemoryError) as err:
            cache.acquire(other, on_wait=reasons.append)
        assert cache.loaded() == ["default"]
    msg = str(err.value)
    assert "default (55 MiB, in use by 1 job)" in msg and "gave up after waiting 0.6 s" in msg, msg
    assert reasons[0] and reasons[-1] is None  # told why it waited, then that it no longer does
    # with the lease gone the same load evicts the idle model and succeeds
    assert cache.get(other) is not None and cache.loaded() == ["other"]


def test_threads_sharing_and_swapping_models_never_exceed_the_budget(catalog, one_thread):
    """Three threads, two models, room for one: a model is shared by leases on it, never evicted under one,
    the loads take turns; no deadlock, and the cache never holds both."""
    cache = _cache(catalog, BUDGET_MIB)
    entries = [catalog.get("default"), catalog.get("other")]
    errors, over = [], []
    in_use: dict[str, int] = {"default": 0, "other": 0}
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            for n in range(2):
                entry = entries[(i + n) % 2]
                with cache.lease(entry) as pipe:
                    with lock:
                        in_use[entry.name] += 1
                        if in_use["default"] and in_use["other"]:
                            over.append(dict(in_use))
                    assert entry.name in cache.loaded() and pipe is not None
                    time.sleep(0.02)
                    assert entry.name in cache.loaded()  # not evicted while leased
                    with lock:
                        in_use[entry.name] -= 1
                if len(cache.loaded()) > 1:
                    over.append(cache.loaded())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still waiting"
    assert errors == [] and over == [], (errors, over)
