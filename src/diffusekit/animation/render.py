"""Render an animation frame by frame into a folder, resumably: prompt travel, seed travel, 2D motion.

Key frames (every `cadence`-th frame and the last) are diffused; the frames between them are
interpolated (latent slerp or pixel blend). Every frame is written as a whole PNG as soon as it exists,
and each key frame's latent beside it, so `resume=True` continues a killed render from the last key
frame on disk and gives the same frames as an uninterrupted run (same settings, same seed).
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..params import MAX_BATCH, GenerationParams
from ..pipeline import Pipeline, slerp
from . import warp as warp2d
from .schedule import CURVES, ScheduleError, blend_weights, parse_schedule
from .video import frame_path, save_frame

MODES = ("travel", "seed", "motion", "animatediff")
INTERPOLATIONS = ("slerp", "blend")
COLOR_COHERENCE = ("lab", "none")
STATE_FILE = "animation.json"
MAX_FRAMES = 10_000
MAX_MOTION_LORAS = 8


class AnimationError(ValueError):
    """Animation settings that cannot be rendered; the message names the setting and what is valid."""


@dataclass(frozen=True)
class MotionSettings:
    """Deforum-style 2D motion: keyframe schedules (see schedule.parse_schedule) evaluated per frame."""

    zoom: str = "1.0"  # scale per frame (>1 moves in)
    angle: str = "0"  # degrees per frame, counter-clockwise
    translation_x: str = "0"  # pixels per frame
    translation_y: str = "0"
    strength: str = "0.45"  # img2img denoising strength of each frame (A1111's "Denoising strength")
    noise: str = "0.02"  # pixel noise added before img2img (std dev, image in [0, 1])
    color_coherence: str = "lab"  # match each frame's LAB histograms to the first frame, or "none"

    def check(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "color_coherence":
                parse_schedule(getattr(self, f.name), name=f"--{f.name.replace('_', '-')}")
        if self.color_coherence not in COLOR_COHERENCE:
            raise AnimationError(
                f"unknown color coherence {self.color_coherence!r}; valid: {', '.join(COLOR_COHERENCE)}"
            )


@dataclass(frozen=True)
class AnimationSpec:
    """What an animation is, beside the GenerationParams shared by all its frames."""

    mode: str = "travel"
    frames: int = 16
    fps: float = 8.0
    prompts: dict[int, str] = field(default_factory=dict)  # keyframed prompts; {} = params.prompt
    seeds: tuple[int, ...] = ()  # seed travel: the seeds visited, spread evenly over the frames
    curve: str = "linear"  # easing between keyframes (prompts, seeds, schedules)
    cadence: int = 1  # diffuse every N-th frame, interpolate the rest
    interpolation: str = "slerp"  # in-between frames: "slerp" of latents or "blend" of pixels
    motion: MotionSettings = MotionSettings()
    motion_module: str = ""  # animatediff: the motion module file or diffusers folder
    context: int = 16  # animatediff: frames per window of the motion module
    overlap: int = 4  # animatediff: frames shared by consecutive windows
    motion_loras: tuple[tuple[str, float], ...] = ()  # animatediff: (MotionLoRA path, weight) pairs

    def check(self) -> AnimationSpec:
        if self.mode not in MODES:
            raise AnimationError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(self.frames, int) or not 1 <= self.frames <= MAX_FRAMES:
            raise AnimationError(f"frames {self.frames!r} is out of range; valid: 1..{MAX_FRAMES}")
        if not 0 < self.fps <= 240:
            raise AnimationError(f"fps {self.fps} is out of range; valid: above 0, at most 240")
        if self.curve not in CURVES:
            raise AnimationError(f"unknown curve {self.curve!r}; valid: {', '.join(CURVES)}")
        if not isinstance(self.cadence, int) or not 1 <= self.cadence <= 64:
            raise AnimationError(f"cadence {self.cadence!r} is out of range; valid: 1..64")
        if self.interpolation not in INTERPOLATIONS:
            raise AnimationError(
                f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}"
            )
        if self.mode == "seed" and len(self.seeds) < 2:
            raise AnimationError("seed travel needs at least two seeds (--seeds 1,2,3)")
        if any(not 0 <= s < 2**63 for s in self.seeds):
            raise AnimationError("seeds must be in 0..2^63-1")
        if self.mode == "motion":
            self.motion.check()
        if self.mode == "animatediff":
            if not self.motion_module:
                raise AnimationError("animatediff mode needs --motion-module PATH (an AnimateDiff module)")
            if self.frames > MAX_BATCH or self.cadence != 1:
                raise AnimationError(
                    f"animatediff renders all frames in one sampler run: at most {MAX_BATCH} frames, "
                    "cadence 1"
                )
            if not 2 <= self.context <= 32 or not 0 <= self.overlap < self.context:
                raise AnimationError("--context must be 2..32 frames and --overlap 0..context-1")
        if self.motion_loras and self.mode != "animatediff":
            raise AnimationError("--motion-lora applies to --mode animatediff only")
        if len(self.motion_loras) > MAX_MOTION_LORAS:
            raise AnimationError(f"at most {MAX_MOTION_LORAS} motion LoRAs; got {len(self.motion_loras)}")
        return self

    def key_frames(self) -> list[int]:
        """The diffused frames: every `cadence`-th one and the last."""
        keys = list(range(0, self.frames, self.cadence))
        return keys if keys[-1] == self.frames - 1 else [*keys, self.frames - 1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"] = {str(k): v for k, v in self.prompts.items()}
        d["seeds"] = list(self.seeds)
        return d


@dataclass(frozen=True)
class FrameProgress:
    """Frame `frame` (0-based) of `frames` written; `step`/`total` of its sampler run when diffusing."""

    frame: int
    frames: int
    step: int = 0
    total: int = 0
    denoised: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (B, C, h, w) x0 estimate


class Renderer:
    """Renders one AnimationSpec with one Pipeline into a folder of frame_NNNNNN.png files."""

    def __init__(
        self, pipe: Pipeline, params: GenerationParams, spec: AnimationSpec, folder: Path, adapter=None
    ):
        self.pipe, self.spec, self.folder = pipe, spec.check(), Path(folder)
        if spec.mode == "animatediff" and adapter is None:
            from .animatediff import load_motion_adapter

            adapter = load_motion_adapter(spec.motion_module)
            if spec.motion_loras:
                from .motion_lora import apply_motion_loras, load_motion_lora

                loras = [(load_motion_lora(p), float(w)) for p, w in spec.motion_loras]
                apply_motion_loras(adapter, loras)
        self.adapter = adapter  # animatediff: a motion_module.MotionAdapter
        if params.seed < 0:
            params = params.replace(seed=random.randrange(2**32))
        self.params = params.validate(pipe.cfg.resolution, pipe.defaults)
        self.width, self.height = self.params.size(pipe.cfg.resolution)
        prompts = spec.prompts or {0: self.params.prompt}
        self.prompt_keys = list(prompts)
        self.prompts = [prompts[k] for k in self.prompt_keys]
        self._conds: list[tuple[dict, dict]] | None = None
        m = spec.motion
        self.sched = {f.name: parse_schedule(getattr(m, f.name), curve=spec.curve, name=f.name)
                      for f in dataclasses.fields(m) if f.name != "color_coherence"}  # fmt: skip

    # --- state on disk -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What decides the frames; a resumed render must match it exactly."""
        params = dataclasses.asdict(self.params)
        params["extras"] = {k: str(v) for k, v in params["extras"].items()}
        return {"spec": self.spec.to_dict(), "params": params, "model": self.pipe.loaded.name,
                "model_hash": self.pipe.model_hash}  # fmt: skip

    def _start(self, resume: bool) -> int:
        """Prepare the folder; return the key frame to start from (0 for a fresh render)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state_path = self.folder / STATE_FILE
        state = json.loads(json.dumps(self.state()))
        if resume and state_path.is_file():
            saved = json.loads(state_path.read_text())
            if saved != state:
                changed = sorted(k for k in state if saved.get(k) != state[k])
                raise AnimationError(
                    f"cannot resume {self.folder}: its render used other settings ({', '.join(changed)}); "
                    "run with the same settings, or without --resume into an empty folder"
                )
            done = 0
            while done < self.spec.frames and frame_path(self.folder, done).is_file():
                done += 1
            starts = [k for k in self.spec.key_frames() if k < done and self._latent_path(k).is_file()]
            return starts[-1] + 1 if starts else 0
        if any(self.folder.glob("frame_*.png")):
            raise AnimationError(
                f"{self.folder} already holds frames; pass --resume to continue that render, or choose an "
                "empty folder"
            )
        state_path.write_text(json.dumps(state, indent=2))
        return 0

    def _latent_path(self, frame: int) -> Path:
        return self.folder / f"key_{frame:06d}.safetensors"

    # --- conditioning ------------------------------------------------------------------------

    def conds_at(self, frame: int) -> tuple[dict, dict]:
        """The keyframed prompts' conditioning at `frame`, interpolated between keyframes."""
        if self._conds is None:
            self._conds = [self.pipe.encode(self.params.replace(prompt=p), self.width, self.height)
                           for p in self.prompts]  # fmt: skip
            lengths = {c[0]["context"].shape[1] for c in self._conds}
            if len(lengths) > 1:
                raise ScheduleError(
                    "keyframed prompts must encode to the same number of 75-token chunks; shorten the "
                    "longest or add BREAK to the others"
                )
        a, b, w = blend_weights(self.prompt_keys, frame, self.spec.curve)
        if w == 0.0:
            return self._conds[a]
        ca, cb = self._conds[a], self._conds[b]
        return tuple({k: torch.lerp(x[k], y[k], w) for k in x} for x, y in zip(ca, cb, strict=True))

    def prompt_at(self, frame: int) -> str:
        a, _, w = blend_weights(self.prompt_keys, frame, self.spec.curve)
        return self.prompts[a] if w < 0.5 else self.prompts[min(a + 1, len(self.prompts) - 1)]

    # --- frames ------------------------------------------------------------------------------

    def render(
        self,
        *,
        resume: bool = False,
        init_image: Image.Image | None = None,
        callback: Callable[[FrameProgress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Path]:
        """Render every frame; return their paths in order."""
        keys = self.spec.key_frames()
        start = self._start(resume)
        if self.spec.mode == "animatediff":
            return self._render_animatediff(start, callback, cancel)
        prev: tuple[int, torch.Tensor, Image.Image] | None = None  # (frame, latent, image) of last key
        first: Image.Image | None = None
        if start > 0:
            k = max(f for f in keys if f < start)
            prev = (k, load_file(self._latent_path(k))["latent"], Image.open(frame_path(self.folder, k)))
            first = Image.open(frame_path(self.folder, 0)).convert("RGB")
        for f in keys:
            if f < start:
                continue

            def report(p, _f=f) -> None:
                if callback is not None:
                    callback(FrameProgress(_f, self.spec.frames, p.step, p.total, p.denoised))

            latent, image, info = self.key_frame(f, prev, first, init_image, report, cancel)
            save_file({"latent": latent.contiguous()}, self._latent_path(f))
            if prev is not None:
                self._in_betweens(prev, (f, latent, image), callback)
            save_frame(image, self.folder, f, info)
            if callback is not None:
                callback(FrameProgress(f, self.spec.frames))
            prev = (f, latent, image)
            first = first or image
        return [frame_path(self.folder, i) for i in range(self.spec.frames)]

    def _render_animatediff(self, start: int, callback, cancel) -> list[Path]:
        """All frames in one sampler run of the inflated U-Net (a killed run restarts from frame 0)."""
        from .animatediff import inflate

        frames = self.spec.frames
        paths = [frame_path(self.folder, i) for i in range(frames)]
        if start > 0 and all(p.is_file() for p in paths):
            return paths
        per_frame = [self.conds_at(f) for f in range(frames)]
        conds = tuple({k: torch.cat([c[i][k] for c in per_frame]) for k in per_frame[0][i]} for i in range(2))
        params = self.params.replace(
            batch_size=frames, n_iter=1, extras={**self.params.extras, "Animation": "animatediff",
            "Motion module": Path(self.spec.motion_module).name, **self._lora_extras()},
        )  # fmt: skip

        def report(p) -> None:
            if callback is not None:
                callback(FrameProgress(0, frames, p.step, p.total, p.denoised))

        spec = self.spec
        with inflate(self.pipe, self.adapter, frames, context=spec.context, overlap=spec.overlap):
            result = self.pipe.generate(params, conds=conds, callback=report, cancel=cancel)
        for i, (image, info) in enumerate(zip(result.images, result.infotexts, strict=True)):
            save_frame(image, self.folder, i, info)
            if callback is not None:
                callback(FrameProgress(i, frames))
        return paths

    def _lora_extras(self) -> dict[str, str]:
        loras = self.spec.motion_loras
        if not loras:
            return {}
        return {"Motion LoRA": " ".join(f"{Path(p).name}:{float(w):g}" for p, w in loras)}

    def key_frame(self, f, prev, first, init_image, report, cancel) -> tuple[torch.Tensor, Image.Image, str]:
        """Diffuse key frame `f`: (latent (1, C, h, w), image, infotext)."""
        params = self.params.replace(
            prompt=self.prompt_at(f), extras={**self.params.extras, "Animation": self.spec.mode, "Frame": f}
        )
        kw: dict[str, Any] = {"conds": self.conds_at(f), "callback": report, "cancel": cancel}
        mode = self.spec.mode
        if mode == "seed":
            seeds = self.spec.seeds
            spots = [round(i * (self.spec.frames - 1) / (len(seeds) - 1)) for i in range(len(seeds))]
            a, b, w = blend_weights(spots, f, self.spec.curve)
            # A1111's variation seed: the initial noise is slerped from seed a to seed b; a stochastic
            # sampler's per-step noise stays seed a's, so a key frame exactly on seed b is seed b alone.
            a, w = (b, 0.0) if w >= 1.0 else (a, w)
            params = params.replace(seed=seeds[a], subseed=seeds[b], subseed_strength=w)
        elif mode == "motion":
            params = params.replace(seed=(self.params.seed + f) % 2**63)
            if prev is None and init_image is not None:
                strength = self.sched["strength"](0)
                kw["init_image"] = init_image.convert("RGB").resize((self.width, self.height))
                params = params.replace(denoising_strength=strength)
            elif prev is not None:
                kw["init_image"] = self._motion_input(f, prev, first)
                params = params.replace(denoising_strength=self.sched["strength"](f))
        result = self.pipe.generate(params, **kw)
        return result.latents[:1], result.images[0], result.infotexts[0]

    def _motion_input(
        self, f: int, prev: tuple[int, torch.Tensor, Image.Image], first: Image.Image
    ) -> Image.Image:
        """The previous key frame warped by every frame's motion up to `f`, colour-matched, noised."""
        img = prev[2].convert("RGB")
        s = self.sched
        for j in range(prev[0] + 1, f + 1):
            img = warp2d.warp(img, zoom=s["zoom"](j), angle=s["angle"](j),
                              tx=s["translation_x"](j), ty=s["translation_y"](j))  # fmt: skip
        if self.spec.motion.color_coherence == "lab":
            img = warp2d.match_colors(img, first)
        return warp2d.add_noise(img, s["noise"](f), seed=(self.params.seed + f) % 2**63)

    def _in_betweens(self, a, b, callback) -> None:
        """Frames strictly between key frames a and b, interpolated, written in order."""
        (fa, za, ia), (fb, zb, ib) = a, b
        for j in range(fa + 1, fb):
            t = (j - fa) / (fb - fa)
            if self.spec.interpolation == "slerp":
                image = self.pipe.decode(slerp(t, za, zb))[0]
            else:
                image = Image.blend(ia.convert("RGB"), ib.convert("RGB"), t)
            save_frame(image, self.folder, j, f"Interpolated frame {j} between key frames {fa} and {fb}")
            if callback is not None:
                callback(FrameProgress(j, self.spec.frames))
