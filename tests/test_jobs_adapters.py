"""The job runner with LoRA and embedding folders and two workers on one loaded model: a LoRA job holds the
model alone (its merged weights never leak into a concurrent job), embedding hooks stay in their thread,
and the shared/exclusive lock itself. Real SQLite queue and pipeline, the bundled 64x64 model."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from PIL import Image

from diffusekit.cli_generate import default_model_path
from diffusekit.jobs.adapters import Adapters, _SharedExclusive
from diffusekit.jobs.batch import batchable
from diffusekit.jobs.catalog import ModelCatalog
from diffusekit.jobs.model import JobState
from diffusekit.jobs.worker import JobRunner, params_from_job
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from test_server_lora import _make_lora

GEN = dict(seed=5, steps=3, width=64, height=64, cfg_scale=3.0, sampler="Euler")
PLAIN = "a blue square near zorb"
LORA = "a blue square near zorb <lora:styl:1>"


def test_shared_exclusive_lock():
    lock, inside = _SharedExclusive(), []
    release = {n: threading.Event() for n in ("s1", "s2", "x", "s3")}
    entered = {n: threading.Event() for n in release}

    def hold(name: str, exclusive: bool) -> None:
        with lock.hold(exclusive):
            inside.append(name)
            entered[name].set()
            release[name].wait(10)
            inside.remove(name)

    def start(name: str, exclusive: bool) -> threading.Thread:
        t = threading.Thread(target=hold, args=(name, exclusive))
        t.start()
        return t

    def until(check, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    threads = [start("s1", False), start("s2", False)]
    assert entered["s1"].wait(10) and entered["s2"].wait(10)  # shared holders overlap
    threads.append(start("x", True))
    until(lambda: lock._waiting == 1)  # x waits for the shared holders
    threads.append(start("s3", False))
    time.sleep(0.2)
    assert not entered["x"].is_set() and not entered["s3"].is_set()  # s3 queues behind the waiting x
    release["s1"].set()
    release["s2"].set()
    assert entered["x"].wait(10)
    assert inside == ["x"] and not entered["s3"].is_set()  # the exclusive holder is alone
    release["x"].set()
    assert entered["s3"].wait(10)
    release["s3"].set()
    for t in threads:
        t.join(10)


def test_worker_and_batch_agree_on_which_jobs_run_alone(tmp_path, one_thread):
    """The worker's solo decision (`Adapters.uses_adapters`) and `jobs.batch.batchable` refusing a run are
    one check: a job with a `<kind:...>` tag in either prompt or an embedding name never joins a batch."""
    embs = tmp_path / "embeddings"
    embs.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 128, generator=torch.Generator().manual_seed(2))}},
               embs / "zorb.pt")  # fmt: skip
    adapters = Adapters(tmp_path / "loras", embs)
    pipe = Pipeline.from_file(default_model_path())
    adapters.attach(pipe)
    cases = {
        ("a blue square", ""): False,
        ("a blue square", "blurry, red"): False,
        ("a blue square <lora:styl:1>", ""): True,
        ("a blue square", "blurry <lora:styl:1>"): True,  # ignored by generate, but never batched
        ("a blue square <hypernet:x:1>", ""): True,
        (PLAIN, ""): True,
        ("a blue square", "zorb"): True,
    }
    for (prompt, negative), solo in cases.items():
        p = GenerationParams(prompt=prompt, negative_prompt=negative, **GEN)
        assert adapters.uses_adapters(pipe, p) == solo, (prompt, negative)
        assert (batchable(pipe, [p, p.replace(seed=6)]) is None) == solo, (prompt, negative)


def test_lora_jobs_hold_the_model_alone_with_two_workers(tmp_path, one_thread):
    loras, embs = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embs.mkdir()
    _make_lora(loras / "styl.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 128, generator=torch.Generator().manual_seed(2))}},
               embs / "zorb.pt")  # fmt: skip
    runner = JobRunner(tmp_path / "data", ModelCatalog(None, default_model_path()), workers=2)
    runner.adapters = Adapters(loras, embs)
    pipe = runner.cache.get(runner.catalog.get("default"))
    runner.adapters.attach(pipe)
    expected = {
        prompt: np.asarray(pipe.generate(params_from_job({**GEN, "prompt": prompt})).images[0])
        for prompt in (PLAIN, LORA)
    }
    assert not np.array_equal(expected[PLAIN], expected[LORA])
    runner.start()
    try:
        jobs = [runner.submit("txt2img", {**GEN, "prompt": p}, model="default")[0] for p in [PLAIN, LORA] * 4]
        done = [runner.wait(j.id, timeout=300) for j in jobs]
    finally:
        runner.stop()
    for job in done:
        assert job.state == JobState.SUCCEEDED, job.error
        img = np.asarray(Image.open(runner.store.root.parent / job.images[0].path).convert("RGB"))
        assert np.array_equal(img, expected[job.params["prompt"]]), job.params["prompt"]
        assert ("Lora hashes" in job.images[0].infotext) == ("<lora:" in job.params["prompt"])
        assert "TI hashes" in job.images[0].infotext


def test_embedding_hooks_stay_in_their_thread(tmp_path, one_thread):
    """Two threads encoding prompts through one text encoder, each with the embeddings hooked: each gets
    exactly its single-thread conditioning (A1111 prompts with and without the embedding)."""
    embs = tmp_path / "embeddings"
    embs.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(3, 128, generator=torch.Generator().manual_seed(4))}},
               embs / "zorb.pt")  # fmt: skip
    runner = JobRunner(tmp_path / "data", ModelCatalog(None, default_model_path()))
    runner.adapters = Adapters(tmp_path / "loras", embs)
    pipe = runner.cache.get(runner.catalog.get("default"))
    runner.adapters.attach(pipe)
    prompts = ["zorb zorb on a hill", "a plain red circle"]
    want = {p: pipe.encode(params_from_job({"prompt": p}), 64, 64)[0]["context"] for p in prompts}
    assert not torch.equal(*want.values())
    errors: list[str] = []

    def loop(prompt: str) -> None:
        try:
            for _ in range(60):
                got = pipe.encode(params_from_job({"prompt": prompt}), 64, 64)[0]["context"]
                if not torch.equal(got, want[prompt]):
                    errors.append(f"{prompt!r}: conditioning differs")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{prompt!r}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=loop, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


def test_training_job_requeued_after_its_lora_was_written_does_not_train_again(tmp_path, one_thread):
    from PIL import ImageDraw

    from diffusekit.server.train_schemas import TrainLoraParams

    ds = tmp_path / "datasets" / "dots"
    ds.mkdir(parents=True)
    for i in range(2):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((10 + 8 * i, 10, 40 + 8 * i, 40), fill=(0, 120, 60))
        img.save(ds / f"{i}.png")
        (ds / f"{i}.txt").write_text("a green dot")
    params = TrainLoraParams(name="dots", dataset="dots", steps=3, save_every=1).model_dump()
    params.pop("model")

    def runner() -> JobRunner:
        r = JobRunner(tmp_path / "data", ModelCatalog(None, default_model_path()))
        r.adapters = Adapters(tmp_path / "loras", tmp_path / "embeddings")
        r.datasets_dir = tmp_path / "datasets"
        return r

    first = runner()
    first.start()
    try:
        job = first.submit("train_lora", params, model="default")[0]
        done = first.wait(job.id, timeout=300)
    finally:
        first.stop()
    assert done.state == JobState.SUCCEEDED, done.error
    lora = tmp_path / "loras" / "dots.safetensors"
    written = lora.stat().st_mtime_ns
    # a crash after the LoRA was written but before the job's end was committed: it is `running` again
    with first.queue._tx() as c:
        c.execute("UPDATE jobs SET state = 'running', finished_at = NULL WHERE id = ?", (job.id,))
    second = runner()
    second.start()  # re-queues it
    try:
        again = second.wait(job.id, timeout=300)
    finally:
        second.stop()
    assert again.state == JobState.SUCCEEDED and again.attempts == 2
    assert lora.stat().st_mtime_ns == written  # not trained or written a second time
