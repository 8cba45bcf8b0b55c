"""The job runner: worker threads claim jobs from the queue and run each through GenerationParams +
Pipeline (the path the CLI uses, so the same parameters and seed give the same pixels), then store the
images durably before the job is marked succeeded."""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from ..params import GenerationParams
from .adapters import session
from .cache import ModelCache
from .catalog import ModelCatalog
from .files import ImageStore
from .model import ImageRecord, Job, JobState
from .queue import SQLiteQueue, batch_key

HEARTBEAT_S = 0.5  # progress is written to the database at most this often
PREVIEW_S = 0.5  # a preview is made at most this often per job
PREVIEW_SIDE = 128
_PARAM_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)} - {"extras"}

# SD latent channels -> RGB, a cheap preview without the VAE (the factors A1111's "Approx cheap" uses).
_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def params_from_job(params: dict[str, Any]) -> GenerationParams:
    """The GenerationParams stored in a job's params (its other keys name input images)."""
    return GenerationParams(**{k: v for k, v in params.items() if k in _PARAM_FIELDS})


class Observer:
    """What the runner reports (the server turns it into metrics and log lines); no-ops here."""

    def job_state(self, job: Job) -> None: ...

    def step(self, job_id: str, seconds: float) -> None: ...

    def model_load(self, name: str, seconds: float) -> None: ...


@dataclass
class Live:
    """In-memory progress of a running job (the database has step/total too, less often)."""

    job_id: str
    owner: str | None
    started: float
    step: int = 0
    total: int = 0
    pass_index: int = 1
    passes: int = 1
    batch: int = 0
    n_iter: int = 1
    fraction: float = 0.0  # overall 0..1
    preview_step: int = 0
    loss: float | None = None  # training jobs: the last step's loss
    sampling: bool = False  # training jobs: making sample images now
    cancel: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)  # A1111 skip: end the current image
    last_step_at: float = 0.0
    preview_at: float = 0.0
    heartbeat_at: float = 0.0
    model_version: str | None = None  # the store version (NAME@V) the job runs on, once resolved
    waiting: str | None = None  # why the job waits before it can run (model memory held by other jobs)

    _png: bytes | None = field(default=None, init=False, repr=False)
    _source: Callable[[], bytes | None] | None = field(default=None, init=False, repr=False)
    _render_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def preview(self) -> bytes | None:
        """A small PNG of the newest x0 estimate, rendered when first asked for (most are never looked
        at: rendering each one in the worker cost a VAE decode per job every PREVIEW_S)."""
        with self._render_lock:
            source, self._source = self._source, None
            if source is not None:
                self._png = source()
            return self._png

    @preview.setter
    def preview(self, png: bytes | None) -> None:
        with self._render_lock:
            self._png, self._source = png, None

    @property
    def preview_pending(self) -> bool:
        """A newer preview waits to be rendered (reading `preview` will run a small VAE decode)."""
        return self._source is not None

    def set_preview_source(self, render: Callable[[], bytes | None]) -> None:
        """The newest preview, as a function that renders it (called at most once, by a reader)."""
        self._source = render

    @property
    def eta_s(self) -> float | None:
        if self.fraction <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.fraction - elapsed


class JobRunner:
    """Owns the queue, the image store, the model cache and the worker threads."""

    def __init__(
        self,
        data_dir: str | Path,
        catalog: ModelCatalog,
        *,
        workers: int = 1,
        device: str = "auto",
        precision: str = "auto",
        max_queued: int = 1000,
        observer: Observer | None = None,
        batch_max: int = 8,
        model_memory_bytes: int | None = None,
        model_wait_s: float = 3600.0,
    ):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.queue = SQLiteQueue(self.data_dir / "diffusekit.db", max_queued=max_queued)
        self.store = ImageStore(self.data_dir)
        self.catalog = catalog
        self.observer = observer or Observer()
        self.cache = ModelCache(
            catalog, device=device, precision=precision, limit_bytes=model_memory_bytes, wait_s=model_wait_s,
            on_load=self.observer.model_load,
        )  # fmt: skip
        self.n_workers = workers
        self.batch_max = batch_max  # > 1: compatible queued txt2img jobs share one sampler run
        self.live: dict[str, Live] = {}
        self._live_lock = threading.Lock()
        self._wake = threading.Condition()
        self._done = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy: set[str] = set()  # models a worker is running jobs on now
        self._busy_lock = threading.Lock()
        self.recovered = 0
        self.done_version = 0
        self.adapters = None  # jobs.adapters.Adapters: the LoRA / embedding folders (set by the server)
        self.datasets_dir: Path | None = None  # where train_lora jobs find dataset folders

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue what a crash left running, drop stray files, start the workers."""
        self.recovered = self.queue.recover()
        self.store.sweep(self.queue.image_paths())
        for i in range(self.n_workers):
            t = threading.Thread(target=self._loop, name=f"diffusekit-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._live_lock:
            for live in self.live.values():
                live.cancel.set()
        self.notify()
        for t in self._threads:
            t.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # --- requests --------------------------------------------------------------------------------

    def submit(self, kind: str, params: dict[str, Any], **kw) -> tuple[Job, bool]:
        job, created = self.queue.submit(kind, params, **kw)
        if created:
            self.observer.job_state(job)
            self.notify()
        return job, created

    def save_input(self, image: Image.Image, owner: str | None) -> ImageRecord:
        """Store an uploaded image durably (before the job that uses it is committed)."""
        return self.store.write(image, "", owner=owner, role="input")

    def skip(self, job_id: str) -> bool:
        """A1111's skip for a running job: its current image ends now (at its latest x0 estimate) and the
        job goes on with its next batch of n_iter; False when the job is not running here."""
        with self._live_lock:
            live = self.live.get(job_id)
        if live is None:
            return False
        live.skip.set()
        return True

    def cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        job = self.queue.cancel(job_id, owner)
        if job is None:
            return None
        with self._live_lock:
            live = self.live.get(job_id)
        if live is not None:
            live.cancel.set()
        if job.state == JobState.CANCELLED:
            self.observer.job_state(job)
            self._signal_done()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job is done (or the timeout passes); the job as it is then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while True:
                job = self.queue.get(job_id)
                if job is None or job.state.done:
                    return job
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return job
                self._done.wait(min(0.5, left) if left is not None else 0.5)

    def _signal_done(self) -> None:
        with self._done:
            self.done_version += 1  # async waiters poll this cheaply
            self._done.notify_all()

    # --- the workers -----------------------------------------------------------------------------

    def _claim(self) -> list[Job]:
        """The next job (with the compatible ones that join its batch) on a model no other worker is on.

        A Pipeline is not safe for two concurrent runs (a LoRA merges into its weights for one call, an
        embedding hooks its text encoder), so with several workers each model is used by one at a time;
        workers run jobs on different models side by side.
        """
        with self._busy_lock:
            job = self.queue.claim(exclude_models=sorted(self._busy))
            if job is None:
                return []
            self._busy.add(job.model)
        group = [job]
        if self.batch_max > 1 and batch_key(job) is not None:
            group += self.queue.claim_compatible(job, self.batch_max - 1)
        return group

    def _loop(self) -> None:
        while not self._stop.is_set():
            group = self._claim()
            if not group:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            try:
                for j in group:
                    self.observer.job_state(j)
                if len(group) == 1:
                    self._run(group[0])
                else:
                    self._run_batch(group)
            finally:
                with self._busy_lock:
                    self._busy.discard(group[0].model)
                self.notify()  # another worker may be waiting for this model

    def _start(self, job: Job) -> Live:
        live = Live(job.id, job.owner, started=time.time(), n_iter=int(job.params.get("n_iter", 1)))
        with self._live_lock:
            self.live[job.id] = live
        if self.queue.heartbeat(job.id, 0, 0):
            live.cancel.set()
        return live

    def _end(self, job: Job, state: JobState, error=None, records=(), model_hash=None) -> None:
        with self._live_lock:
            live = self.live.get(job.id)
        version = live.model_version if live is not None else None
        done = self.queue.finish(
            job.id, state, error=error, images=records, model_hash=model_hash, model_version=version
        )
        with self._live_lock:
            self.live.pop(job.id, None)
        self.observer.job_state(done)
        self._signal_done()

    def _run(self, job: Job) -> None:
        if job.kind == "animate":  # frames, resume after a restart and a video: see jobs.animate_job
            from .animate_job import run_animate

            return run_animate(self, job)
        live = self._start(job)
        state, error, records, model_hash = JobState.FAILED, None, [], None
        try:
            if job.kind == "train_lora":
                from .train_job import Suspended, run_train_lora

                try:
                    state, records, model_hash = run_train_lora(self, job, live)
                except Suspended:  # left running: the next start re-queues it and it resumes
                    state = None
            else:
                state, records, model_hash = self._generate(job, live)
        except Exception as e:  # noqa: BLE001 - a failing job is recorded, the server keeps serving
            state, error = _failure(e)
        finally:
            if state is not None:
                self._end(job, state, error, records, model_hash)
            else:
                with self._live_lock:
                    self.live.pop(job.id, None)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Jobs that share a sampler run (see jobs.batch); each still ends on its own."""
        lives = [self._start(j) for j in jobs]
        try:
            entry = self.catalog.get(jobs[0].model)  # resolved once: every job of the run uses it
            for lv in lives:
                lv.model_version = entry.version
            pipe = self.cache.acquire(entry, on_wait=_waiting(lives))  # a cancel ends a job in the run
        except Exception as e:  # noqa: BLE001
            for j in jobs:
                self._end(j, *_failure(e))
            return
        try:  # the lease keeps the pipeline loaded until every job of the group has ended
            self._run_leased_batch(jobs, lives, pipe)
        finally:
            self.cache.release(entry)

    def _run_leased_batch(self, jobs: list[Job], lives: list[Live], pipe) -> None:
        from .batch import batchable, generate_batch

        try:
            params = [params_from_job(j.params) for j in jobs]
            solo = self.adapters is not None and any(self.adapters.uses_adapters(pipe, p) for p in params)
            conds = None if solo else batchable(pipe, params)  # LoRA / TI jobs take the solo path
        except Exception as e:  # noqa: BLE001
            for j in jobs:
                self._end(j, *_failure(e))
            return
        if conds is None:  # prompts of different lengths: one at a time (each shares this lease)
            for j in jobs:
                with self._live_lock:
                    self.live.pop(j.id, None)
                self._run(j)
            return
        hooks = [
            self._progress_hook(j, lv, pipe, i) for i, (j, lv) in enumerate(zip(jobs, lives, strict=True))
        ]
        try:
            with session(self.adapters, pipe, params):
                results = generate_batch(pipe, params, conds, callback=lambda p: [h(p) for h in hooks],
                                         cancels=[lv.cancel for lv in lives],
                                         skips=[lv.skip for lv in lives])  # fmt: skip
        except Exception as e:  # noqa: BLE001
            for j in jobs:
                self._end(j, *_failure(e))
            return
        for j, lv, result in zip(jobs, lives, results, strict=True):
            if lv.cancel.is_set():
                self._end(j, JobState.CANCELLED, "cancelled while running")
                continue
            try:
                records = [self.store.write(result.images[0], result.infotexts[0], owner=j.owner,
                                            seed=result.seeds[0])]  # fmt: skip
                self._end(j, JobState.SUCCEEDED, None, records, pipe.model_hash)
            except Exception as e:  # noqa: BLE001
                self._end(j, *_failure(e))

    def _progress_hook(self, job: Job, live: Live, pipe, index: int = 0):
        """The pipeline callback for one job: live progress, previews, heartbeats (and cancel requests)."""

        def on_progress(p) -> None:
            now = time.time()
            if live.last_step_at and index == 0:
                self.observer.step(job.id, now - live.last_step_at)
            live.last_step_at = now
            live.step, live.total, live.pass_index, live.passes, live.batch = (
                p.step, p.total, p.pass_index, p.passes, p.batch,
            )  # fmt: skip
            done_runs = p.batch * p.passes + (p.pass_index - 1) + p.step / max(p.total, 1)
            live.fraction = min(1.0, done_runs / (live.n_iter * p.passes))
            if p.denoised is not None and now - live.preview_at >= PREVIEW_S:
                live.preview_at = now
                live.set_preview_source(partial(_preview, pipe, p.denoised[index : index + 1].clone()))
                live.preview_step = p.step
            if now - live.heartbeat_at >= HEARTBEAT_S or p.step == p.total:
                live.heartbeat_at = now
                if self.queue.heartbeat(job.id, p.step, p.total):
                    live.cancel.set()

        return on_progress

    def _generate(self, job: Job, live: Live) -> tuple[JobState, list[ImageRecord], str | None]:
        entry = self.catalog.get(job.model)  # a store NAME resolves to its current version now
        live.model_version = entry.version
        with self.cache.lease(entry, cancel=live.cancel, on_wait=_waiting([live])) as pipe:
            return self._generate_on(pipe, job, live)

    def _generate_on(self, pipe, job: Job, live: Live) -> tuple[JobState, list[ImageRecord], str | None]:
        params = params_from_job(job.params)
        inputs = {}
        for key, mode in (("init_image", "RGB"), ("mask", "L")):
            image_id = job.params.get(key)
            if image_id:
                rec = self.queue.image(image_id)
                if rec is None:
                    raise ValueError(f"{key}: image {image_id} no longer exists")
                inputs[key] = self.store.open(rec).convert(mode)
        if job.params.get("mask_invert") and "mask" in inputs:
            inputs["mask"] = inputs["mask"].point(lambda v: 255 - v)
        with session(self.adapters, pipe, [params]):  # the server's LoRA / embedding folders
            result = pipe.generate(
                params,
                init_image=inputs.get("init_image"),
                mask=inputs.get("mask"),
                callback=self._progress_hook(job, live, pipe),
                cancel=live.cancel,
                skip=live.skip,
            )
        records = [
            self.store.write(img, text, owner=job.owner, seed=seed)
            for img, text, seed in zip(result.images, result.infotexts, result.seeds, strict=True)
        ]
        return JobState.SUCCEEDED, records, pipe.model_hash


def _waiting(lives: list[Live]) -> Callable[[str | None], None]:
    """The cache's on_wait for these jobs: their live status says why they wait (None: no longer)."""

    def on_wait(reason: str | None) -> None:
        for lv in lives:
            lv.waiting = reason

    return on_wait


def _failure(e: Exception) -> tuple[JobState, str]:
    """(state, error) for an exception out of a job: cancelled, or failed with a one-line reason."""
    from ..pipeline import Cancelled

    if isinstance(e, Cancelled):
        return JobState.CANCELLED, "cancelled while running"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return JobState.FAILED, f"{type(e).__name__}: {text}" if text else type(e).__name__


def _preview(pipe, denoised) -> bytes | None:
    """A small PNG of the first image's current x0 estimate: the VAE for small images, else a linear map."""
    import torch

    z = denoised[:1].float()  # (1, C, h, w)
    try:
        if z.shape[-1] * z.shape[-2] <= 32 * 32:
            img = pipe.decode(z)[0]
        elif z.shape[1] == 4:
            rgb = torch.einsum("bchw,cr->brhw", z, torch.tensor(_LATENT_RGB))  # (1, 3, h, w)
            arr = ((rgb[0] + 1) / 2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
            img = Image.fromarray(arr)
        else:
            return None
    except Exception:  # noqa: BLE001 - a preview is best effort
        return None
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
