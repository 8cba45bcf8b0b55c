"""Keyframe schedules, Deforum-style: ``"0: (1.0), 30: (1.02)"`` -> one value per frame.

Values between keyframes follow a curve (linear by default); before the first keyframe the first value
holds, after the last the last value holds. A plain number is a constant schedule. Errors name the
character position of what is wrong and what is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# t in [0, 1] -> eased t in [0, 1]
CURVES: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "ease-in": lambda t: t * t,
    "ease-out": lambda t: 1 - (1 - t) * (1 - t),
    "ease-in-out": lambda t: 0.5 - 0.5 * math.cos(math.pi * t),
    "step": lambda t: 0.0,
}


class ScheduleError(ValueError):
    """A keyframe schedule that cannot be parsed; the message names the position and the valid syntax."""


SYNTAX = 'keyframes "FRAME: (VALUE), FRAME: (VALUE)" e.g. "0: (1.0), 30: (1.02)", or a plain number'
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ENTRY = re.compile(rf"\s*(\d+)\s*:\s*\(?\s*({_NUMBER})\s*\)?\s*(?:,|$)")
MAX_KEYFRAME = 1_000_000


@dataclass(frozen=True)
class Schedule:
    """Keyframes (frame -> value), sorted, and the curve used between them."""

    keyframes: tuple[tuple[int, float], ...]
    curve: str = "linear"

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise ScheduleError(f"a schedule needs at least one keyframe; valid: {SYNTAX}")
        if self.curve not in CURVES:
            raise ScheduleError(f"unknown curve {self.curve!r}; valid: {', '.join(CURVES)}")

    def __call__(self, frame: int) -> float:
        """The value at `frame`; before the first keyframe its value holds, after the last the last."""
        keys = self.keyframes
        if frame <= keys[0][0]:
            return keys[0][1]
        for (f0, v0), (f1, v1) in zip(keys, keys[1:], strict=False):
            if f0 <= frame <= f1:
                t = CURVES[self.curve]((frame - f0) / (f1 - f0))
                return v0 + (v1 - v0) * t
        return keys[-1][1]

    def values(self, frames: int) -> list[float]:
        return [self(i) for i in range(frames)]


def parse_schedule(text: str | float | int, *, curve: str = "linear", name: str = "schedule") -> Schedule:
    """Parse ``"0: (1.0), 30: (1.02)"`` or a plain number; `name` (e.g. the option) appears in errors."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return Schedule(((0, _finite(float(text), name, 0)),), curve)
    if not isinstance(text, str):
        raise ScheduleError(f"{name}: expected a string or a number, got {type(text).__name__}; {SYNTAX}")
    stripped = text.strip()
    if re.fullmatch(_NUMBER, stripped):
        return Schedule(((0, _finite(float(stripped), name, 0)),), curve)
    pos, keys = 0, {}
    while pos < len(text):
        if not text[pos:].strip():
            break
        pos += len(text[pos:]) - len(text[pos:].lstrip())  # errors point at the first non-space
        m = _ENTRY.match(text, pos)
        if m is None:
            bad = text[pos:].strip()[:20]
            raise ScheduleError(f"{name}: cannot parse at character {pos + 1} ({bad!r}); valid: {SYNTAX}")
        frame = int(m.group(1))
        if frame > MAX_KEYFRAME:
            raise ScheduleError(f"{name}: keyframe {frame} at character {pos + 1} is above {MAX_KEYFRAME}")
        if frame in keys:
            raise ScheduleError(f"{name}: keyframe {frame} appears twice (character {pos + 1})")
        keys[frame] = _finite(float(m.group(2)), name, pos)
        pos = m.end()
    if not keys:
        raise ScheduleError(f"{name}: empty schedule; valid: {SYNTAX}")
    return Schedule(tuple(sorted(keys.items())), curve)


def parse_prompts(
    prompts: Mapping[str, str] | Mapping[int, str], *, name: str = "--prompts"
) -> dict[int, str]:
    """Keyframed prompts ``{"0": "...", "24": "..."}`` -> {frame: prompt}, sorted, checked."""
    if not isinstance(prompts, Mapping) or not prompts:
        raise ScheduleError(
            f'{name}: expected a JSON object of frame -> prompt, e.g. {{"0": "a", "24": "b"}}'
        )
    out: dict[int, str] = {}
    for key, prompt in prompts.items():
        try:
            frame = int(key)
        except (TypeError, ValueError):
            raise ScheduleError(f"{name}: keyframe {key!r} is not a frame number (0, 1, 2, ...)") from None
        if frame < 0 or frame > MAX_KEYFRAME:
            raise ScheduleError(f"{name}: keyframe {frame} is outside 0..{MAX_KEYFRAME}")
        if not isinstance(prompt, str):
            raise ScheduleError(f"{name}: the prompt of keyframe {frame} must be a string")
        out[frame] = prompt
    return dict(sorted(out.items()))


def blend_weights(keys: list[int], frame: int, curve: str = "linear") -> tuple[int, int, float]:
    """For keyframes `keys` (sorted): (index a, index b, weight of b) describing `frame` between them."""
    if frame <= keys[0]:
        return 0, 0, 0.0
    for i in range(len(keys) - 1):
        if keys[i] <= frame <= keys[i + 1]:
            return i, i + 1, CURVES[curve]((frame - keys[i]) / (keys[i + 1] - keys[i]))
    last = len(keys) - 1
    return last, last, 0.0


def _finite(value: float, name: str, pos: int) -> float:
    if not math.isfinite(value):
        raise ScheduleError(f"{name}: value at character {pos + 1} is not a finite number")
    return value
