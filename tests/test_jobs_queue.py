"""The SQLite job queue on its own: order, idempotency, cancel, crash recovery, durable image files."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from PIL import Image

from diffusekit.jobs import JobState, QueueFull, SQLiteQueue
from diffusekit.jobs.files import ImageStore


def test_priority_then_fifo_and_ids_never_reused(tmp_path):
    q = SQLiteQueue(tmp_path / "q.db")
    a = q.submit("txt2img", {"seed": 1}, model="default")[0]
    b = q.submit("txt2img", {"seed": 2}, model="default", priority=5)[0]
    c = q.submit("txt2img", {"seed": 3}, model="default")[0]
    assert [q.claim().id for _ in range(3)] == [b.id, a.id, c.id]
    assert q.claim() is None
    assert q.position(a) == 0
    seen = {a.id, b.id, c.id}
    for j in (a, b, c):
        q.finish(j.id, JobState.SUCCEEDED)
    q.close()
    q = SQLiteQueue(tmp_path / "q.db")  # a fresh process: sequence and ids continue, never reused
    d = q.submit("txt2img", {}, model="default")[0]
    assert d.id not in seen and d.seq > c.seq


def test_idempotency_cancel_and_recover(tmp_path):
    q = SQLiteQueue(tmp_path / "q.db", max_queued=3)
    j, created = q.submit("txt2img", {}, model="m", owner="k1", idempotency_key="x")
    again, created2 = q.submit("txt2img", {}, model="m", owner="k1", idempotency_key="x")
    other, created3 = q.submit("txt2img", {}, model="m", owner="k2", idempotency_key="x")
    assert created and not created2 and again.id == j.id and created3 and other.id != j.id
    assert q.get(j.id, owner="k2") is None and q.get(j.id, owner="k1").id == j.id
    assert q.cancel(j.id, owner="k2") is None
    assert q.cancel(j.id, owner="k1").state == JobState.CANCELLED  # queued: it never runs
    running = q.claim()
    assert running.id == other.id and running.state == JobState.RUNNING
    third = q.submit("txt2img", {}, model="m")[0]
    q.submit("txt2img", {}, model="m")
    q.submit("txt2img", {}, model="m")
    with pytest.raises(QueueFull):
        q.submit("txt2img", {}, model="m")
    # a crash: the running job goes back to the queue; a running job whose cancel was asked ends cancelled
    q.claim()
    assert q.cancel(third.id).cancel_requested
    assert q.heartbeat(third.id, 1, 10) is True
    assert q.recover() == 1
    assert q.get(other.id).state == JobState.QUEUED and q.get(third.id).state == JobState.CANCELLED
    assert sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_images_are_written_whole_and_strays_swept(tmp_path):
    store = ImageStore(tmp_path)
    rec = store.write(
        Image.new("RGB", (8, 8), (1, 2, 3)), "hello\nSteps: 1, Seed: 2, Size: 8x8", owner=None, seed=2
    )
    path = tmp_path / rec.path
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert store.open(rec).getpixel((0, 0)) == (1, 2, 3)
    (path.parent / ".dead.tmp").write_bytes(b"half")
    orphan = store.write(Image.new("RGB", (8, 8)), "", owner=None)
    assert store.sweep({rec.path}) == 2
    assert path.is_file() and not (tmp_path / orphan.path).exists()


@pytest.fixture
def one_thread():
    """One compute thread (see server_helpers.env: on a busy machine OpenMP's spinning threads crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batched_jobs_are_pixel_identical_to_solo_runs(tmp_path, one_thread):
    """Compatible queued jobs share one sampler run (batching is on by default) and each image is the
    one its job makes alone, bit for bit, with the same infotext; an incompatible job runs on its own."""
    import numpy as np

    from diffusekit.cli_generate import default_model_path
    from diffusekit.jobs.catalog import ModelCatalog
    from diffusekit.jobs.worker import JobRunner
    from diffusekit.params import GenerationParams

    runner = JobRunner(tmp_path, ModelCatalog(None, default_model_path()))
    assert runner.batch_max == 8
    # 8 jobs: at this batch size oneDNN's 1x1 convolutions already pick other kernels (see jobs.batch)
    prompts = [f"a red circle number {i}" for i in range(7)] + ["two green dots on a long blue line"]
    base = {"steps": 4, "width": 64, "height": 64, "sampler": "Euler a", "cfg_scale": 2.0}
    ids = [
        runner.submit("txt2img", {**base, "prompt": p, "seed": 5 + i}, model="default")[0].id
        for i, p in enumerate(prompts)
    ]
    odd = runner.submit("txt2img", {**base, "prompt": "x", "seed": 1, "steps": 5}, model="default")[0].id
    runner.start()
    try:
        jobs = [runner.wait(i, 240) for i in ids]
        assert runner.wait(odd, 120).state == JobState.SUCCEEDED
    finally:
        runner.stop()
    assert all(j.state == JobState.SUCCEEDED for j in jobs)
    assert len({j.started_at for j in jobs[1:]}) == 1  # the first job's run took the other seven along
    pipe = runner.cache.get(runner.catalog.get("default"))
    for i, (p, job) in enumerate(zip(prompts, jobs, strict=True)):
        solo = pipe.generate(GenerationParams(**base, prompt=p, seed=5 + i))
        assert np.array_equal(np.asarray(solo.images[0]), np.asarray(runner.store.open(job.images[0]))), i
        assert job.images[0].infotext == solo.infotexts[0]


def test_skip_ends_the_current_image_and_goes_on(one_thread):
    """A1111's skip: the image being sampled ends at its current x0 estimate, the next ones are whole; in
    a batch of jobs only the skipped job's image ends early."""
    import threading

    import numpy as np

    from diffusekit.cli_generate import default_model_path
    from diffusekit.jobs.batch import batchable, generate_batch
    from diffusekit.params import GenerationParams
    from diffusekit.pipeline import Pipeline

    pipe = Pipeline.from_file(default_model_path())
    params = GenerationParams(prompt="a red circle", seed=9, steps=6, width=64, height=64, n_iter=3)
    full = pipe.generate(params)
    skip = threading.Event()

    def at_step(p) -> None:
        if p.batch == 1 and p.step == 2:
            skip.set()

    skipped = pipe.generate(params, callback=at_step, skip=skip)
    pixels = [[np.asarray(im) for im in r.images] for r in (full, skipped)]
    assert len(skipped.images) == 3 and skipped.seeds == full.seeds == [9, 10, 11]
    assert np.array_equal(pixels[0][0], pixels[1][0]) and np.array_equal(pixels[0][2], pixels[1][2])
    assert not np.array_equal(pixels[0][1], pixels[1][1])  # ended at step 3 of 6
    assert skipped.infotexts == full.infotexts
    # batched jobs: job 1 is skipped at step 2, the others run to the end
    ps = [params.replace(n_iter=1, prompt=f"shape {i}", seed=20 + i) for i in range(3)]
    skips = [threading.Event() for _ in ps]
    out = generate_batch(pipe, ps, batchable(pipe, ps), callback=lambda p: p.step == 2 and skips[1].set(),
                         skips=skips)  # fmt: skip
    for i, (p, r) in enumerate(zip(ps, out, strict=True)):
        same = np.array_equal(np.asarray(r.images[0]), np.asarray(pipe.generate(p).images[0]))
        assert same == (i != 1), i


def test_a_failing_job_is_failed_with_its_reason_and_the_next_runs(tmp_path, one_thread):
    from diffusekit.cli_generate import default_model_path
    from diffusekit.jobs.catalog import ModelCatalog
    from diffusekit.jobs.worker import JobRunner

    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    catalog = ModelCatalog(models, default_model_path())
    assert [e.name for e in catalog.entries()] == ["default", "broken"]
    with pytest.raises(ValueError, match="not found; valid: default, broken"):
        catalog.get("../models/broken")
    runner = JobRunner(tmp_path / "data", catalog)
    bad = runner.submit("txt2img", {"prompt": "x", "seed": 1, "steps": 2}, model="broken")[0].id
    huge = runner.submit(
        "txt2img",
        {"prompt": "x", "seed": 1, "steps": 2, "width": 4096, "height": 4096, "batch_size": 64},
        model="default",
    )[0].id
    good = runner.submit("txt2img", {"prompt": "x", "seed": 1, "steps": 2}, model="default")[0].id
    runner.start()
    try:
        failed, too_big, ok = (runner.wait(i, 120) for i in (bad, huge, good))
    finally:
        runner.stop()
    assert (
        failed.state == JobState.FAILED
        and failed.error.startswith("CheckpointError")
        and "broken" in failed.error
    )
    assert too_big.state == JobState.FAILED and too_big.error.startswith("MemoryBudgetError")
    assert ok.state == JobState.SUCCEEDED and len(ok.images) == 1


def test_model_cache_loads_once_and_evicts_least_recently_used(tmp_path, one_thread):
    from diffusekit.jobs.cache import LOAD_HEADROOM, ModelCache
    from diffusekit.jobs.catalog import ModelCatalog
    from helpers import make_checkpoint

    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny_sd1",):
        make_checkpoint(name, models)
    (models / "tiny_sd1.safetensors").rename(models / "a.safetensors")
    make_checkpoint("tiny_sd1", models, seed=1)
    (models / "tiny_sd1.safetensors").rename(models / "b.safetensors")
    catalog = ModelCatalog(models, None)
    a, b = catalog.get("a"), catalog.get("b")
    loads = []
    room = int(a.size_bytes * LOAD_HEADROOM * 1.5)  # one model fits, two do not
    cache = ModelCache(catalog, limit_bytes=room, on_load=lambda name, s: loads.append(name))
    pa = cache.get(a)
    assert cache.get(a) is pa and loads == ["a"]  # loaded once
    cache.get(b)
    assert cache.loaded() == ["b"] and loads == ["a", "b"]  # a evicted to make room
    big = ModelCache(catalog, limit_bytes=room * 4, on_load=lambda name, s: loads.append(name))
    big.get(a), big.get(b), big.get(a)
    assert big.loaded() == ["b", "a"]  # both fit; a is the most recently used
