"""The animate job on the native API: checking its params before it is queued, its per-frame progress
and video in the job JSON, `GET /v1/jobs/{id}/video` and `GET /v1/motion-modules`."""

from __future__ import annotations

import random
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from ..animation.render import AnimationError
from ..animation.schedule import ScheduleError, parse_prompts, parse_schedule
from ..jobs.animate_job import (
    SCHEDULES,
    MotionModuleError,
    limits_of,
    motion_loras,
    motion_modules,
    resolve_motion_lora,
    resolve_motion_module,
    spec_from_params,
    video_info,
    video_path,
)
from ..jobs.model import Job, JobState
from ..params import MAX_BATCH
from .auth import Principal, authenticate
from .errors import ApiError, FieldError
from .submit import check_generation, resolve_model

router = APIRouter(prefix="/v1", tags=["jobs"])

GENERATION_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "sampler",
                     "schedule", "seed", "subseed", "subseed_strength", "clip_skip", "cfg_rescale",
                     "prompt_mode")  # fmt: skip
# fields that only one mode reads (the CLI ignores them elsewhere; the API says so instead)
MODE_FIELDS = {
    "seeds": "seed", "init_image": "motion", "color_coherence": "motion", "motion_module": "animatediff",
    "motion_loras": "animatediff", "context": "animatediff", "overlap": "animatediff",
    **dict.fromkeys(SCHEDULES, "motion"),
}  # fmt: skip
# (lowest, highest) values of each motion schedule's keyframes
SCHEDULE_RANGES = {"zoom": (0.1, 10.0), "angle": (-360.0, 360.0), "translation_x": (-4096.0, 4096.0),
                   "translation_y": (-4096.0, 4096.0), "strength": (0.0, 1.0),
                   "noise": (0.0, 1.0)}  # fmt: skip


def prepare_animate(app, p: Principal, body, input_image) -> tuple[dict[str, Any], str, list]:
    """Checked params of an animate job (seed drawn, init image stored), its model, its input records."""
    a = body.params
    params = a.model_dump()
    model = resolve_model(app.runner.catalog, params.pop("model") or "default", "params.model")
    gen = {k: params[k] for k in GENERATION_FIELDS}
    check_generation(gen, {k: f"params.{k}" for k in gen})
    for name in sorted(a.model_fields_set):
        mode = MODE_FIELDS.get(name)
        if mode is not None and mode != a.mode and getattr(a, name) is not None:
            raise FieldError(f"params.{name}", f"applies to mode {mode!r} only, not {a.mode!r}")
    limits = limits_of(app.runner)
    try:
        limits.check_size(a.frames, a.width or 512, a.height or 512)
    except ValueError as e:
        raise FieldError("params.frames", str(e)) from None
    if a.prompts is not None:
        try:
            prompts = parse_prompts(a.prompts, name="params.prompts")
            params["prompts"] = {str(k): v for k, v in prompts.items()}
        except ScheduleError as e:
            raise FieldError("params.prompts", _strip(str(e), "params.prompts")) from None
    if a.mode == "seed" and len(a.seeds or ()) < 2:
        raise FieldError("params.seeds", "seed travel needs a list of at least two seeds, e.g. [1, 2, 3]")
    if a.mode == "motion":
        for name in SCHEDULES:
            _check_schedule(name, params[name], a.curve)
    if a.mode == "animatediff":
        _check_animatediff(app, a)
    if params["seed"] < 0:  # fixed now: the job JSON shows it and a resumed render keeps it
        params["seed"] = random.randrange(2**32)
    try:  # the renderer's own checks, as a last net (the fields above are already named)
        spec_from_params(params, "motion module" if a.mode == "animatediff" else "").check()
    except (AnimationError, ScheduleError) as e:
        raise FieldError("params", str(e)) from None
    inputs = []
    if a.init_image:
        rec, img = input_image(app, p, a.init_image, "params.init_image", "RGB")
        if rec is None:
            rec = app.runner.save_input(img, p.owner)
            inputs.append(rec)
        params["init_image"] = rec.id
    return params, model, inputs


def _strip(message: str, name: str) -> str:
    return message.removeprefix(f"{name}: ")


def _check_schedule(name: str, text: str, curve: str) -> None:
    """The schedule parses (errors name the character position) and its values are in range."""
    field = f"params.{name}"
    try:
        sched = parse_schedule(text, curve=curve, name=field)
    except ScheduleError as e:
        raise FieldError(field, _strip(str(e), field)) from None
    lo, hi = SCHEDULE_RANGES[name]
    for frame, value in sched.keyframes:
        if not lo <= value <= hi:
            raise FieldError(
                field, f"value {value:g} at keyframe {frame} is out of range; valid: {lo:g}..{hi:g}"
            )


def _check_animatediff(app, a) -> None:
    if app.runner.n_workers > 1:  # the motion modules go into the U-Net that all workers share
        raise FieldError("params.mode", "animatediff needs a server started with --workers 1")
    if not a.motion_module:
        names = ", ".join(motion_modules(limits_of(app.runner).motion_modules_dir)) or "none installed"
        raise FieldError("params.motion_module", f"animatediff needs a motion module; valid: {names}")
    if "/" in a.motion_module or "\\" in a.motion_module or a.motion_module.startswith("."):
        raise FieldError("params.motion_module", "a name from GET /v1/motion-modules, not a path")
    try:
        resolve_motion_module(limits_of(app.runner).motion_modules_dir, a.motion_module)
    except MotionModuleError as e:
        raise FieldError("params.motion_module", str(e)) from None
    for i, lora in enumerate(a.motion_loras or ()):
        if "/" in lora.name or "\\" in lora.name or lora.name.startswith("."):
            raise FieldError(f"params.motion_loras[{i}].name", "a MotionLoRA name, not a path")
        try:
            resolve_motion_lora(limits_of(app.runner).motion_loras_dir, lora.name)
        except MotionModuleError as e:
            raise FieldError(f"params.motion_loras[{i}].name", str(e)) from None
    if a.frames > MAX_BATCH:
        raise FieldError("params.frames", f"animatediff renders all frames at once; valid: 1..{MAX_BATCH}")
    if a.cadence != 1:
        raise FieldError("params.cadence", "animatediff renders every frame; valid: 1")
    if a.overlap >= a.context:
        raise FieldError("params.overlap", f"must be below context ({a.context}); valid: 0..{a.context - 1}")


def animate_out(app, job: Job, live) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(progress fields, video) of an animate job for its JSON: frame i of N, frames written, the file."""
    frames = int(job.params.get("frames", 0))
    if job.state == JobState.RUNNING and live is not None and hasattr(live, "frames_done"):
        progress = {"frame": live.frame + 1, "frames": frames, "frames_done": live.frames_done}
    elif job.state == JobState.SUCCEEDED:
        progress = {"frame": frames, "frames": frames, "frames_done": frames}
    else:
        progress = {"frame": 0, "frames": frames, "frames_done": 0}
    video = None
    if job.state == JobState.SUCCEEDED:
        info = video_info(app.runner.data_dir, job)
        if info is not None:
            video = {"url": f"/v1/jobs/{job.id}/video", **info}
    return progress, video


@router.get("/jobs/{job_id}/video", response_class=FileResponse)
def get_video(job_id: str, request: Request, p: Principal = Depends(authenticate)):
    """The finished video of an animate job (MP4, GIF or animated WebP; byte ranges supported)."""
    runner = request.app.state.runner
    job = runner.queue.get(job_id, p.owner_filter)
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    if job.kind != "animate":
        raise ApiError(404, f"job {job_id} is a {job.kind} job; only animate jobs have a video")
    if not job.state.done:
        raise ApiError(409, f"job {job_id} is {job.state.value}; its video exists once it has succeeded")
    info = video_info(runner.data_dir, job)
    path = video_path(runner.data_dir, job)
    if job.state != JobState.SUCCEEDED or info is None or not path.is_file():
        raise ApiError(404, f"job {job_id} has no video (it {job.state.value})")
    return FileResponse(
        path, media_type=info["media_type"], filename=f"{job_id}.{info['format']}",
        content_disposition_type="inline", headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )  # fmt: skip


@router.get("/motion-modules")
def list_motion_modules(request: Request, p: Principal = Depends(authenticate)):
    """The AnimateDiff motion modules and MotionLoRAs an animatediff job may name (files and folders)."""
    limits = limits_of(request.app.state.runner)
    out = {}
    for key, found in (("motion_modules", motion_modules(limits.motion_modules_dir)),
                       ("motion_loras", motion_loras(limits.motion_loras_dir))):  # fmt: skip
        out[key] = [{"name": n, "kind": "folder" if v.is_dir() else "file"} for n, v in found.items()]
    return out
