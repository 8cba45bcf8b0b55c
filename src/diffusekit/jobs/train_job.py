"""The `train_lora` job: `diffusekit train-lora` run by a worker, with progress, loss, cancel and resume.

The steps are those of the CLI (same config, network init, data order, loss and optimizer), driven one at a
time so the job can report {step, total, loss}, check for a cancel between steps and checkpoint every
`save_every` steps into DATA/training/<job id>/. A job the queue re-queues after a crash resumes from that
checkpoint (exact, see train.loop), so it never trains twice to completion. On success the LoRA is written
atomically into the server's LoRA folder, where the next prompt can use it, and the work folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from ..adapters.lora import LoraError
from ..checkpoints.single_file import read_safetensors_header
from .model import ImageRecord, Job, JobState

JOB_META = "diffusekit_job_id"  # metadata key naming the job that wrote a LoRA file
HEARTBEAT_S = 0.5


class Suspended(Exception):
    """The server is stopping: the job was checkpointed and stays `running`, so the next start re-queues
    it and it resumes (a graceful restart does not cancel a training run)."""


def work_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "training" / job_id


def result_path(data_dir: Path, job_id: str) -> Path:
    """Where a finished training job's summary is kept (read by the job API)."""
    return data_dir / "training" / f"{job_id}.json"


def read_result(data_dir: Path, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(result_path(data_dir, job_id).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _written_by(path: Path, job: Job) -> bool:
    """Whether the LoRA file at `path` exists and was written by `job`."""
    try:
        return path.is_file() and read_safetensors_header(path)[1].get(JOB_META) == job.id
    except ValueError:
        return False


def _lora_out(runner, job: Job) -> Path:
    """The LoRA file this job writes; refuses to replace one it did not write unless overwrite is set."""
    name = job.params["name"]
    out = runner.adapters.loras.folder / f"{name}.safetensors"
    if out.exists() and not job.params.get("overwrite") and not _written_by(out, job):
        raise LoraError(f"a LoRA named {name!r} exists already; set overwrite to replace it")
    return out


def _dataset(runner, job: Job, work: Path) -> Path:
    """The folder of images + captions: the named dataset folder, or the uploads written into `work`."""
    p = job.params
    if p.get("dataset") is not None:
        return runner.datasets_dir / p["dataset"]
    folder = work / "data"
    if not (folder / "done").is_file():  # written once; a resumed job reuses it
        folder.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(p["images"]):
            rec = runner.queue.image(item["image"])
            if rec is None:
                raise LoraError(f"images.{i}: image {item['image']} no longer exists")
            runner.store.open(rec).convert("RGB").save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text(item.get("caption", ""))
        (folder / "done").write_text("")
    return folder


def run_train_lora(runner, job: Job, live) -> tuple[JobState, list[ImageRecord], str | None]:
    """Train, report, checkpoint; write the LoRA; return (state, [loss curve image], base model hash).

    A failure or a cancel removes the work folder; a crash or a server stop leaves it, for the resume.
    The job's own fp32 copy of the base model counts against the server's model memory while it runs."""
    from ..pipeline import Cancelled

    try:
        entry = runner.catalog.get(job.model)
        need = runner.cache.estimate(entry, precision="fp32")
        waiting = partial(setattr, live, "waiting")  # why it waits for model memory (None: no longer)
        with ExitStack() as stack:
            try:
                label = f"{entry.label} (training copy)"
                stack.enter_context(runner.cache.hold(label, need, cancel=live.cancel, on_wait=waiting))
            except Cancelled:
                if not runner.running:  # the server stops while it waits: re-queued on the next start
                    raise Suspended(job.id) from None
                raise
            return _train(runner, job, live)
    except Suspended:
        raise
    except Exception:
        shutil.rmtree(work_dir(runner.data_dir, job.id), ignore_errors=True)
        raise


def _train(runner, job: Job, live) -> tuple[JobState, list[ImageRecord], str | None]:
    import torch

    from ..adapters.train_lora import (
        CaptionedImages,
        LoraParameters,
        LoraTrainConfig,
        LoraTraining,
        make_loss_fn,
        new_network,
        training_metadata,
    )
    from ..checkpoints.load import load_model
    from ..pipeline import Cancelled
    from ..train.loop import TrainConfig, Trainer
    from ..train.report import loss_curve_png

    p = job.params
    name = p["name"]
    out = _lora_out(runner, job)
    if read_result(runner.data_dir, job.id) is not None and _written_by(out, job):
        return JobState.SUCCEEDED, [], None  # a crash came after the LoRA was written: nothing to redo
    work = work_dir(runner.data_dir, job.id)
    entry = runner.catalog.get(job.model)
    live.model_version = entry.version  # the exact store version trained on (None for a file)
    # its own fp32 copy of the base model: the cached generation pipeline is never touched
    loaded = runner.catalog.store.load(entry.version) if entry.kind == "store" else load_model(entry.path)
    model = loaded.model.float()
    res = p.get("resolution") or loaded.cfg.resolution
    cfg = LoraTrainConfig(
        rank=p["rank"], alpha=p["alpha"], targets=p["targets"], conv_rank=p.get("conv_rank"),
        train_text_encoder=p["train_text_encoder"], resolution=res, min_snr_gamma=p.get("min_snr"),
        seed=p["seed"],
    )  # fmt: skip
    data = CaptionedImages(_dataset(runner, job, work), res)
    net = new_network(model, name, cfg, p["seed"])
    params = LoraParameters(net)
    training = LoraTraining(model, loaded.tokenizer, data, cfg)
    steps = p["steps"]
    tcfg = TrainConfig(
        steps=steps, batch_size=p["batch"], lr=p["lr"], warmup=min(p["warmup"], steps),
        ema_decay=p["ema_decay"], grad_clip=1.0, bf16=False, save_every=p["save_every"],
        log_every=max(1, min(10, steps // 10)), seed=p["seed"],
    )  # fmt: skip
    trainer = Trainer(name, params, tcfg, work, precision="fp32")
    resumed_from = trainer.state.step if trainer.resume() else None  # a re-queued job goes on from here
    loss_fn = make_loss_fn(training, net, p["batch"])
    start, t0, running = trainer.state.step, time.perf_counter(), []
    live.total, live.step = steps, start
    live.loss = trainer.state.losses[-1][1] if trainer.state.losses else None
    sampler = Samples(runner, job, live, loaded, net)
    _samples(runner, job, trainer, params, sampler, start)  # those a stop during sampling left unmade
    params.train()
    while trainer.state.step < steps:
        if live.cancel.is_set():
            if not runner.running:  # the server stops, nobody cancelled: keep the work for the restart
                trainer.save()
                raise Suspended(job.id)
            raise Cancelled("training cancelled")
        loss = trainer.train_step(loss_fn, trainer.state.step).item()
        trainer.state.step += 1
        step = trainer.state.step
        running.append(loss)
        if step % tcfg.log_every == 0 or step == steps:
            trainer.state.losses.append((step, sum(running) / len(running)))
            running = []
        if step % tcfg.save_every == 0 or step == steps:
            trainer.save()
        _report(runner, job, live, step, steps, loss)
        _samples(runner, job, trainer, params, sampler, step)
    params.eval()
    if p["ema"]:
        trainer.ema.copy_to(params)
    seconds = time.perf_counter() - t0
    meta = training_metadata(cfg, loaded.cfg, name, steps, p["lr"], len(data), entry.filename)
    meta[JOB_META] = job.id
    out = _lora_out(runner, job)  # again: another job may have written the name meanwhile
    with torch.no_grad():
        net.save(out, loaded.cfg, style=p["format"], metadata=meta)
    records = []
    if trainer.state.losses:
        curve = loss_curve_png({f"LoRA {name}": trainer.state.losses}, work / "loss.png")
        from PIL import Image

        with Image.open(curve) as img:
            records.append(runner.store.write(img.convert("RGB"), "", owner=job.owner))
    summary = {
        "lora": name,
        "file": out.name,
        "bytes": out.stat().st_size,
        "prompt": f"<lora:{name}:1>",
        "steps": steps,
        "resumed_from": resumed_from,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / (steps - start), 4) if steps > start else None,
        "final_loss": trainer.state.losses[-1][1] if trainer.state.losses else None,
        "losses": trainer.state.losses,
        "layers": len(net.modules),
        "images": len(data),
        "resolution": res,
    }
    _write_json(result_path(runner.data_dir, job.id), summary)
    shutil.rmtree(work, ignore_errors=True)
    return JobState.SUCCEEDED, records, None


class Samples:
    """Sample images every `sample_every` steps (the CLI's option), one per sample prompt, made with the
    LoRA as trained so far on the job's own copy of the model and stored with the job as role "sample"
    at once, so the job's status and events list them while training goes on. A resumed job skips the
    steps whose samples were stored before the crash."""

    def __init__(self, runner, job: Job, live, loaded, net):
        self.runner, self.job, self.live, self.loaded, self.net = runner, job, live, loaded, net
        self.every = int(job.params.get("sample_every") or 0)
        prompts = job.params.get("sample_prompt") or []
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.done = {r.step for r in runner.queue.job_images(job.id, "sample")}
        self._pipe = None

    def due(self, step: int) -> bool:
        return bool(self.every and self.prompts) and step % self.every == 0 and step not in self.done

    def make(self, step: int) -> None:
        """One image per prompt at `step`, stored and recorded with the job (durably) before it goes on."""
        import torch

        from ..adapters.train_lora import sample_with_lora
        from ..pipeline import Pipeline

        if self._pipe is None:
            self._pipe = Pipeline(self.loaded, dtype=torch.float32)  # shares the model being trained
            if self.runner.adapters is not None:
                self.runner.adapters.attach(self._pipe)  # <lora:...> tags and embeddings of the server
        p, store, owner, records = self.job.params, self.runner.store, self.job.owner, []
        self.live.sampling = True
        try:
            for prompt in self.prompts:
                kw = dict(seed=p["seed"], steps=p["sample_steps"], cancel=self.live.cancel)
                result = sample_with_lora(self._pipe, self.net, prompt, **kw)
                img, text, seed = result.images[0], result.infotexts[0], result.seeds[0]
                records.append(store.write(img, text, owner=owner, seed=seed, role="sample", step=step))
        finally:
            self.live.sampling = False
        if self.runner.queue.add_images(self.job.id, records):
            self.done.add(step)


def _samples(runner, job: Job, trainer, params, sampler: Samples, step: int) -> None:
    """The samples due at `step`; a server stop while they are made checkpoints `step` (Suspended)."""
    from ..pipeline import Cancelled

    if step == 0 or not sampler.due(step):
        return
    params.eval()
    try:
        sampler.make(step)
    except Cancelled:
        if not runner.running:  # the server stops: the restarted job makes them before it goes on
            trainer.save()
            raise Suspended(job.id) from None
        raise
    params.train()


def _report(runner, job: Job, live, step: int, total: int, loss: float) -> None:
    """Live progress and loss; the step is written to the database at most every HEARTBEAT_S."""
    now = time.time()
    live.step, live.total, live.loss = step, total, loss
    live.fraction = step / total
    if now - live.heartbeat_at >= HEARTBEAT_S or step == total:
        live.heartbeat_at = now
        if runner.queue.heartbeat(job.id, step, total):
            live.cancel.set()
