"""The generation fields that the native job kinds which sample share (txt2img/img2img/inpaint, animate)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..params import MAX_SIDE, MAX_STEPS
from .a1111_schemas import MAX_PROMPT, SEED_MAX


class SamplingFields(BaseModel):
    """GenerationParams fields every sampling job takes, with the CLI's ranges (None: the model's
    recommendation); a job kind's params model adds its own fields after these."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None, max_length=200, description="a name from GET /v1/models (default: 'default')"
    )
    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)
    sampler: str | None = Field(None, max_length=100)
    schedule: str | None = Field(None, max_length=100)
    seed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
