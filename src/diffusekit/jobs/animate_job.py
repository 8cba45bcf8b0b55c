"""Animate jobs: an animation (animation.render) rendered for a queued job, resumably, with per-frame
progress; its result is a video file and one image record per frame.

Files, under the data folder:
  animations/<job id>/   the render's work folder (frame PNGs, key-frame latents, animation.json)
  videos/<job id>.<fmt>  the finished video (written atomically), with <job id>.json beside it

A crash or a server stop mid-render leaves the job `running` in the database and its work folder on
disk; the next start re-queues it (queue.recover) and the renderer resumes from the last whole key
frame, so the frames equal an uninterrupted render. The job ends once: queue.finish only moves a
`running` job, and the frames' image records are written in that same transaction.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from ..durable import fsync_dir
from ..image_files import write_atomic
from ..metadata import parse_infotext, read_infotext
from .model import ImageRecord, Job, JobState
from .worker import PREVIEW_S, PREVIEW_SIDE, Live, _failure, _preview, params_from_job

WORK_DIR = "animations"
VIDEO_DIR = "videos"
MEDIA_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}
MOTION_SUFFIXES = (".safetensors", ".ckpt")
HEARTBEAT_S = 0.5  # progress is written to the database at most this often
SCHEDULES = ("zoom", "angle", "translation_x", "translation_y", "strength", "noise")


class MotionModuleError(ValueError):
    """A motion-module name that the server's motion-module folder does not hold."""


@dataclass(frozen=True)
class AnimateLimits:
    """What one animate job may ask of the server, and where its motion modules live."""

    motion_modules_dir: Path
    max_frames: int = 240
    max_frame_pixels: int = 240 * 512 * 512  # frames x width x height

    @property
    def motion_loras_dir(self) -> Path:
        """MotionLoRAs live in `motion_loras`, a sibling of the motion-module folder."""
        return Path(self.motion_modules_dir).parent / "motion_loras"

    def check_size(self, frames: int, width: int, height: int) -> None:
        """Raise ValueError when `frames` frames of width x height exceed the limits."""
        if frames > self.max_frames:
            raise ValueError(f"frames={frames} is over this server's limit; valid: 1..{self.max_frames}")
        if frames * width * height > self.max_frame_pixels:
            most = max(1, self.max_frame_pixels // (width * height))
            raise ValueError(
                f"frames={frames} of {width}x{height} exceed this server's budget of "
                f"{self.max_frame_pixels:,} frame pixels (frames x width x height); valid at this size: "
                f"1..{min(most, self.max_frames)} frames"
            )


def limits_of(runner) -> AnimateLimits:
    """The runner's animate limits (set by the server app), else the defaults under its data folder."""
    limits = getattr(runner, "animate_limits", None)
    return limits if limits is not None else AnimateLimits(runner.data_dir / "motion_modules")


# --- motion modules by name --------------------------------------------------------------------


def _offered(folder: Path, is_model_dir: Callable[[Path], bool]) -> dict[str, Path]:
    """name -> path of the weights in `folder`: files by stem, folders that `is_model_dir` accepts by name;
    hidden entries and symlinks leading out of the folder are not offered."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    root = folder.resolve()
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.resolve().is_relative_to(root):
            continue
        if p.is_file() and p.suffix.lower() in MOTION_SUFFIXES:
            out.setdefault(p.stem, p)
        elif p.is_dir() and is_model_dir(p):
            out.setdefault(p.name, p)
    return out


def motion_modules(folder: Path) -> dict[str, Path]:
    """name -> path of the AnimateDiff modules in `folder`: files by stem, diffusers folders by name."""
    return _offered(folder, lambda p: (p / "config.json").is_file())


def resolve_motion_module(folder: Path, name: str) -> Path:
    """The module called `name` (a stem, a file name or a folder name) in `folder`; never a path."""
    found = motion_modules(folder)
    by_file = {p.name: p for p in found.values()}
    path = found.get(name) or by_file.get(name)
    if path is None:
        valid = ", ".join(found) or "none installed"
        raise MotionModuleError(f"motion module {name!r} not found; valid: {valid} (GET /v1/motion-modules)")
    return path


def motion_loras(folder: Path) -> dict[str, Path]:
    """name -> path of the MotionLoRAs in `folder`: files by stem, diffusers LoRA folders by name."""
    from ..animation.motion_lora import LORA_FILES

    return _offered(folder, lambda p: any((p / n).is_file() for n in LORA_FILES))


def resolve_motion_lora(folder: Path, name: str) -> Path:
    """The MotionLoRA called `name` (a stem, a file name or a folder name) in `folder`; never a path."""
    found = motion_loras(folder)
    by_file = {p.name: p for p in found.values()}
    path = None if "/" in name or "\\" in name else found.get(name) or by_file.get(name)
    if path is None:
        valid = ", ".join(found) or f"none installed (put them in {folder.name}/ beside the motion modules)"
        raise MotionModuleError(f"motion LoRA {name!r} not found; valid: {valid}")
    return path


# --- the job ------------------------------------------------------------------------------------


@dataclass
class AnimateLive(Live):
    """Live progress of an animate job: the frame being made, whole frames written, key frames done."""

    frame: int = 0  # 0-based index of the frame being diffused
    frames: int = 0
    frames_done: int = 0
    keys: tuple[int, ...] = ()
    units: int = 1  # sampler runs of the whole render (key frames; 1 for animatediff)
    units_done: int = 0


def work_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / WORK_DIR / job_id


def video_path(data_dir: Path, job: Job) -> Path:
    return Path(data_dir) / VIDEO_DIR / f"{job.id}.{job.params.get('format', 'mp4')}"


def video_info(data_dir: Path, job: Job) -> dict[str, Any] | None:
    """The finished video's facts (format, media type, frames, fps, size, bytes), or None."""
    side = video_path(data_dir, job).with_suffix(".json")
    try:
        return json.loads(side.read_text())["video"]
    except (OSError, ValueError, KeyError):
        return None


def spec_from_params(
    params: dict[str, Any], motion_module: str = "", motion_loras: tuple[tuple[str, float], ...] = ()
):
    """The AnimationSpec an animate job's params describe (module and LoRAs: resolved paths)."""
    from ..animation.render import AnimationSpec, MotionSettings

    motion = MotionSettings(
        **{k: str(params[k]) for k in SCHEDULES if k in params},
        color_coherence=params.get("color_coherence", "lab"),
    )
    prompts = params.get("prompts") or {}
    return AnimationSpec(
        mode=params.get("mode", "travel"), frames=int(params.get("frames", 16)),
        fps=float(params.get("fps", 8.0)), prompts={int(k): v for k, v in sorted(prompts.items(),
        key=lambda kv: int(kv[0]))}, seeds=tuple(params.get("seeds") or ()),
        curve=params.get("curve", "linear"), cadence=int(params.get("cadence", 1)),
        interpolation=params.get("interpolation", "slerp"), motion=motion, motion_module=motion_module,
        context=int(params.get("context", 16)), overlap=int(params.get("overlap", 4)),
        motion_loras=motion_loras,
    )  # fmt: skip


def run_animate(runner, job: Job) -> None:
    """Run one claimed animate job to its end (or leave it `running` for a resume when the server stops)."""
    from ..pipeline import Cancelled

    live = AnimateLive(job.id, job.owner, started=time.time(), frames=int(job.params.get("frames", 0)))
    with runner._live_lock:
        runner.live[job.id] = live
    if runner.queue.heartbeat(job.id, 0, 0):
        live.cancel.set()
    state, error, records, model_hash = JobState.FAILED, None, [], None
    try:
        _sweep(runner)
        entry = runner.catalog.get(job.model)
        waiting = partial(setattr, live, "waiting")  # why it waits for model memory (None: no longer)
        with runner.cache.lease(entry, cancel=live.cancel, on_wait=waiting) as pipe:  # kept while it renders
            records, model_hash = _render(runner, job, live, pipe)
        state = JobState.SUCCEEDED
    except Exception as e:  # noqa: BLE001 - a failing job is recorded, the server keeps serving
        now = runner.queue.get(job.id)
        if isinstance(e, Cancelled) and runner._stop.is_set() and not (now and now.cancel_requested):
            with runner._live_lock:  # the server stops: keep the job running (re-queued on next start)
                runner.live.pop(job.id, None)
            return
        state, error = _failure(e)
    runner._end(job, state, error, records, model_hash)
    shutil.rmtree(work_dir(runner.data_dir, job.id), ignore_errors=True)
    if state != JobState.SUCCEEDED:
        video = video_path(runner.data_dir, job)
        video.unlink(missing_ok=True)
        video.with_suffix(".json").unlink(missing_ok=True)


def _render(runner, job: Job, live: AnimateLive, pipe) -> tuple[list[ImageRecord], str | None]:
    from ..animation.render import STATE_FILE, Renderer
    from ..animation.video import frame_path, write_video
    from ..pipeline import Cancelled

    limits = limits_of(runner)
    p = job.params
    module, loras = "", ()
    if p.get("mode") == "animatediff":
        module = str(resolve_motion_module(limits.motion_modules_dir, p.get("motion_module") or ""))
        loras = tuple(
            (str(resolve_motion_lora(limits.motion_loras_dir, d["name"])), float(d.get("weight", 1.0)))
            for d in p.get("motion_loras") or ()
        )
    spec = spec_from_params(p, module, loras)
    folder = work_dir(runner.data_dir, job.id)
    renderer = Renderer(pipe, params_from_job(p), spec, folder)
    limits.check_size(spec.frames, renderer.width, renderer.height)
    state_file = folder / STATE_FILE
    try:
        same = json.loads(state_file.read_text()) == json.loads(json.dumps(renderer.state()))
    except (OSError, ValueError):
        same = not state_file.exists()
    if not same:  # settings changed since the interrupted run (e.g. another model file): start over
        shutil.rmtree(folder, ignore_errors=True)
    done = 0
    while done < spec.frames and frame_path(folder, done).is_file():
        done += 1
    live.keys = tuple(spec.key_frames())
    live.units = 1 if spec.mode == "animatediff" else len(live.keys)
    live.frames_done = done
    live.units_done = 0 if spec.mode == "animatediff" else sum(1 for k in live.keys if k < done)
    live.frame = min(done, spec.frames - 1)
    live.fraction = live.units_done / live.units
    init = None
    if p.get("init_image"):
        rec = runner.queue.image(p["init_image"])
        if rec is None:
            raise ValueError(f"init_image: image {p['init_image']} no longer exists")
        init = runner.store.open(rec).convert("RGB")
    hook = _progress_hook(runner, job, live, folder, pipe)
    renderer.render(resume=True, init_image=init, callback=hook, cancel=live.cancel)
    if live.cancel.is_set() or runner.queue.heartbeat(job.id, live.total, live.total):
        raise Cancelled("generation cancelled")
    frames = []
    for i in range(spec.frames):
        with Image.open(frame_path(folder, i)) as im:
            im.load()
            frames.append(im.copy())
    out = video_path(runner.data_dir, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(frames, out, spec.fps, json.dumps(renderer.state()))  # the CLI's container comment
    fmt = out.suffix[1:]
    video = {"format": fmt, "media_type": MEDIA_TYPES[fmt], "frames": spec.frames, "fps": spec.fps,
             "width": renderer.width, "height": renderer.height, "bytes": out.stat().st_size}  # fmt: skip
    summary = {"video": video, "seed": renderer.params.seed, **renderer.state()}
    write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2).encode())
    return _publish_frames(runner, job, folder, spec.frames), pipe.model_hash


def _progress_hook(runner, job: Job, live: AnimateLive, folder: Path, pipe):
    """Renderer callback: live frame/step progress, frame previews, heartbeats, cancel between steps."""
    from ..animation.video import frame_path
    from ..pipeline import Cancelled

    def on_progress(fp) -> None:  # fp: animation.render.FrameProgress
        if live.cancel.is_set():
            raise Cancelled("generation cancelled")
        now = time.time()
        if fp.total:  # a sampler step of frame fp.frame
            if live.last_step_at and live.step < fp.step:
                runner.observer.step(job.id, now - live.last_step_at)
            live.last_step_at = now
            live.frame, live.step, live.total = fp.frame, fp.step, fp.total
            part = fp.step / fp.total
            if fp.denoised is not None and now - live.preview_at >= PREVIEW_S:  # the frame taking shape
                live.preview_at = now
                live.preview = _preview(pipe, fp.denoised)
                live.preview_step = fp.step
        else:  # frame fp.frame is written whole
            live.frames_done = max(live.frames_done, fp.frame + 1)
            if live.units > 1:  # a key frame is done once every frame up to it is written
                live.units_done = sum(1 for k in live.keys if k < live.frames_done)
            else:
                live.units_done = int(live.frames_done == live.frames)
            live.frame = min(live.frames_done, live.frames - 1)
            part = 0.0
            if fp.frame + 1 == live.frames_done:  # the latest whole frame
                live.preview_at = now
                live.preview = _thumbnail(frame_path(folder, fp.frame))
                live.preview_step = fp.frame
        live.fraction = min(1.0, (live.units_done + part) / live.units)
        if now - live.heartbeat_at >= HEARTBEAT_S:
            live.heartbeat_at = now
            if runner.queue.heartbeat(job.id, live.step, live.total):
                live.cancel.set()

    return on_progress


def _thumbnail(path: Path) -> bytes | None:
    import io

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError:
        return None
    im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _publish_frames(runner, job: Job, folder: Path, frames: int) -> list[ImageRecord]:
    """Each frame as an image record: the frame file hard-linked (or copied) into the image store."""
    from ..animation.video import frame_path

    records, parents = [], set()
    for i in range(frames):
        src = frame_path(folder, i)
        image_id = uuid.uuid4().hex
        dst = runner.store.path_of(image_id)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)  # the frame is already whole and fsynced (metadata.save_png)
            parents.add(dst.parent)
        except OSError:
            write_atomic(dst, src.read_bytes())
        infotext = read_infotext(src) or ""
        seed = parse_infotext(infotext).get("Seed", "") if infotext.strip() else ""
        records.append(ImageRecord(
            id=image_id, job_id=None, owner=job.owner, path=str(dst.relative_to(runner.data_dir)),
            seed=int(seed) if seed.isdigit() else None, infotext=infotext, created_at=time.time(),
        ))  # fmt: skip
    for parent in parents:  # the new names are durable before the records that point at them
        fsync_dir(parent)
    return records


def _sweep(runner) -> None:
    """Drop work folders of jobs that ended (left by a crash between the commit and the clean-up)."""
    root = Path(runner.data_dir) / WORK_DIR
    if not root.is_dir():
        return
    for d in root.iterdir():
        job = runner.queue.get(d.name)
        if job is None or job.state.done:
            shutil.rmtree(d, ignore_errors=True)
