"""A1111-compatible /sdapi/v1: requests become jobs on the same queue as /v1, answered when they finish."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from ..diffusion.samplers import SAMPLERS, SCHEDULE_A1111_NAMES
from ..jobs.model import Job, JobState
from ..memory import available_bytes, proc_bytes
from ..metadata import parse_infotext, read_infotext
from .a1111_schemas import (
    GenerationResponse,
    Img2ImgRequest,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from .adapters_routes import check_adapters
from .auth import Principal, authenticate, check_quota, require_admin
from .errors import ApiError, FieldError
from .families import check_family
from .inputs import decode_b64_image, encode_png_b64
from .model_info import sd_model_rows
from .submit import check_generation, failure_status, resolve_model, wait_done

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 compatible"])

HIRES_UPSCALERS = {
    "latent": "latent",
    "latent (nearest)": "latent-nearest",
    "latent (nearest-exact)": "latent-nearest",
    "lanczos": "lanczos",
}
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}  # 3 = "Just resize (latent upscale)": not supported
INPAINT_FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": "default",
    "CLIP_stop_at_last_layers": 1,
    "sd_vae": "Automatic",
    "samples_format": "png",
    "eta_noise_seed_delta": 0,
}
# A1111 names for "the same as the first pass" in hires fields
SAME = {"", "use same checkpoint", "use same sampler", "use same scheduler", "none"}


def _unsupported(field: str, what: str) -> FieldError:
    return FieldError(field, f"{what} is not supported by diffusekit; leave it at its default")


def options(request: Request) -> dict[str, Any]:
    return {**DEFAULT_OPTIONS, **request.app.state.runner.queue.setting("a1111_options", {})}


def _settings(request: Request, override: dict[str, Any]) -> tuple[str, int]:
    """(model name, clip skip) from the options and a request's override_settings."""
    cat = request.app.state.runner.catalog
    opts = options(request)
    model_field = "override_settings.sd_model_checkpoint" if "sd_model_checkpoint" in override else "options"
    model = resolve_model(cat, override.get("sd_model_checkpoint", opts["sd_model_checkpoint"]), model_field)
    clip = override.get("CLIP_stop_at_last_layers", opts["CLIP_stop_at_last_layers"])
    if not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12:
        raise FieldError(
            "override_settings.CLIP_stop_at_last_layers", f"{clip!r} is out of range; valid: 1..12"
        )
    vae = override.get("sd_vae", "Automatic")
    if str(vae).casefold() not in ("automatic", "none"):
        raise FieldError("override_settings.sd_vae", f"VAE {vae!r} not found; valid: Automatic, None")
    if override.get("eta_noise_seed_delta", 0) not in (0, None):
        raise _unsupported("override_settings.eta_noise_seed_delta", "a non-zero eta noise seed delta")
    return model, clip


def _common(req: Txt2ImgRequest) -> dict[str, Any]:
    """GenerationParams fields shared by txt2img and img2img, after refusing what cannot be honoured."""
    checks = (
        ("restore_faces", req.restore_faces, "face restoration"),
        ("tiling", req.tiling, "tiling"),
        ("script_name", bool(req.script_name), f"script {req.script_name!r} (no scripts are installed)"),
        ("styles", bool(req.styles), "prompt styles"),
        ("seed_resize_from_w", req.seed_resize_from_w > 0, "seed resize"),
        ("seed_resize_from_h", req.seed_resize_from_h > 0, "seed resize"),
        ("s_churn", req.s_churn != 0, "s_churn"),
        ("s_noise", req.s_noise != 1, "s_noise other than 1"),
        ("s_min_uncond", req.s_min_uncond != 0, "s_min_uncond"),
        ("refiner_checkpoint", (req.refiner_checkpoint or "").casefold() not in SAME, "a refiner"),
    )
    for field, bad, what in checks:
        if bad:
            raise _unsupported(field, what)
    if req.alwayson_scripts:
        name = next(iter(req.alwayson_scripts))
        raise FieldError(
            f"alwayson_scripts.{name}", f"always-on script {name!r} not found; none are installed"
        )
    sampler = req.sampler_name or req.sampler_index
    return dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=req.width,
        height=req.height,
        steps=req.steps,
        cfg_scale=req.cfg_scale,
        sampler=sampler,
        schedule=req.scheduler,
        seed=req.seed,
        subseed=req.subseed,
        subseed_strength=req.subseed_strength,
        batch_size=req.batch_size,
        n_iter=req.n_iter,
        eta=req.eta,
    )


def _txt2img_params(req: Txt2ImgRequest) -> dict[str, Any]:
    params = _common(req)
    if req.enable_hr:
        up = HIRES_UPSCALERS.get((req.hr_upscaler or "Latent").casefold())
        if up is None:
            raise FieldError(
                "hr_upscaler", f"{req.hr_upscaler!r} not found; valid: Latent, Latent (nearest), Lanczos"
            )
        for field in ("hr_resize_x", "hr_resize_y", "firstphase_width", "firstphase_height"):
            if getattr(req, field):
                raise _unsupported(field, f"{field} (use hr_scale)")
        if (req.hr_checkpoint_name or "").casefold() not in SAME:
            raise _unsupported("hr_checkpoint_name", "a second checkpoint for the hires pass")
        if (req.hr_sampler_name or "").casefold() not in SAME and req.hr_sampler_name != params["sampler"]:
            raise _unsupported("hr_sampler_name", "a different sampler for the hires pass")
        if (req.hr_scheduler or "").casefold() not in SAME | {
            "automatic"
        } and req.hr_scheduler != req.scheduler:
            raise _unsupported("hr_scheduler", "a different schedule for the hires pass")
        for field, main in (("hr_prompt", req.prompt), ("hr_negative_prompt", req.negative_prompt)):
            if getattr(req, field) and getattr(req, field) != main:
                raise _unsupported(field, "a different prompt for the hires pass")
        strength = 0.7 if req.denoising_strength is None else req.denoising_strength
        params.update(
            enable_hr=True,
            hr_scale=req.hr_scale,
            hr_upscaler=up,
            hr_second_pass_steps=req.hr_second_pass_steps,
            hr_denoising_strength=strength,
        )
    return params


def _img2img_params(req: Img2ImgRequest) -> dict[str, Any]:
    params = _common(req)
    if req.resize_mode not in RESIZE_MODES:
        raise _unsupported("resize_mode", "resize_mode 3 (latent upscale); valid: 0, 1, 2")
    if req.initial_noise_multiplier != 1:
        raise _unsupported("initial_noise_multiplier", "an initial noise multiplier other than 1")
    if req.latent_mask:
        raise _unsupported("latent_mask", "a separate latent mask")
    if not req.init_images:
        raise FieldError("init_images", "img2img needs one base64 image in init_images")
    if len(req.init_images) > 1:
        raise _unsupported("init_images", f"{len(req.init_images)} init images (send one)")
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    params.update(
        denoising_strength=req.denoising_strength,
        resize_mode=RESIZE_MODES[req.resize_mode],
        mask_blur=float(blur),
        inpainting_fill=INPAINT_FILLS[req.inpainting_fill],
        inpaint_full_res=bool(req.inpaint_full_res),
        inpaint_full_res_padding=req.inpaint_full_res_padding,
    )
    return params


async def _generate(request: Request, p: Principal, req: Txt2ImgRequest, kind: str) -> GenerationResponse:
    app = request.app.state
    check_quota(request, p)
    model, clip_skip = _settings(request, req.override_settings)
    params = _img2img_params(req) if kind != "txt2img" else _txt2img_params(req)
    params["clip_skip"] = clip_skip
    names = {"sampler": "sampler_name", "schedule": "scheduler"}
    check_generation(params, names)
    check_family(app.runner.catalog, model, "inpaint" if getattr(req, "mask", None) else kind, params, names)
    check_adapters(app.runner, params, model=model)
    inputs = []
    if kind != "txt2img":
        inputs = await run_in_threadpool(_store_inputs, app, p, req, params)
        kind = "inpaint" if "mask" in params else "img2img"
    job, _ = app.runner.submit(
        kind, params, model=model, owner=p.owner, inputs=inputs, idempotency_key=req.force_task_id
    )
    request.state.job_id = job.id
    done = await wait_done(app.runner, job.id, app.config.a1111_timeout_s)
    if done is None or not done.state.done:
        raise ApiError(
            504, f"job {job.id} did not finish within {app.config.a1111_timeout_s:.0f} s; see /v1/jobs"
        )
    if done.state == JobState.FAILED:
        raise ApiError(failure_status(done), f"generation failed: {done.error}")
    images = [] if not req.send_images else await run_in_threadpool(_b64_images, app, done)
    echo = req.model_dump()
    if kind != "txt2img" and not getattr(req, "include_init_images", False):
        echo.update(init_images=None, mask=None)
    return GenerationResponse(images=images, parameters=echo, info=json.dumps(_info(done, params, model)))


def _store_inputs(app, p: Principal, req: Img2ImgRequest, params: dict[str, Any]) -> list:
    cfg = app.config
    bounds = dict(max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)
    init = decode_b64_image(req.init_images[0], "init_images.0", **bounds)
    records = [app.runner.save_input(init, p.owner)]
    params["init_image"] = records[0].id
    if req.mask:
        mask = decode_b64_image(req.mask, "mask", mode="L", **bounds)
        if mask.size != init.size:
            raise FieldError(
                "mask",
                f"mask is {mask.size[0]}x{mask.size[1]} but init_images.0 is "
                f"{init.size[0]}x{init.size[1]}; they must match",
            )
        records.append(app.runner.save_input(mask, p.owner))
        params["mask"] = records[1].id
        params["mask_invert"] = bool(req.inpainting_mask_invert)
    return records


def _b64_images(app, job: Job) -> list[str]:
    return [encode_png_b64(app.runner.store.read(rec)) for rec in job.images]


def _info(job: Job, params: dict[str, Any], model: str) -> dict[str, Any]:
    """A1111's Processed.js() keys for a finished job."""
    texts = [rec.infotext for rec in job.images]
    seeds = [rec.seed for rec in job.images]
    first = parse_infotext(texts[0]) if texts else {}
    n = len(seeds)
    subseed = params.get("subseed", -1)
    return {
        "prompt": params["prompt"],
        "all_prompts": [params["prompt"]] * n,
        "negative_prompt": params["negative_prompt"],
        "all_negative_prompts": [params["negative_prompt"]] * n,
        "seed": seeds[0] if seeds else params["seed"],
        "all_seeds": seeds,
        "subseed": subseed,
        "all_subseeds": [subseed + i if subseed >= 0 else -1 for i in range(n)],
        "subseed_strength": params["subseed_strength"],
        "width": params["width"],
        "height": params["height"],
        "sampler_name": first.get("Sampler", params["sampler"]),
        "cfg_scale": float(first.get("CFG scale", 0)),
        "steps": int(first.get("Steps", params["steps"])),
        "batch_size": params["batch_size"],
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": job.model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get(
            "hr_denoising_strength" if params.get("enable_hr") else "denoising_strength"
        ),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        "clip_skip": params["clip_skip"],
        "is_using_inpainting_conditioning": False,
        "version": first.get("Version"),
        "job_id": job.id,
        "interrupted": job.state == JobState.CANCELLED,
    }


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(req: Txt2ImgRequest, request: Request, p: Principal = Depends(authenticate)):
    return await _generate(request, p, req, "txt2img")


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(req: Img2ImgRequest, request: Request, p: Principal = Depends(authenticate)):
    return await _generate(request, p, req, "img2img")


@router.post("/png-info", response_model=PngInfoResponse)
def png_info(req: PngInfoRequest, request: Request, p: Principal = Depends(authenticate)):
    cfg = request.app.state.config
    img = decode_b64_image(
        req.image, "image", max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels, mode=None
    )
    text = read_infotext(img) or ""
    items = {k: v for k, v in img.info.items() if isinstance(v, str | int | float) and k != "parameters"}
    return PngInfoResponse(info=text, items=items, parameters=parse_infotext(text) if text else {})


def _visible(request: Request, p: Principal):
    runner = request.app.state.runner
    with runner._live_lock:
        lives = [lv for lv in runner.live.values() if p.owner_filter is None or lv.owner == p.owner_filter]
    return lives


@router.get("/progress", response_model=ProgressResponse)
def progress(request: Request, skip_current_image: bool = False, p: Principal = Depends(authenticate)):
    runner = request.app.state.runner
    lives = _visible(request, p)
    queued = runner.queue.list(owner=p.owner_filter, state=JobState.QUEUED, limit=1000)
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": len(lives) + len(queued),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not lives:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=state)
    lv = max(lives, key=lambda x: x.started)
    state.update(
        job=f"task({lv.job_id})",
        job_no=lv.batch,
        interrupted=lv.cancel.is_set(),
        skipped=lv.skip.is_set(),
        sampling_step=lv.step,
        sampling_steps=lv.total,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(lv.started)),
    )
    image = None if skip_current_image or lv.preview is None else encode_png_b64(lv.preview)
    eta = lv.eta_s
    return ProgressResponse(
        progress=max(0.01, lv.fraction),
        eta_relative=eta if eta is not None else 0.0,
        state=state,
        current_image=image,
        textinfo=None,
    )


def _stop_running(request: Request, p: Principal) -> int:
    runner = request.app.state.runner
    ids = [lv.job_id for lv in _visible(request, p)]
    # a training job is stopped only by DELETE /v1/jobs/{id}, never by an A1111 client's interrupt button
    ids = [i for i in ids if (job := runner.queue.get(i)) is not None and job.kind != "train_lora"]
    for job_id in ids:
        runner.cancel(job_id, p.owner_filter)
    return len(ids)


@router.post("/interrupt")
def interrupt(request: Request, p: Principal = Depends(authenticate)):
    _stop_running(request, p)
    return {}


@router.post("/skip")
def skip(request: Request, p: Principal = Depends(authenticate)):
    """A1111's skip: the caller's running jobs end their current image now (decoded from its latest x0
    estimate, as A1111 keeps it) and go on with their next batch of n_iter; the job itself succeeds."""
    runner = request.app.state.runner
    for lv in _visible(request, p):
        runner.skip(lv.job_id)
    return None


@router.get("/options")
def get_options(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
    opts = options(request)
    cat = request.app.state.runner.catalog
    try:
        entry = cat.get(opts["sd_model_checkpoint"])
        opts["sd_model_checkpoint"] = cat.title(entry)
        opts["sd_checkpoint_hash"] = cat.sha256(entry, compute=False)
    except ValueError:
        opts["sd_checkpoint_hash"] = None
    return opts


@router.post("/options")
async def set_options(body: dict[str, Any], request: Request, p: Principal = Depends(authenticate)):
    require_admin(p)
    runner = request.app.state.runner
    current = runner.queue.setting("a1111_options", {})
    changes = dict(body)
    if "sd_model_checkpoint" in changes:
        name = changes["sd_model_checkpoint"]
        if not isinstance(name, str):
            raise FieldError("sd_model_checkpoint", f"expected a model name or title, got {name!r}")
        entry = runner.catalog.get(resolve_model(runner.catalog, name, "sd_model_checkpoint"))
        try:
            await run_in_threadpool(runner.cache.get, entry)  # A1111 loads the model before answering
        except (ValueError, OSError) as e:  # a broken checkpoint file: say so, keep serving
            raise FieldError("sd_model_checkpoint", f"model {entry.name!r} failed to load: {e}") from None
        changes["sd_model_checkpoint"] = entry.name
    if "CLIP_stop_at_last_layers" in changes or "sd_vae" in changes:
        _settings(request, {k: changes[k] for k in ("CLIP_stop_at_last_layers", "sd_vae") if k in changes})
    try:
        json.dumps(changes)
    except (TypeError, ValueError):
        raise FieldError("options", "values must be JSON") from None
    runner.queue.set_setting("a1111_options", {**current, **changes})
    return None


@router.get("/sd-models")
def sd_models(request: Request, p: Principal = Depends(authenticate)):
    return sd_model_rows(request.app.state.runner)


@router.post("/refresh-checkpoints")
def refresh_checkpoints(request: Request, p: Principal = Depends(authenticate)):
    request.app.state.runner.catalog.refresh()
    return None


@router.get("/samplers")
def samplers(p: Principal = Depends(authenticate)):
    return [{"name": s.label, "aliases": [s.id, *s.aliases], "options": {}} for s in SAMPLERS.values()]


@router.get("/schedulers")
def schedulers(p: Principal = Depends(authenticate)):
    return [
        {
            "name": label.lower().replace(" ", "_"),
            "label": label,
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
        for label in SCHEDULE_A1111_NAMES
    ]


@router.get("/upscalers")
def upscalers(p: Principal = Depends(authenticate)):
    return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes")
def latent_upscale_modes(p: Principal = Depends(authenticate)):
    return [{"name": "Latent"}, {"name": "Latent (nearest)"}]


@router.get("/scripts")
def scripts(p: Principal = Depends(authenticate)):
    return {"txt2img": [], "img2img": []}


def _empty(p: Principal = Depends(authenticate)) -> list:
    return []


for _path in (
    "/sd-vae",
    "/hypernetworks",
    "/face-restorers",
    "/realesrgan-models",
    "/prompt-styles",
):
    router.add_api_route(_path, _empty, methods=["GET"])


@router.get("/memory")
def memory(p: Principal = Depends(authenticate)):
    import torch

    total = proc_bytes("MemTotal", "/proc/meminfo") or 0
    free = available_bytes() or 0
    ram = {"free": free, "used": total - free, "total": total, "process_rss": proc_bytes("VmRSS")}
    if torch.cuda.is_available():
        free_c, total_c = torch.cuda.mem_get_info()
        cuda = {
            "system": {"free": free_c, "used": total_c - free_c, "total": total_c},
            "active": {"current": torch.cuda.memory_allocated()},
        }
    else:
        cuda = {"error": "no CUDA device"}
    return {"ram": ram, "cuda": cuda}
