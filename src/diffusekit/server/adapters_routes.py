"""LoRAs and embeddings over HTTP: A1111's /sdapi/v1/loras, /embeddings and refresh routes, their /v1
equivalents, the prompt check that answers 422 for an unknown <lora:NAME>, and `train_lora` job intake."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from ..adapters.lora import LoraError
from ..adapters.train_lora import IMAGE_SUFFIXES
from ..jobs.model import JobState
from ..jobs.train_job import JOB_META
from .auth import Principal, authenticate, require_admin
from .errors import ApiError, FieldError
from .submit import resolve_model
from .train_schemas import TrainLoraParams

router = APIRouter(tags=["LoRA and embeddings"])


def check_adapters(runner, params: dict[str, Any], field: str = "prompt", model: str | None = None) -> None:
    """422 naming the LoRA when a prompt's <lora:NAME:...> tag names none the server has (or is malformed)."""
    if runner.adapters is None:
        return
    try:
        runner.adapters.loras.check(params.get("prompt") or "")
    except LoraError as e:
        raise FieldError(field, str(e)) from None


# --- A1111 --------------------------------------------------------------------------------------


@router.get("/sdapi/v1/loras")
def sdapi_loras(request: Request, p: Principal = Depends(authenticate)) -> list[dict[str, Any]]:
    """[{name, alias, path, metadata}]; path is relative to the server's LoRA folder."""
    return request.app.state.runner.adapters.loras.listing()


@router.post("/sdapi/v1/refresh-loras")
def sdapi_refresh_loras(request: Request, p: Principal = Depends(authenticate)):
    """The folder is read on every use, so this only re-reads it once (A1111 returns null)."""
    request.app.state.runner.adapters.loras.files()
    return None


async def _widths(request: Request, model: str | None) -> tuple[str, list[int]]:
    """(model name, its text encoders' widths), loading the model as a generation with it would."""
    from .a1111 import options

    runner = request.app.state.runner
    name = model or options(request)["sd_model_checkpoint"]
    entry = runner.catalog.get(resolve_model(runner.catalog, name, "model"))
    try:
        pipe = await run_in_threadpool(runner.cache.get, entry)
    except (ValueError, OSError) as e:  # a broken checkpoint: say so, keep serving
        raise ApiError(503, f"model {entry.name!r} failed to load: {e}") from None
    return entry.name, [e.cfg.width for e in pipe.model.text_encoders]


@router.get("/sdapi/v1/embeddings")
async def sdapi_embeddings(request: Request, p: Principal = Depends(authenticate)) -> dict[str, Any]:
    """{"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {...}}:
    loaded = fits the current model's text encoders."""
    _, widths = await _widths(request, None)
    library = request.app.state.runner.adapters.embeddings
    return await run_in_threadpool(library.listing, widths)


@router.post("/sdapi/v1/refresh-embeddings")
def sdapi_refresh_embeddings(request: Request, p: Principal = Depends(authenticate)):
    request.app.state.runner.adapters.embeddings.all()
    return None


# --- native /v1 -----------------------------------------------------------------------------------


@router.get("/v1/loras", tags=["jobs"])
def list_loras(request: Request, p: Principal = Depends(authenticate)) -> list[dict[str, Any]]:
    """The LoRAs prompts can use: name, alias, the tag to paste, size, base model and rank when recorded."""
    loras = request.app.state.runner.adapters.loras
    out = []
    for item in loras.listing():
        path = loras.folder / item["path"]
        meta = item["metadata"]
        out.append(
            {
                "name": item["name"],
                "alias": item["alias"],
                "file": item["path"],
                "prompt": f"<lora:{item['name']}:1>",
                "bytes": path.stat().st_size,
                "modified_at": path.stat().st_mtime,
                "base_model": meta.get("ss_base_model_version"),
                "rank": meta.get("ss_network_dim"),
                "alpha": meta.get("ss_network_alpha"),
                "trained_by_job": meta.get(JOB_META),
            }
        )
    return out


@router.get("/v1/embeddings", tags=["jobs"])
async def list_embeddings(
    request: Request, model: str | None = Query(None, max_length=200), p: Principal = Depends(authenticate)
) -> dict[str, Any]:
    """Embeddings usable by name in prompts with `model` (default: the current model), those that do not
    fit it, and files that could not be read."""
    name, widths = await _widths(request, model)
    library = request.app.state.runner.adapters.embeddings
    listing = await run_in_threadpool(library.listing, widths)

    def items(group: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"name": k, **v} for k, v in group.items()]

    return {
        "model": name,
        "loaded": items(listing["loaded"]),
        "skipped": items(listing["skipped"]),
        "unreadable": [{"name": k, "error": v} for k, v in library.errors.items()],
    }


# --- train_lora jobs ------------------------------------------------------------------------------


def _datasets(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def dataset_folder(root: Path, name: str) -> Path:
    """The dataset folder `name` under `root`; a FieldError listing the valid names for anything else."""
    root = root.resolve()
    parts = PurePosixPath(name).parts
    bad = (
        not name.strip()
        or "\\" in name
        or name.startswith("/")
        or any(part in ("..", ".") or part.startswith(".") for part in parts)
    )
    path = (root / name).resolve()
    if bad or not path.is_relative_to(root) or not path.is_dir():
        valid = ", ".join(_datasets(root)) or "(none: put image folders in the server's datasets folder)"
        raise FieldError("params.dataset", f"dataset {name!r} not found; valid: {valid}")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        raise FieldError("params.dataset", f"dataset {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return path


def _sample_prompts(runner, raw: TrainLoraParams, model: str) -> list[str]:
    """The sample prompts, checked as a generation's prompt is (length, <lora:...> names)."""
    from .train_schemas import MAX_SAMPLE_PROMPT, MAX_SAMPLE_PROMPTS

    prompts = raw.sample_prompts()
    if isinstance(raw.sample_prompt, list) and not 1 <= len(raw.sample_prompt) <= MAX_SAMPLE_PROMPTS:
        raise FieldError("params.sample_prompt", f"give 1..{MAX_SAMPLE_PROMPTS} prompts, not "
                         f"{len(raw.sample_prompt)}")  # fmt: skip
    for i, prompt in enumerate(prompts):
        field = "params.sample_prompt" if isinstance(raw.sample_prompt, str) else f"params.sample_prompt.{i}"
        if len(prompt) > MAX_SAMPLE_PROMPT:
            raise FieldError(field, f"{len(prompt)} characters; valid: at most {MAX_SAMPLE_PROMPT}")
        check_adapters(runner, {"prompt": prompt}, field, model)
    return prompts


def prepare_train(app, p: Principal, raw: TrainLoraParams) -> tuple[dict[str, Any], str, list]:
    """(job params, base model name, stored input images) of a train_lora job, or a 4xx naming the field."""
    from .jobs_api import _input_image

    require_admin(p)  # it writes into the LoRA folder every key reads, and holds a worker for long
    runner = app.runner
    params = raw.model_dump()
    model = resolve_model(runner.catalog, params.pop("model") or "default", "params.model")
    family = runner.catalog.family(runner.catalog.get(model))
    if family == "sd3":
        raise FieldError("params.model", f"train_lora trains SD1, SD2 and SDXL models; {model!r} is SD3")
    name = params["name"]
    if (runner.adapters.loras.folder / f"{name}.safetensors").exists() and not params["overwrite"]:
        raise FieldError("params.name", f"a LoRA named {name!r} exists already; set overwrite to replace it",
                         status=409)  # fmt: skip
    for state in (JobState.QUEUED, JobState.RUNNING):
        for job in runner.queue.list(state=state, limit=1000):
            if job.kind == "train_lora" and job.params.get("name") == name:
                raise FieldError("params.name", f"job {job.id} is already training a LoRA named {name!r}",
                                 status=409)  # fmt: skip
    if params["conv_rank"] is not None and params["targets"] != "attn+conv":
        raise FieldError("params.conv_rank", "conv_rank needs targets 'attn+conv'")
    if params["warmup"] > params["steps"]:
        raise FieldError("params.warmup", f"warmup {params['warmup']} is more than steps {params['steps']}")
    params["sample_prompt"] = _sample_prompts(runner, raw, model)
    if params["sample_every"] and not params["sample_prompt"]:
        raise FieldError("params.sample_prompt", "sample_every needs a sample_prompt (a prompt or a list)")
    inputs = []
    if params["dataset"] is not None:
        dataset_folder(runner.datasets_dir, params["dataset"])
    else:
        images = []
        for i, item in enumerate(params["images"]):
            rec, img = _input_image(app, p, item["image"], f"params.images.{i}.image", "RGB")
            if rec is None:
                rec = runner.save_input(img, p.owner)
                inputs.append(rec)
            images.append({"image": rec.id, "caption": item["caption"]})
        params["images"] = images
    return params, model, inputs
