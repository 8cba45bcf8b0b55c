"""Deforum-style 2D motion between frames: an affine warp (zoom, angle, translation) with replicated
borders, and colour coherence by matching each LAB channel's histogram to a reference frame."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import images


def warp(
    image: Image.Image, *, zoom: float = 1.0, angle: float = 0.0, tx: float = 0.0, ty: float = 0.0
) -> Image.Image:
    """Zoom by `zoom` (>1 moves in) and rotate by `angle` degrees (counter-clockwise) about the centre,
    then shift the content by (tx, ty) pixels; pixels pulled from outside repeat the border."""
    if not (math.isfinite(zoom) and zoom > 0):
        raise ValueError(f"zoom must be a positive number; got {zoom}")
    w, h = image.size
    x = images.to_tensor(image.convert("RGB"))  # (1, 3, H, W) in [-1, 1]
    a = math.radians(angle)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    # output pixel (u, v) in normalised coords samples the input at R(-angle)/zoom (u - t) (aspect-aware)
    theta = torch.tensor(
        [
            [cos, sin * h / w, -(cos * tx * 2 / w + sin * ty * 2 / w)],
            [-sin * w / h, cos, -(-sin * tx * 2 / h + cos * ty * 2 / h)],
        ],
        dtype=torch.float32,
    )[None]  # (1, 2, 3)
    grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return images.to_pil(out)[0]


def add_noise(image: Image.Image, amount: float, seed: int) -> Image.Image:
    """Add Gaussian pixel noise of standard deviation `amount` (in [0, 1] image units), seeded."""
    if amount <= 0:
        return image
    g = torch.Generator("cpu").manual_seed(seed)
    x = images.to_tensor(image.convert("RGB"))  # (1, 3, H, W) in [-1, 1]
    x = x + 2 * amount * torch.randn(x.shape, generator=g)
    return images.to_pil(x.clamp(-1, 1))[0]


# sRGB D65 -> XYZ and back (IEC 61966-2-1)
_M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]])  # fmt: skip
_M_INV = np.linalg.inv(_M)
_WHITE = _M @ np.ones(3)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W, 3) float CIE L*a*b* (D65)."""
    c = rgb.astype(np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) float L*a*b* -> (H, W, 3) uint8 sRGB (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.clip(xyz @ _M_INV.T, 0, 1)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(np.round(c * 255), 0, 255).astype(np.uint8)


def _match_channel(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map `source` values so their distribution follows `reference`'s (quantile matching)."""
    src_values, src_idx, src_counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(reference.ravel(), return_counts=True)
    src_q = np.cumsum(src_counts) / source.size
    ref_q = np.cumsum(ref_counts) / reference.size
    return np.interp(src_q, ref_q, ref_values)[src_idx].reshape(source.shape)


def match_colors(image: Image.Image, reference: Image.Image) -> Image.Image:
    """Colour coherence: match each LAB channel's histogram of `image` to `reference`'s."""
    src = rgb_to_lab(np.asarray(image.convert("RGB")))
    ref = rgb_to_lab(np.asarray(reference.convert("RGB")))
    out = np.stack([_match_channel(src[..., c], ref[..., c]) for c in range(3)], -1)
    return Image.fromarray(lab_to_rgb(out), "RGB")
