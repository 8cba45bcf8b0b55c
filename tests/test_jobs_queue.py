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


def test_batched_jobs_match_solo_runs(tmp_path, one_thread):
    """Compatible queued jobs share one sampler run; each image equals its solo run up to the float
    rounding of a batched U-Net (at most 1/255, as the pipeline's own batch_size gives), same infotext."""
    import numpy as np

    from diffusekit.cli_generate import default_model_path
    from diffusekit.jobs.catalog import ModelCatalog
    from diffusekit.jobs.worker import JobRunner
    from diffusekit.params import GenerationParams

    runner = JobRunner(tmp_path, ModelCatalog(None, default_model_path()), batch_max=8)
    prompts = ["a red circle", "a blue square on the left", "two green dots"]
    base = {"steps": 4, "width": 64, "height": 64, "sampler": "Euler a", "cfg_scale": 2.0}
    ids = [runner.submit("txt2img", {**base, "prompt": p, "seed": 5 + i}, model="default")[0].id
           for i, p in enumerate(prompts)]  # fmt: skip
    odd = runner.submit("txt2img", {**base, "prompt": "x", "seed": 1, "steps": 5}, model="default")[0].id
    runner.start()
    try:
        jobs = [runner.wait(i, 120) for i in ids]
        assert runner.wait(odd, 120).state == JobState.SUCCEEDED
    finally:
        runner.stop()
    assert all(j.state == JobState.SUCCEEDED for j in jobs)
    assert len({j.started_at for j in jobs[1:]}) == 1  # the first job's run took the other two along
    pipe = runner.cache.get(runner.catalog.get("default"))
    for p, i, job in zip(prompts, range(3), jobs, strict=True):
        solo = pipe.generate(GenerationParams(**base, prompt=p, seed=5 + i))
        a = np.asarray(solo.images[0]).astype(int)
        b = np.asarray(runner.store.open(job.images[0])).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
        assert job.images[0].infotext == solo.infotexts[0]
