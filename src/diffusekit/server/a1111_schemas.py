"""Pydantic models of A1111's /sdapi/v1 requests and responses: A1111's field names and defaults, the CLI's
ranges. Unknown fields are ignored (as A1111 does); a null is the field's default."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..params import MAX_BATCH, MAX_SIDE, MAX_STEPS

MAX_PROMPT = 10_000
SEED_MAX = 2**63 - 1


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Txt2ImgRequest(_Lenient):
    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIDE)
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIDE)
    sampler_name: str | None = Field(None, max_length=100)
    sampler_index: str = Field("Euler", max_length=100)
    scheduler: str | None = Field(None, max_length=100)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    n_iter: int = Field(1, ge=1, le=100)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=MAX_SIDE, multiple_of=8)
    height: int = Field(512, ge=64, le=MAX_SIDE, multiple_of=8)
    restore_faces: bool = False
    tiling: bool = False
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float = Field(1.0, ge=0.0, le=2.0)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    s_min_uncond: float = 0.0
    s_churn: float = 0.0
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float = 1.0
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: str | None = Field(None, max_length=100)
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS)
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = Field("", max_length=MAX_PROMPT)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT)
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = Field(None, max_length=200)
    infotext: str | None = Field(None, max_length=MAX_PROMPT)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = Field(None, max_length=16)
    resize_mode: int = Field(0, ge=0, le=3)
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    mask_blur: int | None = Field(None, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float = 1.0
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)


class GenerationResponse(BaseModel):
    images: list[str] = Field(default_factory=list, description="base64 PNGs, each with its infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, width, height, ...")


class PngInfoRequest(_Lenient):
    image: str = Field(..., description="base64 PNG")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None
