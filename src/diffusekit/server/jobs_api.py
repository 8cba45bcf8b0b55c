"""The native job API /v1: submit (202), look up, list, cancel, follow by server-sent events, images."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..diffusion.samplers import SAMPLERS
from ..jobs.model import Job, JobState
from .adapters_routes import check_adapters, prepare_train
from .animate_api import animate_out, prepare_animate
from .auth import Principal, authenticate, check_quota
from .errors import ApiError, FieldError
from .families import check_family
from .inputs import decode_b64_image
from .model_info import model_rows
from .schemas import JobCreated, JobList, JobOut, JobRequest
from .submit import check_generation, resolve_model, wait_done

router = APIRouter(prefix="/v1", tags=["jobs"])
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")


def job_out(request: Request, job: Job) -> JobOut:
    runner = request.app.state.runner
    live = runner.live.get(job.id)
    step, total, fraction, eta = job.step, job.total, 1.0 if job.state == JobState.SUCCEEDED else 0.0, None
    if live is not None and job.state == JobState.RUNNING:
        step, total, fraction, eta = live.step, live.total, live.fraction, live.eta_s
    progress = {"step": step, "total": total, "fraction": round(fraction, 4)}
    if live is not None and live.waiting and job.state == JobState.RUNNING:
        progress["waiting"] = live.waiting  # e.g. for model memory that other running jobs hold
    result, samples = None, None
    if job.kind == "train_lora":
        from ..jobs.train_job import read_result

        result = read_result(runner.data_dir, job.id) if job.state == JobState.SUCCEEDED else None
        loss = live.loss if live is not None else None
        progress["loss"] = loss if loss is not None else (result or {}).get("final_loss")
        if live is not None and live.sampling and job.state == JobState.RUNNING:
            progress["sampling"] = True  # making sample images (training resumes after them)
        samples = train_samples(runner, job)
    params = {k: v for k, v in job.params.items()}
    video = None
    if job.kind == "animate":  # frame i of N and the frames written; the video once it succeeded
        extra, video = animate_out(request.app.state, job, live)
        progress.update(extra)
    return JobOut(
        id=job.id,
        kind=job.kind,
        state=job.state.value,
        priority=job.priority,
        progress=progress,
        eta_s=eta,
        error=job.error,
        images=[
            {"id": r.id, "url": f"/v1/images/{r.id}", "seed": r.seed, "infotext": r.infotext}
            for r in job.images
        ],
        model=job.model,
        model_hash=job.model_hash,
        model_version=job.model_version,
        params=params,
        queue_position=runner.queue.position(job) if job.state == JobState.QUEUED else None,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        timings={"queue_wait_s": job.queue_wait_s, "run_s": job.run_s},
        result=result,
        video=video,
        samples=samples,
    )


def train_samples(runner, job: Job) -> list[dict[str, Any]]:
    """A train_lora job's sample images so far, by step: [{id, url, step, prompt, seed, infotext}]."""
    prompts = job.params.get("sample_prompt") or []
    prompts = [prompts] if isinstance(prompts, str) else prompts
    out, index = [], {}
    for r in runner.queue.job_images(job.id, "sample"):
        i = index[r.step] = index.get(r.step, -1) + 1  # within a step, in the order of the prompts
        out.append({"id": r.id, "url": f"/v1/images/{r.id}", "step": r.step,
                    "prompt": prompts[i] if i < len(prompts) else None, "seed": r.seed,
                    "infotext": r.infotext})  # fmt: skip
    return out


def _input_image(app, p: Principal, value: str, field: str, mode: str):
    """An image given as the id of an earlier (own) image, or as base64; returns (record or None, image)."""
    runner = app.runner
    if _IMAGE_ID.match(value):
        rec = runner.queue.image(value, p.owner_filter)
        if rec is None:
            raise FieldError(field, f"image {value} not found")
        return rec, runner.store.open(rec).convert(mode)
    cfg = app.config
    img = decode_b64_image(
        value, field, max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels, mode=mode
    )
    return None, img


def _prepare(app, p: Principal, body: JobRequest) -> tuple[dict[str, Any], str, list]:
    if body.kind == "animate":
        return prepare_animate(app, p, body, _input_image)
    params = body.params.model_dump()
    model = resolve_model(app.runner.catalog, params.pop("model") or "default", "params.model")
    init, mask = params.pop("init_image"), params.pop("mask")
    gen = {k: v for k, v in params.items() if k != "mask_invert"}
    check_generation(gen, {k: f"params.{k}" for k in gen})
    check_family(app.runner.catalog, model, body.kind, gen, {k: f"params.{k}" for k in (*gen, "mask")})
    check_adapters(app.runner, gen, "params.prompt", model)
    if body.kind == "txt2img" and (init or mask):
        raise FieldError(
            "params.init_image", "txt2img takes no init_image or mask; use kind img2img or inpaint"
        )
    if body.kind in ("img2img", "inpaint") and not init:
        raise FieldError("params.init_image", f"{body.kind} needs an init_image (base64 or an image id)")
    if body.kind == "inpaint" and not mask:
        raise FieldError("params.mask", "inpaint needs a mask (base64 or an image id; white = repaint)")
    if body.kind == "img2img" and mask:
        raise FieldError("params.mask", "img2img takes no mask; use kind inpaint")
    inputs = []
    if init:
        rec, img = _input_image(app, p, init, "params.init_image", "RGB")
        if rec is None:
            rec = app.runner.save_input(img, p.owner)
            inputs.append(rec)
        params["init_image"] = rec.id
        if mask:
            mrec, mimg = _input_image(app, p, mask, "params.mask", "L")
            if mimg.size != img.size:
                raise FieldError(
                    "params.mask",
                    f"mask is {mimg.size[0]}x{mimg.size[1]} but init_image is "
                    f"{img.size[0]}x{img.size[1]}; they must match",
                )
            if mrec is None:
                mrec = app.runner.save_input(mimg, p.owner)
                inputs.append(mrec)
            params["mask"] = mrec.id
    return params, model, inputs


@router.post("/jobs", status_code=202, response_model=JobCreated)
def create_job(
    body: JobRequest,
    request: Request,
    response: Response,
    idempotency_key: str | None = Header(None, max_length=200),
    p: Principal = Depends(authenticate),
):
    app = request.app.state
    if idempotency_key is not None:
        existing = app.runner.queue.list_by_key(p.owner, idempotency_key)
        if existing is not None:
            return JobCreated(id=existing.id, state=existing.state.value)
    check_quota(request, p)
    if body.kind == "train_lora":
        params, model, inputs = prepare_train(app, p, body.params)
    else:
        params, model, inputs = _prepare(app, p, body)
    job, _ = app.runner.submit(
        body.kind,
        params,
        model=model,
        priority=body.priority,
        owner=p.owner,
        idempotency_key=idempotency_key,
        inputs=inputs,
    )
    request.state.job_id = job.id
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobCreated(id=job.id, state=job.state.value)


def _get(request: Request, p: Principal, job_id: str) -> Job:
    job = request.app.state.runner.queue.get(job_id, p.owner_filter)
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return job


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str,
    request: Request,
    wait: float = Query(
        0, ge=0, le=60, description="long polling: answer once the job is done or after this many seconds"
    ),
    p: Principal = Depends(authenticate),
):
    job = await run_in_threadpool(_get, request, p, job_id)
    if wait > 0 and not job.state.done:  # one request per job instead of one per polling interval
        await wait_done(request.app.state.runner, job_id, wait)
        job = await run_in_threadpool(_get, request, p, job_id)
    return await run_in_threadpool(job_out, request, job)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    request: Request,
    state: JobState | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=20, pattern=r"^\d+$"),
    p: Principal = Depends(authenticate),
):
    q = request.app.state.runner.queue
    jobs = q.list(p.owner_filter, state, limit + 1, int(cursor) if cursor else None)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobList(jobs=[job_out(request, j) for j in jobs], next_cursor=str(jobs[-1].seq) if more else None)


@router.delete("/jobs/{job_id}", response_model=JobOut)
def cancel_job(job_id: str, request: Request, p: Principal = Depends(authenticate)):
    _get(request, p, job_id)
    job = request.app.state.runner.cancel(job_id, p.owner_filter)
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return job_out(request, job)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, p: Principal = Depends(authenticate)):
    """Server-sent events: `progress` (step, total, fraction, eta_s, a small preview) and a final `done`."""
    _get(request, p, job_id)
    runner = request.app.state.runner

    async def stream():
        last, last_preview = None, None
        while True:
            if await request.is_disconnected():
                return
            job = runner.queue.get(job_id)
            out = job_out(request, job)
            if job.state.done:
                yield f"event: done\ndata: {out.model_dump_json()}\n\n"
                return
            live = runner.live.get(job_id)
            data = {
                "state": out.state,
                **out.progress,
                "eta_s": out.eta_s,
                "queue_position": out.queue_position,
            }
            if out.samples:  # a training job's sample images so far (an event when one is added)
                data["samples"] = [{k: s[k] for k in ("id", "url", "step", "prompt")} for s in out.samples]
            preview = None
            if live is not None:  # rendering (when a new one waits) runs off the event loop
                preview = (
                    await run_in_threadpool(lambda lv=live: lv.preview)
                    if live.preview_pending
                    else live.preview
                )
            if preview is not None and preview is not last_preview:
                last_preview = preview
                data["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
            key = json.dumps({k: v for k, v in data.items() if k != "eta_s"}, sort_keys=True)
            if key != last:
                last = key
                yield f"event: progress\ndata: {json.dumps(data)}\n\n"
            await asyncio.sleep(0.1)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/images/{image_id}", response_class=Response)
async def get_image(image_id: str, request: Request, p: Principal = Depends(authenticate)):
    runner = request.app.state.runner
    rec = runner.queue.image(image_id, p.owner_filter) if _IMAGE_ID.match(image_id) else None
    if rec is None:
        raise ApiError(404, f"image {image_id} not found")
    data = await run_in_threadpool(runner.store.read, rec)
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"}
    )


@router.get("/models")
def list_models(request: Request, p: Principal = Depends(authenticate)):
    return model_rows(request.app.state.runner)


@router.get("/samplers")
def list_samplers(p: Principal = Depends(authenticate)):
    from ..diffusion.schedules import SCHEDULES

    return {
        "samplers": [
            {"id": s.id, "name": s.label, "default_schedule": s.default_schedule} for s in SAMPLERS.values()
        ],
        "schedules": ["automatic", *SCHEDULES],
    }
