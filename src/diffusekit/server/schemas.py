"""Pydantic models of the native /v1 job API: GenerationParams fields with the CLI's ranges."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from ..params import INPAINT_FILLS, MAX_BATCH, MAX_STEPS, PROMPT_MODES
from .animate_schemas import AnimateJobCreate
from .sampling_schemas import SamplingFields
from .train_schemas import TrainLoraParams


class JobParams(SamplingFields):
    """GenerationParams fields (None: the model's recommendation), the model, and input images."""

    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=100)
    clip_skip: int = Field(1, ge=1, le=12)
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0)
    eta: float = Field(1.0, ge=0.0, le=2.0)
    prompt_mode: Literal[PROMPT_MODES] = "a1111"  # type: ignore[valid-type]
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    img2img_steps: Literal["a1111", "diffusers"] = "a1111"
    resize_mode: Literal["resize", "crop", "fill"] = "resize"
    mask_blur: float = Field(4.0, ge=0.0, le=64.0)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    inpainting_fill: Literal[INPAINT_FILLS] = "original"  # type: ignore[valid-type]
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: Literal["latent", "latent-nearest", "lanczos"] = "latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS)
    hr_denoising_strength: float = Field(0.7, ge=0.0, le=1.0)
    init_image: str | None = Field(None, description="base64 image, or the id of an earlier image")
    mask: str | None = Field(None, description="base64 image or image id; white = repaint")
    mask_invert: bool = False


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["txt2img", "img2img", "inpaint", "train_lora"]
    params: JobParams | TrainLoraParams = Field(default_factory=JobParams, validate_default=True)
    priority: int = Field(0, ge=-100, le=100, description="higher runs first; FIFO within a priority")

    @field_validator("params", mode="wrap")
    @classmethod
    def _params_of_kind(cls, value, handler, info: ValidationInfo):
        """The params model of the job's kind (errors then name only its fields)."""
        model = PARAMS_BY_KIND.get(info.data.get("kind"), JobParams)
        return model.model_validate(value.model_dump() if isinstance(value, BaseModel) else value)


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {"train_lora": TrainLoraParams}


def _job_kind(body: Any) -> str | None:
    """Which body model a POST /v1/jobs is: "animate", "generation", or None for an unknown kind."""
    kind = body.get("kind") if isinstance(body, dict) else getattr(body, "kind", None)
    if kind == "animate":
        return "animate"
    known = get_args(JobCreate.model_fields["kind"].annotation)
    return "generation" if not isinstance(body, dict) or kind is None or kind in known else None


# The body of POST /v1/jobs: its model is picked by `kind` (the tags are dropped from error locations).
JOB_TAGS = ("generation", "animate")
JobRequest = Annotated[
    Annotated[JobCreate, Tag("generation")] | Annotated[AnimateJobCreate, Tag("animate")],
    Discriminator(
        _job_kind,
        custom_error_type="invalid_kind",
        custom_error_message="kind: not a job kind; valid: "
        + ", ".join((*get_args(JobCreate.model_fields["kind"].annotation), "animate")),
    ),
]


class JobCreated(BaseModel):
    id: str
    state: str


class ImageOut(BaseModel):
    id: str
    url: str
    seed: int | None
    infotext: str


class JobOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    kind: str
    state: str
    priority: int
    progress: dict[str, Any]
    eta_s: float | None
    error: str | None
    images: list[ImageOut]
    model: str
    model_hash: str | None
    model_version: str | None = None  # the store version (NAME@V) the job ran on
    params: dict[str, Any]
    queue_position: int | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float | None]
    result: dict[str, Any] | None = None  # train_lora: the LoRA written, steps, losses
    video: dict[str, Any] | None = None  # animate jobs: url, media_type, format, frames, fps, size, bytes
    samples: list[dict[str, Any]] | None = None  # train_lora: sample images so far (id, url, step, prompt)


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None
