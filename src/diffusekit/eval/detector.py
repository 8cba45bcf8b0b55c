"""A deterministic, numpy-only detector that reads colored shapes back from pixels.

Pipeline: estimate the background from the image border; unmix every pixel as `bg + alpha * (color - bg)`
against each palette color and call it foreground where the best fit has alpha >= 0.5 (so anti-aliased
edges fall on the right side and never form rings of a wrong color); label 8-connected components and drop
specks; name each component's color from the median of its most opaque pixels (nearest palette color in
CIELAB) and its shape by matching its box-normalized mask against templates of the ideal outlines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffusekit.data.shapes import BACKGROUNDS, COLORS, SHAPES, Scene, ShapesDataset, shape_polygon

TEMPLATE_SIDE = 16  # side of the box-normalized masks compared with the shape templates
ALPHA_THRESHOLD = 0.5  # unmixed opacity at which a pixel counts as part of an object
MIN_AREA = 0.004  # components smaller than this fraction of the image are specks
CENTER_TOLERANCE = 0.06  # fraction of the image side a detected center may be off from the truth


@dataclass(frozen=True)
class DetectedObject:
    """One object read from pixels; center/bbox in pixels, bbox as (x0, y0, x1, y1) exclusive."""

    shape: str
    color: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    shape_error: float
    color_error: float


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {arr.shape}")
    if min(arr.shape[:2]) < 8:
        raise ValueError(f"image of size {arr.shape[1]}x{arr.shape[0]} is too small to read (at least 8x8)")
    return arr


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, any leading shape."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64)
_PALETTE_LAB = srgb_to_lab(_PALETTE)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_LAB = srgb_to_lab(np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64))


def estimate_background(arr: np.ndarray) -> np.ndarray:
    """The background color: per-channel median of a border ring (objects keep off the border)."""
    h, w = arr.shape[:2]
    r = max(1, min(h, w) // 32)
    ring = np.concatenate(
        [arr[:r].reshape(-1, 3), arr[-r:].reshape(-1, 3), arr[:, :r].reshape(-1, 3), arr[:, -r:].reshape(-1, 3)]
    )
    return np.median(ring, axis=0)


def background_name(image: Image.Image | np.ndarray) -> str:
    """The nearest named background color (CIELAB) of an image."""
    lab = srgb_to_lab(estimate_background(_as_array(image)))
    return _BG_NAMES[int(np.argmin(((_BG_LAB - lab) ** 2).sum(-1)))]


def foreground_alpha(arr: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per-pixel opacity of the best-fitting palette color over `bg` (the unmixing of each pixel)."""
    d = arr - bg  # (H, W, 3)
    v = _PALETTE - bg  # (K, 3)
    norm2 = np.maximum((v**2).sum(-1), 1e-6)
    alpha = np.clip(d @ v.T / norm2, 0.0, 1.0)  # (H, W, K)
    resid = ((d[..., None, :] - alpha[..., None] * v) ** 2).sum(-1)
    best = np.argmin(resid, axis=-1)
    return np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels (0 = none, 1..n) of a boolean mask, numbered in raster order of first pixel."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = lab
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nb = np.minimum(nb, p[dy : dy + h, dx : dx + w])
        new = np.where(mask, nb, big)
        # Pointer jumping: follow each label to the label of the pixel it names, which speeds convergence.
        flat = new.ravel()
        ok = flat < big
        flat[ok] = np.minimum(flat[ok], flat[flat[ok] - 1])
        if np.array_equal(new, lab):
            break
        lab = new
    labels = np.zeros((h, w), dtype=np.int64)
    roots = np.unique(lab[mask])
    labels[mask] = np.searchsorted(roots, lab[mask]) + 1
    return labels, len(roots)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging input cells over each of n_out equal output cells."""
    edges_out = np.linspace(0.0, n_in, n_out + 1)
    lo = np.maximum(edges_out[:-1, None], np.arange(n_in)[None, :])
    hi = np.minimum(edges_out[1:, None], np.arange(n_in)[None, :] + 1)
    return np.clip(hi - lo, 0.0, None) / (n_in / n_out)


def normalized_mask(mask: np.ndarray, side: int = TEMPLATE_SIDE) -> np.ndarray:
    """A boolean mask cropped to its box and area-resampled to side x side coverage in [0, 1]."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("cannot normalize an empty mask")
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float64)
    return _area_matrix(crop.shape[0], side) @ crop @ _area_matrix(crop.shape[1], side).T


@lru_cache(maxsize=4)
def shape_templates(side: int = TEMPLATE_SIDE) -> np.ndarray:
    """(len(SHAPES), side, side) coverage templates of each ideal outline, box-normalized."""
    big = 256
    out = []
    for shape in SHAPES:
        canvas = Image.new("L", (big + 8, big + 8), 0)
        pts = shape_polygon(shape, ((big + 8) / 2, (big + 8) / 2), big)
        ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in pts], fill=255)
        out.append(normalized_mask(np.asarray(canvas) >= 128, side))
    return np.stack(out)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The template shape nearest to a component mask, and the mean absolute coverage difference."""
    norm = normalized_mask(mask)
    errs = np.abs(shape_templates() - norm[None]).mean(axis=(1, 2))
    k = int(np.argmin(errs))
    return SHAPES[k], float(errs[k])


def classify_color(rgb: np.ndarray) -> tuple[str, float]:
    """The palette color nearest (CIELAB distance) to an sRGB triple, and that distance."""
    dist = np.sqrt(((_PALETTE_LAB - srgb_to_lab(rgb)) ** 2).sum(-1))
    k = int(np.argmin(dist))
    return _COLOR_NAMES[k], float(dist[k])


def detect(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    """All objects in an image, ordered top-to-bottom then left-to-right by center."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    bg = estimate_background(arr)
    alpha = foreground_alpha(arr, bg)
    labels, n = label_components(alpha >= ALPHA_THRESHOLD)
    min_area = max(4, int(MIN_AREA * h * w))
    found = []
    for k in range(1, n + 1):
        mask = labels == k
        area = int(mask.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        a = alpha[mask]
        core = arr[mask][a >= np.median(a)]
        color, color_err = classify_color(np.median(core, axis=0))
        shape, shape_err = classify_shape(mask)
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        found.append(DetectedObject(shape, color, center, (x0, y0, x1, y1), area, shape_err, color_err))
    found.sort(key=lambda o: (round(o.center[1]), o.center[0]))
    return found


def describe(image: Image.Image | np.ndarray) -> str:
    """A one-line-per-object human-readable account of what the detector sees (for debugging)."""
    arr = _as_array(image)
    objs = detect(arr)
    lines = [f"{arr.shape[1]}x{arr.shape[0]} image, {background_name(arr)} background, {len(objs)} object(s)"]
    for o in objs:
        lines.append(
            f"  {o.color} {o.shape} at ({o.center[0]:.1f}, {o.center[1]:.1f}) box {o.bbox} area {o.area}"
            f" (shape err {o.shape_error:.3f}, color err {o.color_error:.1f})"
        )
    return "\n".join(lines)


def compare_to_scene(detections: Sequence[DetectedObject], scene: Scene) -> list[str]:
    """Differences between detections and the true scene; empty when every object is read correctly."""
    problems = []
    if len(detections) != len(scene.objects):
        problems.append(f"{len(detections)} objects detected, {len(scene.objects)} in the scene")
    tol = CENTER_TOLERANCE * scene.size
    free = list(detections)
    for obj in scene.objects:
        hits = [
            d
            for d in free
            if d.shape == obj.shape
            and d.color == obj.color
            and max(abs(d.center[0] - obj.center[0]), abs(d.center[1] - obj.center[1])) <= tol
        ]
        if not hits:
            problems.append(f"missed {obj.color} {obj.shape} at ({obj.center[0]:.1f}, {obj.center[1]:.1f})")
            continue
        free.remove(min(hits, key=lambda d: abs(d.center[0] - obj.center[0]) + abs(d.center[1] - obj.center[1])))
    problems.extend(f"spurious {d.color} {d.shape} at ({d.center[0]:.1f}, {d.center[1]:.1f})" for d in free)
    return problems


@dataclass(frozen=True)
class AccuracyReport:
    """Share of ground-truth images whose every object was read correctly, with the failures."""

    accuracy: float
    n_images: int
    failures: tuple[tuple[int, str, tuple[str, ...]], ...]


def measure_accuracy(n: int = 500, seed: int = 0, size: int = 64, split: str = "train") -> AccuracyReport:
    """Detector accuracy on the first `n` images of ShapesDataset(seed, size, split)."""
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    ds = ShapesDataset(seed, size, n, split)
    failures = []
    for i in range(n):
        sample = ds[i]
        problems = compare_to_scene(detect(sample.image), sample.scene)
        if problems:
            failures.append((i, sample.caption, tuple(problems)))
    return AccuracyReport(1.0 - len(failures) / n, n, tuple(failures))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: report detector accuracy on ground-truth images."""
    ap = argparse.ArgumentParser(description="Detector accuracy on ground-truth shape images.")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--split", default="train", choices=["train", "heldout"])
    args = ap.parse_args(argv)
    rep = measure_accuracy(args.n, args.seed, args.size, args.split)
    print(f"detector accuracy: {rep.accuracy:.4f} on {rep.n_images} images (size {args.size}, {args.split})")
    for i, caption, problems in rep.failures:
        print(f"  #{i} {caption!r}: {'; '.join(problems)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
