"""Pictures of a training run: loss curves and sample grids, drawn with Pillow (no plotting library)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_COLORS = ((220, 60, 60), (60, 110, 220), (40, 160, 80), (200, 140, 20))


def loss_curve_png(
    curves: dict[str, Sequence[tuple[int, float]]], path: str | Path, size: tuple[int, int] = (720, 420)
) -> Path:
    """One panel per curve: log10(loss) against step, with min/max labels."""
    w, h = size
    panels = [(name, pts) for name, pts in curves.items() if pts]
    img = Image.new("RGB", (w, h * max(1, len(panels))), "white")
    draw = ImageDraw.Draw(img)
    for row, (name, pts) in enumerate(panels):
        top, left, right, bottom = row * h + 30, 60, w - 20, (row + 1) * h - 30
        steps = [s for s, _ in pts]
        logs = [math.log10(max(v, 1e-12)) for _, v in pts]
        lo, hi = min(logs), max(logs)
        span_y, span_x = (hi - lo) or 1.0, (max(steps) - min(steps)) or 1

        first = min(steps)
        points = [
            (left + (s - first) / span_x * (right - left), bottom - (v - lo) / span_y * (bottom - top))
            for s, v in zip(steps, logs, strict=True)
        ]
        draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        draw.line(points, fill=_COLORS[row % 4], width=2)
        draw.text((left, top - 20), f"{name}: loss (log scale) vs step", fill="black")
        draw.text((4, top), f"{10**hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{10**lo:.3g}", fill="black")
        draw.text((right - 60, bottom + 6), f"step {max(steps)}", fill="black")
    img.save(path)
    return Path(path)


def image_grid(
    images: Sequence[Image.Image], captions: Sequence[str], cols: int, scale: int = 2
) -> Image.Image:
    """Images (upscaled by `scale`, nearest) in a grid, each with its caption underneath."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    cw, ch = w * scale, h * scale + 26
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * cw, rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * cw, (i // cols) * ch
        grid.paste(im.resize((cw, h * scale), Image.Resampling.NEAREST), (x, y))
        words, lines = cap.split(), [""]
        for word in words:  # wrap to the cell width (about 6 px per character)
            if len(lines[-1]) + len(word) + 1 > cw // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.text((x + 2, y + h * scale + 1), "\n".join(lines[:2]), fill="black")
    return grid
