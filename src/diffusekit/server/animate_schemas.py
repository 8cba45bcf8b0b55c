"""Pydantic models of an animate job: the generation fields `diffusekit animate` takes plus the animation
settings, with the CLI's names (`--translation-x` -> `translation_x`) and ranges."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..animation.render import INTERPOLATIONS, MODES
from ..animation.schedule import CURVES
from ..params import PROMPT_MODES
from .a1111_schemas import MAX_PROMPT, SEED_MAX
from .sampling_schemas import SamplingFields

MAX_PROMPT_KEYFRAMES = 256
MAX_SEEDS = 1000
MAX_SCHEDULE_CHARS = 4000
SCHEDULE_DOC = 'keyframes "FRAME: (VALUE), ..." e.g. "0: (1.0), 30: (1.02)", or a number'

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT)]
ScheduleText = Annotated[str | float, Field(description=SCHEDULE_DOC)]


class MotionLoraRef(BaseModel):
    """One MotionLoRA by name (from the `motion_loras` folder beside the motion modules) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="file stem, file name or folder name")
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class AnimateParams(SamplingFields):
    """`diffusekit animate` options as job params (None: the model's recommendation)."""

    prompt: str = Field("", max_length=MAX_PROMPT, description="the prompt when `prompts` is not given")
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="-1: drawn when the job is accepted")
    clip_skip: int = Field(1, ge=1, le=12)
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0)
    prompt_mode: Literal[PROMPT_MODES] = "a1111"  # type: ignore[valid-type]
    # the animation
    mode: Literal[MODES] = "travel"  # type: ignore[valid-type]
    frames: int = Field(16, ge=1, description="frames of the video (the server's --max-frames bounds it)")
    fps: float = Field(8.0, gt=0.0, le=240.0)
    format: Literal["mp4", "gif", "webp"] = "mp4"
    prompts: dict[str, Prompt] | None = Field(
        None, max_length=MAX_PROMPT_KEYFRAMES, description='keyframed prompts {"0": "...", "24": "..."}'
    )
    seeds: list[Seed] | None = Field(None, max_length=MAX_SEEDS, description="seed travel: 2+ seeds")
    curve: Literal[tuple(CURVES)] = "linear"  # type: ignore[valid-type]
    cadence: int = Field(1, ge=1, le=64, description="diffuse every N-th frame, interpolate the rest")
    interpolation: Literal[INTERPOLATIONS] = "slerp"  # type: ignore[valid-type]
    zoom: ScheduleText = "1.0"
    angle: ScheduleText = "0"
    translation_x: ScheduleText = "0"
    translation_y: ScheduleText = "0"
    strength: ScheduleText = "0.45"
    noise: ScheduleText = "0.02"
    color_coherence: Literal["lab", "none"] = "lab"
    init_image: str | None = Field(None, description="motion: base64 image or the id of an earlier image")
    motion_module: str | None = Field(
        None, max_length=200, description="animatediff: a name from GET /v1/motion-modules"
    )
    motion_loras: list[MotionLoraRef] | None = Field(
        None, max_length=8, description="animatediff: MotionLoRAs (camera motions) merged into the module"
    )
    context: int = Field(16, ge=2, le=32, description="animatediff: frames per motion-module window")
    overlap: int = Field(4, ge=0, le=31, description="animatediff: frames shared by consecutive windows")

    @field_validator("zoom", "angle", "translation_x", "translation_y", "strength", "noise")
    @classmethod
    def _schedule_text(cls, value: Any) -> str:
        """Numbers become their text (the CLI's form); the syntax is checked when the job is prepared."""
        text = value if isinstance(value, str) else repr(float(value))
        if len(text) > MAX_SCHEDULE_CHARS:
            raise ValueError(f"at most {MAX_SCHEDULE_CHARS} characters")
        return text


class AnimateJobCreate(BaseModel):
    """POST /v1/jobs with kind "animate"."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["animate"]
    params: AnimateParams = Field(default_factory=AnimateParams)
    priority: int = Field(0, ge=-100, le=100, description="higher runs first; FIFO within a priority")
