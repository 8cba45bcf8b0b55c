"""Pydantic model of a `train_lora` job's params: `diffusekit train-lora`'s options with server bounds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..params import MAX_STEPS
from .a1111_schemas import SEED_MAX

MAX_TRAIN_STEPS = 20_000
MAX_TRAIN_IMAGES = 200
MAX_CAPTION = 2_000
MAX_SAMPLE_PROMPTS = 4
MAX_SAMPLE_PROMPT = 2_000
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"  # a file stem: no path separators, no dots


class TrainImage(BaseModel):
    """One uploaded training image and its caption (kohya's image + .txt pair)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 image, or the id of an earlier image")
    caption: str = Field("", max_length=MAX_CAPTION)


class TrainLoraParams(BaseModel):
    """What `diffusekit train-lora` takes; the data is a dataset folder or uploaded images, not both."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(..., pattern=LORA_NAME, description="the LoRA's name: NAME.safetensors, <lora:NAME:1>")
    model: str | None = Field(None, max_length=200, description="base model from GET /v1/models")
    dataset: str | None = Field(
        None, max_length=300, description="a folder under the server's datasets folder (images + .txt)"
    )
    images: list[TrainImage] | None = Field(None, min_length=1, max_length=MAX_TRAIN_IMAGES)
    rank: int = Field(4, ge=1, le=256, description="network dim")
    alpha: float = Field(1.0, gt=0.0, le=1024.0, description="network alpha: scale = alpha / rank")
    targets: Literal["attn", "attn+conv"] = "attn"
    conv_rank: int | None = Field(None, ge=1, le=256)
    train_text_encoder: bool = False
    steps: int = Field(500, ge=1, le=MAX_TRAIN_STEPS)
    batch: int = Field(1, ge=1, le=16)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    warmup: int = Field(0, ge=0, le=MAX_TRAIN_STEPS)
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=64, description="default: the model's")
    min_snr: float | None = Field(None, gt=0.0, le=100.0, description="min-SNR loss weighting gamma")
    ema: bool = False
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    save_every: int = Field(50, ge=1, le=MAX_TRAIN_STEPS, description="checkpoint every N steps (resume)")
    sample_every: int = Field(
        0, ge=0, le=MAX_TRAIN_STEPS, description="sample images every N steps (0 = never), as the CLI's"
    )
    sample_prompt: str | list[str] = Field(
        "", description=f"the samples' prompt, or up to {MAX_SAMPLE_PROMPTS} prompts (one image each)"
    )
    sample_steps: int = Field(20, ge=1, le=MAX_STEPS, description="sampler steps of each sample image")
    format: Literal["kohya", "diffusers"] = "kohya"
    overwrite: bool = Field(False, description="replace an existing LoRA of this name")

    @model_validator(mode="after")
    def _one_source(self) -> TrainLoraParams:
        if (self.dataset is None) == (self.images is None):
            raise ValueError("give exactly one of dataset (a folder name) or images (uploads with captions)")
        return self

    def sample_prompts(self) -> list[str]:
        """The sample prompts as a list (empty: no samples)."""
        prompts = [self.sample_prompt] if isinstance(self.sample_prompt, str) else list(self.sample_prompt)
        return [p for p in prompts if p.strip()]
