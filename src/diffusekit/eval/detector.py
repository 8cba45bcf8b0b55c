"""A deterministic, numpy-only detector that reads colored shapes back from pixels.

Pipeline: estimate the background from the image border; unmix every pixel as `bg + alpha * (color - bg)`
against each palette color and call it foreground where the best fit has alpha >= 0.5 (so anti-aliased
edges fall on the right side and never form rings of a wrong color); label 8-connected components and drop
specks; name each component's color from the median of its most opaque pixels (nearest palette color in
CIELAB) and its shape by fitting every ideal outline, blurred, to its soft coverage (`fit_shapes`), which
keeps working on the soft edges a small generative model draws.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffusekit.data.shapes import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    ShapesDataset,
    shape_polygon,
)

ALPHA_THRESHOLD = 0.5  # unmixed opacity at which a pixel counts as part of an object
MIN_AREA = 0.004  # components smaller than this fraction of the image are specks
CENTER_TOLERANCE = 0.06  # fraction of the image side a detected center may be off from the truth
WINDOW_PAD = 3  # pixels of context around a component for the shape fit
RASTER_GROWTH = 0.5  # Pillow's polygon fill reaches about half a (supersampled) pixel beyond the outline


@dataclass(frozen=True)
class DetectedObject:
    """One object read from pixels, with how well its shape and color fit (lower error is better)."""

    shape: str
    color: str
    center: tuple[float, float]  # center of the fitted shape's box, in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of its pixel mask, x1/y1 exclusive
    area: int  # pixels in its mask
    extent: float  # largest side of the fitted shape, in pixels
    blur: float  # fitted Gaussian blur sigma, in pixels
    shape_error: float  # L1 coverage misfit per unit mass of the chosen shape
    shape_margin: float  # runner-up shape's error minus the chosen one's: small means ambiguous
    color_error: float  # CIELAB distance of its core color to the chosen palette color


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
        [
            arr[:r].reshape(-1, 3),
            arr[-r:].reshape(-1, 3),
            arr[:, :r].reshape(-1, 3),
            arr[:, -r:].reshape(-1, 3),
        ]
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


def polygon_moments(points: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, centroid (x, y) and central second moments (var_x, var_y) of a simple polygon."""
    x, y = points[:, 0], points[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cx = ((x + xn) * cross).sum() / (6 * area)
    cy = ((y + yn) * cross).sum() / (6 * area)
    exx = ((x * x + x * xn + xn * xn) * cross).sum() / (12 * area)
    eyy = ((y * y + y * yn + yn * yn) * cross).sum() / (12 * area)
    return float(abs(area)), float(cx), float(cy), float(exx - cx * cx), float(eyy - cy * cy)


@lru_cache(maxsize=4)
def _unit_moments(
    shapes: tuple[str, ...] = SHAPES,
) -> dict[str, tuple[float, float, float, float, float, float]]:
    """polygon_moments and perimeter of each shape at extent 1 centered on 0."""
    out = {}
    for s in shapes:
        pts = shape_polygon(s, (0.0, 0.0), 1.0)
        perimeter = float(np.linalg.norm(pts - np.roll(pts, -1, axis=0), axis=1).sum())
        out[s] = (*polygon_moments(pts), perimeter)
    return out


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalized Gaussian blur along one axis (identity for sigma ~ 0)."""
    if sigma < 0.05:
        return np.eye(n)
    i = np.arange(n, dtype=np.float64)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return g / g.sum(axis=1, keepdims=True)


def render_coverage(
    shape: str, center: tuple[float, float], extent: float, hw: tuple[int, int], supersample: int = 4
) -> np.ndarray:
    """(h, w) pixel coverage in [0, 1] of an ideal shape, rendered like the data generator renders it."""
    h, w = hw
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    pts = shape_polygon(shape, center, extent) * supersample
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in pts], fill=255)
    return np.asarray(canvas.reduce(supersample), dtype=np.float64) / 255.0


@dataclass(frozen=True)
class ShapeFit:
    """One shape hypothesis fitted to a coverage window: center/extent in window pixels, blur sigma."""

    shape: str
    error: float
    center: tuple[float, float]
    extent: float
    sigma: float


def fit_shapes(coverage: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> list[ShapeFit]:
    """Every shape of `shapes` fitted to a single object's coverage window, best (lowest error) first.

    Mass and centroid are unchanged by blur, so for each shape they fix its extent and position; the excess
    of the observed second moments over the sharp shape's gives the blur. The error is the L1 difference
    between observed and rendered, blurred coverage (at that blur and a few nearby ones) per unit mass.
    """
    h, w = coverage.shape
    mass = float(coverage.sum())
    if mass <= 0:
        raise ValueError("cannot fit a shape to an empty coverage window")
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (coverage * xs).sum() / mass, (coverage * ys).sum() / mass
    vx = (coverage * (xs - cx) ** 2).sum() / mass
    vy = (coverage * (ys - cy) ** 2).sum() / mass
    fits = []
    grow = RASTER_GROWTH / 4  # the renders below and the data generator both supersample 4x
    for shape, (area, ox, oy, kx, ky, perimeter) in _unit_moments(tuple(shapes)).items():
        # mass = area * e^2 + perimeter * e * grow: the rasterizer fills a thin band outside the outline.
        b = perimeter * grow
        extent = (-b + math.sqrt(b * b + 4 * area * mass)) / (2 * area)
        sigma0 = math.sqrt(max(0.0, 0.5 * ((vx - kx * extent**2) + (vy - ky * extent**2))))
        center = (float(cx - ox * extent), float(cy - oy * extent))
        sharp = render_coverage(shape, center, extent, (h, w))
        best = (math.inf, sigma0)
        for sigma in sorted({sigma0, 0.6 * sigma0, 1.4 * sigma0, sigma0 + 0.5, max(0.0, sigma0 - 0.5)}):
            model = _gaussian_matrix(h, sigma) @ sharp @ _gaussian_matrix(w, sigma).T
            best = min(best, (float(np.abs(model - coverage).sum()) / mass, sigma))
        fits.append(ShapeFit(shape, best[0], center, extent, best[1]))
    return sorted(fits, key=lambda f: f.error)


def classify_color(rgb: np.ndarray) -> tuple[str, float]:
    """The palette color nearest (CIELAB distance) to an sRGB triple, and that distance."""
    dist = np.sqrt(((_PALETTE_LAB - srgb_to_lab(rgb)) ** 2).sum(-1))
    k = int(np.argmin(dist))
    return _COLOR_NAMES[k], float(dist[k])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return mask


def detect(image: Image.Image | np.ndarray, shapes: Sequence[str] = SHAPES) -> list[DetectedObject]:
    """All objects in an image, ordered top-to-bottom then left-to-right by center; each object is named
    the best-fitting of `shapes` (the default model's SHAPES; add EXTRA_SHAPES to read new concepts)."""
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or len(shapes) < 2:
        raise ValueError(
            f"detector shapes must be at least two of {', '.join(ALL_SHAPES)}; got {list(shapes)}"
        )
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
        color, color_err = classify_color(np.median(arr[mask][a >= np.median(a)], axis=0))
        # Soft coverage of this object alone: its opacity relative to its own core, near it, others removed.
        region = _dilate(mask, 2) & ~((labels > 0) & (labels != k))
        cov = np.where(region, np.clip(alpha / max(0.5, float(np.percentile(a, 75))), 0.0, 1.0), 0.0)
        cov[cov < 0.1] = 0.0
        wy0, wx0 = max(0, y0 - WINDOW_PAD), max(0, x0 - WINDOW_PAD)
        fits = fit_shapes(cov[wy0 : min(h, y1 + WINDOW_PAD), wx0 : min(w, x1 + WINDOW_PAD)], tuple(shapes))
        best = fits[0]
        center = (best.center[0] + wx0, best.center[1] + wy0)
        margin = fits[1].error - best.error
        found.append(
            DetectedObject(
                best.shape,
                color,
                center,
                (x0, y0, x1, y1),
                area,
                best.extent,
                best.sigma,
                best.error,
                margin,
                color_err,
            )
        )
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
        free.remove(
            min(hits, key=lambda d: abs(d.center[0] - obj.center[0]) + abs(d.center[1] - obj.center[1]))
        )
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
