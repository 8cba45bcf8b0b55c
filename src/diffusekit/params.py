"""What a generation asks for: one frozen dataclass, validated with messages naming field and valid range."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from .diffusion.samplers import SAMPLERS, resolve_sampler
from .diffusion.schedules import SCHEDULES
from .images import RESIZE_MODES

MAX_SIDE = 4096
MAX_STEPS = 150
MAX_BATCH = 64
MAX_N_ITER = 1000
HIRES_UPSCALERS = ("latent", "latent-nearest", "lanczos")
INPAINT_FILLS = ("original", "latent_noise", "latent_nothing", "fill")
PROMPT_MODES = ("a1111", "a1111_no_norm", "plain")
IMG2IMG_STEPS = ("a1111", "diffusers")
STRENGTH_VALID = "more than 0 and at most 1"  # one wording for every strength check
SEED_RANGE = 2**63  # seeds are 0..2^63-1; image i of a batch uses (seed + i) mod 2^63


# field -> (min, max, description of the valid values or "" for "min..max")
_RANGES: dict[str, tuple[float, float, str]] = {
    "steps": (1, MAX_STEPS, ""),
    "cfg_scale": (0.0, 30.0, ""),
    "denoising_strength": (0.0, 1.0, STRENGTH_VALID),  # > 0 is checked where it is used (img2img)
    "subseed_strength": (0.0, 1.0, ""),
    "cfg_rescale": (0.0, 1.0, ""),
    "eta": (0.0, 2.0, ""),
    "batch_size": (1, MAX_BATCH, ""),
    "n_iter": (1, MAX_N_ITER, ""),
    "clip_skip": (1, 12, ""),
    "seed": (-1, 2**63 - 1, "-1 (random) or 0..2^63-1"),  # batches wrap: see seed_at
    "subseed": (-1, 2**63 - 1, "-1 (random) or 0..2^63-1"),
    "mask_blur": (0.0, 64.0, "0..64 pixels"),
    "inpaint_full_res_padding": (0, 256, "0..256 pixels"),
}
_HIRES_RANGES: dict[str, tuple[float, float, str]] = {
    "hr_scale": (1.0, 4.0, ""),
    "hr_second_pass_steps": (0, MAX_STEPS, f"0 (same as steps)..{MAX_STEPS}"),
    "hr_denoising_strength": (0.0, 1.0, STRENGTH_VALID),
}


# str enums of the registries (members equal their string ids, so plain strings work everywhere too)
Sampler = Enum("Sampler", {k.upper(): k for k in SAMPLERS}, type=str)
Schedule = Enum("Schedule", {k.upper(): k for k in ("automatic", *SCHEDULES)}, type=str)


class ParamError(ValueError):
    """A generation parameter out of range; the message names the field and what is valid."""

    def __init__(self, message: str, field: str = "", value: Any = None, valid: str = ""):
        super().__init__(message)
        self.field, self.value, self.valid = field, value, valid


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides an image, named as A1111's API names it where there is a counterpart."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None  # None: the model's native resolution
    height: int | None = None
    # None: the model's recommended setting (ModelDefaults; A1111's 20 / 7 / DPM++ 2M / automatic if none)
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: Sampler | str | None = None  # a Sampler, our id, an A1111 name or "DPM++ 2M Karras"
    schedule: Schedule | str | None = None
    seed: int = -1  # -1: random; image i of a batch uses seed + i
    subseed: int = -1  # variation seed (-1: random when subseed_strength > 0)
    subseed_strength: float = 0.0
    batch_size: int = 1  # images per sampler run
    n_iter: int = 1  # sampler runs (batch count)
    clip_skip: int = 1
    cfg_rescale: float = 0.0  # Lin et al. 2023 guidance rescale, for v-prediction models
    eta: float = 1.0  # noise multiplier of ancestral/SDE samplers (A1111 "eta")
    prompt_mode: str = "a1111"  # "plain" = diffusers-style: no emphasis syntax, one 77-token window
    # img2img / inpainting
    denoising_strength: float = 0.75
    img2img_steps: str = "a1111"  # "a1111": int(steps*strength)+1 steps; "diffusers": int(steps*strength)
    resize_mode: str = "resize"
    mask_blur: float = 4.0
    inpaint_full_res: bool = False  # A1111 "Only masked": work on the masked area at full resolution
    inpaint_full_res_padding: int = 32
    inpainting_fill: str = "original"
    # hires fix (txt2img): enabled by enable_hr
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "latent"
    hr_second_pass_steps: int = 0  # 0: same as steps
    hr_denoising_strength: float = 0.7
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def size(self, native: int) -> tuple[int, int]:
        """(width, height), defaulting to the model's native resolution (None only: 0 is out of range)."""
        width = native if self.width is None else self.width
        return width, native if self.height is None else self.height

    def validate(self, native: int = 512, defaults: ModelDefaults | None = None) -> GenerationParams:
        """Raise ParamError for the first field out of range; return the params with every field left to
        the model (None) filled from `defaults` (A1111's when not given)."""
        return (defaults or ModelDefaults()).fill(self)._check_ranges(native)

    def _check_ranges(self, native: int) -> GenerationParams:
        width, height = self.size(native)
        for name, value in (("width", width), ("height", height)):
            valid = f"a multiple of 8 in 64..{MAX_SIDE} (leave it out for the model's native {native})"
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, valid)
            _check(64 <= value <= MAX_SIDE and value % 8 == 0, name, value, valid)
        integers = ("steps", "batch_size", "n_iter", "clip_skip", "inpaint_full_res_padding", "seed")
        for name in (*integers, "subseed"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        ranges = dict(_RANGES, **(_HIRES_RANGES if self.enable_hr else {}))
        for name, (lo, hi, valid) in ranges.items():
            value = getattr(self, name)
            _check(_is_number(value), name, value, valid or f"{lo}..{hi}")
            _check(lo <= value <= hi, name, value, valid or f"{lo}..{hi}")
        if self.enable_hr:  # the second pass must run at least one step
            _check(self.hr_denoising_strength > 0, "hr_denoising_strength", self.hr_denoising_strength,
                   STRENGTH_VALID)  # fmt: skip
        for name, choices in (
            ("inpainting_fill", INPAINT_FILLS),
            ("prompt_mode", PROMPT_MODES),
            ("img2img_steps", IMG2IMG_STEPS),
            ("resize_mode", RESIZE_MODES),
        ):
            _check(getattr(self, name) in choices, name, getattr(self, name), ", ".join(choices))
        if self.enable_hr:
            _check(
                self.hr_upscaler in HIRES_UPSCALERS,
                "hr_upscaler",
                self.hr_upscaler,
                ", ".join(HIRES_UPSCALERS),
            )
            hr_w, hr_h = self.hires_size(native)
            _check(
                max(hr_w, hr_h) <= MAX_SIDE, "hr_scale", self.hr_scale,
                f"a factor keeping the hires size ({hr_w}x{hr_h}) within {MAX_SIDE}",
            )  # fmt: skip
        return self

    def check_img2img(self) -> GenerationParams:
        """Raise ParamError unless img2img/inpainting can run: a strength above 0 (at least one step)."""
        _check(self.denoising_strength > 0, "denoising_strength", self.denoising_strength, STRENGTH_VALID)
        return self

    def hires_size(self, native: int) -> tuple[int, int]:
        width, height = self.size(native)
        return _scaled(width, self.hr_scale), _scaled(height, self.hr_scale)


@dataclass(frozen=True)
class ModelDefaults:
    """The generation settings a model recommends, for the GenerationParams fields left at None.

    A small model trained at low guidance, a distilled few-step model or a v-prediction model tuned for
    one sampler would each be used wrong at A1111's 20 steps / CFG 7; a file can say so in its safetensors
    metadata (`METADATA_KEY`, a JSON object with any of these fields), as InvokeAI's per-model default
    settings do. What a user asks for explicitly always wins.
    """

    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule: str = "automatic"

    METADATA_KEY: ClassVar[str] = "diffusekit.defaults"

    def __post_init__(self):
        for name in ("steps", "cfg_scale"):
            lo, hi, _ = _RANGES[name]
            value = getattr(self, name)
            kind = int if name == "steps" else (int, float)
            _check(isinstance(value, kind) and not isinstance(value, bool) and lo <= value <= hi,
                   f"default {name}", value, f"{lo}..{hi}")  # fmt: skip
        try:
            resolve_sampler(self.sampler, self.schedule)
        except ValueError as e:
            raise ParamError(f"default sampler/schedule: {e}") from None

    def fill(self, params: GenerationParams) -> GenerationParams:
        """`params` with its None fields set to these."""
        unset = {f: getattr(self, f) for f in _DEFAULTED if getattr(params, f) is None}
        return params.replace(**unset) if unset else params

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], name: str = "checkpoint") -> ModelDefaults:
        """The defaults a file's metadata recommends (A1111's for any field it leaves out)."""
        text = metadata.get(cls.METADATA_KEY)
        if text is None:
            return cls()
        try:
            given = json.loads(text)
            if not isinstance(given, dict):
                raise ValueError("not a JSON object")
            unknown = sorted(set(given) - set(_DEFAULTED))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(_DEFAULTED)}")
            return cls(**given)
        except (ValueError, TypeError) as e:  # ParamError is a ValueError
            raise ParamError(f"{name}: bad {cls.METADATA_KEY} metadata {text!r}: {e}") from None

    def overrides(self) -> dict[str, Any]:
        """The fields that differ from A1111's defaults."""
        base = ModelDefaults()
        return {f: getattr(self, f) for f in _DEFAULTED if getattr(self, f) != getattr(base, f)}

    def to_metadata(self) -> dict[str, str]:
        """The metadata entry recording `overrides()` ({} when there are none)."""
        changed = self.overrides()
        return {self.METADATA_KEY: json.dumps(changed)} if changed else {}


_DEFAULTED = tuple(f.name for f in dataclasses.fields(ModelDefaults))


def _scaled(side: int, scale: float) -> int:
    return int(side * scale) // 8 * 8


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    if not ok:
        raise ParamError(f"{name}={value!r} is out of range; valid: {valid}", name, value, valid)


def seed_at(seed: int, index: int) -> int:
    """The seed of image `index` of a run starting at `seed`: seed + index, wrapped into 0..2^63-1, so
    every recorded seed is one ``--seed`` accepts and replays."""
    return (seed + index) % SEED_RANGE
